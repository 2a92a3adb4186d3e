"""Stand-ins for TensorRT and cuda-python that keep the real APIs' conventions (tests and gpu_check.py).

- `FakeCudart`: cuda-python's `cuda.bindings.runtime` on the host ("device" memory is host memory). Calls
  return `(err, *values)`; the current device is per thread (as in CUDA); every allocation and stream
  remembers the device it was made on; a copy whose stream or buffers are not on the current device is
  recorded in `violations`. `driver=False` raises RuntimeError on every call, as cuda-python 12.x does when
  libcuda is missing.
- `StandinTensorRT`: the TensorRT 10.3-11.x Python API this project uses, builder and runtime. A "plan" is
  JSON naming the profile and what the graph computes: `gain` x nearest upscaling by `scale` (the graphs of
  `tests/nearest_bundle.py`). `set_input_shape` returns False outside the profile, `execute_async_v3`
  returns False (and records why) when the context, stream or buffers are not on the current device,
  `create_timing_cache` returns None when `timing_cache_none` is set.
- Where the engine's arithmetic runs: `HostKernel` (numpy on FakeCudart's host pointers) or `CupyKernel`
  (CuPy on real device pointers, on the given stream), so that on a GPU machine without TensorRT the `trt`
  backend's real cuda-python plumbing runs end to end.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np

VERSION = "10.3.0"  # the stand-in's tensorrt.__version__ (engine records carry it)


class _Err(int):
    """A cudaError_t: an int with a name."""

    def __new__(cls, code: int, name: str) -> _Err:
        err = int.__new__(cls, code)
        err.name = name
        return err


OK = _Err(0, "cudaSuccess")


class FakeCudart:
    """cuda-python's runtime on the host; see the module docstring."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self, devices: int = 1, name: str = "Fake GPU", cc: tuple[int, int] = (8, 9), driver: bool = True):
        self.devices, self.gpu_name, self.cc, self.driver = devices, name, cc, driver
        self._tls = threading.local()
        self.memory: dict[int, tuple[Any, int | None]] = {}  # ptr -> (buffer, device; None: pinned host)
        self.streams: dict[int, int] = {}  # handle -> device
        self.violations: list[str] = []
        self._next = 0x100

    @property
    def current(self) -> int:
        return getattr(self._tls, "device", 0)

    def _driver(self) -> None:
        if not self.driver:
            raise RuntimeError("Failed to dlopen libcuda.so.1")

    def cudaGetDeviceCount(self):
        self._driver()
        return OK, self.devices

    def cudaSetDevice(self, device):
        self._driver()
        if not 0 <= int(device) < self.devices:
            return (_Err(101, "cudaErrorInvalidDevice"),)
        self._tls.device = int(device)
        return (OK,)

    def cudaGetDevice(self):
        self._driver()
        return OK, self.current

    def cudaGetDeviceProperties(self, device):
        self._driver()
        props = SimpleNamespace(name=self.gpu_name.encode() + b"\0\0", major=self.cc[0], minor=self.cc[1])
        return OK, props

    def _alloc(self, nbytes, device):
        buf = ctypes.create_string_buffer(max(1, int(nbytes)))
        self.memory[ctypes.addressof(buf)] = (buf, device)
        return OK, ctypes.addressof(buf)

    def cudaMalloc(self, nbytes):
        self._driver()
        return self._alloc(nbytes, self.current)

    def cudaMallocHost(self, nbytes):
        self._driver()
        return self._alloc(nbytes, None)

    def cudaFree(self, ptr):
        self._driver()
        del self.memory[int(ptr)]
        return (OK,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags):
        self._driver()
        self._next += 1
        self.streams[self._next] = self.current
        return OK, self._next

    def cudaStreamDestroy(self, stream):
        self._driver()
        del self.streams[int(stream)]
        return (OK,)

    def cudaStreamSynchronize(self, stream):
        self._driver()
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self._driver()
        device_ptr = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        self.check_launch("cudaMemcpyAsync", stream, [device_ptr])
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (OK,)

    def check_launch(self, what: str, stream: int, device_ptrs: list[int], device: int | None = None) -> bool:
        """Record (and return False) when `stream`, the device buffers or `device` are not on the current
        device: what CUDA refuses or silently gets wrong."""
        here, problems = self.current, []
        if self.streams.get(int(stream)) != here:
            problems.append(f"stream {stream} is on device {self.streams.get(int(stream))}")
        for ptr in device_ptrs:
            if self.memory.get(int(ptr), (None, "unknown"))[1] != here:
                problems.append(f"buffer {ptr:#x} is on device {self.memory.get(int(ptr), (None, '?'))[1]}")
        if device is not None and device != here:
            problems.append(f"the engine/context is on device {device}")
        for p in problems:
            self.violations.append(f"{what} with device {here} current: {p}")
        return not problems


# --- where the stand-in engine computes -----------------------------------------------------------------------
def host_view(ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    c_floats = ctypes.cast(int(ptr), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(c_floats, (int(np.prod(shape)),)).reshape(shape)


class HostKernel:
    """gain x nearest upscaling on FakeCudart's host "device" pointers, checking devices first."""

    def __init__(self, cudart: FakeCudart) -> None:
        self.cudart = cudart

    def run(self, io: dict[str, Any], stream: int, device: int) -> bool:
        if not self.cudart.check_launch("execute_async_v3", stream, [io["in_ptr"], io["out_ptr"]], device):
            return False
        x, y = host_view(io["in_ptr"], io["in_shape"]), host_view(io["out_ptr"], io["out_shape"])
        s = io["scale"]
        y.reshape(*x.shape[:3], s, x.shape[3], s)[:] = io["gain"] * x[:, :, :, None, :, None]
        return True


class CupyKernel:
    """The same on real device pointers, with CuPy, enqueued on the given CUDA stream."""

    def __init__(self) -> None:
        import cupy

        self.cp = cupy

    def _view(self, ptr: int, shape: tuple[int, ...]) -> Any:
        cp = self.cp
        memory = cp.cuda.UnownedMemory(int(ptr), 4 * int(np.prod(shape)), owner=None)
        return cp.ndarray(shape, cp.float32, cp.cuda.MemoryPointer(memory, 0))

    def run(self, io: dict[str, Any], stream: int, device: int) -> bool:
        with self.cp.cuda.Device(device), self.cp.cuda.ExternalStream(int(stream)):
            x, y = self._view(io["in_ptr"], io["in_shape"]), self._view(io["out_ptr"], io["out_shape"])
            s = io["scale"]
            y.reshape(*x.shape[:3], s, x.shape[3], s)[...] = io["gain"] * x[:, :, :, None, :, None]
        return True


# --- TensorRT ---------------------------------------------------------------------------------------------
class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine, self.shape, self.addresses = engine, None, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        shape = tuple(int(d) for d in shape)
        inside = name == self.engine.input and len(shape) == len(lo)
        if not inside or not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
            self.engine.refused.append(shape)
            return False  # TensorRT returns False for a shape outside the profile
        self.shape = shape
        return True

    def get_tensor_shape(self, name):
        n, c, h, w = self.shape
        s = self.engine.plan["scale"]
        return (n, c, h * s, w * s) if name == self.engine.output else self.shape

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream):
        e = self.engine
        e.shapes.append(self.shape)
        io = {
            "in_ptr": self.addresses[e.input],
            "out_ptr": self.addresses[e.output],
            "in_shape": self.shape,
            "out_shape": self.get_tensor_shape(e.output),
            "gain": e.plan["gain"],
            "scale": e.plan["scale"],
        }
        return e.trt.kernel.run(io, int(stream), e.device)


class _Engine:
    def __init__(self, trt: StandinTensorRT, plan: dict[str, Any], device: int) -> None:
        self.trt, self.plan, self.device = trt, plan, device
        self.input, self.output = plan["input"], plan["output"]
        self.profile = [tuple(plan["profile"][k]) for k in ("min", "opt", "max")]
        self.num_io_tensors = 2
        self.shapes: list[tuple[int, ...]] = []  # every input shape executed
        self.refused: list[tuple[int, ...]] = []  # every shape set_input_shape refused

    def get_tensor_name(self, i):
        return (self.input, self.output)[i]

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    def get_tensor_profile_shape(self, name, profile_index):
        return self.profile

    def create_execution_context(self):
        if self.trt.current_device() != self.device:
            self.trt.violations.append(f"context for an engine of device {self.device} created on another")
        return _Context(self)


class _Network:
    def __init__(self) -> None:
        self.graph: dict[str, Any] | None = None


class _Parser:
    def __init__(self, network: _Network, logger: Any) -> None:
        self.network, self.num_errors = network, 0

    def parse(self, blob: bytes) -> bool:
        import onnx
        from onnx import numpy_helper

        model = onnx.load_from_string(bytes(blob))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.network.graph = {
            "input": model.graph.input[0].name,
            "output": model.graph.output[0].name,
            "scale": int(inits["scales"][-1]),
            "gain": float(inits.get("gain", 1.0)),
        }
        return True

    def get_error(self, i):
        return "no error"


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(map(int, lo)), list(map(int, opt)), list(map(int, hi))]


class _TimingCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = bytes(blob)

    def serialize(self):
        return self.blob + b"t"  # one more "timing" per build


class _Config:
    def __init__(self, trt: StandinTensorRT) -> None:
        self.trt, self.profiles, self.cache, self.builder_optimization_level = trt, [], None, 3

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def clear_flag(self, flag):
        pass

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return 0

    def create_timing_cache(self, blob):
        return None if self.trt.timing_cache_none else _TimingCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        if not isinstance(cache, _TimingCache):  # the pybind11 signature takes an ITimingCache, not None
            raise TypeError("set_timing_cache(): incompatible function arguments")
        self.cache = cache
        return True


class _Builder:
    def __init__(self, trt: StandinTensorRT, logger: Any) -> None:
        self.trt = trt

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config(self.trt)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        graph = network.graph
        if graph is None or len(config.profiles) != 1 or graph["input"] not in config.profiles[0].shapes:
            return None
        lo, opt, hi = config.profiles[0].shapes[graph["input"]]
        plan = {"standin": VERSION, **graph, "profile": {"min": lo, "opt": opt, "max": hi}}
        return json.dumps(plan).encode()


class StandinTensorRT:
    """The `tensorrt` module as this project uses it; the engines compute with `kernel` on `cudart`."""

    __version__ = VERSION
    DataType = SimpleNamespace(FLOAT="float32")
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    BuilderFlag = SimpleNamespace(TF32="tf32")

    class Logger:
        WARNING = 2

        def __init__(self, level: int = 2) -> None:
            self.level = level

    def __init__(self, cudart: Any, kernel: Any = None, timing_cache_none: bool = False) -> None:
        self.cudart, self.kernel = cudart, kernel if kernel is not None else HostKernel(cudart)
        self.timing_cache_none = timing_cache_none
        self.engines: list[_Engine] = []
        self.violations: list[str] = []

    def current_device(self) -> int:
        return int(self.cudart.cudaGetDevice()[1])

    def Builder(self, logger):  # noqa: N802 (TensorRT's spelling)
        return _Builder(self, logger)

    def OnnxParser(self, network, logger):  # noqa: N802
        return _Parser(network, logger)

    def Runtime(self, logger):  # noqa: N802
        return SimpleNamespace(deserialize_cuda_engine=self.deserialize)

    def deserialize(self, plan: bytes) -> _Engine | None:
        try:
            data = json.loads(bytes(plan))
        except ValueError:
            return None  # TensorRT returns None for a plan it cannot read
        if data.get("standin") != self.__version__:
            return None
        self.engines.append(_Engine(self, data, self.current_device()))
        return self.engines[-1]


@contextmanager
def installed(trt: StandinTensorRT, cudart: Any) -> Iterator[None]:
    """Make the runtime and the exporter import `trt` and `cudart` instead of tensorrt and cuda-python."""
    from wbsr_runtime.backends import trt as backend

    saved = backend.import_tensorrt, backend.import_cudart
    backend.import_tensorrt, backend.import_cudart = (lambda: trt), (lambda: cudart)
    try:
        yield
    finally:
        backend.import_tensorrt, backend.import_cudart = saved


def add_standin_engines(bundle: Any, trt: StandinTensorRT, cudart: Any, **options: Any) -> list[dict[str, Any]]:
    """Build and record stand-in engines for every subnet of `bundle` (wbsr-export's path, TensorRT
    replaced): the real `TensorRTToolchain`, `build_plan`, validation against ONNX Runtime and commit."""
    from wbsr_export.attach import add_engines

    with installed(trt, cudart):
        return add_engines(bundle, **{"precision": "fp32", **options})
