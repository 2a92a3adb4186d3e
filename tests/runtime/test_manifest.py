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
    Manifest,
    RouterInfo,
    Routing,
    SubnetInfo,
    Tiling,
    file_sha256,
    hash_files,
    load_manifest,
    parse_manifest,
    write_manifest,
)
from wbsr_runtime.upscaler import MODELS_DIR


def make_bundle(root: Path) -> dict:
    """A minimal valid bundle (2 subnets, K = 3) with placeholder files; returns its manifest dict."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("router.onnx", "subnet_00.onnx", "subnet_01.onnx"):
        (root / name).write_bytes(name.encode())
    subnets = tuple(
        SubnetInfo(index=i, width=8, depth=i + 1, flops_per_patch=100 * (i + 1), flops_patch=32,
                   files={"onnx": f"subnet_{i:02d}.onnx"}, input="lr", output="sr")
        for i in range(2)
    )
    manifest = Manifest(
        root=root,
        schema_version=SCHEMA_VERSION,
        name=root.name,
        scale=4,
        model={"arch": "srresnet", "widths": [8], "depths": [1, 2]},
        input={"layout": "NCHW", "dtype": "float32", "range": [0, 1], "color": "RGB"},
        tiling=Tiling(patch=32, overlap=4, max_batch=8),
        router=RouterInfo(
            file="router.onnx",
            inputs={"frame": "frame", "boxes": "boxes"},
            outputs={"scores": "scores", "classes": "classes"},
            num_classes=3,
            thresholds=(0.1, 0.2),
            class_patch=32,
            descriptor="sobel-luma-mean-plus-std/v1",
        ),
        subnets=subnets,
        routing=Routing(
            mse_table=((60.0, 58.0), (80.0, 70.0), (110.0, 100.0)),
            class_freq=(0.5, 0.3, 0.2),
            tolerance_db=0.2,
            budget=None,
            class_to_subnet=(0, 1, 1),
        ),
        engines=(),
        files=hash_files(root),
        provenance={"checkpoint_sha256": "0" * 64, "package": "0.1.0"},
    )
    write_manifest(root, manifest.to_dict())
    return manifest.to_dict()


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


def test_the_records_write_back_what_they_read(tmp_path: Path) -> None:
    """One schema: `to_dict` is the manifest.json layout, for a bundle of ours and for the shipped ones."""
    written = make_bundle(tmp_path / "b")
    m = load_manifest(tmp_path / "b")
    assert m.to_dict() == written and parse_manifest(written, tmp_path / "b") == m
    assert "max_batch" not in Tiling(patch=8, overlap=2).to_dict()  # optional: absent, as older bundles have it
    for scale in (2, 4):
        shipped = MODELS_DIR / f"x{scale}"
        on_disk = json.loads((shipped / "manifest.json").read_text())
        assert load_manifest(shipped).to_dict() == on_disk


def test_a_dict_parses_without_a_file(tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path / "b")
    (tmp_path / "b" / "subnet_01.onnx").unlink()  # files are load_manifest's business, not the parser's
    assert parse_manifest(manifest, tmp_path / "b").subnets[1].files["onnx"] == "subnet_01.onnx"
    with pytest.raises(BundleError, match="newer"):
        parse_manifest({**manifest, "schema_version": SCHEMA_VERSION + 1}, tmp_path / "b")
    with pytest.raises(BundleError, match="malformed manifest .missing field 'routing'"):
        parse_manifest({k: v for k, v in manifest.items() if k != "routing"}, tmp_path / "b")


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
