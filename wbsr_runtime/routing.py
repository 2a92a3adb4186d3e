"""Class -> subnet maps (gradient projection), pure numpy.

Subnets are indexed 0..M-1 cheapest first (by FLOPs); classes are 1..K, and a map is a (K,) int array whose
entry k-1 is the subnet of class k. Where a map is chosen by cost, `costs` (M,) may be FLOPs or measured
times: on real hardware the two can order the subnets differently.
"""

from __future__ import annotations

import numpy as np


def classify(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Class in 1..K of each descriptor score: 1 + the number of thresholds at or below it."""
    scores = np.asarray(scores, dtype=np.float64)
    return 1 + np.searchsorted(np.asarray(thresholds, dtype=np.float64), scores, side="right")


def eq15_map(num_classes: int, num_subnets: int) -> np.ndarray:
    """The paper's projection (Eq. 15), m = ceil(k M / K), as 0-based subnet indices."""
    k = np.arange(1, num_classes + 1)
    return -(-k * num_subnets // num_classes) - 1


def tolerance_map(psnr_table: np.ndarray, tolerance_db: float, costs: np.ndarray | None = None) -> np.ndarray:
    """Per class, the cheapest subnet whose PSNR is within `tolerance_db` of that class's best (METHOD.md 5);
    cheapest by `costs` (M,), or by index (FLOPs order) when None."""
    table = np.asarray(psnr_table, dtype=np.float64)
    ok = table >= table.max(axis=1, keepdims=True) - tolerance_db
    if costs is None:
        return ok.argmax(axis=1)  # first True = cheapest, since columns are ordered by FLOPs
    return np.where(ok, np.asarray(costs, dtype=np.float64), np.inf).argmin(axis=1)


def map_cost(class_map: np.ndarray, costs: np.ndarray, class_weights: np.ndarray | None = None) -> float:
    """Average cost of a map as a fraction of the full (last) subnet's, classes weighted."""
    costs = np.asarray(costs, dtype=np.float64)
    w = np.full(len(class_map), 1.0 / len(class_map)) if class_weights is None else np.asarray(class_weights)
    return float((w / w.sum()) @ costs[np.asarray(class_map)] / costs[-1])


def budget_map(
    psnr_table: np.ndarray, costs: np.ndarray, budget: float, class_weights: np.ndarray | None = None
) -> np.ndarray:
    """The map with the best weighted mean PSNR whose average cost (`costs`, (M,): FLOPs or times) is at most
    `budget` x the full model's.

    Swept over tolerances: every candidate map of tolerance_map is tried, cheapest feasible quality kept.
    Falls back to the cheapest subnet everywhere when even that exceeds the budget.
    """
    table = np.asarray(psnr_table, dtype=np.float64)
    w = np.full(table.shape[0], 1.0) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    gaps = np.unique(table.max(axis=1, keepdims=True) - table)
    cheapest = int(np.argmin(costs))
    best, best_psnr = np.full(table.shape[0], cheapest, dtype=np.int64), -np.inf
    for tol in gaps:
        m = tolerance_map(table, tol, costs)
        psnr = float(w @ table[np.arange(len(m)), m] / w.sum())
        if map_cost(m, costs, w) <= budget + 1e-12 and psnr > best_psnr:
            best, best_psnr = m, psnr
    return best
