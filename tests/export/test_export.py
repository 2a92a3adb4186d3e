"""Export: slicing, ONNX and torch.export parity, the router graph, the bundle writer and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from tests.conftest import real_or_textured_images, tiny_checkpoint_data  # noqa: E402
from wbsr_export import bundle as bundle_mod  # noqa: E402
from wbsr_export.bundle import export_bundle  # noqa: E402
from wbsr_export.cli import main  # noqa: E402
from wbsr_export.onnx import OPSET, export_router_onnx  # noqa: E402
from wbsr_export.parity import box_grid, parity_inputs, reference_scores, router_parity, subnet_parity  # noqa: E402
from wbsr_export.slice import extract_subnet  # noqa: E402
from wbsr_export.trt import EngineBuild  # noqa: E402
from wbsr_runtime.manifest import file_sha256, load_manifest  # noqa: E402
from wbsr_train.checkpoint import load_checkpoint, save_checkpoint, supernet_from_checkpoint  # noqa: E402
from wbsr_train.config import ModelConfig, SubnetSpec  # noqa: E402
from wbsr_train.descriptor import thresholds_from_pool  # noqa: E402
from wbsr_train.model import build_supernet  # noqa: E402


def real_patches(size: int = 20, count: int = 6) -> np.ndarray:
    """(count, 3, size, size) float32 crops of real (or textured) images."""
    crops = [img[0, :, 40 : 40 + size, 40 : 40 + size] for img in real_or_textured_images()]
    return np.stack((crops * count)[:count])


@pytest.mark.parametrize("arch,scale", [("srresnet", 4), ("srresnet", 2), ("rcan", 2), ("lrnet", 4), ("lrnet", 3)])
def test_extracted_subnet_equals_supernet(arch: str, scale: int) -> None:
    cfg = ModelConfig(arch, scale, (8, 16), (1, 2), n_groups=2, reduction=4)
    torch.manual_seed(0)
    supernet = build_supernet(cfg).eval()
    inputs = [torch.rand(2, 3, 11, 13), torch.from_numpy(real_patches(12, 2))]
    for spec in [SubnetSpec(w, d) for w in cfg.widths for d in cfg.depths]:
        sub = extract_subnet(supernet, spec)
        names = set(sub.state_dict())
        assert all(
            t.shape == supernet.state_dict()[n][tuple(slice(0, s) for s in t.shape)].shape
            for n, t in sub.state_dict().items()
        )
        assert len(names) <= len(supernet.state_dict())
        with torch.no_grad():
            for x in inputs:
                assert (sub(x) - supernet(x, spec)).abs().max().item() <= 1e-5


def test_extract_rejects_spec_outside_supernet() -> None:
    supernet = build_supernet(ModelConfig("srresnet", 2, (8,), (1,)))
    with pytest.raises(ValueError, match="outside"):
        extract_subnet(supernet, SubnetSpec(16, 1))


def test_onnx_graphs_are_valid_and_dynamic(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    for s in m.subnets:
        for key in ("onnx", "onnx_fp16"):
            model = onnx.load(str(m.path(s.files[key])))
            onnx.checker.check_model(model, full_check=True)
            assert model.opset_import[0].version >= OPSET
            (inp,), (out,) = model.graph.input, model.graph.output
            assert (inp.name, out.name) == ("lr", "sr")
            assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            dims = [d.dim_param for d in inp.type.tensor_type.shape.dim]
            assert dims[0] and dims[2] and dims[3]
        half = onnx.load(str(m.path(s.files["onnx_fp16"])))
        assert {i.data_type for i in half.graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}


def test_fp32_and_fp16_parity_on_random_and_real_patches(tiny_checkpoint: Path, tiny_bundle: Path) -> None:
    net = supernet_from_checkpoint(load_checkpoint(tiny_checkpoint))
    m = load_manifest(tiny_bundle)
    inputs = parity_inputs(seed=1, patch=20, real=real_patches())
    for s in m.subnets:
        sub = extract_subnet(net, SubnetSpec(s.width, s.depth))
        fp32 = subnet_parity(sub, m.path(s.files["onnx"]), inputs)
        half = subnet_parity(sub, m.path(s.files["onnx_fp16"]), inputs)
        assert fp32["max_abs"] <= 1e-4
        assert np.isfinite(half["rel"]) and half["rel"] < 1e-2
    parity = m.provenance["parity"]
    assert max(parity["fp32_max_abs"]) <= 1e-4 and len(parity["fp16_rel"]) == len(m.subnets)


def test_torch_programs_load_and_match(tiny_checkpoint: Path, tiny_bundle: Path) -> None:
    net = supernet_from_checkpoint(load_checkpoint(tiny_checkpoint))
    m = load_manifest(tiny_bundle)
    x = torch.rand(3, 3, 9, 14)  # a shape other than the export sample's
    for s in (m.subnets[0], m.subnets[-1]):
        program = torch.export.load(str(m.path(s.files["torch"]))).module()
        with torch.no_grad():
            expected = net(x, SubnetSpec(s.width, s.depth))
            assert (program(x) - expected).abs().max().item() <= 1e-5


def test_router_matches_training_descriptor_on_real_images(tmp_path: Path) -> None:
    images = [np.ascontiguousarray(img[:, :, :200, :240]) for img in real_or_textured_images()]
    grids = [box_grid(img.shape[2], img.shape[3], patch=32, step=7) for img in images]
    pool = torch.cat(
        [torch.from_numpy(reference_scores(img, b)) for img, b in zip(images, grids, strict=True)]
    )
    thresholds = thresholds_from_pool(pool, 10).tolist()
    path = export_router_onnx(thresholds, tmp_path / "router.onnx")
    rng = np.random.default_rng(0)
    total, mismatched = 0, 0.0
    for img, boxes in zip(images, grids, strict=True):
        # plus boxes of mixed sizes, as tiling at frame borders makes them
        y0, x0 = rng.integers(0, 40, 20), rng.integers(0, 40, 20)
        odd = np.stack([y0, x0, y0 + rng.integers(3, 40, 20), x0 + rng.integers(3, 40, 20)], 1)
        result = router_parity(path, img, np.concatenate([boxes, odd]).astype(np.int64), thresholds)
        assert result["score_rel"] <= 1e-4
        total += result["boxes"]
        mismatched += result["class_mismatch_no_ties"] * result["boxes"]
    assert mismatched / total <= 1e-3


def test_router_in_bundle_uses_checkpoint_thresholds(tiny_checkpoint: Path, tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    assert list(m.router.thresholds) == list(load_checkpoint(tiny_checkpoint).thresholds)
    img = real_or_textured_images()[0][:, :, :64, :80]
    result = router_parity(m.path(m.router.file), img, box_grid(64, 80, 16, 8), m.router.thresholds)
    assert result["score_rel"] <= 1e-4 and result["class_mismatch_no_ties"] == 0.0


def test_manifest_records_checkpoint(tiny_checkpoint: Path, tiny_bundle: Path) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    m = load_manifest(tiny_bundle)
    assert m.scale == 4 and (m.tiling.patch, m.tiling.overlap, m.tiling.max_batch) == (16, 2, 4)
    assert [(s.width, s.depth) for s in m.subnets] == list(ckpt.specs)
    assert [s.flops_per_patch for s in m.subnets] == list(ckpt.flops)
    assert {s.flops_patch for s in m.subnets} == {ckpt.flops_patch} == {32} and m.router.class_patch == 32
    assert list(m.routing.class_to_subnet) == ckpt.calibration["class_to_subnet"]
    assert m.routing.mse_table is not None and len(m.routing.mse_table) == 10 and len(m.routing.class_freq) == 10
    assert m.provenance["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    assert set(m.files) == {p.name for p in tiny_bundle.iterdir() if p.name != "manifest.json"}
    assert m.engines == ()


def test_uncalibrated_checkpoint_gets_eq15_map() -> None:
    ckpt = dataclasses.replace(tiny_checkpoint_data(), calibration=None)
    routing = bundle_mod._routing(ckpt, 4)
    assert routing.mse_table is None and routing.tolerance_db is None and routing.budget is None
    assert routing.class_to_subnet == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


@pytest.fixture(scope="module")
def single_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-subnet checkpoint (width 8, depth 1): the cheapest thing the CLI can export."""
    path = tmp_path_factory.mktemp("single") / "single.pt"
    ckpt = tiny_checkpoint_data(widths=(8,), depths=(1,), calibrated=False)
    save_checkpoint(path, dataclasses.replace(ckpt, class_patch=12))  # as if trained on 12 x 12 patches
    return path


def test_interrupted_export_leaves_nothing(single_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod, "export_router_onnx", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(single_checkpoint, tmp_path / "b", torch_programs=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_and_replaces_with_force(single_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "engines" / "x"
    args = ["--ckpt", str(single_checkpoint), "--out", str(out), "--patch", "16", "--no-torch-programs"]
    assert main(args) == 0
    first = load_manifest(out).provenance["created"]
    routing = load_manifest(out).routing  # uncalibrated: the Eq. 15 map
    assert routing.mse_table is None and routing.class_to_subnet == (0,) * 10
    assert load_manifest(out).router.class_patch == 12  # the checkpoint's, not the tiling's 16
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert load_manifest(out).provenance["created"] >= first
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]  # no temp or old folders left


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / f"{name}.pt" for name in ("corrupt", "evil", "version", "format")}
    paths["corrupt"].write_bytes(b"not a checkpoint at all")
    torch.save({"x": 1}, paths["format"])
    with open(paths["evil"], "wb") as f:
        pickle.dump(Evil(), f)
    torch.save({**tiny_checkpoint_data(widths=(8,), depths=(1,)).to_dict(), "version": 99}, paths["version"])
    paths["missing"] = tmp_path / "missing.pt"
    return paths


def test_cli_bad_input_is_one_line_exit_2(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name, path in _bad_checkpoints(tmp_path).items():
        out = tmp_path / "out" / name
        assert main(["--ckpt", str(path), "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert not out.exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "pwned.txt").exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["--ckpt", str(tiny_checkpoint), "--out", str(existing)]) == 2
    assert list(existing.iterdir()) == []


@pytest.mark.slow
def test_bundle_trt_without_torch_or_tensorrt(tiny_bundle: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
        "from wbsr_export.cli import main\n"
        f"rc = main(['--bundle', {str(tiny_bundle)!r}, '--trt', '--fp16'])\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "NVIDIA" in proc.stderr


def test_bundle_trt_records_engines(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    calls = {}

    def build_engines(bundle_dir: Path, **kwargs) -> EngineBuild:
        calls.update(kwargs)  # nothing written: the commit writes the plan with the manifest
        record = {
            "target": 0,
            "file": "trt/subnet_00.k.plan",
            "key": "k",
            "precision": kwargs["precision"],
            "tensorrt": "10.3",
            "gpu": "Orin",
            "compute_capability": "8.7",
        }
        return EngineBuild([record], {"trt/subnet_00.k.plan": b"plan"})

    monkeypatch.setitem(sys.modules, "wbsr_export.trt", types.SimpleNamespace(build_engines=build_engines))
    assert main(["--bundle", str(bundle), "--trt", "--fp16", "--max-batch", "8"]) == 0
    assert calls["precision"] == "fp16" and calls["max_batch"] == 8 and calls["patch"] == 16
    m = load_manifest(bundle)
    assert m.engines[0]["file"] == "trt/subnet_00.k.plan" and "trt/subnet_00.k.plan" in m.files
    assert json.loads((bundle / "manifest.json").read_text())["engines"][0]["gpu"] == "Orin"
