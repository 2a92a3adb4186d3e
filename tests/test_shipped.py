"""The shipped default models: they load, run without --bundle, and re-exporting their checkpoints reproduces
the shipped bundles' outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests import ROOT
from wbsr_runtime import cli
from wbsr_runtime.manifest import load_manifest
from wbsr_runtime.upscaler import MODELS_DIR, default_bundle

SAMPLE = ROOT / "wbsr_runtime" / "samples" / "butterfly.png"


@pytest.mark.parametrize("scale", [2, 4])
def test_default_bundle_loads_and_verifies(scale: int) -> None:
    manifest = load_manifest(default_bundle(scale))  # sha256 of every file checked
    assert manifest.scale == scale and len(manifest.subnets) == 9
    assert manifest.routing.mse_table is not None and manifest.model["arch"] == "lrnet"  # calibrated: knobs work


@pytest.mark.parametrize("scale", [2, 4])
def test_main_job_without_bundle(tmp_path: Path, scale: int) -> None:
    out, routing = tmp_path / "out.png", tmp_path / "map.png"
    argv = [str(SAMPLE), "-o", str(out), "--routing-map", str(routing), "--scale", str(scale)]
    assert cli.main(argv) == 0
    from PIL import Image

    w, h = Image.open(SAMPLE).size
    assert Image.open(out).size == (w * scale, h * scale) and routing.is_file()


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [4])
def test_reexport_reproduces_shipped_bundle(tmp_path: Path, scale: int) -> None:
    pytest.importorskip("torch")
    from wbsr_export.bundle import export_bundle

    shipped = load_manifest(default_bundle(scale))
    fresh = load_manifest(export_bundle(MODELS_DIR / f"x{scale}.pt", tmp_path / "b", torch_programs=False,
                                        patch=shipped.tiling.patch, overlap=shipped.tiling.overlap))
    rng = np.random.default_rng(0)
    lr = rng.random((2, 3, 20, 24), dtype=np.float32)
    for a, b in zip(shipped.subnets, fresh.subnets, strict=True):
        ya = _run(shipped.path(a.files["onnx"]), {a.input: lr})[0]
        yb = _run(fresh.path(b.files["onnx"]), {b.input: lr})[0]
        assert np.abs(ya - yb).max() <= 1e-5
    frame = rng.random((1, 3, 40, 50), dtype=np.float32)
    boxes = np.array([[0, 0, 32, 32], [8, 18, 40, 50]], dtype=np.int64)
    feeds = {shipped.router.inputs["frame"]: frame, shipped.router.inputs["boxes"]: boxes}
    ra, rb = _run(shipped.path(shipped.router.file), feeds), _run(fresh.path(fresh.router.file), feeds)
    np.testing.assert_array_equal(ra[1], rb[1])
    assert shipped.routing.class_to_subnet == fresh.routing.class_to_subnet
