"""Reader, validator and atomic writer of a bundle's `manifest.json` (docs/bundle.md). Stdlib + numpy only.

The manifest is the runtime's only input: `load_manifest` turns it into frozen, typed records and refuses,
with one line saying what is wrong and how to fix it, anything it cannot trust (newer schema, missing file,
changed file, malformed field).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileio import atomic_file

FORMAT = "wbsr-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REBUILD = "re-export it with `wbsr-export --ckpt CHECKPOINT --out DIR --force`"


class BundleError(ValueError):
    """A bundle the runtime cannot use; the message is one line: what is wrong and how to fix it."""


@dataclass(frozen=True)
class Tiling:
    patch: int  # default LR core patch size
    overlap: int  # LR context added on each side
    max_batch: int | None = None  # batch upper bound the export was asked for (engine profiles)


@dataclass(frozen=True)
class RouterInfo:
    file: str
    inputs: Mapping[str, str]  # {"frame": name, "boxes": name}
    outputs: Mapping[str, str]  # {"scores": name, "classes": name}
    num_classes: int  # K
    thresholds: tuple[float, ...]  # K-1 ascending descriptor thresholds
    class_patch: int  # LR patch size the thresholds were computed at
    descriptor: str


@dataclass(frozen=True)
class SubnetInfo:
    index: int  # position, cheapest first
    width: int
    depth: int
    flops_per_patch: int  # 2 x MACs on one flops_patch x flops_patch LR patch
    flops_patch: int
    files: Mapping[str, str]  # {"onnx": rel, "onnx_fp16"?: rel, "torch"?: rel}
    input: str
    output: str


@dataclass(frozen=True)
class Routing:
    psnr_table: tuple[tuple[float, ...], ...] | None  # K x M dB, or None when not calibrated
    tolerance_db: float | None
    class_to_subnet: tuple[int, ...]  # K subnet indices, entry k-1 for class k


@dataclass(frozen=True)
class Manifest:
    root: Path
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
    """Write `manifest.json` atomically (temp file in the same folder, then rename)."""
    path = Path(bundle_dir) / MANIFEST
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path


def read_manifest_dict(bundle_dir: str | Path) -> dict[str, Any]:
    """The raw manifest as a dict, after the format and schema-version checks."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a WBSR bundle (no {MANIFEST}); export one with wbsr-export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({type(e).__name__}); {REBUILD}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not a WBSR bundle manifest (no '{FORMAT}' format tag); {REBUILD}")
    version = data.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{path}: invalid schema_version {version!r}; {REBUILD}")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{path}: bundle schema version {version} is newer than supported ({SCHEMA_VERSION}); "
            f"upgrade wbsr-deploy, or {REBUILD} using this version"
        )
    return data


def load_manifest(bundle_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and validate `bundle_dir/manifest.json`; with `verify_hashes`, check every file's sha256."""
    root = Path(bundle_dir)
    data = read_manifest_dict(root)
    try:
        manifest = _parse(root, data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise BundleError(f"{root / MANIFEST}: malformed manifest ({what}); {REBUILD}") from None
    _check_files(manifest, verify_hashes)
    return manifest


def _parse(root: Path, d: dict[str, Any]) -> Manifest:
    r, rt = d["router"], d["routing"]
    router = RouterInfo(
        file=str(r["file"]),
        inputs=dict(r["inputs"]),
        outputs=dict(r["outputs"]),
        num_classes=int(r["num_classes"]),
        thresholds=tuple(float(t) for t in r["thresholds"]),
        class_patch=int(r["class_patch"]),
        descriptor=str(r["descriptor"]),
    )
    subnets = tuple(
        SubnetInfo(
            index=int(s["index"]),
            width=int(s["width"]),
            depth=int(s["depth"]),
            flops_per_patch=int(s["flops_per_patch"]),
            flops_patch=int(s["flops_patch"]),
            files={str(k): str(v) for k, v in s["files"].items()},
            input=str(s["input"]),
            output=str(s["output"]),
        )
        for s in d["subnets"]
    )
    table = rt["psnr_table"]
    routing = Routing(
        psnr_table=None if table is None else tuple(tuple(float(v) for v in row) for row in table),
        tolerance_db=None if rt["tolerance_db"] is None else float(rt["tolerance_db"]),
        class_to_subnet=tuple(int(m) for m in rt["class_to_subnet"]),
    )
    manifest = Manifest(
        root=root,
        schema_version=int(d["schema_version"]),
        name=str(d["name"]),
        scale=int(d["scale"]),
        model=dict(d["model"]),
        input=dict(d["input"]),
        tiling=_tiling(d["tiling"]),
        router=router,
        subnets=subnets,
        routing=routing,
        engines=tuple(dict(e) for e in d["engines"]),
        files={str(k): str(v) for k, v in d["files"].items()},
        provenance=dict(d["provenance"]),
    )
    _check_consistency(manifest)
    return manifest


def _tiling(t: dict[str, Any]) -> Tiling:
    batch = t.get("max_batch")
    return Tiling(
        patch=int(t["patch"]), overlap=int(t["overlap"]), max_batch=None if batch is None else int(batch)
    )


def _check_consistency(m: Manifest) -> None:
    """ValueError (turned into BundleError) when fields contradict each other."""
    k, n = m.router.num_classes, len(m.subnets)
    if m.scale not in (2, 3, 4) or m.tiling.patch < 3 or m.tiling.overlap < 0:
        raise ValueError(f"scale {m.scale}, patch {m.tiling.patch}, overlap {m.tiling.overlap} out of range")
    if len(m.router.thresholds) != k - 1 or list(m.router.thresholds) != sorted(m.router.thresholds):
        raise ValueError(f"router needs {k - 1} ascending thresholds, has {len(m.router.thresholds)}")
    if n == 0 or [s.index for s in m.subnets] != list(range(n)):
        raise ValueError("subnets must be listed with indices 0..M-1")
    if len(m.routing.class_to_subnet) != k or not all(0 <= i < n for i in m.routing.class_to_subnet):
        raise ValueError(f"class_to_subnet must hold {k} subnet indices in 0..{n - 1}")
    if m.routing.psnr_table is not None and (
        len(m.routing.psnr_table) != k or any(len(row) != n for row in m.routing.psnr_table)
    ):
        raise ValueError(f"psnr_table must be {k} x {n}")


def referenced_files(m: Manifest) -> list[str]:
    """Every file the manifest points at: router, subnet graphs and programs, engines."""
    files = [m.router.file] + [f for s in m.subnets for f in s.files.values()]
    return files + [str(e["file"]) for e in m.engines if "file" in e]


def _check_files(m: Manifest, verify_hashes: bool) -> None:
    for rel in referenced_files(m):
        if rel not in m.files:
            raise BundleError(f"{m.root}: {rel} is used but has no sha256 in the manifest; {REBUILD}")
    for rel, digest in m.files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{m.root}: file path {rel!r} leaves the bundle folder; {REBUILD}")
        path = m.path(rel)
        if not path.is_file():
            raise BundleError(f"{m.root}: missing file {rel}; copy the whole bundle folder or {REBUILD}")
        if verify_hashes and file_sha256(path) != digest:
            raise BundleError(
                f"{m.root}: {rel} does not match its sha256 in the manifest (changed or "
                f"corrupt); copy it again or {REBUILD}"
            )
