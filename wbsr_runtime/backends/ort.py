"""ONNX Runtime backend: one session per subnet per runner (ORT serialises calls on one session).

CPU by default, each session capped to `threads` intra-op threads so several workers don't oversubscribe the
cores, all sessions drawing on one shared CPU memory arena (`base.session_options`). With onnxruntime-gpu
installed, `device="cuda[:N]"` asks for the CUDA execution provider explicitly, and `OrtOptions(tensorrt=True)` puts
ORT's TensorRT provider before it; the providers a session actually got are checked, and a silent fallback to
the CPU is refused (onnxruntime-gpu falls back without an error when CUDA libraries are missing).

ORT's TensorRT provider builds an engine for every input shape outside its profiles, in every session. So with
`tensorrt=True` the runner is bound to one tile, as the `trt` backend is: explicit profiles
(`trt_profile_min/opt/max_shapes`, "name:NxCxHxW") for tiles of patch + 2 x overlap at batch 1..max_batch,
and `fixed_tiles` set, so that the Upscaler sends those shapes only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import defaults
from ..engines import profile_shapes
from ..manifest import REBUILD, BundleError
from .base import BackendError, LazySubnets, import_onnxruntime, ort_shadowing, session_options, subnet_files
from .options import OrtOptions

log = logging.getLogger(__name__)



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


class OrtRunner:
    """ONNX Runtime runner (a `base.Runner`). `device`: "cpu" | "cuda" | "cuda:N"; `tiling`: (patch, overlap) of
    the tiles the TensorRT provider is built for (default the bundle's; ignored otherwise: any shape runs);
    `options`: see `OrtOptions`."""

    name = "ort"

    def __init__(
        self,
        manifest: Any,
        worker_index: int = 0,
        *,
        device: str = "cpu",
        tiling: tuple[int, int] | None = None,
        options: OrtOptions | None = None,
    ) -> None:
        options = options or OrtOptions()
        self.manifest, self.worker_index, self.options = manifest, worker_index, options
        self.max_batch, self.fixed_tiles = options.max_batch, None
        self.providers: list[str] = []
        device_id = _device_id(device)
        if options.tensorrt and device_id is None:
            raise BackendError("ORT's TensorRT provider runs on a CUDA device: use device='cuda[:N]'")
        self._ort = import_onnxruntime()
        self._wanted = None  # the provider that must be in every session's providers
        if device_id is not None:
            self._wanted = "TensorrtExecutionProvider" if options.tensorrt else "CUDAExecutionProvider"
        available = self._ort.get_available_providers()
        if self._wanted and self._wanted not in available:
            why = ort_shadowing() or "install onnxruntime-gpu instead of onnxruntime (README: GPU install)"
            raise BackendError(f"ONNX Runtime here has no {self._wanted} (has {', '.join(available)}): {why}")
        self.threads = options.threads or os.cpu_count() or 1  # open_runners shares the CPUs among workers
        cache = Path(options.trt_cache) if options.trt_cache else None
        self._providers = self._provider_list(device_id, tiling, cache)
        self.device = "cpu" if device_id is None else f"cuda:{device_id}"
        self._subnets = LazySubnets(manifest, self._load)

    def __enter__(self) -> OrtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _provider_list(self, device_id: int | None, tiling: tuple[int, int] | None, cache: Path | None) -> list[Any]:
        """The explicit provider list (most preferred first); binds the runner to one tile for TensorRT."""
        if device_id is None:
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": device_id})
        if not self.options.tensorrt:
            return [cuda, "CPUExecutionProvider"]
        self.fixed_tiles = tiling or (self.manifest.tiling.patch, self.manifest.tiling.overlap)
        self.max_batch = self.max_batch or self.manifest.tiling.max_batch or defaults.MAX_BATCH
        inputs = {s.input for s in self.manifest.subnets}
        if len(inputs) != 1:
            raise BackendError(f"subnets have different input names {sorted(inputs)}; re-export the bundle")
        opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": self.options.fp16}
        opts |= trt_profile_options(inputs.pop(), profile_shapes(*self.fixed_tiles, self.max_batch))
        if cache is not None:
            opts |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            }
        return [("TensorrtExecutionProvider", opts), cuda, "CPUExecutionProvider"]

    def _load(self, index: int) -> tuple[Any, str, str]:
        """(session, input name, output name) of subnet `index`, the names the manifest records."""
        files, fp16 = subnet_files(self.manifest, index), self.options.fp16
        rel = files.get("onnx_fp16") if fp16 and files.get("onnx_fp16") else files["onnx"]
        if fp16 and not files.get("onnx_fp16"):
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
        subnet = self.manifest.subnets[index]
        inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if subnet.input not in inputs or subnet.output not in outputs:
            raise BundleError(
                f"{self.manifest.root}: {rel} takes {inputs} and gives {outputs}, the manifest says "
                f"{subnet.input!r} -> {subnet.output!r}; {REBUILD}"
            )
        return session, subnet.input, subnet.output

    @staticmethod
    def _infer(handle: tuple[Any, str, str], batch: np.ndarray) -> np.ndarray:
        session, inp, out = handle
        return session.run([out], {inp: batch})[0].astype(np.float32, copy=False)

    def run_subnet(self, index: int, batch: np.ndarray) -> np.ndarray:
        """(n, 3, h, w) float32 in [0, 1] -> (n, 3, h*s, w*s) float32 (not clamped) by subnet `index`."""
        return self._subnets.run(index, batch, self.max_batch, self._infer)

    def close(self) -> None:
        self._subnets.clear()  # ORT frees a session with its last reference
