"""The bundle manifest reader: typed fields, and one-line refusals of anything it cannot trust. No torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wbsr_runtime.manifest import (
    SCHEMA_VERSION,
    BundleError,
    file_sha256,
    hash_files,
    load_manifest,
    write_manifest,
)


def make_bundle(root: Path) -> dict:
    """A minimal valid bundle (2 subnets, K = 3) with placeholder files; returns its manifest dict."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("router.onnx", "subnet_00.onnx", "subnet_01.onnx"):
        (root / name).write_bytes(name.encode())
    subnet = {"flops_patch": 32, "input": "lr", "output": "sr"}
    manifest = {
        "format": "wbsr-bundle",
        "schema_version": SCHEMA_VERSION,
        "name": root.name,
        "scale": 4,
        "model": {"arch": "srresnet", "widths": [8], "depths": [1, 2]},
        "input": {"layout": "NCHW", "dtype": "float32", "range": [0, 1], "color": "RGB"},
        "tiling": {"patch": 32, "overlap": 4, "max_batch": 8},
        "router": {
            "file": "router.onnx",
            "inputs": {"frame": "frame", "boxes": "boxes"},
            "outputs": {"scores": "scores", "classes": "classes"},
            "num_classes": 3,
            "thresholds": [0.1, 0.2],
            "class_patch": 32,
            "descriptor": "sobel-luma-mean-plus-std/v1",
        },
        "subnets": [
            {
                **subnet,
                "index": 0,
                "width": 8,
                "depth": 1,
                "flops_per_patch": 100,
                "files": {"onnx": "subnet_00.onnx"},
            },
            {
                **subnet,
                "index": 1,
                "width": 8,
                "depth": 2,
                "flops_per_patch": 200,
                "files": {"onnx": "subnet_01.onnx"},
            },
        ],
        "routing": {
            "mse_table": [[60, 58], [80, 70], [110, 100]],
            "class_freq": [0.5, 0.3, 0.2],
            "tolerance_db": 0.2,
            "budget": None,
            "class_to_subnet": [0, 1, 1],
        },
        "engines": [],
        "files": hash_files(root),
        "provenance": {"checkpoint_sha256": "0" * 64, "package": "0.1.0"},
    }
    write_manifest(root, manifest)
    return manifest


def test_loads_typed_fields(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    m = load_manifest(tmp_path / "b")
    assert (m.scale, m.tiling.patch, m.tiling.overlap, m.tiling.max_batch) == (4, 32, 4, 8)
    assert m.router.thresholds == (0.1, 0.2) and m.router.num_classes == 3
    assert [(s.index, s.width, s.depth) for s in m.subnets] == [(0, 8, 1), (1, 8, 2)]
    assert m.routing.class_to_subnet == (0, 1, 1) and m.routing.mse_table[0] == (60.0, 58.0)
    assert m.path(m.subnets[1].files["onnx"]).read_bytes() == b"subnet_01.onnx"
    with pytest.raises(AttributeError):
        m.scale = 2  # frozen


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path / "b")
    write_manifest(tmp_path / "b", {**manifest, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(BundleError, match="newer"):
        load_manifest(tmp_path / "b")


def test_missing_and_changed_files_are_named(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / "subnet_01.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="subnet_01.onnx does not match its sha256"):
        load_manifest(tmp_path / "b")
    load_manifest(tmp_path / "b", verify_hashes=False)
    (tmp_path / "b" / "router.onnx").unlink()
    with pytest.raises(BundleError, match="missing file router.onnx"):
        load_manifest(tmp_path / "b", verify_hashes=False)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.pop("routing"),
        lambda m: m["routing"].update(class_to_subnet=[0, 1]),
        lambda m: m["routing"].update(class_to_subnet=[0, 1, 5]),
        lambda m: m["router"].update(thresholds=[0.3, 0.2]),
        lambda m: m["subnets"][1].update(index=3),
        lambda m: m.update(scale="four"),
        lambda m: m["engines"].append({"target": 0, "file": "trt/x.plan"}),  # file not hashed
        lambda m: m["files"].update({"../outside": "0" * 64}),
    ],
)
def test_malformed_manifest_is_refused(tmp_path: Path, edit) -> None:
    manifest = make_bundle(tmp_path / "b")
    edit(manifest)
    write_manifest(tmp_path / "b", manifest)
    with pytest.raises(BundleError) as e:
        load_manifest(tmp_path / "b")
    assert "\n" not in str(e.value) and "wbsr-export" in str(e.value)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BundleError, match="not a WBSR bundle"):
        load_manifest(tmp_path)


def test_write_manifest_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")) == []
    assert json.loads((tmp_path / "b" / "manifest.json").read_text()) == manifest
    assert file_sha256(tmp_path / "b" / "router.onnx") == manifest["files"]["router.onnx"]


@pytest.mark.slow
def test_manifest_module_runs_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import wbsr_runtime.manifest, wbsr_runtime.routing"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
