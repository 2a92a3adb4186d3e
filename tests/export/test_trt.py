"""TensorRT engine building and the trt backend: everything that runs without TensorRT.

The builds and runs themselves go through a fake toolchain (tests the decisions: keys, reuse, refusal,
validation), and `build_plan` through a mock `tensorrt` module (tests the calls it makes). Tests that need a
real GPU and TensorRT are marked `trt` and skip here.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest

from wbsr_export import trt as build
from wbsr_export.attach import commit_engines
from wbsr_runtime.backends.base import BackendError
from wbsr_runtime.engines import EngineMismatch, TensorRTUnavailable

onnx = pytest.importorskip("onnx")
from tests.nearest_bundle import build_nearest_bundle  # noqa: E402

SCALE = 2


def _write_bundle(root: Path, num_subnets: int = 2) -> Path:
    """Nearest x2 subnets (fp32 and fp16 graphs), tiles of 6 + 2 x 1."""
    return build_nearest_bundle(root, scale=SCALE, gains=(1.0,) * num_subnets, patch=6, overlap=1, fp16=True)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return _write_bundle(tmp_path / "b")


class FakeToolchain:
    """Stands in for TensorRT: a 'plan' names its ONNX file; running it upscales exactly (or as told)."""

    version, gpu_name, compute_capability = "10.3.0", "Fake GPU", "8.7"

    def __init__(self, output=None, **ident):
        self.__dict__.update(ident)
        self.builds: list[str] = []
        self.ran: list[bytes] = []
        self.output = output

    def build(self, onnx_path, *, timing_cache, **kwargs):
        self.builds.append(Path(onnx_path).name)
        return f"plan:{Path(onnx_path).name}:{self.version}".encode(), timing_cache + b"t"

    def run(self, plan, batch, input_name, output_name):
        self.ran.append(plan)
        out = batch.repeat(SCALE, axis=2).repeat(SCALE, axis=3)
        return out if self.output is None else self.output(out)


def _build(bundle: Path, **kwargs) -> list[dict]:
    """What `wbsr-export --trt --fp16` does: build, then commit the files and records to the manifest."""
    result = build.build_engines(bundle, **{"precision": "fp16", **kwargs})
    commit_engines(bundle, result)
    return result.records


def test_builds_are_keyed_recorded_and_validated(bundle):
    tc = FakeToolchain()
    records = _build(bundle, max_batch=2, toolchain=tc)
    assert tc.builds == ["subnet_00.fp16.onnx", "subnet_01.fp16.onnx"]
    assert len(tc.ran) == 4  # each engine checked at batch 1 and at max batch
    for i, r in enumerate(records):
        assert r["target"] == i and r["file"] == f"trt/subnet_{i:02d}.{r['key']}.plan"
        assert (bundle / r["file"]).read_bytes() == f"plan:subnet_{i:02d}.fp16.onnx:10.3.0".encode()
        assert r["profile"] == {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [2, 3, 8, 8]}
        assert (r["tensorrt"], r["gpu"], r["compute_capability"], r["precision"]) == (
            "10.3.0",
            "Fake GPU",
            "8.7",
            "fp16",
        )
        assert r["workspace"] == 1 << 30 and r["opt_level"] == 3 and r["max_abs_diff_vs_ort"] == 0.0
        assert r["tiling"] == {"patch": 6, "overlap": 1}
        assert r["onnx_sha256"] == build.sha256_file(bundle / f"subnet_{i:02d}.fp16.onnx")
    assert records[0]["key"] != records[1]["key"] or records[0]["onnx_sha256"] == records[1]["onnx_sha256"]
    caches = list((bundle / "trt").glob("timing.*.cache"))
    assert len(caches) == 1 and caches[0].read_bytes() == b"tt"  # one cache, shared by both builds
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["files"][caches[0].relative_to(bundle).as_posix()] == build.sha256_file(caches[0])


def test_second_call_reuses_engines(bundle):
    first = _build(bundle, max_batch=2, toolchain=FakeToolchain())
    tc = FakeToolchain()
    again = build.build_engines(bundle, precision="fp16", max_batch=2, toolchain=tc)
    assert again.records == first and again.files == {} and tc.builds == [] and tc.ran == []


def test_other_machine_or_settings_build_new_engines(bundle):
    first = _build(bundle, max_batch=2, toolchain=FakeToolchain())
    for tc, kwargs in [
        (FakeToolchain(version="10.7.0"), {}),
        (FakeToolchain(), {"max_batch": 4}),
        (FakeToolchain(gpu_name="Orin"), {}),
        (FakeToolchain(), {"precision": "fp32"}),
    ]:
        kwargs = {"max_batch": 2, **kwargs}
        records = build.build_engines(bundle, toolchain=tc, **{"precision": "fp16", **kwargs}).records
        assert len(tc.builds) == 2 and {r["key"] for r in records}.isdisjoint({r["key"] for r in first})
    assert tc.builds == ["subnet_00.onnx", "subnet_01.onnx"]  # fp32 builds from the fp32 graph


def test_altered_or_unrecorded_plan_is_not_loaded(bundle):
    first = _build(bundle, max_batch=2, toolchain=FakeToolchain())
    (bundle / first[0]["file"]).write_bytes(b"tampered")  # hash no longer matches the manifest
    tc = FakeToolchain()
    again = _build(bundle, max_batch=2, toolchain=tc)
    assert tc.builds == ["subnet_00.fp16.onnx"] and again == first
    assert (bundle / first[0]["file"]).read_bytes().startswith(b"plan:")
    # a plan file on disk that no manifest record vouches for is rebuilt, not trusted
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["engines"] = []
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    tc = FakeToolchain()
    build.build_engines(bundle, precision="fp16", max_batch=2, toolchain=tc)
    assert len(tc.builds) == 2


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda y: np.where(y > 0.5, np.nan, y), "NaN"),
        (lambda y: y + 0.1, "exceeds"),
        (lambda y: y[:, :, :-1], "shape"),
    ],
)
def test_validation_rejects_bad_engines(bundle, corrupt, match):
    with pytest.raises(build.EngineValidationError, match=match):
        _build(bundle, max_batch=2, toolchain=FakeToolchain(output=corrupt))
    assert not (bundle / "trt").exists()


def test_compare_outputs_thresholds():
    ref = np.zeros((1, 3, 4, 4), np.float32)
    assert build.compare_outputs(ref, ref + 0.01, build.MAX_ABS_DIFF["fp16"]) == pytest.approx(0.01)
    with pytest.raises(build.EngineValidationError):
        build.compare_outputs(ref, ref + 0.01, build.MAX_ABS_DIFF["fp32"])
    with pytest.raises(build.EngineValidationError, match="NaN or inf"):
        build.compare_outputs(ref, ref + np.inf, 1.0)


def test_fp16_needs_fp16_graphs(bundle):
    assert build.build_engines.__kwdefaults__["precision"] == "fp32"  # fp16 is asked for, as --fp16 does
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["subnets"][0]["files"]["onnx_fp16"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(build.EngineBuildError, match="--fp16"):
        build.build_engines(bundle, precision="fp16", toolchain=FakeToolchain())


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_without_tensorrt_one_line_error(bundle, no_tensorrt):
    with pytest.raises(TensorRTUnavailable) as info:
        build.build_engines(bundle)
    msg = str(info.value)
    assert "\n" not in msg and "pip install tensorrt" in msg and "JetPack" in msg and "NVIDIA GPU" in msg
    assert build.TensorRTUnavailable is TensorRTUnavailable


def test_build_plan_calls(tmp_path):
    trt = mock.MagicMock()
    trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 3
    builder = trt.Builder.return_value
    builder.build_serialized_network.return_value = b"PLAN"
    config = builder.create_builder_config.return_value
    config.create_timing_cache.return_value.serialize.return_value = b"CACHE"
    onnx_path = tmp_path / "g.onnx"
    onnx_path.write_bytes(b"graph")
    profile = {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [2, 3, 8, 8]}
    kw = dict(
        input_name="lr",
        profile=profile,
        precision="fp16",
        workspace=1 << 20,
        opt_level=4,
        timing_cache=b"old",
    )
    assert build.build_plan(trt, None, onnx_path, **kw) == (b"PLAN", b"CACHE")
    builder.create_network.assert_called_once_with(1 << 3)
    trt.OnnxParser.return_value.parse.assert_called_once_with(b"graph")
    builder.create_optimization_profile.return_value.set_shape.assert_called_once_with(
        "lr", profile["min"], profile["opt"], profile["max"]
    )
    config.create_timing_cache.assert_called_once_with(b"old")
    assert config.builder_optimization_level == 4
    config.set_memory_pool_limit.assert_called_once_with(trt.MemoryPoolType.WORKSPACE, 1 << 20)
    config.set_flag.assert_not_called()  # precision lives in the graph, never in builder flags

    builder.build_serialized_network.return_value = None
    with pytest.raises(build.EngineBuildError, match="could not build g.onnx"):
        build.build_plan(trt, None, onnx_path, **kw)
    parser = trt.OnnxParser.return_value
    parser.parse.return_value, parser.num_errors, parser.get_error.return_value = False, 1, "bad node"
    with pytest.raises(build.EngineBuildError, match="could not parse g.onnx: bad node"):
        build.build_plan(trt, None, onnx_path, **kw)


# --- the runtime backend ------------------------------------------------------------------------------------
def test_runner_imports_and_refuses_without_tensorrt(no_tensorrt):
    from wbsr_runtime.backends.trt import TrtRunner

    with pytest.raises(TensorRTUnavailable) as info:
        TrtRunner(SimpleNamespace(subnets=[], engines=[], root="b"))
    assert "\n" not in str(info.value) and "pip install tensorrt" in str(info.value)
    assert isinstance(info.value, BackendError)  # what open_runners' callers catch


def test_cuda_check():
    from wbsr_runtime.backends.trt import CudaError, cuda_check

    class Err(int):
        name = "cudaErrorMemoryAllocation"

    assert cuda_check((0,), "x") is None
    assert cuda_check((0, 7), "x") == 7
    assert cuda_check((0, 1, 2), "x") == (1, 2)
    with pytest.raises(CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        cuda_check((Err(2), 0), "cudaMalloc")


def test_runner_refuses_foreign_engines(monkeypatch):
    """Before touching any engine: records for another GPU are refused with the rebuild command."""
    from wbsr_runtime.backends import trt as backend

    props = SimpleNamespace(name=b"NVIDIA GeForce RTX 4090\0\0", major=8, minor=9)
    cudart = SimpleNamespace(cudaSetDevice=lambda d: (0,), cudaGetDeviceProperties=lambda d: (0, props))
    monkeypatch.setattr(backend, "import_tensorrt", lambda: SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(backend, "import_cudart", lambda: cudart)
    record = {
        "target": 0,
        "file": "trt/subnet_00.k.plan",
        "tensorrt": "10.3.0",
        "gpu": "Orin",
        "compute_capability": "8.7",
        "profile": {"min": [1, 3, 8, 8], "max": [2, 3, 8, 8]},
    }
    manifest = SimpleNamespace(subnets=[{}], engines=[record], root="engines/x2")
    with pytest.raises(
        EngineMismatch, match=r"GPU and compute capability differ.*--bundle engines/x2 --trt$"
    ):
        backend.TrtRunner(manifest)


@pytest.mark.trt
def test_real_tensorrt_roundtrip(bundle):
    """On a machine with TensorRT, cuda-python and a GPU: build, validate and run one engine."""
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    records = build.build_engines(bundle, max_batch=2, precision="fp32")
    assert all(r["max_abs_diff_vs_ort"] <= build.MAX_ABS_DIFF["fp32"] for r in records)


class _HostCudart:
    """cudart stand-in whose 'device' memory is host memory: enough to check TrtEngine's sizes and copies."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.live: dict[int, object] = {}

    def cudaMallocHost(self, nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        self.live[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    cudaMalloc = cudaMallocHost

    def cudaFree(self, ptr):
        del self.live[ptr]
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)


class _UpscaleContext:
    """Execution context stand-in: nearest x2 from the bound input address to the bound output address."""

    def __init__(self):
        self.shape, self.addr, self.ok = None, {}, True

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        n, c, h, w = self.shape
        return (n, c, h * SCALE, w * SCALE) if name == "sr" else self.shape

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream):
        def view(name, shape):
            p = ctypes.cast(self.addr[name], ctypes.POINTER(ctypes.c_float))
            return np.ctypeslib.as_array(p, (int(np.prod(shape)),)).reshape(shape)

        view("sr", self.get_tensor_shape("sr"))[:] = view("lr", self.shape).repeat(2, 2).repeat(2, 3)
        return self.ok


def test_trt_engine_buffers_and_copies():
    from wbsr_runtime.backends.trt import BackendError, TrtEngine

    trt = SimpleNamespace(DataType=SimpleNamespace(FLOAT="f32"))
    context = _UpscaleContext()
    engine = SimpleNamespace(
        num_io_tensors=2,
        get_tensor_name=["lr", "sr"].__getitem__,
        get_tensor_dtype=lambda n: "f32",
        get_tensor_profile_shape=lambda n, p: ((1, 3, 4, 4), (2, 3, 4, 4), (2, 3, 4, 4)),
        create_execution_context=lambda: context,
    )
    cudart = _HostCudart()
    runner = TrtEngine(trt, cudart, engine, "lr", "sr")
    assert runner.max_batch == 2 and len(cudart.live) == 4  # pinned + device, input + output, profile max
    for n in (1, 2):
        batch = np.random.default_rng(n).random((n, 3, 4, 4), dtype=np.float32)
        np.testing.assert_array_equal(runner.execute(batch, 0), batch.repeat(2, 2).repeat(2, 3))
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner.execute(np.zeros((3, 3, 4, 4), np.float32), 0)
    context.ok = False
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        runner.execute(np.zeros((1, 3, 4, 4), np.float32), 0)
    runner.close()
    assert cudart.live == {}
