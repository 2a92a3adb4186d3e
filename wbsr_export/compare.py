"""The one output comparator of the export's checks (torch-free: engine validation runs on a Jetson too)."""

from __future__ import annotations

import numpy as np


def compare(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """`max_abs` difference and `rel` error (||out - ref|| / ||ref||, L2 over all elements), both NaN when the
    output has a NaN or an inf; ValueError for different shapes."""
    ref, out = reference.astype(np.float64), output.astype(np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, output {out.shape}")
    if not np.isfinite(out).all():
        return {"max_abs": float("nan"), "rel": float("nan")}
    diff = out - ref
    rel = np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-12)
    return {"max_abs": float(np.abs(diff).max(initial=0.0)), "rel": float(rel)}
