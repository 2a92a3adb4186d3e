"""The one interface every backend implements (STYLE.md principle 5).

A `Runner` is created bound to one worker (one thread; on a GPU one stream and its own execution contexts),
used as a context manager (`__exit__` frees sessions, engines, streams and buffers), and runs subnets (routing
is not a runner's job: `wbsr_runtime.router.Router` runs the bundle's router on ONNX Runtime's CPU provider
for every backend):

- `run_subnet(index, batch)`: `batch` (n, 3, h, w) float32 RGB in [0, 1] -> (n, 3, h*s, w*s) float32, not
  clamped, computed by subnet `index` of the bundle (0 = cheapest). `n` is at most `max_batch` when that is
  not None; the scheduler chunks to it. Implementations may assume one calling thread at a time.

Attributes: `name` (backend name), `max_batch` (int or None for unbounded), `tiling` (None when it takes
inputs of any size; else the (patch, overlap) whose tiles, (n, 3, patch + 2 x overlap, same) with
1 <= n <= max_batch, are the only shapes it takes, as TensorRT engines built for one profile do: the Upscaler
then tiles with exactly that and sends nothing else), `device` (a short string such as "cpu" or
"cuda:0 (NVIDIA H100)"), `providers` (what actually runs, e.g. ORT providers).

A subclass implements `_load(index)` (build whatever runs subnet `index`, called lazily once) and
`_infer(handle, batch)`, and releases its own resources in `close()` (calling `super().close()`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from typing import Any

import numpy as np

from ..manifest import REBUILD, BundleError, Manifest

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A backend cannot be created or run here (missing package, no GPU, silent CPU fallback, ...)."""


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python object (`cudaStream_t`, ...) or an int. cuda-bindings 13 deprecates
    `int(obj)` in favour of `cuda.bindings.utils.get_cuda_native_handle`; 12.x has only `int(obj)`."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


# The legacy default stream (0, and cudaStreamLegacy = 1) and cudaStreamPerThread (2): the design runs each
# worker on a non-blocking stream of its own (blocking streams would serialise with the legacy one).
DEFAULT_STREAMS = (0, 1, 2)


def stream_handle(stream: Any) -> int:
    """A caller's stream as an int handle; BackendError for a default stream."""
    handle = native_handle(stream)
    if handle in DEFAULT_STREAMS:
        raise BackendError(
            f"stream {handle} is a CUDA default stream; pass a non-blocking stream of your own "
            "(cudaStreamCreateWithFlags(cudaStreamNonBlocking), torch: stream.cuda_stream, CuPy: stream.ptr)"
        )
    return handle


ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu")  # both install the one `onnxruntime` package
ORT_INSTALL = 'pip install "wbsr-deploy[cpu]" (or [ort-gpu-cu12] / [ort-gpu-cu13] for the CUDA build)'
_ort_checked = False


def installed_ort_builds() -> list[str]:
    """Which ONNX Runtime distributions pip has installed here (names from ORT_BUILDS)."""
    found = []
    for name in ORT_BUILDS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def ort_shadowing() -> str | None:
    """A one-line diagnosis when the CPU and GPU builds of ONNX Runtime are both installed, else None."""
    if len(installed_ort_builds()) < 2:
        return None
    return (
        "onnxruntime and onnxruntime-gpu are both installed; they install the same `onnxruntime` package, so "
        "whichever was installed last shadows the other: keep one (pip uninstall -y onnxruntime "
        'onnxruntime-gpu, then pip install "wbsr-deploy[ort-gpu-cu13]" or [ort-gpu-cu12] or [cpu])'
    )


def import_onnxruntime() -> Any:
    """`onnxruntime`, or BackendError saying which extra installs it; warns once when both builds are
    installed (the runtime needs ONNX Runtime on every backend: the router always runs on it)."""
    global _ort_checked
    try:
        import onnxruntime
    except ImportError:
        raise BackendError(f"ONNX Runtime is not installed: {ORT_INSTALL}") from None
    if not _ort_checked:
        _ort_checked = True
        problem = ort_shadowing()
        if problem:
            log.warning("%s", problem)
    return onnxruntime


def subnet_files(manifest: Manifest, index: int) -> dict[str, str]:
    """`{"onnx": ..., "onnx_fp16"?: ..., "torch"?: ...}` of subnet `index` (paths relative to the bundle)."""
    return dict(manifest.subnets[index].files)


class Runner:
    """Base runner: lazy per-subnet handles, context management."""

    name = "base"

    def __init__(self, manifest: Manifest, worker_index: int = 0, max_batch: int | None = None) -> None:
        self.manifest = manifest
        self.worker_index = worker_index
        self.max_batch = max_batch
        self.tiling: tuple[int, int] | None = None
        self.device = "cpu"
        self.providers: list[str] = []
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()

    # --- to implement -------------------------------------------------------------------------------------
    def _load(self, index: int) -> Any:
        """Build the object that runs subnet `index` (session, module, engine context)."""
        raise NotImplementedError

    def _infer(self, handle: Any, batch: np.ndarray) -> np.ndarray:
        """Run one handle on (n, 3, h, w) float32 -> (n, 3, h*s, w*s) float32."""
        raise NotImplementedError

    # --- the interface ------------------------------------------------------------------------------------
    def run_subnet(self, index: int, batch: np.ndarray) -> np.ndarray:
        """(n, 3, h, w) float32 in [0, 1] -> (n, 3, h*s, w*s) float32 (not clamped) by subnet `index`."""
        if not 0 <= index < len(self.manifest.subnets):
            raise IndexError(f"subnet {index} out of range 0..{len(self.manifest.subnets) - 1}")
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (n, 3, h, w) batch, got {batch.shape}")
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise ValueError(f"batch of {batch.shape[0]} exceeds max_batch {self.max_batch}")
        with self._lock:
            if index not in self._handles:
                self._handles[index] = self._load(index)
            handle = self._handles[index]
        out = self._infer(handle, np.ascontiguousarray(batch, dtype=np.float32))
        n, _, h, w = batch.shape
        s = self.manifest.scale
        if out.shape != (n, 3, h * s, w * s):  # e.g. a manifest whose scale the graphs do not have
            raise BundleError(
                f"{self.manifest.root}: subnet {index} turns {n}x3x{h}x{w} into {'x'.join(map(str, out.shape))}, "
                f"not the manifest's x{s}; {REBUILD}"
            )
        return out

    def close(self) -> None:
        """Free everything this runner holds (subclasses free their own handles first)."""
        self._handles.clear()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(worker={self.worker_index}, device={self.device!r}, providers={self.providers})"


_shared_arena = threading.Lock()  # held while the process-wide CPU arena is registered (once)
_arena_registered = False


def session_options(threads: int) -> Any:
    """ONNX Runtime session options, CPU side (under the GPU providers too): `threads` intra-op threads (so
    many sessions don't oversubscribe the cores) that do not spin when idle, and one CPU memory arena shared by
    every session of the process, grown only by what is requested. ORT otherwise gives each session its own
    arena as large as its largest call, so M subnet sessions and the router would hold M + 1 of them."""
    ort = import_onnxruntime()

    global _arena_registered
    with _shared_arena:
        if not _arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            try:
                ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            except Exception as err:  # the embedding application registered one already: share that
                log.debug("shared CPU arena not registered: %s", err)
            _arena_registered = True
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.use_env_allocators", "1")
    # Calls alternate between the M subnet sessions; a session's idle pool threads would otherwise spin on
    # after its call and take the cores from the next session's threads.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def cpu_session(path: str | os.PathLike, threads: int) -> Any:
    """An ONNX Runtime CPU session (see `session_options`)."""
    ort = import_onnxruntime()

    opts = session_options(threads)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
