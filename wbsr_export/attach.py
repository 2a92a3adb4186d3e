"""Add TensorRT engines to an existing bundle. Imports neither torch nor the checkpoint code, so it runs on a
device that has only the bundle, TensorRT and cuda-python (a Jetson)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wbsr_runtime.engines import TensorRTUnavailable, merge_engine_records
from wbsr_runtime.manifest import BundleError, hash_files, load_manifest, read_manifest_dict, write_manifest

log = logging.getLogger(__name__)


def add_engines(
    bundle_dir: str | Path,
    *,
    precision: str = "fp16",
    max_batch: int | None = None,
    patch: int | None = None,
    overlap: int | None = None,
    workspace_mb: int = 1024,
    opt_level: int = 3,
) -> list[dict[str, Any]]:
    """Build engines for this machine with `wbsr_export.trt.build_engines`, then record them in the manifest.

    `max_batch`, `patch`, `overlap` default to the bundle's tiling. The manifest is rewritten atomically with
    the new records (replacing older ones for the same target, machine and precision) and fresh file hashes.
    Raises BundleError for an unusable bundle, TensorRTUnavailable without TensorRT.
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
    records = build_engines(
        root,
        precision=precision,
        max_batch=max_batch or manifest.tiling.max_batch or 16,
        patch=patch or manifest.tiling.patch,
        overlap=manifest.tiling.overlap if overlap is None else overlap,
        workspace_mb=workspace_mb,
        opt_level=opt_level,
    )
    data = read_manifest_dict(root)
    data["engines"] = merge_engine_records(data.get("engines", []), records)
    data["files"] = hash_files(root)
    write_manifest(root, data)
    load_manifest(root)  # the rewritten manifest must validate (every engine file present and hashed)
    return [dict(r) for r in records]
