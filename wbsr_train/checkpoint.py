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

import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from wbsr_runtime.fileio import atomic_file

FORMAT = "wbsr-checkpoint"
VERSION = 1
MODEL_KEYS = ("model_config", "model", "specs", "flops", "num_classes", "thresholds")  # what eval/export need
JSON_KEYS = ("model_config", "train_config", "specs", "flops", "num_classes", "thresholds", "calibration", "metrics")
MAX_JSON_BYTES = 1 << 20  # all JSON fields together, as written out (a real checkpoint's take ~10 KB)
ZIP_SLACK = 1 << 20  # bytes the members of a torch.save archive may add up to beyond its file size


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or of an unknown format; the message is one line."""


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write atomically: a temp file in the same folder, then rename, so a crash never leaves half a file."""
    with atomic_file(path, parents=True) as f:
        torch.save({"format": FORMAT, "version": VERSION, **ckpt}, f)


def _check_archive(path: Path) -> None:
    """Refuse, from the zip directory alone (nothing decompressed yet), what torch.save never writes: another
    format (the legacy one allocates storages of whatever size its pickle declares), or members that expand
    beyond the file's size (torch.save stores them uncompressed; a zip bomb deflates GBs out of MBs)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: refused, not a checkpoint written by torch.save (no zip archive)")
    try:
        with zipfile.ZipFile(path) as z:
            expanded = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    if expanded > path.stat().st_size + ZIP_SLACK:
        raise CheckpointError(
            f"{path}: refused, its members would expand to {expanded:,} bytes from a {path.stat().st_size:,}-byte "
            "file (torch.save does not compress; a zip bomb does)"
        )


def _refusal(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """Our own words for what the weights-only unpickler refused (torch's message suggests turning it off)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"the Python object `{found.group(1)}`" if found else "a pickle instruction outside plain data"
    return CheckpointError(
        f"{path}: refused, its pickle asks for {what}, which could run code; a WBSR checkpoint holds only "
        "tensors, numbers, strings, lists and dicts, so nothing was loaded and nothing ran"
    )


def _check_json(value: Any, where: str, budget: list[int], depth: int = 0) -> None:
    """Refuse a value that is not plain JSON data, or that would take more than the budget's bytes once
    written out: every visit is paid for, so a structure sharing one list a million times costs what
    json.dumps would write (a manifest of GBs), not what the pickle holds."""
    if isinstance(value, str):
        budget[0] -= len(value) + 3
    elif isinstance(value, int):
        budget[0] -= abs(value).bit_length() // 3 + 3  # ~ its digits
    else:
        budget[0] -= 2 if isinstance(value, dict | list | tuple) else 24
    if budget[0] < 0 or depth > 32:
        raise CheckpointError(f"{where}: larger or deeper than a config can be (at most {MAX_JSON_BYTES:,} bytes)")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: has a key of type {type(k).__name__}")
            budget[0] -= len(k) + 3
            _check_json(v, f"{where}.{k}", budget, depth + 1)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", budget, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value) and where.startswith(("thresholds", "calibration")):
        raise CheckpointError(f"{where}: {value} is not a finite number")
    elif not (value is None or isinstance(value, str | bool | int | float)):
        raise CheckpointError(f"{where}: {type(value).__name__} is not JSON data")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` after `_check_archive`, and check its JSON fields (types and
    size); CheckpointError says in one line what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/zipfile errors for corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a WBSR checkpoint (no '{FORMAT}' format tag)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')!r} is not supported (this toolkit reads {VERSION})"
        )
    budget = [MAX_JSON_BYTES]
    try:
        for key in JSON_KEYS:
            _check_json(ckpt.get(key), key, budget)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: refused, {e}") from None
    return ckpt


def require_model(ckpt: dict[str, Any], path: str | Path) -> None:
    """CheckpointError unless the checkpoint holds a model (MODEL_KEYS): what wbsr-eval, wbsr-calibrate and
    wbsr-export need (a run's first save before training also has them; a bare resume state does not)."""
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)} (not a model checkpoint)")
    if not isinstance(ckpt["model_config"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: model_config and model must be dicts")


def supernet_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> torch.nn.Module:
    """The supernet of a loaded checkpoint, weights in, in eval mode; CheckpointError (naming `path`) for a
    model config or weights that do not make a network."""
    from .config import model_config_from_dict
    from .model import build_supernet

    require_model(ckpt, path)
    weights = {k: tuple(v.shape) for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    try:
        cfg = model_config_from_dict(ckpt["model_config"])
        if max(cfg.depths) * (cfg.n_groups if cfg.arch == "rcan" else 1) > len(weights):
            raise ValueError("more blocks than the checkpoint has weights")
        with torch.device("meta"):  # shapes only: a config claiming huge widths allocates nothing
            wanted = {k: tuple(v.shape) for k, v in build_supernet(cfg).state_dict().items()}
        if wanted != weights:
            raise ValueError("its weights do not fit its model config")
        net = build_supernet(cfg)  # as large as the weights already loaded
        net.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: invalid model in checkpoint ({first[:200]})") from None
    return net.eval()
