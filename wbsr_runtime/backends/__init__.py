"""Backends: `open_runners` creates one runner per worker for "ort", "torch", "trt" or "auto".

Every runner implements `wbsr_runtime.backends.base.Runner`. Backend modules import their heavy packages
(torch, tensorrt, cuda-python) lazily, so importing this package needs only numpy and onnxruntime.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from .base import BackendError, Runner

log = logging.getLogger(__name__)

BACKENDS = ("ort", "torch", "trt", "auto")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent blocked or set to None in sys.modules
        return False


def _torch_cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    """ "auto" -> "trt" if TensorRT and a CUDA GPU, else "torch" if PyTorch sees CUDA, else "ort"."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if _has("tensorrt") and _has("cuda") and _torch_cuda_or_cuda_python():
        return "trt"
    if _torch_cuda():
        return "torch"
    return "ort"


def _torch_cuda_or_cuda_python() -> bool:
    """Whether a CUDA GPU is visible (via cuda-python; TensorRT needs it anyway)."""
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:  # any failure means "no usable GPU" for auto selection
        return False


def open_runners(manifest: Any, backend: str = "auto", workers: int = 1, **opts: Any) -> list[Runner]:
    """One runner per worker (each bound to its own stream/sessions); `opts` go to the runner class.

    Close them (each is a context manager) when done. Raises BackendError with a one-line reason when the
    backend can't run here.
    """
    name = resolve_backend(backend)
    if workers < 1:
        raise BackendError(f"workers must be >= 1, got {workers}")
    if name == "ort":
        from .ort import OrtRunner as cls
    elif name == "torch":
        if not _has("torch"):
            raise BackendError("the torch backend needs PyTorch: pip install torch (or use --backend ort)")
        from .torch import TorchRunner as cls
    else:
        try:
            from .trt import TrtRunner as cls
        except ImportError as err:
            raise BackendError(
                f"the trt backend needs TensorRT and cuda-python ({err}): "
                "pip install tensorrt cuda-python, or use --backend ort/torch"
            ) from err
    if name == "ort" and not opts.get("threads"):  # CPU sessions: the cores shared among the workers
        opts = {**opts, "threads": max(1, (os.cpu_count() or 1) // workers)}
    runners: list[Runner] = []
    try:
        for i in range(workers):
            runners.append(cls(manifest, i, **opts))
    except Exception:
        for r in runners:
            r.close()
        raise
    log.info("backend %s: %d worker(s), %r", name, workers, runners[0])
    return runners


__all__ = ["BACKENDS", "BackendError", "Runner", "open_runners", "resolve_backend"]
