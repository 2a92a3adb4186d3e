"""ONNX Runtime backend: one session per subnet per runner (ORT serialises calls on one session).

CPU by default, each session capped to `threads` intra-op threads so several workers don't oversubscribe the
cores, all sessions drawing on one shared CPU memory arena (`base.session_options`). With onnxruntime-gpu
installed, `device="cuda[:N]"` asks for the CUDA execution provider explicitly, and `tensorrt=True` puts
ORT's TensorRT provider before it; the providers a session actually got are checked, and a silent fallback to
the CPU is refused (onnxruntime-gpu falls back without an error when CUDA libraries are missing).

ORT's TensorRT provider builds an engine for every input shape outside its profiles, in every session. So with
`tensorrt=True` the runner is bound to one tile, as the `trt` backend is: explicit profiles
(`trt_profile_min/opt/max_shapes`, "name:NxCxHxW") for tiles of patch + 2 x overlap at batch 1..max_batch,
and `tiling` set, so that the Upscaler sends those shapes only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..engines import profile_shapes
from .base import BackendError, Runner, import_onnxruntime, ort_shadowing, session_options, subnet_files

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16  # TensorRT provider profiles: as wbsr-export's default engine batch


def _device_id(device: str) -> int | None:
    """"cpu" -> None, "cuda" / "cuda:N" -> N; BackendError otherwise."""
    text = str(device).strip().lower()
    if text == "cpu":
        return None
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return int(text[5:] or 0)
    raise BackendError(f"ort device must be cpu, cuda or cuda:N, got {device!r}")


def trt_profile_options(input_name: str, profile: dict[str, list[int]]) -> dict[str, str]:
    """ORT TensorRT provider options for one explicit profile: "lr:1x3x36x36" etc."""
    return {f"trt_profile_{k}_shapes": f"{input_name}:{'x'.join(map(str, profile[k]))}" for k in ("min", "opt", "max")}


class OrtRunner(Runner):
    """ONNX Runtime runner. `device`: "cpu" | "cuda" | "cuda:N"; `tensorrt`: ORT's TensorRT provider first (on
    a CUDA device; fixed tiles, see the module docstring); `fp16`: use `subnet_XX.fp16.onnx` graphs where the
    bundle has them (fp32 in and out); `threads`: intra-op threads per session (CPU; default all CPUs, and
    `open_runners` gives each of N workers 1/N of them); `tiling`: (patch, overlap) of the tiles the
    TensorRT provider is built for (default the bundle's; ignored otherwise: any shape runs)."""

    name = "ort"

    def __init__(
        self,
        manifest: Any,
        worker_index: int = 0,
        *,
        device: str = "cpu",
        tensorrt: bool = False,
        fp16: bool = False,
        threads: int | None = None,
        max_batch: int | None = None,
        trt_cache: str | Path | None = None,
        tiling: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(manifest, worker_index, max_batch=max_batch)
        device_id = _device_id(device)
        if tensorrt and device_id is None:
            raise BackendError("ORT's TensorRT provider runs on a CUDA device: use device='cuda[:N]'")
        self._ort = import_onnxruntime()
        self._wanted = None  # the provider that must be in every session's providers
        if device_id is not None:
            self._wanted = "TensorrtExecutionProvider" if tensorrt else "CUDAExecutionProvider"
        available = self._ort.get_available_providers()
        if self._wanted and self._wanted not in available:
            why = ort_shadowing() or "install onnxruntime-gpu instead of onnxruntime (README: GPU install)"
            raise BackendError(f"ONNX Runtime here has no {self._wanted} (has {', '.join(available)}): {why}")
        self.fp16 = fp16
        self.threads = threads or os.cpu_count() or 1  # open_runners shares the CPUs among workers
        self._providers = self._provider_list(device_id, tensorrt, tiling, Path(trt_cache) if trt_cache else None)
        self.device = "cpu" if device_id is None else f"cuda:{device_id}"

    def _provider_list(
        self, device_id: int | None, tensorrt: bool, tiling: tuple[int, int] | None, cache: Path | None
    ) -> list[Any]:
        """The explicit provider list (most preferred first); binds the runner to one tile for TensorRT."""
        if device_id is None:
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": device_id})
        if not tensorrt:
            return [cuda, "CPUExecutionProvider"]
        self.tiling = tiling or (self.manifest.tiling.patch, self.manifest.tiling.overlap)
        self.max_batch = self.max_batch or self.manifest.tiling.max_batch or DEFAULT_MAX_BATCH
        inputs = {s.input for s in self.manifest.subnets}
        if len(inputs) != 1:
            raise BackendError(f"subnets have different input names {sorted(inputs)}; re-export the bundle")
        opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": self.fp16}
        opts |= trt_profile_options(inputs.pop(), profile_shapes(*self.tiling, self.max_batch))
        if cache is not None:
            opts |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            }
        return [("TensorrtExecutionProvider", opts), cuda, "CPUExecutionProvider"]

    def _load(self, index: int) -> Any:
        files = subnet_files(self.manifest, index)
        rel = files.get("onnx_fp16") if self.fp16 and files.get("onnx_fp16") else files["onnx"]
        if self.fp16 and not files.get("onnx_fp16"):
            log.warning("bundle has no fp16 graph for subnet %d; using fp32", index)
        session = self._ort.InferenceSession(
            str(self.manifest.path(rel)), sess_options=session_options(self.threads), providers=self._providers
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
