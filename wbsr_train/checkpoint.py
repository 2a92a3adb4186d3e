"""Checkpoints: plain tensors and JSON-able values only, so `torch.load(weights_only=True)` reads them.

Layout (format "wbsr-checkpoint", version 1):
    model_config: dict            ModelConfig as JSON types
    train_config: dict | None     TrainConfig as JSON types (None for an imported plain network)
    model: dict[str, Tensor]      supernet state dict (BasicSR parameter names)
    specs: list[[width, depth]]   subnets, cheapest first
    flops: list[int]              2 x MACs of each subnet on one 32x32 LR patch
    num_classes: int              K
    thresholds: list[float]       K-1 descriptor thresholds (wbsr_train.descriptor)
    calibration: dict | None      {"psnr_table": K x M, "tolerance_db": float, "class_to_subnet": [K ints]}
    state: dict | None            resume state: step, optimizer, scheduler, loss, rng
    metrics: dict                 last validation numbers
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from wbsr_runtime.fileio import atomic_file

FORMAT = "wbsr-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or of an unknown format; the message is one line."""


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write atomically: a temp file in the same folder, then rename, so a crash never leaves half a file."""
    with atomic_file(path, parents=True) as f:
        torch.save({"format": FORMAT, "version": VERSION, **ckpt}, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; CheckpointError says in one line what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused, not a plain-tensor checkpoint ({first[:160]})") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/zipfile errors for corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a WBSR checkpoint (no '{FORMAT}' format tag)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')!r} is not supported (this toolkit reads {VERSION})"
        )
    return ckpt


def supernet_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The supernet of a loaded checkpoint, weights in, in eval mode."""
    from .config import model_config_from_dict
    from .model import build_supernet

    net = build_supernet(model_config_from_dict(ckpt["model_config"]))
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model config ({str(e).splitlines()[0]})") from None
    return net.eval()
