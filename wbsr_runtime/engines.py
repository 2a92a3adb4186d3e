"""TensorRT engine identity: cache keys, optimisation profiles, and the checks that refuse a foreign engine.

Pure stdlib + numpy (and the runtime's `BackendError`), so both `wbsr_export.trt` (which builds engines) and the
`trt` backend (which runs them) share one definition, and all of it is tested without TensorRT.

A TensorRT plan only runs on the TensorRT version and GPU that built it. Following vs-mlrt, an engine's key
hashes everything that changes the plan: the ONNX content, `tensorrt.__version__`, the GPU name and compute
capability, the optimisation-profile shapes, the precision, the workspace limit and the builder optimisation
level. The key is part of the file name (`trt/subnet_00.<key>.plan`), so engines for several GPUs can live
side by side in one bundle and a mismatched one is never picked up by accident.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .backends.base import BackendError

KEY_VERSION = 1  # bump when the key's payload changes meaning
KEY_LENGTH = 16  # hex digits of sha256 kept: 64 bits, ample for a handful of engines per bundle
PRECISIONS = ("fp32", "fp16")
REBUILD_COMMAND = "wbsr-export --bundle {bundle} --trt"

Target = int | str  # a subnet index, or "router"


class EngineMismatch(ValueError):
    """An engine in the bundle was built for another TensorRT version or GPU, or none exists for this one."""


class TensorRTUnavailable(BackendError):
    """TensorRT (or cuda-python) is not installed here: for export a RuntimeError, for the runtime's backends
    the "can't run here" error. Defined here so the runtime need not import export."""

    def __init__(self, what: str = "TensorRT") -> None:
        super().__init__(
            f"{what} is not installed: `pip install tensorrt cuda-python` (x86_64/aarch64 Linux or Windows), "
            "or on a Jetson use the TensorRT that JetPack ships; it runs only on NVIDIA GPUs "
            "(use the `ort` or `torch` backend elsewhere)"
        )


def rebuild_command(bundle: object = None) -> str:
    """The command that builds engines for this machine, with the bundle path filled in when known."""
    return REBUILD_COMMAND.format(bundle=bundle if bundle is not None else "DIR")


def normalize_compute_capability(cc: str | Sequence[int] | float) -> str:
    """`(8, 7)`, `"8.7"`, `"sm_87"` or `8.7` -> `"8.7"`."""
    if isinstance(cc, str):
        text = cc.strip().lower().removeprefix("sm_").removeprefix("sm")
        if "." not in text and text.isdigit() and len(text) >= 2:
            text = f"{text[:-1]}.{text[-1]}"
        major, _, minor = text.partition(".")
        return f"{int(major)}.{int(minor or 0)}"
    if isinstance(cc, float):
        return normalize_compute_capability(f"{cc:.1f}")
    major, minor = (int(v) for v in cc)
    return f"{major}.{minor}"


def _shape(values: Iterable[int]) -> list[int]:
    return [int(v) for v in values]


def normalize_profile(profile: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """A profile as `{"min", "opt", "max"}` lists of ints, checked: same rank, min <= opt <= max."""
    try:
        out = {k: _shape(profile[k]) for k in ("min", "opt", "max")}
    except KeyError as exc:
        raise ValueError(f"profile needs min, opt and max shapes, missing {exc}") from None
    if not len(out["min"]) == len(out["opt"]) == len(out["max"]):
        raise ValueError(f"profile shapes differ in rank: {out}")
    for lo, mid, hi in zip(out["min"], out["opt"], out["max"], strict=True):
        if not 1 <= lo <= mid <= hi:
            raise ValueError(f"profile must satisfy 1 <= min <= opt <= max per dimension: {out}")
    return out


@dataclass(frozen=True)
class EngineSpec:
    """Everything that determines a TensorRT plan; `key` is its short stable hash."""

    onnx_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str
    profile: dict[str, list[int]] = field(hash=False)
    precision: str
    workspace: int  # bytes
    opt_level: int

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        object.__setattr__(self, "compute_capability", normalize_compute_capability(self.compute_capability))
        object.__setattr__(self, "gpu_name", self.gpu_name.strip())
        object.__setattr__(self, "profile", normalize_profile(self.profile))

    @property
    def key(self) -> str:
        payload = {"key_version": KEY_VERSION, **asdict(self)}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def engine_key(
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: str | Sequence[int],
    profile: Mapping[str, Iterable[int]],
    precision: str,
    workspace: int,
    opt_level: int,
) -> str:
    """Short stable hash (16 hex digits) of everything that makes a plan; see `EngineSpec`."""
    return EngineSpec(
        onnx_sha256,
        trt_version,
        gpu_name,
        compute_capability,
        profile,
        precision,
        int(workspace),
        int(opt_level),
    ).key


def target_name(target: Target) -> str:
    """`3` -> `"subnet_03"` (as the bundle names the ONNX graphs); `"router"` stays."""
    if isinstance(target, str):
        if target != "router":
            raise ValueError(f"engine target must be a subnet index or 'router', got {target!r}")
        return target
    return f"subnet_{int(target):02d}"


def engine_file(target: Target, key: str) -> str:
    """Bundle-relative path of an engine: `trt/<target>.<key>.plan`."""
    return f"trt/{target_name(target)}.{key}.plan"


def profile_shapes(
    patch: int, overlap: int, max_batch: int, opt_batch: int | None = None, channels: int = 3
) -> dict[str, list[int]]:
    """Optimisation profile for the subnet input: tiles of `patch + 2 * overlap` square, batch 1..max_batch.

    Every tile the runtime feeds has the same size (frames smaller than a patch are padded), so only the
    batch dimension varies. `opt` defaults to `max_batch`: the scheduler fills chunks up to the engine's max
    batch, so full batches are the common case and the ones worth tuning for.
    """
    if patch < 1 or overlap < 0 or max_batch < 1:
        raise ValueError(
            f"need patch >= 1, overlap >= 0, max_batch >= 1; got {patch}, {overlap}, {max_batch}"
        )
    opt = max_batch if opt_batch is None else int(opt_batch)
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt_batch must lie in 1..{max_batch}, got {opt}")
    tile = int(patch) + 2 * int(overlap)
    return {k: [b, channels, tile, tile] for k, b in (("min", 1), ("opt", opt), ("max", int(max_batch)))}


def engine_tiling(record: Mapping[str, Any], patch: int, overlap: int) -> tuple[int, int]:
    """(patch, overlap) an engine was built for: its record's `tiling`, else the bundle's (`patch`, `overlap`)
    when that gives the engine's tile size. EngineMismatch when neither fits (an engine built for other
    tiles by an older export, which recorded no tiling)."""
    t = record.get("tiling")
    if t:
        return int(t["patch"]), int(t["overlap"])
    tile = int(record["profile"]["max"][2])
    if patch + 2 * overlap == tile:
        return patch, overlap
    raise EngineMismatch(
        f"engine {record.get('file', '?')} takes {tile}x{tile} tiles, the bundle tiles with patch {patch} + "
        f"2 x overlap {overlap}; pass --patch P --overlap O with P + 2 x O = {tile}"
    )


def _describe(record: Mapping[str, Any]) -> str:
    return (
        f"TensorRT {record.get('tensorrt')} on {record.get('gpu')} "
        f"(compute {record.get('compute_capability')})"
    )


def engine_differences(
    record: Mapping[str, Any], trt_version: str, gpu_name: str, compute_capability: str | Sequence[int]
) -> list[str]:
    """What about this machine differs from the one that built `record` (empty when it matches)."""
    diffs = []
    if str(record.get("tensorrt")) != str(trt_version):
        diffs.append("TensorRT version")
    if str(record.get("gpu", "")).strip() != gpu_name.strip():
        diffs.append("GPU")
    try:
        same_cc = normalize_compute_capability(record.get("compute_capability", "")) == (
            normalize_compute_capability(compute_capability)
        )
    except (TypeError, ValueError):
        same_cc = False
    if not same_cc:
        diffs.append("compute capability")
    return diffs


def check_engine_record(
    record: Mapping[str, Any],
    trt_version: str,
    gpu_name: str,
    compute_capability: str | Sequence[int],
    *,
    bundle: object = None,
) -> None:
    """Raise `EngineMismatch` (one line: what differs, and the command that rebuilds) unless `record` was
    built by this TensorRT version on this GPU model."""
    diffs = engine_differences(record, trt_version, gpu_name, compute_capability)
    if diffs:
        here = {"tensorrt": trt_version, "gpu": gpu_name, "compute_capability": compute_capability}
        cc = normalize_compute_capability(compute_capability)
        raise EngineMismatch(
            f"engine {record.get('file', '?')} was built for {_describe(record)}, this machine has "
            f"{_describe({**here, 'compute_capability': cc})}: {' and '.join(diffs)} differ; "
            f"build engines for this machine with: {rebuild_command(bundle)}"
        )


def find_engine(
    manifest_engines: Iterable[Mapping[str, Any]],
    target: Target,
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: str | Sequence[int],
    tile: int | None = None,
    precision: str | None = None,
    bundle: object = None,
) -> dict[str, Any]:
    """The first engine record for `target` built for this machine (and covering `tile` x `tile` inputs and
    `precision` when given). Raises `EngineMismatch` naming what differs, or that none exists, with the
    rebuild command; never returns a foreign engine."""
    candidates = [dict(r) for r in manifest_engines if _same_target(r.get("target"), target)]
    if precision is not None:
        candidates = [r for r in candidates if r.get("precision") == precision]
    if tile is not None:
        candidates = [r for r in candidates if _covers_tile(r.get("profile", {}), tile)]
    for record in candidates:
        if not engine_differences(record, trt_version, gpu_name, compute_capability):
            return record
    if candidates:
        check_engine_record(candidates[0], trt_version, gpu_name, compute_capability, bundle=bundle)
    wanted = [target_name(target)]
    wanted += [f"{tile}x{tile} tiles"] if tile is not None else []
    wanted += [precision] if precision is not None else []
    raise EngineMismatch(
        f"the bundle has no TensorRT engine for {', '.join(wanted)}; "
        f"build engines for this machine with: {rebuild_command(bundle)}"
    )


def _same_target(a: object, b: Target) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a is not None and int(a) == int(b)


def _covers_tile(profile: Mapping[str, Sequence[int]], tile: int) -> bool:
    try:
        lo, hi = profile["min"], profile["max"]
        return lo[2] <= tile <= hi[2] and lo[3] <= tile <= hi[3]
    except (KeyError, IndexError, TypeError):
        return False


def merge_engine_records(
    existing: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Manifest `engines` after a build: the new records replace any older one for the same target, machine
    (TensorRT version, GPU, compute capability) and precision; records for other machines stay, so one bundle
    can carry engines for a desktop GPU and a Jetson."""
    new = [dict(r) for r in new]

    def slot(r: Mapping[str, Any]) -> tuple:
        return (
            str(r.get("target")),
            r.get("tensorrt"),
            r.get("gpu"),
            r.get("compute_capability"),
            r.get("precision"),
        )

    taken = {slot(r) for r in new}
    return [dict(r) for r in existing if slot(r) not in taken] + new
