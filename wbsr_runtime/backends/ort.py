"""ONNX Runtime backend: one session per subnet per runner (ORT serialises calls on one session).

CPU by default, each session capped to `threads` intra-op threads so several workers don't oversubscribe the
cores, all sessions drawing on one shared CPU memory arena (`base.session_options`). With onnxruntime-gpu
installed, `device="cuda"` or `device="tensorrt"` asks for those execution providers explicitly; the providers a
session actually got are checked, and a silent fallback to the CPU is refused (onnxruntime-gpu falls back
without an error when CUDA libraries are missing).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import BackendError, Runner, session_options, subnet_files

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "tensorrt")


def _providers(device: str, device_id: int, trt_cache: Path | None, fp16: bool) -> list[Any]:
    """The explicit provider list for `device` (most preferred first)."""
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    trt_opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": fp16}
    if trt_cache is not None:
        trt_opts |= {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(trt_cache),
        }
    return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]


class OrtRunner(Runner):
    """ONNX Runtime runner. `device`: "cpu" | "cuda" | "tensorrt"; `fp16`: use `subnet_XX.fp16.onnx` graphs
    where the bundle has them (fp32 in and out); `threads`: intra-op threads per session (CPU; default all
    CPUs, and `open_runners` gives each of N workers 1/N of them)."""

    name = "ort"

    def __init__(
        self,
        manifest: Any,
        worker_index: int = 0,
        *,
        device: str = "cpu",
        fp16: bool = False,
        threads: int | None = None,
        device_id: int = 0,
        max_batch: int | None = None,
        trt_cache: str | Path | None = None,
    ) -> None:
        super().__init__(manifest, worker_index, max_batch=max_batch)
        if device not in DEVICES:
            raise BackendError(f"ort device must be one of {DEVICES}, got {device!r}")
        import onnxruntime as ort

        self._ort = ort
        available = ort.get_available_providers()
        wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(device)
        if wanted and wanted not in available:
            raise BackendError(
                f"ONNX Runtime here has no {wanted} (available: {', '.join(available)}); "
                "install onnxruntime-gpu (and uninstall onnxruntime) or use device='cpu'"
            )
        self.fp16 = fp16
        self.threads = threads or os.cpu_count() or 1  # open_runners shares the CPUs among workers
        self._provider_list = _providers(device, device_id, Path(trt_cache) if trt_cache else None, fp16)
        self.device = "cpu" if device == "cpu" else f"{device}:{device_id}"
        self._wanted = wanted

    def _load(self, index: int) -> Any:
        files = subnet_files(self.manifest, index)
        rel = files.get("onnx_fp16") if self.fp16 and files.get("onnx_fp16") else files["onnx"]
        if self.fp16 and not files.get("onnx_fp16"):
            log.warning("bundle has no fp16 graph for subnet %d; using fp32", index)
        session = self._ort.InferenceSession(
            str(self.manifest.path(rel)), sess_options=session_options(self.threads), providers=self._provider_list
        )
        got = session.get_providers()
        if self._wanted and self._wanted not in got:
            raise BackendError(
                f"ONNX Runtime fell back to {got} for {rel}, {self._wanted} was asked for "
                "(check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs)"
            )
        self.providers = got
        log.debug("ort worker %d: %s on %s", self.worker_index, rel, got)
        return session, session.get_inputs()[0].name, session.get_outputs()[0].name

    def _infer(self, handle: Any, batch: np.ndarray) -> np.ndarray:
        session, inp, out = handle
        return session.run([out], {inp: batch})[0].astype(np.float32, copy=False)
