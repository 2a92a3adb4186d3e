"""Each backend's options: a typed, frozen dataclass per backend, so what a runner can be asked for is in its
signature, and `backend_options` turns the Upscaler's keyword arguments into the chosen backend's options,
refusing one it does not take. Common to every backend, and so not here: the device and the tiling, which
`open_runners` passes to every runner."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime. threads: intra-op threads per session (CPU; None: all CPUs, and `open_runners` gives each
    of N workers 1/N of them); fp16: the bundle's `subnet_XX.fp16.onnx` graphs where it has them (fp32 in and
    out); tensorrt: ORT's TensorRT provider before the CUDA one (on a CUDA device; fixed tiles); max_batch:
    the TensorRT provider's largest profile batch (default the bundle's); trt_cache: the TensorRT provider's
    engine and timing cache folder."""

    threads: int | None = None
    fp16: bool = False
    tensorrt: bool = False
    max_batch: int | None = None
    trt_cache: str | Path | None = None


@dataclass(frozen=True)
class TorchOptions:
    """PyTorch (torch.export programs). fp16: weights and arithmetic in float16 (fp32 in and out); stream: an
    external CUDA stream (int `cudaStream_t` handle, or a torch stream) to enqueue on instead of creating one;
    threads: PyTorch's intra-op threads on the CPU (process-wide: the last runner created wins); max_batch:
    tiles per call at most (None: unbounded)."""

    fp16: bool = False
    stream: Any = None
    threads: int | None = None
    max_batch: int | None = None


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT engines. fp16: which engines when the bundle has both precisions (None: the first recorded
    for this machine); stream: a caller's non-blocking `cudaStream_t` (int) to enqueue on; max_batch: a cap
    below the engines' profile."""

    fp16: bool | None = None
    stream: int | None = None
    max_batch: int | None = None


BackendOptions = OrtOptions | TorchOptions | TrtOptions
OPTIONS: dict[str, type[BackendOptions]] = {"ort": OrtOptions, "torch": TorchOptions, "trt": TrtOptions}


def backend_options(backend: str, given: Mapping[str, Any]) -> BackendOptions:
    """The options of `backend` ("ort" | "torch" | "trt") from `given` (name -> value; None: not given).
    ValueError (one line) naming the options `backend` does not take."""
    cls = OPTIONS[backend]
    names = [f.name for f in fields(cls)]
    given = {k: v for k, v in given.items() if v is not None}
    foreign = [k for k in given if k not in names]
    if foreign:
        raise ValueError(
            f"the {backend} backend takes no {', '.join(foreign)} option (it takes {', '.join(names)})"
        )
    return cls(**given)


def check_options_type(backend: str, options: BackendOptions) -> None:
    """ValueError when `options` are another backend's (e.g. TorchOptions for a bundle `auto` runs on ort)."""
    if type(options) is not OPTIONS[backend]:
        raise ValueError(f"the {backend} backend takes {OPTIONS[backend].__name__}, got {type(options).__name__}")
