"""Checkpoint -> bundle folder (docs/bundle.md): subnet graphs, router graph, torch programs, manifest.

Everything is written into a temp folder next to the destination and renamed into place at the end, so an
interrupted export never leaves a half bundle under the final name. Parity against PyTorch is measured while
exporting; an fp32 graph that differs by more than `FP32_TOLERANCE` fails the export.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tqdm import tqdm

from wbsr_runtime.manifest import (
    SCHEMA_VERSION,
    Manifest,
    RouterInfo,
    Routing,
    SubnetInfo,
    Tiling,
    file_sha256,
    hash_files,
    write_manifest,
)
from wbsr_runtime.routing import eq15_map
from wbsr_train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, supernet_from_checkpoint

from .errors import ExportError, ParityError
from .onnx import (
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    SUBNET_INPUT,
    SUBNET_OUTPUT,
    export_router_onnx,
    export_subnet_onnx,
)
from .parity import box_grid, parity_inputs, router_parity, subnet_parity
from .program import export_subnet_program
from .slice import extract_subnet

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # max abs difference ONNX Runtime vs PyTorch, images in [0, 1]
ROUTER_TOLERANCE = 1e-4  # relative score error
INPUT = {"layout": "NCHW", "dtype": "float32", "range": [0, 1], "color": "RGB"}  # what every subnet graph takes


def export_bundle(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    fp16: bool = False,
    max_batch: int = 16,
    patch: int = 32,
    overlap: int = 2,
    force: bool = False,
    torch_programs: bool = True,
) -> Path:
    """Export the checkpoint at `ckpt_path` to the bundle folder `out_dir`; returns `out_dir`.

    `patch`/`overlap` are the default LR tiling the manifest records, `max_batch` the batch upper bound for
    engine profiles; `fp16` adds fp16 graphs, `torch_programs` the `.pt2` programs. Raises CheckpointError or
    ExportError (nothing written) for bad input, ParityError when a graph fails its parity check.
    """
    out = Path(out_dir)
    if patch < 3 or overlap < 0 or max_batch < 1:
        raise ExportError(
            f"need patch >= 3, overlap >= 0, max batch >= 1 (got {patch}, {overlap}, {max_batch})"
        )
    ckpt = load_checkpoint(ckpt_path)
    _check_destination(out, force)
    net = supernet_from_checkpoint(ckpt, ckpt_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        contents = _write_contents(tmp, net, ckpt, fp16=fp16, torch_programs=torch_programs, patch=patch)
        manifest = Manifest(
            root=tmp,
            schema_version=SCHEMA_VERSION,
            name=out.name,
            scale=int(net.cfg.scale),
            model=dict(ckpt.model_config),
            input=INPUT,
            tiling=Tiling(patch=patch, overlap=overlap, max_batch=max_batch),
            router=_router_entry(ckpt),
            subnets=contents.subnets,
            routing=_routing(ckpt, len(ckpt.specs)),
            engines=(),
            files=hash_files(tmp),
            provenance=_provenance(ckpt, contents.parity, file_sha256(ckpt_path)),
        )
        write_manifest(tmp, manifest.to_dict())
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote bundle %s", out)
    return out


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder to `out`; an old bundle is moved aside first and deleted after."""
    _check_destination(out, force)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class _Contents:
    subnets: tuple[SubnetInfo, ...]
    parity: dict[str, Any]  # what the export measured (provenance.parity)


def _write_contents(
    folder: Path, net: torch.nn.Module, ckpt: Checkpoint, *, fp16: bool, torch_programs: bool, patch: int
) -> _Contents:
    """Write every graph into `folder` and check their parity; their manifest entries and the parity."""
    inputs = parity_inputs(seed=0, patch=max(patch, 8))
    subnets, parity = [], {"fp32_max_abs": [], "fp16_rel": [], "fp16_max_abs": []}
    for i, spec in enumerate(tqdm(ckpt.specs, desc="export subnets", unit="subnet", disable=None)):
        sub = extract_subnet(net, spec)
        files = {"onnx": f"subnet_{i:02d}.onnx"}
        fp32 = subnet_parity(sub, export_subnet_onnx(sub, folder / files["onnx"]), inputs)
        if not fp32["max_abs"] <= FP32_TOLERANCE:
            raise ParityError(
                f"subnet {i} {tuple(spec)}: ONNX fp32 differs from PyTorch by {fp32['max_abs']:.3g}"
            )
        parity["fp32_max_abs"].append(fp32["max_abs"])
        if fp16:
            files["onnx_fp16"] = f"subnet_{i:02d}.fp16.onnx"
            half = subnet_parity(sub, export_subnet_onnx(sub, folder / files["onnx_fp16"], fp16=True), inputs)
            if not np.isfinite(half["rel"]):
                raise ParityError(f"subnet {i} {tuple(spec)}: the fp16 graph gives NaN or inf")
            parity["fp16_rel"].append(half["rel"])
            parity["fp16_max_abs"].append(half["max_abs"])
        if torch_programs:
            files["torch"] = export_subnet_program(sub, folder / f"subnet_{i:02d}.pt2").name
        subnets.append(
            SubnetInfo(
                index=i,
                width=spec.width,
                depth=spec.depth,
                flops_per_patch=ckpt.flops[i],
                flops_patch=ckpt.flops_patch,
                files=files,
                input=SUBNET_INPUT,
                output=SUBNET_OUTPUT,
            )
        )
    parity["router"] = _export_router(folder / "router.onnx", list(ckpt.thresholds), inputs[2])
    return _Contents(tuple(subnets), parity)


def _export_router(path: Path, thresholds: list[float], texture: np.ndarray) -> dict[str, float]:
    """Export the router and check its scores against the training descriptor on a textured frame."""
    frame = np.tile(texture, (1, 1, 3, 4))
    boxes = box_grid(frame.shape[2], frame.shape[3], patch=12, step=5)
    result = router_parity(export_router_onnx(thresholds, path), frame, boxes, thresholds)
    if not result["score_rel"] <= ROUTER_TOLERANCE:
        raise ParityError(f"router scores differ from the training descriptor by {result['score_rel']:.3g}")
    return result


def _router_entry(ckpt: Checkpoint) -> RouterInfo:
    return RouterInfo(
        file="router.onnx",
        inputs=dict(zip(ROUTER_INPUTS, ROUTER_INPUTS, strict=True)),
        outputs=dict(zip(ROUTER_OUTPUTS, ROUTER_OUTPUTS, strict=True)),
        num_classes=ckpt.num_classes,
        thresholds=ckpt.thresholds,
        class_patch=ckpt.class_patch,
        descriptor="sobel-luma-mean-plus-std/v1",
    )


def _routing(ckpt: Checkpoint, num_subnets: int) -> Routing:
    """The calibration table, class frequencies and default map when the checkpoint has them, else the
    paper's Eq. 15 map."""
    cal = ckpt.calibration
    if cal and "mse_table" not in cal:
        raise CheckpointError("the checkpoint's calibration predates MSE tables: run wbsr-calibrate on it again")
    if cal:
        return Routing(
            mse_table=tuple(tuple(float(v) for v in row) for row in cal["mse_table"]),
            class_freq=tuple(float(v) for v in cal["class_freq"]),
            tolerance_db=None if cal.get("tolerance_db") is None else float(cal["tolerance_db"]),
            budget=None if cal.get("budget") is None else float(cal["budget"]),
            class_to_subnet=tuple(int(m) for m in cal["class_to_subnet"]),
        )
    class_map = eq15_map(ckpt.num_classes, num_subnets)
    return Routing(mse_table=None, class_freq=None, tolerance_db=None, budget=None,
                   class_to_subnet=tuple(int(m) for m in class_map))


def _provenance(ckpt: Checkpoint, parity: dict[str, Any], checkpoint_sha256: str) -> dict[str, Any]:
    try:
        package = metadata.version("wbsr-deploy")
    except metadata.PackageNotFoundError:
        package = "unknown"
    import onnxruntime

    return {
        "checkpoint_sha256": checkpoint_sha256,
        "package": package,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_config": ckpt.train_config,
        "onnx_exporter": "torch.onnx.export(dynamo=False)",
        "parity": parity,
    }
