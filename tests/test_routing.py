"""Class -> subnet maps: the paper's projection, tolerance and budget maps, by FLOPs and by measured cost."""

from __future__ import annotations

import numpy as np
import pytest

from wbsr_runtime.routing import budget_map, classify, eq15_map, map_cost, tolerance_map

# 3 classes x 4 subnets (cheapest first by FLOPs); class 1 is flat, class 3 needs the full subnet.
TABLE = np.array([[30.0, 30.0, 30.0, 30.0], [28.0, 29.5, 29.9, 30.0], [25.0, 26.0, 27.0, 28.0]])
FLOPS = np.array([1.0, 2.0, 3.0, 4.0])


def test_classify_and_eq15() -> None:
    assert classify([0.0, 0.5, 1.0, 2.0], [0.5, 1.0]).tolist() == [1, 2, 3, 3]
    assert eq15_map(10, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]  # m = ceil(k M / K), 0-based


def test_tolerance_map_takes_the_cheapest_subnet_within_tolerance() -> None:
    assert tolerance_map(TABLE, 0.0).tolist() == [0, 3, 3]
    assert tolerance_map(TABLE, 0.15).tolist() == [0, 2, 3]
    assert tolerance_map(TABLE, 0.6).tolist() == [0, 1, 3]
    assert tolerance_map(TABLE, 0.15, FLOPS).tolist() == tolerance_map(TABLE, 0.15).tolist()
    # Measured on a machine where subnet 2 is slower than the full one: class 2 takes the full subnet.
    timed = np.array([1.0, 2.5, 4.5, 4.0])
    assert tolerance_map(TABLE, 0.15, timed).tolist() == [0, 3, 3]
    assert tolerance_map(TABLE, 0.6, timed).tolist() == [0, 1, 3]


def test_budget_map_is_the_best_map_within_the_budget() -> None:
    weights = np.array([1.0, 1.0, 1.0])
    for budget in (0.25, 0.5, 0.75, 1.0):
        m = budget_map(TABLE, FLOPS, budget, weights)
        assert map_cost(m, FLOPS, weights) <= budget + 1e-12
    assert budget_map(TABLE, FLOPS, 1.0).tolist() == [0, 3, 3]
    assert budget_map(TABLE, FLOPS, 0.25).tolist() == [0, 0, 0]  # nothing fits: the cheapest everywhere
    assert map_cost(np.array([0, 1, 3]), FLOPS) == pytest.approx((1 + 2 + 4) / 3 / 4)
    # Costs measured: the budget is a fraction of the full subnet's time, and the slow subnet 2 is avoided.
    timed = np.array([1.0, 2.5, 4.5, 4.0])
    m = budget_map(TABLE, timed, 0.7)
    assert 2 not in m.tolist() and map_cost(m, timed) <= 0.7
    assert budget_map(TABLE, timed, 0.1).tolist() == [0, 0, 0]
