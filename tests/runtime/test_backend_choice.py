"""Which backend and device run a bundle (`--backend auto`, `--device`), ONNX Runtime's GPU providers, and the
packaging that keeps the CPU and GPU builds of ONNX Runtime apart. GPU stacks are stand-ins
(tests/fake_torch.py, tests/fake_ort_gpu.py)."""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from tests import ROOT
from tests.fake_ort_gpu import FakeGpuOrt
from tests.fake_torch import FakeTorch, program_bundle
from wbsr_runtime import cli
from wbsr_runtime.backends import BackendError, base, choose_backend, open_runners, parse_device
from wbsr_runtime.manifest import load_manifest
from wbsr_runtime.upscaler import Upscaler

GAINS = (1.0, 2.0, 0.5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return program_bundle(tmp_path_factory.mktemp("sel") / "b", scale=2, gains=GAINS)


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)


def test_devices_parse() -> None:
    assert [parse_device(d) for d in (None, "cpu", "CUDA", "cuda:3")] == [None, "cpu", "cuda:0", "cuda:3"]
    for bad in ("gpu", "cuda:x", "cuda1"):
        with pytest.raises(BackendError, match="use cpu, cuda or cuda:N"):
            parse_device(bad)


def test_auto_on_a_cpu_machine_says_why(bundle: Path, no_torch: None) -> None:
    choice = choose_backend(load_manifest(bundle))
    assert (choice.backend, choice.device) == ("ort", "cpu")
    assert "trt: the bundle has no TensorRT engines" in choice.reason
    assert "torch: PyTorch is not installed" in choice.reason
    assert "ort: ONNX Runtime has no CUDA provider" in choice.reason
    with pytest.raises(BackendError, match=r"no backend can run on cuda:1 here \(trt: .*\); use --device cpu"):
        choose_backend(load_manifest(bundle), "auto", "cuda:1")
    assert choose_backend(load_manifest(bundle), "auto", "cpu").backend == "ort"
    with pytest.raises(BackendError, match="trt backend runs on a CUDA GPU"):
        choose_backend(load_manifest(bundle), "trt", "cpu")


def test_auto_takes_torch_on_cuda_and_passes_the_device(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: auto chose torch but open_runners passed no device, so it ran on the CPU."""
    fake = FakeTorch(GAINS, scale=2, devices=2).install(monkeypatch)
    img = np.random.default_rng(0).integers(0, 256, (17, 19, 3), dtype=np.uint8)
    with Upscaler(bundle, backend="auto", device="cuda:1", workers=2) as up:
        assert (up.choice.backend, up.choice.device) == ("torch", "cuda:1") and "PyTorch sees CUDA" in up.choice.reason
        assert all(r.device.startswith("cuda:1") for r in up.runners)
        out = up.upscale(img)
    with Upscaler(bundle, backend="ort") as ref:
        np.testing.assert_array_equal(out, ref.upscale(img))
    assert fake.violations == [] and fake.unrecorded() == []


@pytest.mark.parametrize("fallback", [False, True])
def test_auto_takes_ort_cuda_only_when_a_session_gets_it(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, no_torch: None, fallback: bool
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", FakeGpuOrt(onnxruntime, fallback=fallback))
    choice = choose_backend(load_manifest(bundle))
    if fallback:
        assert choice.backend == "ort" and choice.device == "cpu" and "fell back to the CPU" in choice.reason
        with pytest.raises(BackendError, match="fell back"):
            runner = open_runners(load_manifest(bundle), "ort", device="cuda")[0]
            runner.run_subnet(0, np.zeros((1, 3, 4, 4), np.float32))
    else:
        assert (choice.backend, choice.device) == ("ort", "cuda:0") and "CUDA provider" in choice.reason
        assert open_runners(load_manifest(bundle), choice)[0].device == "cuda:0"


def test_ort_tensorrt_provider_gets_one_profile_and_only_its_shapes(bundle: Path, monkeypatch) -> None:
    """ORT's TensorRT provider: explicit profiles for the tile, and the Upscaler sends nothing else, so each
    session builds one engine (before: windows of many sizes, an engine per size per session)."""
    fake = FakeGpuOrt(onnxruntime)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    img = np.random.default_rng(1).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    with Upscaler(bundle, backend="ort", device="cuda", tensorrt=True, workers=2) as up:
        assert (up.merge, up.patch, up.overlap, up.runners[0].max_batch) == (0, 8, 2, 16)
        up.upscale(img)
        with pytest.raises(ValueError, match="mode 'whole'"):
            Upscaler(bundle, backend="ort", device="cuda", tensorrt=True, mode="whole")
    assert fake.engine_builds() and set(fake.engine_builds()) == {1}
    opts = next(dict(p[1]) for p in up.runners[0]._providers if p[0] == "TensorrtExecutionProvider")
    assert opts["trt_profile_min_shapes"] == "lr:1x3x12x12" and opts["trt_profile_max_shapes"] == "lr:16x3x12x12"


# --- ONNX Runtime builds and packaging ------------------------------------------------------------------------
@pytest.fixture
def both_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution
    monkeypatch.setattr(base.importlib.metadata, "distribution", lambda name: real("onnxruntime"))
    monkeypatch.setattr(base, "_ort_checked", False)


def test_both_ort_builds_installed_are_named(bundle: Path, both_builds: None, caplog, no_torch: None) -> None:
    with caplog.at_level(logging.WARNING):
        base.import_onnxruntime()
    assert "onnxruntime and onnxruntime-gpu are both installed" in caplog.text
    with pytest.raises(BackendError, match="no CUDAExecutionProvider .*both installed.*pip uninstall -y"):
        open_runners(load_manifest(bundle), "ort", device="cuda")
    assert "both installed" in choose_backend(load_manifest(bundle)).reason


def test_no_ort_installed_names_the_extra(bundle: Path, monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendError, match=re.escape('pip install "wbsr-deploy[cpu]"')):
        Upscaler(bundle, backend="ort")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert cli.main([str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"), "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX Runtime is not installed" in err[0] and not (tmp_path / "b.png").exists()


def test_extras_keep_one_ort_build_and_match_cuda_majors() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0] for r in reqs}

    assert not names(project["dependencies"]) & {"onnxruntime", "onnxruntime-gpu"}  # no build by default
    for name, reqs in extras.items():
        assert len(names(reqs) & {"onnxruntime", "onnxruntime-gpu"}) <= 1, name
    assert extras["cpu"] == ["onnxruntime>=1.17"]
    assert extras["gpu-cu12"] == ["cuda-python>=12.6,<13"] and extras["gpu-cu13"] == ["cuda-python>=13,<14"]
    assert extras["ort-gpu-cu12"] == ["onnxruntime-gpu>=1.19,<1.27"]
    assert extras["ort-gpu-cu13"] == ["onnxruntime-gpu>=1.27"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-e ".[cpu,dev,export]"' in ci and '-e ".[cpu,dev,export]"' in (ROOT / "README.md").read_text()


# --- the CLI -----------------------------------------------------------------------------------------------------
def test_cli_device_and_the_choice_line(bundle: Path, tmp_path: Path, capsys, no_torch: None) -> None:
    from PIL import Image

    src = tmp_path / "a.png"
    Image.new("RGB", (10, 9)).save(src)
    argv = [str(src), "--bundle", str(bundle), "--device", "cpu"]
    assert cli.main([*argv, "-o", str(tmp_path / "b.png")]) == 0
    assert capsys.readouterr().err == ""  # stderr is for errors unless -v
    assert cli.main([*argv, "-o", str(tmp_path / "c.png"), "-v"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("wbsr-run: backend ort on cpu: auto with --device cpu: ONNX Runtime")
    assert err[1].startswith("wbsr-run: routing map [")  # and the map's predicted loss and cost
    for device, message in (("cuda", "no backend can run on cuda:0 here"), ("gpu", "unknown device 'gpu'")):
        out = tmp_path / f"{device}.png"
        assert cli.main([str(src), "-o", str(out), "--bundle", str(bundle), "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not out.exists()


def test_readme_states_the_default_backend() -> None:
    text = (ROOT / "README.md").read_text()
    from wbsr_runtime.upscaler import Upscaler

    assert cli._parser().get_default("backend") is None  # not given: the Upscaler's default applies
    assert inspect.signature(Upscaler).parameters["backend"].default == "auto"
    assert "`auto` (default)" in text and "`ort` (default)" not in text
