"""Reader, validator and atomic writer of a bundle's `manifest.json` (docs/bundle.md). Stdlib + numpy only.

The manifest is the runtime's only input: `load_manifest` turns it into frozen, typed records and refuses,
with one line saying what is wrong and how to fix it, anything it cannot trust (newer schema, missing file,
changed file, malformed field). These records are the only schema: the export builds a `Manifest` and writes
its `to_dict()`, and a tool holding the dict (read from a file or built) parses it with `parse_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .fileio import atomic_file, one_line
from .tiling import MAX_TILE, MIN_WINDOW

FORMAT = "wbsr-bundle"
SCHEMA_VERSION = 2  # 2: the routing section holds the MSE table and class frequencies (was a PSNR table)
MANIFEST = "manifest.json"
REBUILD = "re-export it with `wbsr-export --ckpt CHECKPOINT --out DIR --force`"
MAX_MANIFEST_BYTES = 4 << 20  # a bundle of 9 subnets with engines for a few GPUs has a manifest of ~20 KB
MAX_CLASSES = MAX_SUBNETS = 1024  # far beyond any supernet grid; keeps every list the manifest sizes bounded


class BundleError(ValueError):
    """A bundle the runtime cannot use; the message is one line: what is wrong and how to fix it."""


def _json(value: Any) -> Any:
    """`value` as JSON types: records and mappings as dicts, tuples as lists."""
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_json(v) for v in value]
    return value


class _Record:
    """A manifest record that writes itself out as its section of manifest.json (docs/bundle.md)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _json(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class Tiling(_Record):
    patch: int  # default LR core patch size
    overlap: int  # LR context added on each side
    max_batch: int | None = None  # batch upper bound the export was asked for (engine profiles)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return d if self.max_batch is not None else {k: v for k, v in d.items() if k != "max_batch"}


@dataclass(frozen=True)
class RouterInfo(_Record):
    file: str
    inputs: Mapping[str, str]  # {"frame": name, "boxes": name}
    outputs: Mapping[str, str]  # {"scores": name, "classes": name}
    num_classes: int  # K
    thresholds: tuple[float, ...]  # K-1 ascending descriptor thresholds
    class_patch: int  # LR patch size the thresholds were computed at
    descriptor: str


@dataclass(frozen=True)
class SubnetInfo(_Record):
    index: int  # position, cheapest first
    width: int
    depth: int
    flops_per_patch: int  # 2 x MACs on one flops_patch x flops_patch LR patch
    flops_patch: int
    files: Mapping[str, str]  # {"onnx": rel, "onnx_fp16"?: rel, "torch"?: rel}
    input: str
    output: str


@dataclass(frozen=True)
class Routing(_Record):
    mse_table: tuple[tuple[float, ...], ...] | None  # K x M Y-channel MSE ([0, 255] scale); None: uncalibrated
    class_freq: tuple[float, ...] | None  # K pixel shares of the classes on the calibration split
    tolerance_db: float | None  # the knob the default map was chosen with (at most one of the two is set)
    budget: float | None
    class_to_subnet: tuple[int, ...]  # K subnet indices, entry k-1 for class k


@dataclass(frozen=True)
class Manifest(_Record):
    root: Path  # the bundle folder (not written: a bundle can be moved)
    schema_version: int
    name: str
    scale: int
    model: Mapping[str, Any]
    input: Mapping[str, Any]
    tiling: Tiling
    router: RouterInfo
    subnets: tuple[SubnetInfo, ...]
    routing: Routing
    engines: tuple[Mapping[str, Any], ...]  # TensorRT records (wbsr_runtime.engines reads them)
    files: Mapping[str, str]  # relative path -> sha256
    provenance: Mapping[str, Any]

    def path(self, rel: str) -> Path:
        """Absolute path of a file named in the manifest."""
        return self.root / rel

    def to_dict(self) -> dict[str, Any]:
        """The manifest.json object (what `parse_manifest` reads back)."""
        body = {k: v for k, v in super().to_dict().items() if k != "root"}
        return {"format": FORMAT, **body}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(bundle_dir: str | Path) -> dict[str, str]:
    """`{relative posix path: sha256}` of every file under `bundle_dir` except the manifest and temp files."""
    root = Path(bundle_dir)
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def write_manifest(bundle_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write `manifest.json` atomically (temp file in the same folder, then rename); `manifest` is a
    `Manifest.to_dict()` (tests also write hand-edited dicts to check the reader's refusals)."""
    path = Path(bundle_dir) / MANIFEST
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path


def _read_json(path: Path, bundle_dir: str | Path) -> Any:
    """The JSON value of `path`, read at most MAX_MANIFEST_BYTES far."""
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a WBSR bundle (no {MANIFEST}); export one with wbsr-export")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)  # never more, whatever the file's size
        if len(raw) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB, refused; {REBUILD}")
        return json.loads(raw.decode("utf-8"))
    except BundleError:
        raise
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, a 5000-digit number
        raise BundleError(f"{path}: unreadable manifest ({type(e).__name__}); {REBUILD}") from None


def _check_header(data: Any, path: Path) -> None:
    """BundleError unless `data` is a manifest object of this format and schema version."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not a WBSR bundle manifest (no '{FORMAT}' format tag); {REBUILD}")
    version = data.get("schema_version")
    if not _is_int(version) or version < 1:
        raise BundleError(f"{path}: invalid schema_version {_show(version)}; {REBUILD}")
    if version < SCHEMA_VERSION:
        raise BundleError(
            f"{path}: bundle schema version {version} is older than this runtime reads ({SCHEMA_VERSION}): "
            f"{REBUILD}"
        )
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{path}: bundle schema version {version} is newer than supported ({SCHEMA_VERSION}); "
            f"upgrade wbsr-deploy, or {REBUILD} using this version"
        )


def parse_manifest(data: Any, root: str | Path) -> Manifest:
    """The typed, validated records of a manifest dict (types, ranges, consistency) for the bundle folder
    `root`; its files are not looked at (`load_manifest` does that). Every refusal is a BundleError."""
    root = Path(root)
    _check_header(data, root / MANIFEST)
    try:
        return _parse(root, data)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else one_line(e)
        raise BundleError(f"{root / MANIFEST}: malformed manifest ({what}); {REBUILD}") from None


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and parse `bundle_dir/manifest.json` without looking at the files it lists (the engine build,
    which checks the files it uses and rebuilds a missing or altered plan)."""
    root = Path(bundle_dir)
    return parse_manifest(_read_json(root / MANIFEST, bundle_dir), root)


def load_manifest(bundle_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read, parse and validate `bundle_dir/manifest.json`, and check that every file it lists is there, inside
    the folder; with `verify_hashes`, check every file's sha256. Every refusal is a BundleError naming the
    manifest or the file."""
    manifest = read_manifest(bundle_dir)
    _check_files(manifest, verify_hashes)
    return manifest


# --- typed fields: JSON gives int, float, str, bool, None, list, dict; nothing is coerced ---------------------
def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(d: Any, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """`d[key]` (KeyError when missing), of type `kind` when given."""
    if not isinstance(d, dict):
        raise ValueError(f"expected an object holding {key!r}, got {_show(d)}")
    v = d[key]
    if kind is not None and not isinstance(v, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{key} must be of type {names}, got {_show(v)}")
    return v


def _int(d: Mapping[str, Any], key: str, lo: int, hi: float = math.inf) -> int:
    v = _get(d, key)
    if not _is_int(v) or not lo <= v <= hi:
        span = f">= {lo}" if hi == math.inf else f"in {lo}..{hi}"
        raise ValueError(f"{key} must be an integer {span}, got {_show(v)}")
    return v


def _num(v: Any, what: str, lo: float = -math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < lo:
        bound = f" >= {lo}" if lo > -math.inf else ""
        raise ValueError(f"{what} must be a finite number{bound}, got {_show(v)}")
    return float(v)


def _names(d: Mapping[str, Any], key: str, required: tuple[str, ...]) -> dict[str, str]:
    """A {role: name} object of strings holding every role in `required`."""
    v = _get(d, key, dict)
    if not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()) or set(required) - set(v):
        raise ValueError(f"{key} must map {', '.join(required) or 'names'} to names, got {_show(v)}")
    return dict(v)


def _items(d: Mapping[str, Any], key: str, n: int | None = None, limit: int = MAX_SUBNETS) -> list:
    """The list `d[key]`, of exactly `n` entries when given, at most `limit`."""
    v = _get(d, key, list)
    if (n is not None and len(v) != n) or len(v) > limit:
        raise ValueError(f"{key} must hold {n if n is not None else f'at most {limit}'} entries, has {len(v)}")
    return v


def _parse(root: Path, d: dict[str, Any]) -> Manifest:
    router = _router(_get(d, "router", dict))
    subnets = tuple(_subnet(s) for s in _items(d, "subnets"))
    engines = _items(d, "engines", limit=64 * MAX_SUBNETS)
    if not all(isinstance(e, dict) for e in engines):
        raise ValueError("engines must be a list of objects")
    manifest = Manifest(
        root=root,
        schema_version=d["schema_version"],
        name=_get(d, "name", str),
        scale=_int(d, "scale", 2, 4),
        model=_get(d, "model", dict),
        input=_get(d, "input", dict),
        tiling=_tiling(_get(d, "tiling", dict)),
        router=router,
        subnets=subnets,
        routing=_routing(_get(d, "routing", dict), router.num_classes, len(subnets)),
        engines=tuple(engines),
        files=_names(d, "files", ()),
        provenance=_get(d, "provenance", dict),
    )
    _check_consistency(manifest)
    return manifest


def _router(r: dict[str, Any]) -> RouterInfo:
    k = _int(r, "num_classes", 2, MAX_CLASSES)
    thresholds = tuple(_num(t, "a router threshold") for t in _items(r, "thresholds", k - 1, MAX_CLASSES))
    if list(thresholds) != sorted(thresholds):
        raise ValueError("router thresholds must be ascending")
    return RouterInfo(
        file=_get(r, "file", str),
        inputs=_names(r, "inputs", ("frame", "boxes")),
        outputs=_names(r, "outputs", ("scores", "classes")),
        num_classes=k,
        thresholds=thresholds,
        class_patch=_int(r, "class_patch", 1, MAX_TILE),
        descriptor=_get(r, "descriptor", str),
    )


def _subnet(s: Any) -> SubnetInfo:
    return SubnetInfo(
        index=_int(s, "index", 0, MAX_SUBNETS),
        width=_int(s, "width", 1, 1 << 16),
        depth=_int(s, "depth", 1, 1 << 16),
        flops_per_patch=_int(s, "flops_per_patch", 1),
        flops_patch=_int(s, "flops_patch", 1, MAX_TILE),
        files=_names(s, "files", ("onnx",)),
        input=_get(s, "input", str),
        output=_get(s, "output", str),
    )


def _routing(rt: dict[str, Any], k: int, n: int) -> Routing:
    table, freq = _get(rt, "mse_table", (list, type(None))), _get(rt, "class_freq", (list, type(None)))
    if (table is None) != (freq is None):
        raise ValueError("mse_table and class_freq come together (both or neither)")
    if table is not None:
        rows = _items(rt, "mse_table", k, MAX_CLASSES)
        table = tuple(tuple(_num(v, "an mse_table entry", 0.0) for v in _items({"row": r}, "row", n)) for r in rows)
        freq = tuple(_num(v, "a class_freq entry", 0.0) for v in _items(rt, "class_freq", k, MAX_CLASSES))
        if sum(freq) <= 0:
            raise ValueError("class_freq must not be all zero")
    tolerance, budget = _get(rt, "tolerance_db"), _get(rt, "budget")
    if tolerance is not None and budget is not None:
        raise ValueError("routing records both a tolerance and a budget")
    if budget is not None and not (_num(budget, "budget", 0.0) > 0 and budget <= 1):
        raise ValueError(f"budget must be a fraction in (0, 1], got {_show(budget)}")
    cmap = _items(rt, "class_to_subnet", k, MAX_CLASSES)
    if not all(_is_int(i) and 0 <= i < n for i in cmap):
        raise ValueError(f"class_to_subnet must hold {k} subnet indices in 0..{n - 1}, got {_show(cmap)}")
    return Routing(
        mse_table=table,
        class_freq=freq,
        tolerance_db=None if tolerance is None else _num(tolerance, "tolerance_db", 0.0),
        budget=None if budget is None else float(budget),
        class_to_subnet=tuple(cmap),
    )


def _tiling(t: dict[str, Any]) -> Tiling:
    patch, overlap = _int(t, "patch", MIN_WINDOW, MAX_TILE), _int(t, "overlap", 0, MAX_TILE)
    if patch + 2 * overlap > MAX_TILE:
        raise ValueError(f"a tile (patch + 2 x overlap) must be at most {MAX_TILE} pixels, got {patch}, {overlap}")
    batch = None if t.get("max_batch") is None else _int(t, "max_batch", 1, 1 << 16)
    return Tiling(patch=patch, overlap=overlap, max_batch=batch)


def _check_consistency(m: Manifest) -> None:
    """ValueError (turned into BundleError) when fields contradict each other."""
    n = len(m.subnets)
    if n == 0 or [s.index for s in m.subnets] != list(range(n)):
        raise ValueError("subnets must be listed with indices 0..M-1")
    per_pixel = [s.flops_per_patch / s.flops_patch**2 for s in m.subnets]
    if per_pixel != sorted(per_pixel):
        raise ValueError("subnets must be listed cheapest first (FLOPs per pixel ascending)")
    full = m.subnets[-1]
    if full.width != max(s.width for s in m.subnets) or full.depth != max(s.depth for s in m.subnets):
        raise ValueError("the last subnet must be the full one (largest width and depth)")
    if "scale" in m.model and m.model["scale"] != m.scale:
        raise ValueError(f"scale {m.scale} differs from the model's scale {_show(m.model['scale'])}")


def referenced_files(m: Manifest) -> list[str]:
    """Every file the manifest points at: router, subnet graphs and programs, engines."""
    files = [m.router.file] + [f for s in m.subnets for f in s.files.values()]
    return files + [str(e["file"]) for e in m.engines if "file" in e]


def _check_files(m: Manifest, verify_hashes: bool) -> None:
    for rel in referenced_files(m):
        if rel not in m.files:
            raise BundleError(f"{m.root}: {rel} is used but has no sha256 in the manifest; {REBUILD}")
    for rel in m.files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{m.root}: file path {rel!r} leaves the bundle folder; {REBUILD}")
    try:
        real_root = m.root.resolve()
        outside = [rel for rel in [MANIFEST, *m.files] if not m.path(rel).resolve().is_relative_to(real_root)]
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, on Python < 3.13
        raise BundleError(f"{m.root}: a bundle file is a symlink loop; {REBUILD}") from None
    if outside:
        raise BundleError(f"{m.root}: {outside[0]} is a symlink that leaves the bundle folder; {REBUILD}")
    for rel, digest in m.files.items():
        path = m.path(rel)
        if not path.is_file():
            raise BundleError(f"{m.root}: missing file {rel}; copy the whole bundle folder or {REBUILD}")
        if verify_hashes and file_sha256(path) != digest:
            raise BundleError(
                f"{m.root}: {rel} does not match its sha256 in the manifest (changed or "
                f"corrupt); copy it again or {REBUILD}"
            )
