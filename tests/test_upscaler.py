"""Upscaler end to end on a hand-built nearest-neighbour bundle (exact), and on the tiny exported bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.nearest_bundle import build_nearest_bundle, router_classes
from wbsr_runtime.manifest import BundleError
from wbsr_runtime.tiling import plan_tiles, route_boxes
from wbsr_runtime.upscaler import FrameTooLarge, Upscaler, default_bundle

SIZES = [(1, 1), (1, 5), (7, 2), (8, 8), (13, 21), (33, 17)]


@pytest.fixture(scope="module")
def nn_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_nearest_bundle(tmp_path_factory.mktemp("nn") / "b", scale=2, gains=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def gain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_nearest_bundle(tmp_path_factory.mktemp("gain") / "b", scale=3, gains=(1.0, 2.0, 3.0))


def hwc_nearest(img: np.ndarray, s: int) -> np.ndarray:
    return np.repeat(np.repeat(img, s, axis=0), s, axis=1)


def image(h: int, w: int, dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is np.float32:
        return rng.random((h, w, 3), dtype=np.float32)
    return rng.integers(0, np.iinfo(dtype).max, (h, w, 3), endpoint=True).astype(dtype)


@pytest.mark.parametrize("mode", ["dynamic", "full", "whole"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_nearest_stand_in_gives_nearest_upscaling_exactly(nn_bundle: Path, mode: str, dtype: type) -> None:
    with Upscaler(nn_bundle, backend="ort", mode=mode, workers=2, chunk=3) as up:
        for h, w in SIZES:
            img = image(h, w, dtype, seed=h * w)
            out = up.upscale(img)
            assert out.dtype == img.dtype and out.shape == (2 * h, 2 * w, 3)
            np.testing.assert_array_equal(out, hwc_nearest(img, 2))
            stats = up.last_stats
            assert sum(stats.patches_per_subnet) == (1 if mode == "whole" else len(stats.boxes))


@pytest.mark.parametrize("merge", [0, 1, 4])
@pytest.mark.parametrize("patch,overlap", [(8, 2), (5, 0), (16, 3)])
def test_each_tile_runs_the_subnet_its_class_maps_to(gain_bundle: Path, patch: int, overlap: int, merge: int) -> None:
    img = image(29, 23, np.float32) * np.float32(0.3)  # gain <= 3 keeps the output in [0, 1]: no clamping
    with Upscaler(gain_bundle, backend="ort", patch=patch, overlap=overlap, merge=merge) as up:
        out = up.upscale(img)
        plan = plan_tiles(29, 23, patch, overlap)
        subnets = up.class_map[router_classes(route_boxes(plan), 4) - 1]
        np.testing.assert_array_equal(up.last_stats.subnets, subnets)
        expected = np.empty_like(hwc_nearest(img, 3))
        for (y0, x0, y1, x1), m in zip(plan.owned * 3, subnets, strict=True):
            expected[y0:y1, x0:x1] = hwc_nearest(img, 3)[y0:y1, x0:x1] * np.float32(m + 1)
        np.testing.assert_array_equal(out, expected)
        stats = up.last_stats
        per_pixel = np.array([1024 * (m + 1) ** 2 / 32**2 for m in range(3)])
        unmerged = per_pixel[subnets].sum() * (patch + 2 * overlap) ** 2
        if merge == 0:
            assert stats.flops == pytest.approx(unmerged) and stats.windows == plan.num_tiles
        else:  # fewer context pixels, never more
            assert stats.flops < unmerged and stats.windows <= plan.num_tiles
        assert stats.flops_full == pytest.approx(29 * 23 * per_pixel[2])
        assert stats.as_dict()["flops_ratio"] == pytest.approx(stats.flops / stats.flops_full)


def test_full_mode_merges_into_whole_frame_windows(nn_bundle: Path, monkeypatch) -> None:
    img = image(29, 23, np.uint8)
    with Upscaler(nn_bundle, backend="ort", mode="full", patch=8, overlap=2, merge=4) as up:
        np.testing.assert_array_equal(up.upscale(img), hwc_nearest(img, 2))
        assert up.last_stats.windows == 1 and up.last_stats.flops_ratio == pytest.approx(1.0)
    with Upscaler(nn_bundle, backend="ort", mode="full", patch=8, overlap=2, merge=0) as up:
        up.upscale(img)
        assert up.last_stats.windows == 12 and up.last_stats.flops_ratio > 1.5

    from wbsr_runtime.backends import base

    init = base.Runner.__init__

    def fixed_profile(self, *args, **kwargs):  # a backend that takes one tile size only, as TensorRT engines
        init(self, *args, **kwargs)
        self.fixed_tiles = True

    monkeypatch.setattr(base.Runner, "__init__", fixed_profile)
    with Upscaler(nn_bundle, backend="ort", mode="full", patch=8, overlap=2, merge=4) as up:
        assert up.merge == 0
        np.testing.assert_array_equal(up.upscale(img), hwc_nearest(img, 2))
        assert up.last_stats.windows == 12


def test_tolerance_and_budget_rederive_the_map(gain_bundle: Path, tmp_path: Path) -> None:
    with Upscaler(gain_bundle, backend="ort", tolerance=0.0) as up:
        assert up.class_map.tolist() == [0, 2, 2, 2]  # table rises with cost for classes > 1
    with Upscaler(gain_bundle, backend="ort", tolerance=10.0) as up:
        assert up.class_map.tolist() == [0, 0, 0, 0]
    with Upscaler(gain_bundle, backend="ort", budget=1 / 9) as up:
        assert up.class_map.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="not both"):
        Upscaler(gain_bundle, backend="ort", tolerance=0.1, budget=0.5)
    bare = build_nearest_bundle(tmp_path / "bare", psnr_table=False)
    with pytest.raises(BundleError, match="psnr_table"):
        Upscaler(bare, backend="ort", tolerance=0.1)


def test_measured_costs_rank_the_subnets(gain_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from wbsr_runtime import upscaler as upscaler_mod

    with Upscaler(gain_bundle, backend="ort") as up:
        costs = upscaler_mod.measure_costs(up.runners[0], 20)
        assert costs.shape == (3,) and (costs > 0).all()
    # A machine where the full subnet is the fastest: every class takes it, whatever the tolerance.
    monkeypatch.setattr(upscaler_mod, "measure_costs", lambda runner, size: np.array([3.0, 2.0, 1.0]))
    for knob in ({"tolerance": 10.0}, {"budget": 0.5}):
        with Upscaler(gain_bundle, backend="ort", cost="measured", **knob) as up:
            assert up.class_map.tolist() == [2, 2, 2, 2] and up.costs.tolist() == [3.0, 2.0, 1.0]
    with pytest.raises(BundleError, match="no calibration tolerance"):
        Upscaler(gain_bundle, backend="ort", cost="measured")  # and no tolerance given
    calibrated = shutil.copytree(gain_bundle, tmp_path / "calibrated")
    manifest = json.loads((calibrated / "manifest.json").read_text())
    manifest["routing"]["tolerance_db"] = 10.0  # manifest.json itself is not hashed
    (calibrated / "manifest.json").write_text(json.dumps(manifest))
    with Upscaler(calibrated, backend="ort") as up:
        assert up.class_map.tolist() == manifest["routing"]["class_to_subnet"]  # FLOPs: the bundle's map
    with Upscaler(calibrated, backend="ort", cost="measured") as up:
        assert up.class_map.tolist() == [2, 2, 2, 2]  # re-derived at the bundle's tolerance
    with pytest.raises(ValueError, match="cost"):
        Upscaler(gain_bundle, backend="ort", cost="seconds")
    bare = build_nearest_bundle(tmp_path / "bare", psnr_table=False)
    with pytest.raises(BundleError, match="psnr_table"):
        Upscaler(bare, backend="ort", cost="measured")


def test_bad_inputs_are_refused_with_clear_errors(nn_bundle: Path) -> None:
    with Upscaler(nn_bundle, backend="ort", max_pixels=100) as up:
        with pytest.raises(FrameTooLarge, match="max_pixels"):
            up.upscale(np.zeros((11, 10, 3), np.uint8))
        for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.int32)):
            with pytest.raises(ValueError):
                up.upscale(bad)
    with pytest.raises(ValueError, match="mode"):
        Upscaler(nn_bundle, backend="ort", mode="fast")
    with pytest.raises(BundleError, match="--bundle"):
        default_bundle(7)


def test_threads_share_one_upscaler(nn_bundle: Path) -> None:
    images = [image(17 + i, 9 + 2 * i, np.uint8, seed=i) for i in range(6)]
    results: dict[int, np.ndarray] = {}
    with Upscaler(nn_bundle, backend="ort") as up:

        def work(i: int) -> None:
            for _ in range(3):
                results[i] = up.upscale(images[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, img in enumerate(images):
        np.testing.assert_array_equal(results[i], hwc_nearest(img, 2))


def test_runtime_works_without_torch(nn_bundle: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "wbsr_train", "wbsr_export"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from wbsr_runtime.upscaler import Upscaler
        img = np.random.default_rng(0).integers(0, 256, (19, 23, 3), dtype=np.uint8)
        with Upscaler({str(nn_bundle)!r}, backend="auto") as up:
            out = up.upscale(img)
        assert (out == np.repeat(np.repeat(img, 2, 0), 2, 1)).all(), "wrong output"
        assert up.backend == "ort", up.backend
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "wbsr_train", "wbsr_export")]
        assert not bad, bad
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_tiny_bundle_modes_agree(tiny_bundle: Path) -> None:
    """The real exported bundle: full-mode tiling stays close to whole-frame inference (same subnet)."""
    img = image(40, 44, np.float32, seed=3)
    outs = {}
    for mode in ("dynamic", "full", "whole"):
        with Upscaler(tiny_bundle, backend="ort", mode=mode, overlap=8) as up:
            outs[mode] = up.upscale(img)
            assert outs[mode].shape == (160, 176, 3) and np.isfinite(outs[mode]).all()
            if mode == "dynamic":
                assert 0 < up.last_stats.flops_ratio
    assert np.abs(outs["full"] - outs["whole"]).mean() < 1e-3


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_tiny_bundle_windows_of_every_size_match_equal_tiles(tiny_bundle: Path, backend: str) -> None:
    """Windows of every size (a 1-row owned strip: 49 = 3 x 16 + 1) on both backends that take any shape:
    with context beyond the tiny net's receptive field (7 LR pixels), equal tiles, single tight windows and
    merged windows all equal the whole frame up to float rounding."""
    if backend == "torch":
        pytest.importorskip("torch")
    img = image(49, 35, np.float32, seed=5)
    outs = {}
    for merge in (0, 1, 4):
        with Upscaler(tiny_bundle, backend=backend, mode="full", patch=16, overlap=8, merge=merge) as up:
            outs[merge] = up.upscale(img)
            assert up.last_stats.windows == {0: 12, 1: 12, 4: 1}[merge]  # 4 x 3 tiles
    with Upscaler(tiny_bundle, backend=backend, mode="whole") as up:
        whole = up.upscale(img)
    for merge in (0, 1, 4):
        np.testing.assert_allclose(outs[merge], whole, atol=2e-5)
    with Upscaler(tiny_bundle, backend=backend, mode="full", patch=16, overlap=0, merge=1) as up:
        assert up.upscale(img).shape == (196, 140, 3)  # the 1-row strip runs as a MIN_WINDOW-row window
