"""The one interface every backend implements (STYLE.md principle 5), and what the backends share.

A `Runner` is created bound to one worker (one thread; on a GPU one stream and its own execution contexts),
used as a context manager (`__exit__` frees sessions, engines, streams and buffers), and runs subnets:

- `run_subnet(index, batch)`: `batch` (n, 3, h, w) float32 RGB in [0, 1] -> (n, 3, h*s, w*s) float32, not
  clamped, computed by subnet `index` of the bundle (0 = cheapest). `n` is at most `max_batch` when that is
  not None; the scheduler chunks to it. Implementations may assume one calling thread at a time.

Attributes: `name` (backend name), `max_batch` (int or None for unbounded), `fixed_tiles` (None when it takes
inputs of any size; else the (patch, overlap) whose tiles, (n, 3, patch + 2 x overlap, same) with
1 <= n <= max_batch, are the only shapes it takes, as TensorRT engines built for one profile do: the Upscaler
then tiles with exactly that and sends nothing else), `device` (a short string such as "cpu" or
"cuda:0 (NVIDIA H100)"), `providers` (what actually runs, e.g. ORT providers).

Backends implement it without a common base class: each holds a `LazySubnets` (what runs each subnet, built
on first use under one lock, and the checks around every call). Routing is not a runner's job: the bundle's
router runs on ONNX Runtime's CPU provider for every backend (`wbsr_runtime.router.Router`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from ..manifest import REBUILD, BundleError, Manifest

log = logging.getLogger(__name__)

H = TypeVar("H")


class BackendError(RuntimeError):
    """A backend cannot be created or run here (missing package, no GPU, silent CPU fallback, ...)."""


@runtime_checkable
class Runner(Protocol):
    """What the scheduler and the Upscaler need of a backend (see the module docstring)."""

    name: str
    device: str
    providers: list[str]
    max_batch: int | None
    fixed_tiles: tuple[int, int] | None

    def run_subnet(self, index: int, batch: np.ndarray) -> np.ndarray:
        """(n, 3, h, w) float32 in [0, 1] -> (n, 3, h*s, w*s) float32 (not clamped) by subnet `index`."""
        ...

    def close(self) -> None:
        """Free everything the runner holds; it is not used afterwards."""
        ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...


class LazySubnets(Generic[H]):
    """What runs each subnet of `manifest` (a session, a module, an engine context), built by `load(index)` on
    first use, once, under one lock (a runner's worker and a caller may both reach it); and the checks around
    every call. The one implementation of lazy loading the backends share."""

    def __init__(self, manifest: Manifest, load: Callable[[int], H]) -> None:
        self.manifest, self._load = manifest, load
        self._handles: dict[int, H] = {}
        self._lock = threading.Lock()

    def get(self, index: int) -> H:
        """The handle of subnet `index`, loaded now if it is not yet; IndexError outside 0..M-1."""
        self._check_index(index)
        with self._lock:
            if index not in self._handles:
                self._handles[index] = self._load(index)
            return self._handles[index]

    def run(
        self, index: int, batch: np.ndarray, max_batch: int | None, infer: Callable[[H, np.ndarray], np.ndarray]
    ) -> np.ndarray:
        """`infer(handle, batch)` for subnet `index`, with the batch (n, 3, h, w), n <= `max_batch`, made
        contiguous float32, and the output checked to be (n, 3, h*s, w*s) at the manifest's scale."""
        self._check_index(index)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (n, 3, h, w) batch, got {batch.shape}")
        if max_batch is not None and batch.shape[0] > max_batch:
            raise ValueError(f"batch of {batch.shape[0]} exceeds max_batch {max_batch}")
        handle = self.get(index)
        out = infer(handle, np.ascontiguousarray(batch, dtype=np.float32))
        n, _, h, w = batch.shape
        s = self.manifest.scale
        if out.shape != (n, 3, h * s, w * s):  # e.g. a manifest whose scale the graphs do not have
            raise BundleError(
                f"{self.manifest.root}: subnet {index} turns {n}x3x{h}x{w} into {'x'.join(map(str, out.shape))}, "
                f"not the manifest's x{s}; {REBUILD}"
            )
        return out

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.manifest.subnets):
            raise IndexError(f"subnet {index} out of range 0..{len(self.manifest.subnets) - 1}")

    def loaded(self) -> list[tuple[int, H]]:
        """(index, handle) of every subnet loaded so far."""
        with self._lock:
            return list(self._handles.items())

    def clear(self) -> None:
        """Forget every handle (the runner has freed what they hold)."""
        with self._lock:
            self._handles.clear()


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


def cpu_session(model: str | os.PathLike | bytes, threads: int, opts: Any = None) -> Any:
    """An ONNX Runtime CPU session of a graph file (or serialised graph) with `opts` (default
    `session_options(threads)`)."""
    ort = import_onnxruntime()

    source = model if isinstance(model, bytes) else str(model)
    opts = opts or session_options(threads)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
