"""Class -> subnet maps (gradient projection), pure numpy.

Subnets are indexed 0..M-1 cheapest first (by FLOPs); classes are 1..K, and a map is a (K,) int array whose
entry k-1 is the subnet of class k. Calibration (METHOD.md section 5) gives, per class k and subnet m, the
mean squared error `mse[k-1, m]` of the Y channel (the [0, 255] scale PSNR is measured on) and the share of
pixels `freq[k-1]` that falls in class k. Image PSNR is a function of the mean squared error over all its
pixels, so a map's predicted error is the frequency-weighted `sum_k freq_k * mse[k, map_k]` and its cost
`sum_k freq_k * cost[map_k]`, a fraction of the full (last) subnet's cost; `costs` (M,) are FLOPs or
measured times (on real hardware the two can order the subnets differently).

Choosing a map is a multiple-choice knapsack (one subnet per class). `pareto_maps` solves it exactly: it
keeps, class by class, every partial map that no other partial map beats in both cost and error (K = 10
classes x M = 9 subnets leave a few thousand), so the best map for any budget or tolerance is on that front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def classify(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Class in 1..K of each descriptor score: 1 + the number of thresholds at or below it, as the router
    graph counts (a NaN score is class 1). (N,) -> (N,) int64."""
    scores, thresholds = np.asarray(scores, dtype=np.float64), np.asarray(thresholds, dtype=np.float64)
    return 1 + (scores[..., None] >= thresholds).sum(-1, dtype=np.int64)


def eq15_map(num_classes: int, num_subnets: int) -> np.ndarray:
    """The paper's projection (Eq. 15), m = ceil(k M / K), as 0-based subnet indices."""
    k = np.arange(1, num_classes + 1)
    return -(-k * num_subnets // num_classes) - 1


@dataclass(frozen=True)
class Prediction:
    """What calibration predicts for a map on the calibration distribution: `loss_db` is the image PSNR lost
    against the full subnet everywhere (>= 0 up to rounding), `cost` the mean cost as a fraction of it."""

    loss_db: float
    cost: float


def _weights(freq: np.ndarray) -> np.ndarray:
    w = np.asarray(freq, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("class frequencies must be finite, non-negative and not all zero")
    return w / w.sum()


def predict(mse: np.ndarray, freq: np.ndarray, class_map: np.ndarray, costs: np.ndarray) -> Prediction:
    """Predicted PSNR loss (dB) and relative cost of `class_map` (see the module docstring)."""
    mse, w, m = np.asarray(mse, dtype=np.float64), _weights(freq), np.asarray(class_map)
    costs = np.asarray(costs, dtype=np.float64)
    rows = np.arange(len(m))
    err, full = w @ mse[rows, m], w @ mse[:, -1]
    return Prediction(float(10 * np.log10(err / full)) if full > 0 else 0.0, float(w @ costs[m] / costs[-1]))


def pareto_maps(mse: np.ndarray, freq: np.ndarray, costs: np.ndarray) -> list[tuple[float, float, np.ndarray]]:
    """Every map on the cost / error front, as `(cost, error, map)` sorted by cost (cheapest first): no map
    is both cheaper and no worse, and every other map is beaten by one of these. Exact.

    Classes with zero frequency do not change cost or error; they get the subnet of the nearest class that
    has calibration pixels (a class unseen in calibration is served like its neighbour, not for free).
    """
    mse, w, costs = np.asarray(mse, dtype=np.float64), _weights(freq), np.asarray(costs, dtype=np.float64)
    if mse.ndim != 2 or mse.shape != (len(w), len(costs)) or not np.all(np.isfinite(mse)) or np.any(mse < 0):
        raise ValueError(f"mse table must be finite, non-negative and {len(w)} x {len(costs)}")
    seen = np.flatnonzero(w > 0)
    front = [(0.0, 0.0, ())]
    for k in seen:
        options = [(c + w[k] * costs[m] / costs[-1], e + w[k] * mse[k, m], mp + (m,))
                   for c, e, mp in front for m in range(len(costs))]
        options.sort(key=lambda o: (o[0], o[1]))
        front, best = [], np.inf
        for option in options:
            if option[1] < best * (1 - 1e-12):  # strictly better: ties keep the cheaper map
                front.append(option)
                best = option[1]
    nearest = seen[np.abs(np.arange(len(w))[:, None] - seen[None, :]).argmin(axis=1)]
    out = []
    for c, e, mp in front:
        full = np.empty(len(w), dtype=np.int64)
        full[seen] = mp
        out.append((c, e, full[nearest]))
    return out


def budget_map(mse: np.ndarray, freq: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """The map with the least predicted error whose relative cost is at most `budget` (the cheapest map when
    even that is over budget)."""
    front = pareto_maps(mse, freq, costs)
    feasible = [mp for c, _, mp in front if c <= budget + 1e-12]
    return feasible[-1] if feasible else front[0][2]


def tolerance_map(mse: np.ndarray, freq: np.ndarray, costs: np.ndarray, tolerance_db: float) -> np.ndarray:
    """The cheapest map whose predicted PSNR loss against the full subnet is at most `tolerance_db`."""
    front = pareto_maps(mse, freq, costs)
    full = _weights(freq) @ np.asarray(mse, dtype=np.float64)[:, -1]
    limit = full * 10 ** (tolerance_db / 10)
    return next(mp for _, e, mp in front if e <= limit * (1 + 1e-12))
