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

from tests import ROOT
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
            assert sum(stats.tiles_per_subnet) == (1 if mode == "whole" else len(stats.boxes))


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

    from wbsr_runtime.backends.ort import OrtRunner

    init = OrtRunner.__init__

    def fixed_profile(self, *args, **kwargs):  # a backend that takes one tile size only, as TensorRT engines
        init(self, *args, **kwargs)
        self.fixed_tiles = (8, 2)

    monkeypatch.setattr(OrtRunner, "__init__", fixed_profile)
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
    bare = build_nearest_bundle(tmp_path / "bare", calibrated=False)
    with pytest.raises(BundleError, match="mse_table"):
        Upscaler(bare, backend="ort", tolerance=0.1)


def test_measured_costs_rank_the_subnets(gain_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from wbsr_runtime import upscaler as upscaler_mod

    with Upscaler(gain_bundle, backend="ort") as up:
        costs = upscaler_mod.measure_costs(up.runners[0], 3, 20)
        assert costs.shape == (3,) and (costs > 0).all()
    # A machine where the full subnet is the fastest: every class takes it, whatever the tolerance.
    monkeypatch.setattr(upscaler_mod, "measure_costs", lambda runner, count, size: np.array([3.0, 2.0, 1.0]))
    for knob in ({"tolerance": 10.0}, {"budget": 0.5}):
        with Upscaler(gain_bundle, backend="ort", cost="measured", **knob) as up:
            assert up.class_map.tolist() == [2, 2, 2, 2] and up.costs.tolist() == [3.0, 2.0, 1.0]
    with pytest.raises(BundleError, match="no calibration knob"):
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
    bare = build_nearest_bundle(tmp_path / "bare", calibrated=False)
    with pytest.raises(BundleError, match="mse_table"):
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


@pytest.mark.slow
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
    root = ROOT
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.slow
def test_vapoursynth_filter_is_optional() -> None:
    """Without VapourSynth the runtime imports as ever, and the filter module says what to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["vapoursynth"] = None  # as if not installed
        import wbsr_runtime.upscaler, wbsr_runtime.cli
        try:
            import wbsr_runtime.vapoursynth
        except ImportError as err:
            print(err)
    """)
    root = ROOT
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'wbsr-deploy[cpu,vapoursynth]'" in done.stdout.strip().splitlines()[-1]


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


def test_torch_workers_load_their_programs_at_the_same_time(tiny_bundle: Path) -> None:
    """Four workers each load the full subnet's program on their first chunk, concurrently: torch.export.load
    is not thread-safe ("_CURRENT_DESERIALIZER is already set"), so the backend serialises the loads."""
    pytest.importorskip("torch")
    img = image(64, 64, np.float32, seed=7)
    with Upscaler(tiny_bundle, backend="torch", mode="full", workers=4, chunk=1, merge=0) as up:
        out = up.upscale(img)
    with Upscaler(tiny_bundle, backend="ort", mode="full", merge=0) as ref:
        np.testing.assert_allclose(out, ref.upscale(img), atol=1e-4)


# --- knobs, values that poison, small and thin frames -------------------------------------------------------
@pytest.mark.parametrize(
    "knob, value",
    [
        ("tolerance", float("nan")), ("tolerance", float("inf")), ("tolerance", -0.5), ("tolerance", "0.1"),
        ("budget", float("nan")), ("budget", 0.0), ("budget", 1.5), ("budget", float("-inf")),
        ("patch", 2), ("patch", 5000), ("patch", 16.5), ("overlap", -1), ("overlap", 5000), ("overlap", True),
        ("merge", -1), ("workers", 0), ("max_pixels", 0),
    ],
)
def test_out_of_range_knobs_are_refused_in_one_line(nn_bundle: Path, monkeypatch, knob: str, value: object) -> None:
    """Checked first: NaN tolerance used to route everything to the cheapest subnet, overlap 5000 padded an
    80x64 frame to 10032^2 (7 GB). The bundle is never even read for a bad knob."""
    from wbsr_runtime import upscaler

    monkeypatch.setattr(upscaler, "load_manifest", lambda *a, **k: pytest.fail("bundle read before the knobs"))
    with pytest.raises(ValueError) as e:
        Upscaler(nn_bundle, backend="ort", **{knob: value})
    assert knob in str(e.value) and "\n" not in str(e.value)


def test_an_option_the_backend_does_not_take_is_refused_in_one_line(nn_bundle: Path) -> None:
    with pytest.raises(ValueError, match=r"^the ort backend takes no stream option \(it takes threads, fp16, "):
        Upscaler(nn_bundle, backend="ort", stream=5)
    with Upscaler(nn_bundle, backend="ort", threads=1, fp16=False, max_batch=2) as up:
        assert up.runners[0].options.threads == 1 and up.runners[0].max_batch == 2


def test_a_tile_with_its_padding_is_bounded(nn_bundle: Path) -> None:
    with pytest.raises(ValueError, match="at most 256"):
        Upscaler(nn_bundle, backend="ort", patch=200, overlap=40)
    with Upscaler(nn_bundle, backend="ort", patch=128, overlap=64, merge=0) as up:  # the largest tile: 256
        img = image(80, 64, np.uint8)
        np.testing.assert_array_equal(up.upscale(img), hwc_nearest(img, 2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["dynamic", "whole"])
def test_non_finite_float_input_is_refused(nn_bundle: Path, bad: float, mode: str) -> None:
    img = image(9, 7, np.float32)
    img[4, 3, 1] = bad
    with Upscaler(nn_bundle, backend="ort", mode=mode) as up:
        with pytest.raises(ValueError, match="NaN or infinite"):
            up.upscale(img)
        loud = image(9, 7, np.float32) * 3 - 1  # finite but out of range: clipped, as documented
        np.testing.assert_array_equal(up.upscale(loud), hwc_nearest(np.clip(loud, 0, 1), 2))


@pytest.mark.parametrize("h, w, overlap", [(10, 10, 2), (18, 18, 2), (12, 40, 2), (40, 12, 2), (1, 1, 2),
                                           (2, 9, 2), (5, 150, 8), (150, 6, 8)])
def test_small_and_thin_frames_match_whole_frame_inference(tiny_bundle: Path, h: int, w: int, overlap: int) -> None:
    """A side shorter than a tile (patch 16 + 2 x 2 here) was padded by reflection, and the network saw the
    mirrored pixels: up to 140/255 off at x4. Now such a frame runs as itself, like the whole frame (frames
    under 3 pixels are padded to 3 in both modes); long ones are cut into windows with context >= the tiny
    net's receptive field (7), so they match to float rounding too."""
    img = image(h, w, np.float32, seed=h * w)
    with Upscaler(tiny_bundle, backend="ort", mode="whole") as up:
        whole = up.upscale(img)
    with Upscaler(tiny_bundle, backend="ort", mode="full", overlap=overlap) as up:
        np.testing.assert_allclose(up.upscale(img), whole, atol=2e-5)
    with Upscaler(tiny_bundle, backend="ort", mode="dynamic", overlap=overlap) as up:
        assert up.upscale(img).shape == whole.shape  # other subnets: not comparable, but never padded


@pytest.mark.parametrize("h, w", [(30, 30), (64, 20), (20, 64)])
def test_shipped_model_small_frames_match_whole_frame(h: int, w: int) -> None:
    """The issue's cases on the shipped x4 model (tile 32 + 2 x 2): 83/255 off before, float rounding now."""
    img = image(h, w, np.float32, seed=7)
    with Upscaler(scale=4, backend="ort", mode="whole") as up:
        whole = up.upscale(img)
    with Upscaler(scale=4, backend="ort", mode="full") as up:
        np.testing.assert_allclose(up.upscale(img), whole, atol=1e-5)
