"""Add TensorRT engines to an existing bundle. Imports neither torch nor the checkpoint code, so it runs on a
device that has only the bundle, TensorRT and cuda-python (a Jetson)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wbsr_runtime import defaults
from wbsr_runtime.engines import TensorRTUnavailable, merge_engine_records
from wbsr_runtime.fileio import atomic_write_bytes
from wbsr_runtime.manifest import BundleError, load_manifest, read_manifest, write_manifest

if TYPE_CHECKING:
    from .trt import EngineBuild, Toolchain

log = logging.getLogger(__name__)


def add_engines(
    bundle_dir: str | Path,
    *,
    precision: str = defaults.ENGINE_PRECISION,
    max_batch: int | None = None,
    patch: int | None = None,
    overlap: int | None = None,
    workspace_mb: int = 1024,
    opt_level: int = 3,
    toolchain: Toolchain | None = None,
) -> list[dict[str, Any]]:
    """Build engines for this machine with `wbsr_export.trt.build_engines`, then record them in the manifest.

    `max_batch`, `patch`, `overlap` default to the bundle's tiling (engines built for other tiles record
    theirs, and the `trt` backend tiles with it). Nothing is written until every engine is built and
    validated; then `commit_engines` adds the files and the new records (replacing older ones for the same
    target, machine and precision) in one step. Raises BundleError for an unusable bundle,
    TensorRTUnavailable without TensorRT. `toolchain`: a stand-in for TensorRT (tests, `gpu_check.py`).
    """
    root = Path(bundle_dir)
    manifest = load_manifest(root)
    if precision == "fp16" and not all("onnx_fp16" in s.files for s in manifest.subnets):
        raise BundleError(
            f"{root}: the bundle has no fp16 graphs; re-export it with --fp16 or build fp32 engines"
        )
    try:
        from .trt import build_engines
    except ImportError as e:
        log.debug("wbsr_export.trt unavailable: %s", e)
        raise TensorRTUnavailable() from None
    patch = patch or manifest.tiling.patch
    overlap = manifest.tiling.overlap if overlap is None else overlap
    if (patch, overlap) != (manifest.tiling.patch, manifest.tiling.overlap):
        log.warning(
            "engines for patch %d + overlap %d, not the bundle's tiling (%d + %d): the trt backend tiles as "
            "the engines record (or with the same --patch/--overlap)",
            patch,
            overlap,
            manifest.tiling.patch,
            manifest.tiling.overlap,
        )
    build = build_engines(
        root,
        precision=precision,
        max_batch=max_batch or manifest.tiling.max_batch or 16,
        patch=patch,
        overlap=overlap,
        workspace_mb=workspace_mb,
        opt_level=opt_level,
        toolchain=toolchain,
    )
    commit_engines(root, build)
    load_manifest(root)  # the rewritten manifest must validate (every engine file present and hashed)
    return [dict(r) for r in build.records]


def commit_engines(bundle_dir: str | Path, build: EngineBuild) -> None:
    """Write `build`'s files, then the manifest that records them and their sha256.

    The manifest's atomic rename is the one commit point: until it, the files written here are new names (plans
    named by their key, the timing cache by its content) that the old manifest never lists, and they are
    removed again on any error or interrupt, so the bundle stays loadable and unchanged. After it, the
    superseded timing cache is deleted."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    written: list[Path] = []
    try:
        for rel, blob in build.files.items():
            path = root / rel
            if not path.exists():
                written.append(path)
            atomic_write_bytes(path, blob)
        files = {k: v for k, v in manifest.files.items() if k not in build.replaced}
        files |= {rel: hashlib.sha256(blob).hexdigest() for rel, blob in build.files.items()}
        engines = tuple(merge_engine_records(manifest.engines, build.records))
        write_manifest(root, dataclasses.replace(manifest, engines=engines, files=files).to_dict())
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for rel in build.replaced:
        if rel not in build.files:
            (root / rel).unlink(missing_ok=True)
