"""The `trt` backend end to end on a CPU: engines built by wbsr-export's real code path with TensorRT and
cuda-python replaced by stand-ins that keep their conventions (tests/trt_standin.py): profiles that refuse
other shapes, a per-thread current device, `(err, *values)` results, cuda-python 12.x raising without a
driver."""

from __future__ import annotations

import importlib.machinery
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.nearest_bundle import build_nearest_bundle, nearest
from tests.trt_standin import FakeCudart, StandinTensorRT, add_standin_engines, installed
from wbsr_runtime.backends import BackendError, TrtOptions, choose_backend, open_runners
from wbsr_runtime.backends.trt import CudaError, TrtRunner
from wbsr_runtime.engines import EngineMismatch
from wbsr_runtime.manifest import load_manifest
from wbsr_runtime.upscaler import Upscaler

GAINS = (1.0, 2.0, 0.5)


@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nearest x2 bundle (patch 8, overlap 2) with stand-in engines for "Fake GPU", batch 1..4."""
    root = build_nearest_bundle(tmp_path_factory.mktemp("trt") / "b", scale=2, gains=GAINS, patch=8, overlap=2)
    cudart = FakeCudart()
    add_standin_engines(root, StandinTensorRT(cudart), cudart, max_batch=4)
    return root


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> tuple[StandinTensorRT, FakeCudart]:
    cudart = FakeCudart(devices=2)
    trt = StandinTensorRT(cudart)
    with installed(trt, cudart):
        yield trt, cudart


def image(h: int = 29, w: int = 37) -> np.ndarray:
    return np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _shapes_sent(trt: StandinTensorRT) -> set[tuple[int, ...]]:
    assert not [e.refused for e in trt.engines if e.refused], "shapes outside the profile were sent"
    return {s[1:] for e in trt.engines for s in e.shapes}


@pytest.mark.parametrize(
    "knobs",
    [
        {"mode": "dynamic"},
        {"mode": "full"},
        {"mode": "dynamic", "merge": 4},
        {"mode": "dynamic", "patch": 8, "overlap": 2},
        {"mode": "dynamic", "cost": "measured", "tolerance": 0.2},
    ],
    ids=["dynamic", "full", "merge", "same-tiling", "measured"],
)
def test_every_mode_sends_only_profile_shapes(engine_bundle: Path, stack, knobs: dict) -> None:
    trt, cudart = stack
    img = image()
    with Upscaler(engine_bundle, backend="trt", workers=2, **knobs) as up:
        out = up.upscale(img)
        assert (up.patch, up.overlap, up.merge) == (8, 2, 0) and up.choice.backend == "trt"
    assert _shapes_sent(trt) == {(3, 12, 12)} and cudart.violations == []
    if "cost" not in knobs:  # the same equal tiles on ONNX Runtime give the same image, bit for bit
        with Upscaler(engine_bundle, backend="ort", **{**knobs, "merge": 0}) as ref:
            np.testing.assert_array_equal(out, ref.upscale(img))


def test_whole_mode_and_other_tilings_are_refused_before_running(engine_bundle: Path, stack) -> None:
    trt, _ = stack
    with pytest.raises(ValueError, match="mode 'whole'.*12x12 tiles.*mode 'full'"):
        Upscaler(engine_bundle, backend="trt", mode="whole")
    with pytest.raises(EngineMismatch, match=r"16x16 tiles.*--bundle \S+ --patch 12 --overlap 2 --trt"):
        Upscaler(engine_bundle, backend="trt", patch=12)
    assert _shapes_sent(trt) == set()


def test_engines_for_another_tiling_are_run_with_it(engine_bundle: Path, tmp_path: Path, stack) -> None:
    """`wbsr-export --bundle D --trt --patch 6 --overlap 1`: the engines record their tiling, the runtime
    tiles with it (and an explicit matching --patch/--overlap is accepted)."""
    trt, cudart = stack
    bundle = Path(shutil.copytree(engine_bundle, tmp_path / "b"))
    add_standin_engines(bundle, trt, cudart, patch=6, overlap=1, max_batch=2)
    with Upscaler(bundle, backend="ort", mode="full", patch=6, overlap=1, merge=0) as ref:
        expected = ref.upscale(image())
    for knobs in ({}, {"patch": 6, "overlap": 1}):
        with Upscaler(bundle, backend="trt", mode="full", **knobs) as up:
            np.testing.assert_array_equal(up.upscale(image()), expected)
            assert (up.patch, up.overlap) == (6, 1)
    assert _shapes_sent(trt) == {(3, 8, 8)}


def test_workers_on_a_second_gpu_keep_everything_there(engine_bundle: Path, stack) -> None:
    """cuda:1 with two worker threads: engines, contexts, buffers and streams all on device 1 (the current
    device is per thread, and the scheduler's threads start on device 0)."""
    trt, cudart = stack
    with Upscaler(engine_bundle, backend="trt", device="cuda:1", workers=2, chunk=2) as up:
        up.upscale(image(40, 41))
        assert {e.device for e in trt.engines} == {1} and len(trt.engines) >= 2
        assert {d for _, d in cudart.memory.values() if d is not None} == {1}
        assert set(cudart.streams.values()) == {1}
    assert cudart.violations == [] and trt.violations == []


def test_partial_batches_and_the_device_pointer_entry_point(engine_bundle: Path, stack) -> None:
    trt, cudart = stack
    manifest = load_manifest(engine_bundle)
    with TrtRunner(manifest, device="cuda:1") as runner:
        assert runner.fixed_tiles == (8, 2) and runner.max_batch == 4
        for n in (1, 3, 4):
            batch = np.random.default_rng(n).random((n, 3, 12, 12), dtype=np.float32)
            np.testing.assert_array_equal(runner.run_subnet(1, batch), 2 * nearest(batch, 2))
        cudart.cudaSetDevice(1)
        _, src = cudart.cudaMalloc(3 * 3 * 12 * 12 * 4)
        _, dst = cudart.cudaMalloc(3 * 3 * 24 * 24 * 4)
        x = np.random.default_rng(5).random((3, 3, 12, 12), dtype=np.float32)
        cudart.cudaMemcpyAsync(src, x.ctypes.data, x.nbytes, 1, runner._stream)
        assert runner.run_subnet_device(2, src, dst, x.shape) == (3, 3, 24, 24)
        runner.synchronize()
        y = np.empty((3, 3, 24, 24), np.float32)
        cudart.cudaMemcpyAsync(y.ctypes.data, dst, y.nbytes, 2, runner._stream)
        np.testing.assert_array_equal(y, 0.5 * nearest(x, 2))
        with pytest.raises(ValueError, match="outside the engine's profile"):
            runner.run_subnet_device(0, src, dst, (5, 3, 12, 12))
        for default in (0, 1, 2):
            with pytest.raises(BackendError, match="default stream"):
                runner.run_subnet_device(0, src, dst, x.shape, stream=default)
    with pytest.raises(BackendError, match="default stream"):
        TrtRunner(manifest, options=TrtOptions(stream=0))
    assert cudart.violations == []


def test_no_driver_is_one_clear_error(engine_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-python 12.x raises RuntimeError ("Failed to dlopen libcuda.so.1") instead of returning an error."""
    cudart = FakeCudart(driver=False)
    with installed(StandinTensorRT(cudart), cudart):
        with pytest.raises(CudaError, match="no usable NVIDIA driver") as info:
            TrtRunner(load_manifest(engine_bundle))
        assert isinstance(info.value, BackendError) and "\n" not in str(info.value)
        choice = choose_backend(load_manifest(engine_bundle), "auto")
    assert choice.backend != "trt" and "trt: cudaSetDevice failed: no usable NVIDIA driver" in choice.reason


def _as_module(name: str, obj: object) -> object:
    obj.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return obj


@pytest.mark.parametrize("spelling", ["cuda.bindings.runtime", "cuda.cudart"])
def test_auto_finds_tensorrt_through_either_cuda_python_spelling(
    engine_bundle: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    """`auto` picks TensorRT when the bundle has engines for this GPU, whether cuda-python is the >= 12.6
    `cuda.bindings.runtime` or the older `cuda.cudart` (real modules in sys.modules, no patched helpers)."""
    cudart = _as_module(spelling, FakeCudart())
    cuda = _as_module("cuda", ModuleType("cuda"))
    cuda.__path__ = []
    monkeypatch.setitem(sys.modules, "tensorrt", _as_module("tensorrt", StandinTensorRT(cudart)))
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    if spelling == "cuda.cudart":
        cuda.cudart = cudart
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    else:
        bindings = _as_module("cuda.bindings", ModuleType("cuda.bindings"))
        bindings.__path__, bindings.runtime, cuda.bindings = [], cudart, bindings
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, spelling, cudart)
    choice = choose_backend(load_manifest(engine_bundle), "auto")
    assert (choice.backend, choice.device) == ("trt", "cuda:0") and "TensorRT engines" in choice.reason
    with open_runners(load_manifest(engine_bundle), choice)[0] as runner:
        assert runner.name == "trt" and runner.device == "cuda:0 (Fake GPU)"


def test_auto_passes_over_engines_for_another_gpu(engine_bundle: Path) -> None:
    cudart = FakeCudart(name="NVIDIA H200", cc=(9, 0))
    with installed(StandinTensorRT(cudart), cudart):
        choice = choose_backend(load_manifest(engine_bundle), "auto")
        assert choice.backend != "trt" and "built for TensorRT 10.3.0 on Fake GPU" in choice.reason
        with pytest.raises(EngineMismatch, match="wbsr-export --bundle .* --trt"):
            open_runners(load_manifest(engine_bundle), "trt")
