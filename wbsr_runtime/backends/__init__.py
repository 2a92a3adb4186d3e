"""Backends: `choose_backend` decides which backend and device run a bundle; `open_runners` creates one
runner per worker for it.

Every runner implements the `Runner` protocol (`base.py`) and takes its backend's options dataclass
(`options.py`: `OrtOptions`, `TorchOptions`, `TrtOptions`). Backend modules import their heavy packages
(torch, tensorrt, cuda-python) lazily, so importing this package needs only numpy.

`backend="auto"` takes, in order, the first that can run here: TensorRT when the bundle has engines for this
GPU and this TensorRT; else PyTorch on CUDA (the bundle's torch.export programs); else ONNX Runtime with the
CUDA provider (onnxruntime-gpu); else ONNX Runtime on the CPU. `device`: "cpu", "cuda" or "cuda:N"; None lets
"auto" use GPU 0 when it can (the others default to the CPU, `trt` to cuda:0).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .. import CPU_TORCH, defaults
from .base import BackendError, Runner, import_onnxruntime, ort_shadowing
from .options import BackendOptions, OrtOptions, TorchOptions, TrtOptions, backend_options, check_options_type

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Choice:
    """What runs a bundle: `backend` ("ort" | "torch" | "trt"), `device` ("cpu" | "cuda:N") and `reason`, one
    line saying why (for `auto`, why each better option was passed over)."""

    backend: str
    device: str
    reason: str

    def __str__(self) -> str:
        return f"backend {self.backend} on {self.device}: {self.reason}"


def parse_device(device: str | None) -> str | None:
    """None, "cpu", "cuda" or "cuda:N" -> None, "cpu" or "cuda:N"; BackendError for anything else."""
    if device is None:
        return None
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "cuda":
        return "cuda:0"
    if text.startswith("cuda:") and text[5:].isdigit():
        return f"cuda:{int(text[5:])}"
    raise BackendError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def choose_backend(
    manifest: Any, backend: str = "auto", device: str | None = None, tiling: tuple[int, int] | None = None
) -> Choice:
    """The backend and device for `manifest` (see the module docstring); `tiling` (patch, overlap) when the
    caller tiles otherwise than the bundle, so that only TensorRT engines for those tiles count."""
    if backend not in defaults.BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(defaults.BACKENDS)}")
    dev = parse_device(device)
    if backend == "trt" and dev == "cpu":
        raise BackendError("the trt backend runs on a CUDA GPU, not the CPU; use --device cuda[:N]")
    if backend != "auto":
        return Choice(backend, dev or ("cuda:0" if backend == "trt" else "cpu"), f"--backend {backend}")
    if dev == "cpu":
        return Choice("ort", "cpu", "auto with --device cpu: ONNX Runtime on the CPU")
    gpu, passed = dev or "cuda:0", []
    for name, probe in (("trt", _trt_reason), ("torch", _torch_reason), ("ort", _ort_cuda_reason)):
        why_not = probe(manifest, int(gpu[5:]), tiling)
        if why_not is None:
            took = {"trt": "TensorRT engines for this GPU", "torch": "PyTorch sees CUDA", "ort": "CUDA provider"}
            return Choice(name, gpu, f"auto: {took[name]}" + "".join(f"; not {p}" for p in passed))
        passed.append(f"{name}: {why_not}")
    if dev is not None:
        raise BackendError(f"no backend can run on {dev} here ({'; '.join(passed)}); use --device cpu")
    return Choice("ort", "cpu", "auto: no GPU backend here (" + "; ".join(passed) + ")")


def _trt_reason(manifest: Any, device: int, tiling: tuple[int, int] | None) -> str | None:
    """None when TensorRT can run this bundle on `device`, else why not."""
    if not manifest.engines:
        return "the bundle has no TensorRT engines"
    from . import trt

    try:
        tensorrt, cudart = trt.import_tensorrt(), trt.import_cudart()
        trt.machine_engines(manifest, tensorrt, cudart, device, tiling=tiling)
    except (BackendError, ValueError, RuntimeError) as err:  # not installed, no driver/GPU, no engine here
        return str(err).split(";")[0]
    return None


def _torch_reason(manifest: Any, device: int, tiling: tuple[int, int] | None) -> str | None:
    if not all("torch" in s.files for s in manifest.subnets):
        return "the bundle has no torch programs"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU"
    if device >= torch.cuda.device_count():
        return f"PyTorch sees {torch.cuda.device_count()} GPU(s), no cuda:{device}"
    return None


def _ort_cuda_reason(manifest: Any, device: int, tiling: tuple[int, int] | None) -> str | None:
    """None when a session of the cheapest subnet really gets ONNX Runtime's CUDA provider (onnxruntime-gpu
    lists it even where its CUDA libraries are missing, then silently runs on the CPU)."""
    try:
        ort = import_onnxruntime()
    except BackendError:
        return "ONNX Runtime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "ONNX Runtime has no CUDA provider" + (f" ({ort_shadowing()})" if ort_shadowing() else "")
    path = str(manifest.path(manifest.subnets[0].files["onnx"]))
    providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
    try:
        got = ort.InferenceSession(path, providers=providers).get_providers()
    except Exception as err:  # a broken CUDA install surfaces here in many forms
        return f"ONNX Runtime's CUDA provider failed ({type(err).__name__})"
    return None if "CUDAExecutionProvider" in got else "ONNX Runtime's CUDA provider fell back to the CPU"


def open_runners(
    manifest: Any,
    backend: str | Choice = "auto",
    workers: int = 1,
    *,
    device: str | None = None,
    tiling: tuple[int, int] | None = None,
    options: BackendOptions | None = None,
) -> list[Runner]:
    """One runner per worker (each bound to its own stream/sessions) for `choose_backend(manifest, backend,
    device, tiling)` (or for `backend`, a Choice made already); `tiling` also goes to the runners
    (fixed-shape ones build for or check it), `options` (the chosen backend's dataclass; None: its defaults)
    to every runner. Close them (each is a context manager) when done. Logs the choice and why. Raises
    BackendError with a one-line reason when the backend can't run here, ValueError for another backend's
    options."""
    choice = backend if isinstance(backend, Choice) else choose_backend(manifest, backend, device, tiling)
    if workers < 1:
        raise BackendError(f"workers must be >= 1, got {workers}")
    if options is None:
        options = backend_options(choice.backend, {})
    check_options_type(choice.backend, options)
    if isinstance(options, OrtOptions) and choice.device == "cpu" and not options.threads:
        options = replace(options, threads=max(1, (os.cpu_count() or 1) // workers))  # the workers share the cores
    cls = _runner_class(choice.backend)
    runners: list[Runner] = []
    try:
        for i in range(workers):
            runners.append(cls(manifest, i, device=choice.device, tiling=tiling, options=options))
    except Exception:
        for r in runners:
            r.close()
        raise
    first = runners[0]
    log.info("%s; %d worker(s), %s(device=%r, providers=%s)", choice, workers, type(first).__name__, first.device,
             first.providers)
    return runners


def _runner_class(name: str) -> Callable[..., Runner]:
    """The runner class of backend `name`, imported now (BackendError when its packages are missing)."""
    if name == "ort":
        from .ort import OrtRunner

        return OrtRunner
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            raise BackendError(
                f"the torch backend needs PyTorch: {CPU_TORCH} (the CPU build; for CUDA see pytorch.org), "
                "or use --backend ort"
            )
        from .torch import TorchRunner

        return TorchRunner
    try:
        from .trt import TrtRunner
    except ImportError as err:
        raise BackendError(
            f"the trt backend needs TensorRT and cuda-python ({err}): see the README's GPU install"
        ) from err
    return TrtRunner


__all__ = [
    "BackendError",
    "BackendOptions",
    "Choice",
    "OrtOptions",
    "Runner",
    "TorchOptions",
    "TrtOptions",
    "backend_options",
    "choose_backend",
    "open_runners",
    "parse_device",
]
