"""Bundles that lie: manifest values of the wrong type or range, graphs that contradict the manifest (swapped
subnets with consistent hashes, a wrong scale, the router's thresholds), symlinks leading out of the bundle
and an oversized manifest: each refused at load, in one line that names the file, through `wbsr-run`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from tests.conftest import refused_with_peak
from tests.nearest_bundle import build_nearest_bundle
from wbsr_runtime import cli
from wbsr_runtime.manifest import MAX_MANIFEST_BYTES, BundleError, hash_files, load_manifest, write_manifest
from wbsr_runtime.upscaler import Upscaler


@pytest.fixture(scope="module")
def nn_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return build_nearest_bundle(tmp_path_factory.mktemp("nn") / "b", scale=2, patch=16, overlap=2)


def _run(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    src = tmp_path / "a.png"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(src)
    code = cli.main([str(src), "-o", str(tmp_path / "o.png"), "--bundle", str(bundle), "--backend", "ort"])
    assert code == 0 or not (tmp_path / "o.png").exists()
    return code, [line for line in capsys.readouterr().err.splitlines() if line]


def _edited(bundle: Path, tmp_path: Path, edit: Callable[[dict], object], raw: str | None = None) -> Path:
    b = shutil.copytree(bundle, tmp_path / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    edit(manifest)
    (b / "manifest.json").write_text(raw if raw is not None else json.dumps(manifest))
    return b


def _set(path: str, value: object) -> Callable[[dict], None]:
    """An edit that sets manifest[k1][k2]... = value for path "k1/k2/..." (integer keys index lists)."""

    def edit(m: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        for k in parents:
            m = m[k]
        m[last] = value

    return edit


BAD_VALUES = [
    ("scale", "4"), ("scale", 4.5), ("scale", True), ("scale", 1e400), ("scale", 8),
    ("routing/class_to_subnet/1", 2.7), ("routing/class_to_subnet/0", -1), ("routing/class_to_subnet", "0123"),
    ("router/thresholds/1", float("nan")), ("router/thresholds/2", float("inf")), ("router/thresholds", [0.5]),
    ("router/num_classes", 1), ("router/num_classes", 10**30), ("subnets/0/flops_patch", 0),
    ("subnets/1/flops_per_patch", -5), ("subnets/0/width", "8"), ("subnets/2/depth", 0),
    ("subnets/2/flops_per_patch", 1), ("tiling/patch", 1e400), ("tiling/patch", 2), ("tiling/overlap", 5000),
    ("tiling/max_batch", 0), ("routing/mse_table/0/0", float("-inf")), ("routing/mse_table/1", [30.0]),
    ("routing/mse_table/0/1", -1.0), ("routing/class_freq", [0.0, 0.0, 0.0, 0.0]), ("routing/class_freq/2", "x"),
    ("routing/budget", 1.5), ("routing/mse_table", None),
    ("routing/tolerance_db", -0.1), ("router/inputs", {"frame": "frame"}), ("files/router.onnx", 7),
    ("model", [1, 2]), ("engines", [3]), ("subnets", [[1]]), ("name", 5),
]


@pytest.mark.parametrize("path, value", BAD_VALUES, ids=[f"{p}={v!r}"[:40] for p, v in BAD_VALUES])
def test_manifest_values_of_wrong_type_or_range_are_refused_naming_the_file(
    nn_bundle: Path, tmp_path: Path, capsys, path: str, value: object
) -> None:
    """None of these may be coerced (int("4"), int(4.5), int(8.7)) or fail later per image (ZeroDivisionError,
    IndexError, OverflowError): refused before any input, one line naming manifest.json."""
    b = _edited(nn_bundle, tmp_path, _set(path, value))
    code, err = _run(b, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert str(b / "manifest.json") in err[0] and "malformed manifest" in err[0] and "wbsr-export" in err[0]


@pytest.mark.parametrize("what", ["deep", "huge-int", "not-utf8"])
def test_unparseable_manifests_name_the_file(nn_bundle: Path, tmp_path: Path, capsys, what: str) -> None:
    """RecursionError and the int-digits ValueError used to reach the user without the file's name."""
    raw = {
        "deep": '{"format": "wbsr-bundle", "schema_version": 1, "model": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge-int": '{"format": "wbsr-bundle", "schema_version": 1, "scale": ' + "9" * 5000 + "}",
        "not-utf8": '{"format": "wbsr-bundle", "name": "\udcff"}',
    }[what]
    b = shutil.copytree(nn_bundle, tmp_path / "b")
    (b / "manifest.json").write_bytes(raw.encode("utf-8", "surrogateescape"))
    code, err = _run(b, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and str(b / "manifest.json") in err[0] and "unreadable manifest" in err[0]


def test_an_oversized_manifest_is_refused_without_reading_it(nn_bundle: Path, tmp_path: Path) -> None:
    b = shutil.copytree(nn_bundle, tmp_path / "b")
    with open(b / "manifest.json", "r+b") as f:
        f.truncate(200 << 20)  # sparse: 200 MB that take no disk
    message, peak = refused_with_peak(lambda: load_manifest(b), BundleError, "larger than 4 MiB")
    assert str(b / "manifest.json") in message and peak < MAX_MANIFEST_BYTES + (2 << 20)


def test_a_bundle_file_that_is_a_symlink_out_of_the_bundle_is_refused(nn_bundle: Path, tmp_path: Path, capsys) -> None:
    """Same bytes (so the same sha256), but outside the bundle: the Guarantees say such paths are refused."""
    b = shutil.copytree(nn_bundle, tmp_path / "b")
    shutil.move(b / "subnet_01.onnx", tmp_path / "elsewhere.onnx")
    os.symlink(tmp_path / "elsewhere.onnx", b / "subnet_01.onnx")
    code, err = _run(b, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "subnet_01.onnx" in err[0] and "leaves the bundle folder" in err[0]
    (b / "subnet_01.onnx").unlink()
    os.symlink("subnet_00.onnx", b / "subnet_01.onnx")  # inside the bundle: fine (same graph here)
    assert _run(b, tmp_path, capsys)[0] == 0


def test_router_classes_beyond_the_manifest_are_a_bundle_error(nn_bundle: Path, tmp_path: Path, capsys) -> None:
    """The stand-in router gives classes 1..4; a manifest saying K = 2 used to fail with IndexError."""
    b = _edited(nn_bundle, tmp_path, lambda m: m["router"].update(num_classes=2, thresholds=[0.5]) or
                m["routing"].update(class_to_subnet=[0, 1], mse_table=[[30, 30, 30], [29, 29, 29]],
                                    class_freq=[0.5, 0.5]))
    code, err = _run(b, tmp_path, capsys)
    assert code == 2 and "router.onnx gives classes up to 4, but the manifest has 2" in err[0] and len(err) == 2


def test_a_scale_the_graphs_do_not_have_is_a_bundle_error(nn_bundle: Path, tmp_path: Path, capsys) -> None:
    b = _edited(nn_bundle, tmp_path, lambda m: m.update(scale=3))
    code, err = _run(b, tmp_path, capsys)
    assert code == 2 and "not the manifest's x3" in err[0] and str(b) in err[0]


# --- graphs of a real export: what the weights say ---------------------------------------------------------
def _swap(b: Path, i: int, j: int) -> None:
    for suffix in (".onnx", ".fp16.onnx", ".pt2"):
        a, c = b / f"subnet_{i:02d}{suffix}", b / f"subnet_{j:02d}{suffix}"
        tmp = a.with_name("swap")
        a.rename(tmp), c.rename(a), tmp.rename(c)


def _rehash(b: Path, edit: Callable[[dict], object] = lambda m: None) -> None:
    manifest = json.loads((b / "manifest.json").read_text())
    edit(manifest)
    manifest["files"] = hash_files(b)
    write_manifest(b, manifest)


def test_swapped_subnet_graphs_with_consistent_hashes_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    b = shutil.copytree(tiny_bundle, tmp_path / "b")
    _swap(b, 0, 3)
    _rehash(b)
    load_manifest(b)  # every hash matches: only the graphs' weights can tell
    with pytest.raises(BundleError) as e:
        Upscaler(b, backend="ort")
    assert "subnet_00.onnx holds a subnet of width 16, depth 2" in str(e.value)
    assert "subnet 0 is width 8, depth 1" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.update(scale=3, model={**m["model"], "scale": 3}), "x4, but the manifest says"),
        (lambda m: m["router"].update(thresholds=[t + 1e-3 for t in m["router"]["thresholds"]]), "thresholds"),
        (lambda m: m["subnets"][1].update(depth=1), "subnet_01.onnx holds a subnet of width 8, depth 2"),
    ],
    ids=["scale", "thresholds", "depth"],
)
def test_manifest_values_the_graphs_contradict_are_refused(tiny_bundle: Path, tmp_path: Path, edit, needle) -> None:
    b = shutil.copytree(tiny_bundle, tmp_path / "b")
    _rehash(b, edit)
    with pytest.raises(BundleError, match=needle):
        Upscaler(b, backend="ort")


def test_the_shipped_bundles_pass_the_graph_checks() -> None:
    for scale in (2, 4):
        with Upscaler(scale=scale, backend="ort") as up:
            assert up.manifest.scale == scale


def test_an_exported_rcan_bundle_passes_and_a_wrong_rcan_depth_is_refused(tmp_path: Path) -> None:
    """The RCAN rule (groups x (2 per block + 1) + 1 square convolutions) on a real RCAN export."""
    pytest.importorskip("torch")
    from tests.conftest import tiny_checkpoint_data
    from wbsr_export.bundle import export_bundle
    from wbsr_runtime.graphs import subnet_graph
    from wbsr_train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "r.pt", tiny_checkpoint_data(arch="rcan", widths=(8, 16), depths=(1, 2)))
    b = export_bundle(tmp_path / "r.pt", tmp_path / "rcan", patch=16, overlap=2, torch_programs=False)
    with Upscaler(b, backend="ort") as up:
        specs = [(s.width, s.depth) for s in up.manifest.subnets]
        got = [subnet_graph(up.manifest.path(s.files["onnx"]), dict(up.manifest.model)) for s in up.manifest.subnets]
        assert [(g.width, g.depth, g.scale) for g in got] == [(w, d, 4) for w, d in specs]
    _rehash(b, lambda m: m["subnets"][0].update(depth=2) or m["subnets"][1].update(depth=2))
    with pytest.raises(BundleError, match="subnet_00.onnx holds a subnet of width 8, depth 1"):
        Upscaler(b, backend="ort")
