"""Checkpoints: a `Checkpoint` record, saved as plain tensors and JSON-able values only, so
`torch.load(weights_only=True)` reads them. `Checkpoint.from_dict` is the one place a checkpoint is validated;
`Checkpoint.to_dict` is the on-disk layout (format "wbsr-checkpoint", version 1; the fields of `Checkpoint`
and `ResumeState` below, specs as [width, depth] lists).
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wbsr_runtime.fileio import atomic_file, one_line

from .config import SubnetSpec

FORMAT = "wbsr-checkpoint"
VERSION = 1
MODEL_KEYS = ("model_config", "model", "specs", "flops", "num_classes", "thresholds")  # no defaults for these
JSON_KEYS = ("model_config", "train_config", "specs", "flops", "num_classes", "thresholds", "calibration", "metrics")
MAX_JSON_BYTES = 1 << 20  # all JSON fields together, as written out (a real checkpoint's take ~10 KB)
ZIP_SLACK = 1 << 20  # bytes the members of a torch.save archive may add up to beyond its file size
FLOPS_PATCH = 32  # LR patch side the FLOPs are counted at (and were, in checkpoints that do not say)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or of an unknown format; the message is one line."""


@dataclass(frozen=True)
class ResumeState:
    """What `wbsr-train --resume` needs beyond the weights."""

    step: int  # optimizer steps done
    loss: dict[str, Any]  # state dicts of the loss (BDLoss sigma), optimizer and LR scheduler
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: tuple[str, ...]  # each rank's numpy bit-generator state, as JSON


@dataclass(frozen=True)
class Checkpoint:
    """A trained (or imported) supernet and everything export, evaluation and calibration need from it."""

    model_config: dict[str, Any]  # ModelConfig as JSON types
    model: dict[str, torch.Tensor]  # supernet state dict (BasicSR parameter names)
    specs: tuple[SubnetSpec, ...]  # subnets, cheapest first
    flops: tuple[int, ...]  # 2 x MACs of each subnet on one flops_patch x flops_patch LR patch
    num_classes: int  # K
    thresholds: tuple[float, ...]  # K-1 descriptor thresholds (wbsr_train.descriptor)
    class_patch: int  # LR patch side the thresholds were computed at (the training patch)
    flops_patch: int = FLOPS_PATCH
    train_config: dict[str, Any] | None = None  # TrainConfig as JSON types (None for an imported network)
    calibration: dict[str, Any] | None = None  # wbsr_train.calibrate.calibrate's entry (MSE table, map, knob)
    state: ResumeState | None = None  # None once training is done, or for an imported network
    metrics: dict[str, Any] = field(default_factory=dict)  # last validation numbers
    holdout: tuple[str, ...] = ()  # training images set aside as the calibration split

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout: tensors and JSON types only."""
        state = None if self.state is None else {**vars(self.state), "rng": list(self.state.rng)}
        return {
            "format": FORMAT,
            "version": VERSION,
            **vars(self),
            "specs": [list(s) for s in self.specs],
            "flops": list(self.flops),
            "thresholds": list(self.thresholds),
            "state": state,
            "holdout": list(self.holdout),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = "checkpoint") -> Checkpoint:
        """The checkpoint held by `d` (what `torch.load` gave), checked: format and version, JSON fields (types
        and size), a model, each field's type. CheckpointError names `where` and says in one line what is
        wrong. Fields added since version 1 (class_patch, flops_patch) default to what older code used."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a WBSR checkpoint (no '{FORMAT}' format tag)")
        if d.get("version") != VERSION:
            raise CheckpointError(
                f"{where}: checkpoint version {d.get('version')!r} is not supported (this toolkit reads {VERSION})"
            )
        budget = [MAX_JSON_BYTES]
        try:
            for key in JSON_KEYS:
                _check_json(d.get(key), key, budget)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: refused, {e}") from None
        missing = [k for k in MODEL_KEYS if k not in d or d[k] is None]
        if missing:
            raise CheckpointError(f"{where}: checkpoint lacks {', '.join(missing)} (not a model checkpoint)")
        if not isinstance(d["model_config"], dict) or not isinstance(d["model"], dict):
            raise CheckpointError(f"{where}: model_config and model must be dicts")
        train_config = _typed(d, "train_config", dict, where, None)
        trained_at = _typed(train_config or {}, "patch", _int, where, FLOPS_PATCH)  # the patch build_pool scored
        return cls(
            model_config=d["model_config"],
            model=d["model"],
            specs=_typed(d, "specs", lambda v: tuple(SubnetSpec(*(_int(x) for x in s)) for s in v), where),
            flops=_typed(d, "flops", lambda v: tuple(_int(x) for x in v), where),
            num_classes=_typed(d, "num_classes", _int, where),
            thresholds=_typed(d, "thresholds", lambda v: tuple(float(_number(t)) for t in v), where),
            class_patch=_typed(d, "class_patch", _int, where, trained_at),
            flops_patch=_typed(d, "flops_patch", _int, where, FLOPS_PATCH),
            train_config=train_config,
            calibration=_typed(d, "calibration", dict, where, None),
            state=_typed(d, "state", _resume_state, where, None),
            metrics=_typed(d, "metrics", dict, where, {}),
            holdout=_typed(d, "holdout", lambda v: tuple(_str(p) for p in v), where, ()),
        )


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{v!r:.40} is not an integer")
    return v


def _number(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise TypeError(f"{v!r:.40} is not a number")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{v!r:.40} is not a string")
    return v


def _resume_state(v: Any) -> ResumeState:
    return ResumeState(step=_int(v["step"]), loss=dict(v["loss"]), optimizer=dict(v["optimizer"]),
                       scheduler=dict(v["scheduler"]), rng=tuple(_str(r) for r in v["rng"]))


_REQUIRED = object()


def _typed(d: dict[str, Any], key: str, convert: Callable[[Any], Any] | type, where: str | Path,
           default: Any = _REQUIRED) -> Any:
    """`d[key]`, of type `convert` or through `convert`; `default` when given and the key is missing or None.
    CheckpointError naming the field when the value does not fit."""
    value = d.get(key)
    if value is None and default is not _REQUIRED:
        return default
    try:
        if isinstance(convert, type):
            if not isinstance(value, convert):
                raise TypeError(f"not a {convert.__name__}")
            return value
        return convert(value)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: invalid {key} in checkpoint ({str(e) or type(e).__name__})") from None


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write `ckpt.to_dict()` atomically: a temp file in the same folder, then rename, so a crash never leaves
    half a file."""
    with atomic_file(path, parents=True) as f:
        torch.save(ckpt.to_dict(), f)


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


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint with `weights_only=True` after `_check_archive`, then `Checkpoint.from_dict`;
    CheckpointError says in one line what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_archive(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/zipfile errors for corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    return Checkpoint.from_dict(data, path)


def supernet_from_checkpoint(ckpt: Checkpoint, path: str | Path = "checkpoint") -> torch.nn.Module:
    """The supernet of a loaded checkpoint, weights in, in eval mode; CheckpointError (naming `path`) for a
    model config or weights that do not make a network."""
    from .config import model_config_from_dict
    from .model import build_supernet

    weights = {k: tuple(v.shape) for k, v in ckpt.model.items() if isinstance(v, torch.Tensor)}
    try:
        cfg = model_config_from_dict(ckpt.model_config)
        if max(cfg.depths) * (cfg.n_groups if cfg.arch == "rcan" else 1) > len(weights):
            raise ValueError("more blocks than the checkpoint has weights")
        with torch.device("meta"):  # shapes only: a config claiming huge widths allocates nothing
            wanted = {k: tuple(v.shape) for k, v in build_supernet(cfg).state_dict().items()}
        if wanted != weights:
            raise ValueError("its weights do not fit its model config")
        net = build_supernet(cfg)  # as large as the weights already loaded
        net.load_state_dict(ckpt.model)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: invalid model in checkpoint ({one_line(e, 200)})") from None
    return net.eval()
