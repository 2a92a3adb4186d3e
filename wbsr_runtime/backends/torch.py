"""PyTorch backend: the bundle's `subnet_XX.pt2` torch.export programs (never the training package).

CPU or CUDA; on CUDA each runner owns one CUDA stream, so several runners (one per scheduler thread) overlap
on the GPU. fp16 is opt-in (`fp16=True`: weights and arithmetic in float16, fp32 in and out).

Embedding in a GPU pipeline (PyTorch, pycuda, DeepStream) without host copies:

    runner = TorchRunner(manifest, device="cuda", stream=handle)   # handle: int cudaStream_t, or a
                                                                    # torch.cuda.Stream / ExternalStream
    sr = runner.run_tensor(index, lr)    # lr: (n, 3, h, w) float32 CUDA tensor in [0, 1] on runner's device
    # `sr` is (n, 3, h*s, w*s) on the same device, enqueued on `runner.stream` and NOT synchronised: make
    # your stream wait on it (`your_stream.wait_stream(runner.stream)`) or call `runner.stream.synchronize()`.

For a raw device pointer, wrap it first (e.g. `torch.as_tensor` on a CuPy array, or DLPack
`torch.from_dlpack`). `run_subnet` (numpy in, numpy out) synchronises before returning. torch is imported
lazily, when a runner is created.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .base import BackendError, Runner, subnet_files

log = logging.getLogger(__name__)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise BackendError("the torch backend needs PyTorch: pip install torch (or use ort)") from err
    return torch


class TorchRunner(Runner):
    """torch.export runner. `device`: "cpu", "cuda" or "cuda:N"; `stream`: an external CUDA stream (int
    handle or torch stream) to enqueue on instead of creating one; `fp16`: half precision inside."""

    name = "torch"

    def __init__(
        self,
        manifest: Any,
        worker_index: int = 0,
        *,
        device: str = "cpu",
        fp16: bool = False,
        stream: Any = None,
        max_batch: int | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(manifest, worker_index, max_batch=max_batch)
        torch = self._torch = _import_torch()
        self._dev = torch.device(device)
        if self._dev.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here")
            if isinstance(stream, int):
                stream = torch.cuda.ExternalStream(stream, device=self._dev)
            self.stream = stream if stream is not None else torch.cuda.Stream(device=self._dev)
            self.device = f"{self._dev} ({torch.cuda.get_device_name(self._dev)})"
        elif stream is not None:
            raise BackendError("a CUDA stream was given but the torch device is the CPU")
        else:
            self.stream = None
            if threads:
                torch.set_num_threads(threads)  # process-wide in PyTorch: the last runner created wins
        self.fp16 = fp16
        self.providers = [f"torch {torch.__version__}", "fp16" if fp16 else "fp32"]

    def _load(self, index: int) -> Any:
        rel = subnet_files(self.manifest, index).get("torch")
        if not rel:
            raise BackendError(f"bundle has no torch program for subnet {index}; re-export it (wbsr-export)")
        torch = self._torch
        program = torch.export.load(str(self.manifest.path(rel)))
        if self._dev.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, self._dev)
        module = program.module()
        return module.half() if self.fp16 else module

    def _forward(self, module: Any, x: Any) -> Any:
        with self._torch.inference_mode():
            y = module(x.half() if self.fp16 else x)
        return y.float()

    def run_tensor(self, index: int, lr: Any) -> Any:
        """(n, 3, h, w) float32 tensor on the runner's device -> (n, 3, h*s, w*s) float32 on the same device,
        enqueued on `self.stream` (CUDA) without synchronising."""
        with self._lock:
            if index not in self._handles:
                self._handles[index] = self._load(index)
        module = self._handles[index]
        if self.stream is None:
            return self._forward(module, lr)
        self.stream.wait_stream(self._torch.cuda.current_stream(self._dev))  # lr may come from that stream
        with self._torch.cuda.stream(self.stream):
            return self._forward(module, lr)

    def _infer(self, handle: Any, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(batch)
        if self.stream is None:
            return self._forward(handle, x).numpy()
        pinned = x.pin_memory()  # async copies need page-locked host memory; kept alive until the sync
        with torch.cuda.stream(self.stream):
            y = self._forward(handle, pinned.to(self._dev, non_blocking=True)).to("cpu", non_blocking=True)
        self.stream.synchronize()
        return y.numpy()
