"""Parity tools: run exported graphs and their PyTorch source on the same inputs, then compare.

Running and comparing are separate: `run_*` return arrays, `compare.compare` turns two arrays into numbers, and
`subnet_parity` / `router_parity` are the small loops that the export and the tests share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wbsr_runtime.backends.base import cpu_session
from wbsr_runtime.routing import classify
from wbsr_train.descriptor import box_scores

from .compare import compare


def run_onnx(session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of `session` on `feeds`, in graph order."""
    return session.run(None, feeds)


@torch.no_grad()
def run_torch(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """(N, 3, h, w) float32 -> the module's (N, 3, h*s, w*s) float32 output as numpy."""
    return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def parity_inputs(seed: int = 0, patch: int = 16, real: np.ndarray | None = None) -> list[np.ndarray]:
    """Inputs for a parity check, each (N, 3, h, w) float32 in [0, 1].

    Random noise at two shapes (non-square, batch > 1) and a smooth texture with edges; `real` patches
    (N, 3, h, w) from images are appended when given.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:patch, 0:patch] / patch
    texture = 0.5 + 0.4 * np.sin(9 * xx + 5 * yy**2) * (xx + yy > 0.7)
    texture = np.stack([texture, texture[::-1], texture.T])[None].astype(np.float32)
    inputs = [
        rng.random((2, 3, patch, patch), dtype=np.float32),
        rng.random((1, 3, patch - 3, patch + 5), dtype=np.float32),
        np.clip(texture + rng.normal(0, 0.02, texture.shape), 0, 1).astype(np.float32),
    ]
    if real is not None:
        inputs.append(np.ascontiguousarray(real, dtype=np.float32))
    return inputs


def subnet_parity(module: nn.Module, onnx_path: str | Path, inputs: Sequence[np.ndarray]) -> dict[str, float]:
    """Worst `max_abs` and `rel` of the ONNX graph against the PyTorch module over `inputs`."""
    session = cpu_session(onnx_path, threads=1)
    results = [compare(run_torch(module, x), run_onnx(session, {"lr": x})[0]) for x in inputs]
    return {
        key: max(r[key] for r in results) if all(np.isfinite(r[key]) for r in results) else float("nan")
        for key in ("max_abs", "rel")
    }


def box_grid(height: int, width: int, patch: int, step: int) -> np.ndarray:
    """(n, 4) int64 boxes `y0, x0, y1, x1` of `patch` x `patch` every `step` pixels inside the frame."""
    ys, xs = np.arange(0, height - patch + 1, step), np.arange(0, width - patch + 1, step)
    y0, x0 = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    return np.stack([y0, x0, y0 + patch, x0 + patch], 1).astype(np.int64)


def reference_scores(frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Training-code scores (descriptor.box_scores) of the cropped boxes; frame (1, 3, H, W) float32."""
    t = torch.from_numpy(np.array(frame[0], dtype=np.float32))  # a copy: the frame may be read-only
    return box_scores(t, torch.from_numpy(np.asarray(boxes, dtype=np.int64))).numpy()


def router_parity(
    onnx_path: str | Path, frame: np.ndarray, boxes: np.ndarray, thresholds: Sequence[float]
) -> dict[str, float]:
    """Router graph vs the training descriptor on `boxes` of `frame` (1, 3, H, W) float32 in [0, 1].

    Returns the worst relative score error, the fraction of differing classes, and that fraction once ties
    are set aside (reference score within 1e-5 relative of a threshold).
    """
    scores, classes = run_onnx(cpu_session(onnx_path, threads=1), {"frame": frame, "boxes": boxes})
    ref = reference_scores(frame, boxes)
    thr = np.asarray(thresholds, dtype=np.float64)
    ref_classes = classify(ref, thr)
    rel = np.abs(scores.astype(np.float64) - ref) / np.maximum(np.abs(ref), 1e-6)
    tie = np.abs(ref[:, None] - thr[None, :]).min(1, initial=np.inf) <= 1e-5 * np.maximum(np.abs(ref), 1e-6)
    differ = classes != ref_classes
    return {
        "score_rel": float(rel.max(initial=0.0)),
        "class_mismatch": float(differ.mean()) if len(differ) else 0.0,
        "class_mismatch_no_ties": float(differ[~tie].mean()) if (~tie).any() else 0.0,
        "boxes": int(len(boxes)),
    }
