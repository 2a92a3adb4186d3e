"""Class -> subnet maps: the paper's Eq. 15, and the exact multiple-choice knapsack on the calibrated MSE table
(checked against brute force over every map of small random tables)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from wbsr_runtime.routing import budget_map, classify, eq15_map, pareto_maps, predict, tolerance_map


def test_classify_counts_thresholds_at_or_below() -> None:
    assert classify(np.array([0.0, 0.1, 0.15, 0.3]), np.array([0.1, 0.2])).tolist() == [1, 2, 2, 3]


def test_eq15_map() -> None:
    assert eq15_map(10, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert eq15_map(4, 2).tolist() == [0, 0, 1, 1]


def random_case(rng: np.random.Generator, k: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A table whose error mostly falls with cost (as trained subnets do), with noise that breaks the order."""
    costs = np.sort(rng.uniform(1, 10, m))
    base = rng.uniform(1, 200, (k, 1)) * (1 + 2 * np.exp(-np.arange(m) / m))[None]
    mse = base * rng.uniform(0.8, 1.2, (k, m))
    freq = rng.dirichlet(np.ones(k))
    return mse, freq, costs


def all_maps(mse, freq, costs):
    for mp in itertools.product(range(mse.shape[1]), repeat=mse.shape[0]):
        mp = np.array(mp)
        yield mp, freq @ mse[np.arange(len(mp)), mp], freq @ costs[mp] / costs[-1]


@pytest.mark.parametrize("seed", range(12))
def test_budget_map_is_optimal_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mse, freq, costs = random_case(rng, k=int(rng.integers(2, 6)), m=int(rng.integers(2, 5)))
    maps = list(all_maps(mse, freq, costs))
    for budget in (0.2, 0.35, 0.5, 0.65, 0.8, 1.0):
        feasible = [e for _, e, c in maps if c <= budget + 1e-12]
        got = budget_map(mse, freq, costs, budget)
        p = predict(mse, freq, got, costs)
        if not feasible:  # nothing fits: the cheapest map
            assert p.cost == pytest.approx(min(c for _, _, c in maps))
            continue
        assert p.cost <= budget + 1e-12
        assert freq @ mse[np.arange(len(got)), got] == pytest.approx(min(feasible), rel=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_tolerance_map_is_the_cheapest_within_tolerance(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    mse, freq, costs = random_case(rng, k=int(rng.integers(2, 6)), m=int(rng.integers(2, 5)))
    full = freq @ mse[:, -1]
    maps = list(all_maps(mse, freq, costs))
    for tol in (0.0, 0.02, 0.1, 0.5, 2.0):
        got = tolerance_map(mse, freq, costs, tol)
        p = predict(mse, freq, got, costs)
        assert p.loss_db <= tol + 1e-9
        within = [c for _, e, c in maps if 10 * np.log10(e / full) <= tol + 1e-9]
        assert p.cost == pytest.approx(min(within), rel=1e-12)


def test_front_is_sorted_and_dominance_free() -> None:
    mse, freq, costs = random_case(np.random.default_rng(7), k=10, m=9)
    front = pareto_maps(mse, freq, costs)
    cost, err = np.array([c for c, _, _ in front]), np.array([e for _, e, _ in front])
    assert np.all(np.diff(cost) >= 0) and np.all(np.diff(err) < 0)  # cheaper is always worse
    assert 10 < len(front) < 20000  # a full K = 10, M = 9 case stays small enough to enumerate
    for c, e, mp in front[:: max(1, len(front) // 20)]:
        p = predict(mse, freq, mp, costs)
        assert p.cost == pytest.approx(c) and freq @ mse[np.arange(10), mp] == pytest.approx(e)


def test_prediction_of_the_full_map_is_zero_loss_full_cost() -> None:
    mse, freq, costs = random_case(np.random.default_rng(3), k=4, m=3)
    p = predict(mse, freq, np.full(4, 2), costs)
    assert p.loss_db == pytest.approx(0.0) and p.cost == pytest.approx(1.0)


def test_mse_weighting_beats_per_class_psnr_rule() -> None:
    """A textured class with a large MSE matters more than a flat one with the same dB gap: the knapsack
    spends the budget where squared error is, unlike a per-class dB rule."""
    costs = np.array([1.0, 4.0])
    flat, textured = [1.0, 0.5], [200.0, 100.0]  # both: the big subnet halves the MSE (3 dB better)
    mse, freq = np.array([flat, textured]), np.array([0.5, 0.5])
    assert budget_map(mse, freq, costs, budget=0.7).tolist() == [0, 1]


def test_unseen_class_follows_its_neighbour() -> None:
    mse = np.array([[10.0, 1.0], [10.0, 1.0], [10.0, 1.0]])
    freq = np.array([0.5, 0.0, 0.5])
    for mp in (budget_map(mse, freq, np.array([1.0, 2.0]), 1.0), tolerance_map(mse, freq, np.array([1.0, 2.0]), 0)):
        assert mp.tolist() == [1, 1, 1]


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_bad_tables_are_refused(bad: float) -> None:
    mse = np.array([[1.0, bad], [2.0, 1.0]])
    with pytest.raises(ValueError):
        pareto_maps(mse, np.array([0.5, 0.5]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        pareto_maps(np.ones((2, 2)), np.array([0.5, bad]), np.array([1.0, 2.0]))
