"""PyTorch backend: the bundle's `subnet_XX.pt2` torch.export programs (never the training package).

CPU or CUDA; on CUDA each runner owns one CUDA stream, so several runners (one per scheduler thread) overlap
on the GPU. fp16 is opt-in (`TorchOptions(fp16=True)`: weights and arithmetic in float16, fp32 in and out).

Embedding in a GPU pipeline (PyTorch, pycuda, DeepStream) without host copies:

    runner = TorchRunner(manifest, device="cuda", options=TorchOptions(stream=handle))
    # handle: an int cudaStream_t, or a torch.cuda.Stream / ExternalStream
    sr = runner.run_tensor(index, lr)    # lr: (n, 3, h, w) float32 CUDA tensor in [0, 1] on runner's device
    # `sr` is (n, 3, h*s, w*s) on the same device. The work runs on `runner.stream` and is NOT synchronised
    # with the host, but the stream that was current at the call waits for it: use `sr` on that stream.

Stream hygiene (PyTorch's caching allocator reuses a freed block as soon as the stream that allocated it is
done with it, and runner streams are non-blocking, so nothing orders them with the default stream): a
runner loads and casts its weights on its own stream, so its first forwards wait for them; `run_tensor`
makes its stream wait for the caller's, marks `lr` as used on its stream and `sr` as used on the caller's
(`Tensor.record_stream`), so neither block is reused while the other stream may still read it.

For a raw device pointer, wrap it first (e.g. `torch.as_tensor` on a CuPy array, or DLPack
`torch.from_dlpack`). `run_subnet` (numpy in, numpy out) synchronises before returning. torch is imported
lazily, when a runner is created.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from .base import BackendError, LazySubnets, stream_handle, subnet_files
from .options import TorchOptions

log = logging.getLogger(__name__)

# torch.export.load keeps its deserializer in a module global ("_CURRENT_DESERIALIZER is already set" when
# two threads load at once), and the scheduler's workers load their programs lazily, concurrently.
_LOAD_LOCK = threading.Lock()


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise BackendError("the torch backend needs PyTorch: pip install torch (or use ort)") from err
    return torch


class TorchRunner:
    """torch.export runner (a `base.Runner`). `device`: "cpu", "cuda" or "cuda:N"; `tiling` is accepted for the
    common constructor and ignored (any shape runs here); `options`: see `TorchOptions`."""

    name = "torch"
    fixed_tiles = None

    def __init__(
        self,
        manifest: Any,
        worker_index: int = 0,
        *,
        device: str = "cpu",
        tiling: tuple[int, int] | None = None,
        options: TorchOptions | None = None,
    ) -> None:
        options = options or TorchOptions()
        self.manifest, self.worker_index = manifest, worker_index
        self.max_batch, self.fp16 = options.max_batch, options.fp16
        torch = self._torch = _import_torch()
        self._dev, stream = torch.device(device), options.stream
        self.device = "cpu"
        if self._dev.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here")
            self._dev = torch.device("cuda", self._dev.index or 0)  # "cuda" -> "cuda:0": tensors say cuda:0
            if stream is not None:  # an int cudaStream_t, or a torch stream; never a default stream
                handle = stream_handle(stream if isinstance(stream, int) else stream.cuda_stream)
                stream = torch.cuda.ExternalStream(handle, device=self._dev) if isinstance(stream, int) else stream
            self.stream = stream if stream is not None else torch.cuda.Stream(device=self._dev)
            self.device = f"{self._dev} ({torch.cuda.get_device_name(self._dev)})"
        elif stream is not None:
            raise BackendError("a CUDA stream was given but the torch device is the CPU")
        else:
            self.stream = None
            if options.threads:
                torch.set_num_threads(options.threads)  # process-wide in PyTorch: the last runner created wins
        self.providers = [f"torch {torch.__version__}", "fp16" if self.fp16 else "fp32"]
        self._subnets = LazySubnets(manifest, self._load)

    def __enter__(self) -> TorchRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self, index: int) -> Any:
        rel = subnet_files(self.manifest, index).get("torch")
        if not rel:
            raise BackendError(f"bundle has no torch program for subnet {index}; re-export it (wbsr-export)")
        torch = self._torch
        with _LOAD_LOCK:
            program = torch.export.load(str(self.manifest.path(rel)))
        if self.stream is None:
            module = program.module()
            return module.half() if self.fp16 else module
        from torch.export.passes import move_to_device_pass

        with torch.cuda.stream(self.stream):  # weights copied (and cast) on the stream that will read them
            module = move_to_device_pass(program, self._dev).module()
            return module.half() if self.fp16 else module

    def _forward(self, module: Any, x: Any) -> Any:
        # A torch.export program takes its input by position (the manifest's tensor names are the ONNX graphs').
        with self._torch.inference_mode():
            y = module(x.half() if self.fp16 else x)
        return y.float()

    def run_tensor(self, index: int, lr: Any) -> Any:
        """(n, 3, h, w) float32 tensor in [0, 1] on the runner's device -> (n, 3, h*s, w*s) float32 on the same
        device. On CUDA: enqueued on `self.stream`, not synchronised with the host; the stream current at the
        call is made to wait for it, so `sr` is ready on that stream (see the module docstring)."""
        if lr.device != self._dev:
            raise ValueError(f"lr is on {lr.device}, the runner on {self._dev}")
        module = self._subnets.get(index)
        if self.stream is None:
            return self._forward(module, lr)
        torch = self._torch
        caller = torch.cuda.current_stream(self._dev)
        self.stream.wait_stream(caller)  # lr may still be being written on the caller's stream
        lr.record_stream(self.stream)  # ... and is read on ours: its block must outlive our reads
        with torch.cuda.stream(self.stream):
            sr = self._forward(module, lr)
        caller.wait_stream(self.stream)
        sr.record_stream(caller)  # allocated on our stream, used on the caller's
        return sr

    def _infer(self, module: Any, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(batch)
        if self.stream is None:
            return self._forward(module, x).numpy()
        pinned = x.pin_memory()  # async copies need page-locked host memory; kept alive until the sync
        with torch.cuda.stream(self.stream):
            y = self._forward(module, pinned.to(self._dev, non_blocking=True)).to("cpu", non_blocking=True)
        self.stream.synchronize()
        return y.numpy()

    def run_subnet(self, index: int, batch: np.ndarray) -> np.ndarray:
        """(n, 3, h, w) float32 in [0, 1] -> (n, 3, h*s, w*s) float32 (not clamped) by subnet `index`;
        synchronised before it returns."""
        return self._subnets.run(index, batch, self.max_batch, self._infer)

    def close(self) -> None:
        self._subnets.clear()
