"""TensorRT backend: the bundle's engines, run with cuda-python (`cuda.bindings.runtime`), not pycuda/torch.

Written against the TensorRT named-tensor API, unchanged from 10.3 (JetPack 6) to 11.x; it avoids everything
removed in 10.0 or 11.x (binding indices, `execute_async_v2`, `device_memory_size`, ...). NOT exercised by CI
or by any run of ours: no machine here has TensorRT. Everything around it (engine records, keys, checks) lives
in `wbsr_runtime.engines` and is tested.

Layout: `TrtEngine` is one engine's execution context plus pinned host and device buffers sized for the
profile maximum, bound to no stream; `TrtRunner` owns one non-blocking stream (or borrows the caller's) and
one `TrtEngine` per subnet. Deserialised engines are shared, reference-counted, by all runners of a process
(one engine per subnet, one execution context per concurrent worker, as TensorRT intends).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engines import EngineMismatch, TensorRTUnavailable, engine_tiling, find_engine, rebuild_command
from .base import BackendError, LazySubnets, native_handle, stream_handle
from .options import TrtOptions

log = logging.getLogger(__name__)


# --- lazy imports and cuda-python error handling ------------------------------------------------------------
def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable("TensorRT") from None
    return tensorrt


def import_cudart() -> Any:
    """`cuda.bindings.runtime` (cuda-python >= 12.6), or the older `cuda.cudart` spelling."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise TensorRTUnavailable("cuda-python") from None
    return runtime


class CudaError(BackendError):
    """A CUDA runtime call failed (or no usable NVIDIA driver is here)."""


def cuda_check(result: Any, what: str) -> Any:
    """cuda-python returns `(err, *values)`: raise `CudaError` naming the call unless err is success (0);
    return None, the single value, or the tuple of values."""
    result = result if isinstance(result, tuple) else (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        raise CudaError(f"{what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_call(fn: Any, *args: Any) -> Any:
    """Call cuda-python runtime function `fn` and check its `(err, *values)` result (`cuda_check`).

    Without a driver, cuda-python 13 returns an error code but 12.x raises RuntimeError ("Failed to dlopen
    libcuda.so.1"): both become a one-line `CudaError`."""
    what = getattr(fn, "__name__", "CUDA call")
    try:
        result = fn(*args)
    except RuntimeError as err:
        raise CudaError(f"{what} failed: no usable NVIDIA driver here ({err})") from None
    return cuda_check(result, what)


def gpu_identity(cudart: Any, device: int) -> tuple[str, str]:
    """(GPU name, compute capability "M.m") of CUDA device `device`: the same strings export records."""
    props = cuda_call(cudart.cudaGetDeviceProperties, device)
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name).strip(), f"{int(props.major)}.{int(props.minor)}"


# --- one engine: context + reused buffers -------------------------------------------------------------------
class _PinnedBuffer:
    """`count` float32 in pinned host memory (a numpy view) and in device memory."""

    def __init__(self, cudart: Any, count: int) -> None:
        self._cudart, self.nbytes = cudart, 4 * int(count)
        self.host_ptr = self.device_ptr = 0
        try:
            self.host_ptr = native_handle(cuda_call(cudart.cudaMallocHost, self.nbytes))
            self.device_ptr = native_handle(cuda_call(cudart.cudaMalloc, self.nbytes))
        except BaseException:
            self.free()
            raise
        c_floats = ctypes.cast(self.host_ptr, ctypes.POINTER(ctypes.c_float))
        self.host = np.ctypeslib.as_array(c_floats, (int(count),))

    def free(self) -> None:
        if self.device_ptr:
            cuda_call(self._cudart.cudaFree, self.device_ptr)
            self.device_ptr = 0
        if self.host_ptr:
            self.host = None
            cuda_call(self._cudart.cudaFreeHost, self.host_ptr)
            self.host_ptr = 0


class TrtEngine:
    """One deserialised engine's execution context with float32 I/O buffers sized for the profile maximum."""

    def __init__(self, trt: Any, cudart: Any, engine: Any, input_name: str, output_name: str) -> None:
        self._trt, self._cudart = trt, cudart
        self.input_name, self.output_name = input_name, output_name
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        for name in (input_name, output_name):
            if name not in names:
                raise BackendError(f"engine has no tensor {name!r} (it has {sorted(names)})")
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise BackendError(f"engine tensor {name!r} is not float32; rebuild it from this bundle")
        self.min_shape, _, self.max_shape = (
            tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(input_name, 0)
        )
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        out_max = self._set_shape(self.max_shape)
        self._in = _PinnedBuffer(cudart, int(np.prod(self.max_shape)))
        try:
            self._out = _PinnedBuffer(cudart, int(np.prod(out_max)))
        except BaseException:
            self._in.free()
            raise

    @property
    def max_batch(self) -> int:
        return self.max_shape[0]

    def _set_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(d) for d in shape)
        inside = len(shape) == len(self.max_shape) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min_shape, shape, self.max_shape, strict=True)
        )
        if not inside or not self.context.set_input_shape(self.input_name, shape):
            raise ValueError(
                f"input shape {shape} is outside the engine's profile {self.min_shape}..{self.max_shape}"
            )
        return tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))

    def enqueue(self, in_ptr: int, out_ptr: int, shape: Sequence[int], stream: int) -> tuple[int, ...]:
        """Enqueue inference on device buffers on `stream` (asynchronous); returns the output shape."""
        out_shape = self._set_shape(shape)
        for name, ptr in ((self.input_name, in_ptr), (self.output_name, out_ptr)):
            if not self.context.set_tensor_address(name, int(ptr)):
                raise BackendError(f"TensorRT refused the address of {name!r}")
        if not self.context.execute_async_v3(int(stream)):  # returns False instead of raising
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return out_shape

    def execute(self, batch: np.ndarray, stream: int) -> np.ndarray:
        """(n, 3, h, w) float32 host -> (n, 3, h*s, w*s) float32 host via the pinned buffers; synchronous."""
        cudart, kind = self._cudart, self._cudart.cudaMemcpyKind
        self._set_shape(batch.shape)  # refuse shapes outside the profile before touching the buffers
        n_in = batch.size
        self._in.host[:n_in] = batch.reshape(-1)
        h2d, d2h = kind.cudaMemcpyHostToDevice, kind.cudaMemcpyDeviceToHost
        cuda_call(cudart.cudaMemcpyAsync, self._in.device_ptr, self._in.host_ptr, 4 * n_in, h2d, stream)
        out_shape = self.enqueue(self._in.device_ptr, self._out.device_ptr, batch.shape, stream)
        n_out = int(np.prod(out_shape))
        cuda_call(cudart.cudaMemcpyAsync, self._out.host_ptr, self._out.device_ptr, 4 * n_out, d2h, stream)
        cuda_call(cudart.cudaStreamSynchronize, stream)
        return self._out.host[:n_out].reshape(out_shape).copy()

    def close(self) -> None:
        for buf in (getattr(self, "_in", None), getattr(self, "_out", None)):
            if buf is not None:
                buf.free()
        self.context = None


# --- engines shared by the runners of a process -------------------------------------------------------------
class _EngineCache:
    """Deserialise each plan file once per process and device; reference-counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], list[Any]] = {}  # key -> [runtime, engine, refs]

    def acquire(self, trt: Any, path: Path, device: int, bundle: object = None) -> Any:
        key = (str(Path(path).resolve()), device)
        with self._lock:
            if key not in self._entries:
                self._entries[key] = [*deserialize(trt, Path(path).read_bytes(), bundle), 0]
            self._entries[key][2] += 1
            return self._entries[key][1]

    def release(self, path: Path, device: int) -> None:
        key = (str(Path(path).resolve()), device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[2] -= 1
                if entry[2] <= 0:
                    del self._entries[key]  # engine before runtime: drop the engine reference first
                    entry[1] = None


_ENGINES = _EngineCache()
_LOGGER: Any = None


def trt_logger(trt: Any) -> Any:
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def deserialize(trt: Any, plan: bytes, bundle: object = None) -> tuple[Any, Any]:
    """(runtime, engine) from a plan; the runtime must outlive the engine."""
    runtime = trt.Runtime(trt_logger(trt))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineMismatch(
            f"TensorRT {trt.__version__} could not load the engine (built by another version or corrupt); "
            f"rebuild with: {rebuild_command(bundle)}"
        )
    return runtime, engine


def run_plan_once(
    trt: Any, cudart: Any, plan: bytes, batch: np.ndarray, input_name: str, output_name: str, device: int = 0
) -> np.ndarray:
    """Run a plan once on a host batch, on its own stream: what `wbsr-export --trt` validates engines with."""
    cuda_call(cudart.cudaSetDevice, device)
    runtime, engine = deserialize(trt, plan)
    stream = native_handle(cuda_call(cudart.cudaStreamCreateWithFlags, cudart.cudaStreamNonBlocking))
    bound = None  # the engine's execution context and buffers
    try:
        bound = TrtEngine(trt, cudart, engine, input_name, output_name)
        return bound.execute(np.ascontiguousarray(batch, dtype=np.float32), stream)
    finally:
        if bound is not None:
            bound.close()
        cuda_call(cudart.cudaStreamDestroy, stream)
        del engine, runtime


# --- the runner ---------------------------------------------------------------------------------------------
def _device_ordinal(device: int | str) -> int:
    """0, "0", "cuda" or "cuda:1" -> the CUDA ordinal."""
    text = str(device).strip().lower().removeprefix("cuda").removeprefix(":")
    if not text.isdigit() and text != "":
        raise BackendError(f"the trt backend runs on a CUDA device (0, 1, 'cuda:1'), not {device!r}")
    return int(text or 0)


def machine_engines(
    manifest: Any,
    trt: Any,
    cudart: Any,
    device: int,
    *,
    precision: str | None = None,
    tiling: tuple[int, int] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """("cuda:N (GPU name)", one engine record per subnet) built for this TensorRT and GPU, all of one
    precision and one tile size (`tiling`'s when given, else the first subnet's); EngineMismatch naming what
    is missing and the command that builds it. Selects device `device` on the calling thread."""
    cuda_call(cudart.cudaSetDevice, device)
    gpu, cc = gpu_identity(cudart, device)
    tile = None if tiling is None else tiling[0] + 2 * tiling[1]
    records: list[dict[str, Any]] = []
    for i in range(len(manifest.subnets)):
        record = find_engine(
            [dict(r) for r in manifest.engines],
            i,
            trt_version=trt.__version__,
            gpu_name=gpu,
            compute_capability=cc,
            tile=tile,
            precision=precision,
            bundle=rebuild_target(manifest.root, tiling),
        )
        precision, tile = record["precision"], int(record["profile"]["max"][2])
        records.append(record)
    return f"cuda:{device} ({gpu})", records


def rebuild_target(root: object, tiling: tuple[int, int] | None) -> str:
    """The bundle argument of the rebuild command (`wbsr-export --bundle ARG --trt`), followed by the tiling
    flags when a tiling was asked for."""
    return f"{root}" if tiling is None else f"{root} --patch {tiling[0]} --overlap {tiling[1]}"


class TrtRunner:
    """Runs the bundle's TensorRT engines (a `base.Runner`) on one non-blocking CUDA stream (its own, or
    `options.stream`, a caller's `cudaStream_t` handle as an int; never a default stream). Refuses engines
    built for another TensorRT version or GPU. Bound to the engines' tile: `tiling` = (patch, overlap) picks
    the engines for patch + 2 x overlap tiles; None takes the bundle's engines and their recorded tiling."""

    name = "trt"

    def __init__(
        self,
        manifest: Any,
        worker_index: int = 0,
        *,
        device: int | str = 0,
        tiling: tuple[int, int] | None = None,
        options: TrtOptions | None = None,
    ) -> None:
        """`device`: CUDA ordinal (or "cuda:N"); `options`: see `TrtOptions` (None: the defaults)."""
        options = options or TrtOptions()
        self._trt, self._cudart = import_tensorrt(), import_cudart()
        self.manifest, self.worker_index = manifest, worker_index
        self._device_index, self._stream, self._owns_stream = _device_ordinal(device), 0, False
        precision = None if options.fp16 is None else "fp16" if options.fp16 else "fp32"
        self.device, self._records = machine_engines(
            manifest, self._trt, self._cudart, self._device_index, precision=precision, tiling=tiling
        )
        self.fixed_tiles = tiling or engine_tiling(self._records[0], manifest.tiling.patch, manifest.tiling.overlap)
        self.max_batch = min(int(r["profile"]["max"][0]) for r in self._records)
        if options.max_batch is not None:
            self.max_batch = max(1, min(self.max_batch, int(options.max_batch)))
        self.providers = [f"TensorRT {self._trt.__version__}", self._records[0]["precision"]]
        self._engines: LazySubnets[TrtEngine] = LazySubnets(manifest, self._load)
        if options.stream is None:
            flags = self._cudart.cudaStreamNonBlocking
            self._stream = native_handle(cuda_call(self._cudart.cudaStreamCreateWithFlags, flags))
            self._owns_stream = True
        else:
            self._stream = stream_handle(options.stream)

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bind(self) -> None:
        """Make the runner's GPU current on the calling thread: the CUDA device is per-thread state, and the
        scheduler calls from its worker threads, so engines, contexts and buffers would land on GPU 0."""
        cuda_call(self._cudart.cudaSetDevice, self._device_index)

    def _load(self, index: int) -> TrtEngine:
        self._bind()
        record, subnet = self._records[index], self.manifest.subnets[index]
        path = self.manifest.path(record["file"])
        engine = _ENGINES.acquire(self._trt, path, self._device_index, self.manifest.root)
        try:
            return TrtEngine(self._trt, self._cudart, engine, subnet.input, subnet.output)
        except BaseException:
            _ENGINES.release(path, self._device_index)
            raise

    def _infer(self, bound: TrtEngine, batch: np.ndarray) -> np.ndarray:
        self._bind()
        return bound.execute(batch, self._stream)

    def run_subnet(self, index: int, batch: np.ndarray) -> np.ndarray:
        """(n, 3, T, T) float32 in [0, 1] host -> (n, 3, T*s, T*s) float32 host by subnet `index` (T = patch +
        2 x overlap of `self.fixed_tiles`, n <= max_batch); synchronous."""
        return self._engines.run(index, batch, self.max_batch, self._infer)

    def run_subnet_device(
        self, index: int, in_ptr: int, out_ptr: int, shape: Sequence[int], stream: int | None = None
    ) -> tuple[int, ...]:
        """Enqueue subnet `index` on device buffers of the runner's GPU: `in_ptr` holds (n, 3, T, T) float32
        contiguous (T = patch + 2 x overlap of `self.fixed_tiles`, n <= max_batch), `out_ptr` receives
        (n, 3, T*s, T*s) float32. Asynchronous on `stream` (default: the runner's; never a default stream);
        the caller synchronises. Returns the output shape."""
        stream = self._stream if stream is None else stream_handle(stream)
        bound = self._engines.get(index)
        self._bind()
        return bound.enqueue(in_ptr, out_ptr, shape, stream)

    def synchronize(self) -> None:
        """Wait for everything enqueued on the runner's stream."""
        cuda_call(self._cudart.cudaStreamSynchronize, self._stream)

    def close(self) -> None:
        loaded = self._engines.loaded()
        if self._stream or loaded:
            self._bind()
        if self._stream and loaded:
            self.synchronize()
        for index, bound in loaded:
            bound.close()
            _ENGINES.release(self.manifest.path(self._records[index]["file"]), self._device_index)
        if loaded:
            self._engines.clear()
        if self._owns_stream and self._stream:
            cuda_call(self._cudart.cudaStreamDestroy, self._stream)
        self._stream, self._owns_stream = 0, False
