"""HES: quantile classes, Eq. 8 probabilities, the sampling schedule and its distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wbsr_runtime.routing import classify
from wbsr_train.descriptor import patch_scores, thresholds_from_pool
from wbsr_train.sampler import HESSampler, class_probabilities

K = 10
# Upper 0.1% points of the chi-square distribution (fixed, so the test needs no scipy).
CHI2_CRIT_001 = {9: 27.877, 49: 85.351}


def chi_square(observed: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's statistic of (M,) counts against (M,) probabilities (all > 0)."""
    expected = observed.sum() * probs
    return float(((observed - expected) ** 2 / expected).sum())


def positions_for(n: int) -> np.ndarray:
    return np.stack([np.arange(n) % 7, np.arange(n), 2 * np.arange(n)], axis=1).astype(np.int64)


def textured_patches(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 16, 16) in [0, 1]: smooth ramps plus noise of a per-patch random strength."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16) * torch.rand(n, 1, 1, 1, generator=g)
    noise = torch.rand(n, 3, 16, 16, generator=g) * torch.rand(n, 1, 1, 1, generator=g) ** 2
    return (0.2 + 0.5 * ramp + 0.3 * noise).clamp(0, 1)


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "patches"])
def test_quantile_thresholds_give_equal_classes(kind: str) -> None:
    n = 2000
    rng = np.random.default_rng(0)
    if kind == "uniform":
        scores = torch.from_numpy(rng.random(n))
    elif kind == "lognormal":
        scores = torch.from_numpy(rng.lognormal(-3.0, 1.0, n))
    else:
        scores = patch_scores(textured_patches(n, seed=1))
    assert torch.unique(scores).numel() == n  # ties-free pool
    classes = classify(scores.numpy(), thresholds_from_pool(scores, K).numpy())
    counts = np.bincount(classes - 1, minlength=K)
    assert counts.tolist() == [n // K] * K


def test_class_probabilities_hand_worked() -> None:
    # sum 1/N = 1 + 1/2 + 1/4 = 1.75; P = 1.75 / (1 * .5), 1.75 / (2 * .25), 1.75 / (4 * .125): all 3.5.
    np.testing.assert_allclose(class_probabilities(np.array([1, 2, 4]), 0.5), [1 / 3] * 3)
    # Empty class 2: sum 1/N = 1/2 + 1 = 1.5; P1 = 1.5 / (2 * .5) = 1.5, P3 = 1.5 / (1 * .125) = 12.
    np.testing.assert_allclose(class_probabilities(np.array([2, 0, 1]), 0.5), [1 / 9, 0, 8 / 9])
    # Equal counts: P_k proportional to delta^-k.
    p = class_probabilities(np.full(K, 100), 0.85)
    expected = 0.85 ** -np.arange(1, K + 1)
    np.testing.assert_allclose(p, expected / expected.sum())
    assert p.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        class_probabilities(np.zeros(3, dtype=int), 0.85)


def quantile_sampler(n: int = 2000, switch: float = 0.7) -> HESSampler:
    scores = torch.from_numpy(np.random.default_rng(3).random(n))
    classes = classify(scores.numpy(), thresholds_from_pool(scores, K).numpy())
    return HESSampler(positions_for(n), classes, K, delta=0.85, switch=switch)


def test_class_level_draws_follow_eq8() -> None:
    sampler = quantile_sampler()
    idx = sampler.draw(20000, progress=0.9, rng=np.random.default_rng(0))
    observed = np.bincount(sampler.classes[idx] - 1, minlength=K)
    assert chi_square(observed, sampler.class_probs) < CHI2_CRIT_001[9]
    # The same statistic rejects uniform draws, so the check above can fail.
    uniform = sampler.draw(20000, progress=0.0, rng=np.random.default_rng(0))
    observed_u = np.bincount(sampler.classes[uniform] - 1, minlength=K)
    assert chi_square(observed_u, sampler.class_probs) > CHI2_CRIT_001[9]


def test_sample_level_draws_are_uniform_over_patches() -> None:
    n = 50  # unbalanced classes: 40 patches in class 1, one in each of the others
    classes = np.concatenate([np.ones(40, dtype=int), np.arange(1, K + 1)])
    sampler = HESSampler(positions_for(n), classes, K, switch=0.7)
    uniform_p = np.full(n, 1.0 / n)
    before = sampler.draw(20000, progress=0.69, rng=np.random.default_rng(1))
    assert chi_square(np.bincount(before, minlength=n), uniform_p) < CHI2_CRIT_001[49]
    after = sampler.draw(20000, progress=0.7, rng=np.random.default_rng(1))
    assert chi_square(np.bincount(after, minlength=n), uniform_p) > CHI2_CRIT_001[49]


def test_switch_one_never_switches() -> None:
    sampler = quantile_sampler(switch=1.0)
    assert not sampler.class_level(1.0)
    a = sampler.draw(100, progress=1.0, rng=np.random.default_rng(5))
    b = sampler.draw(100, progress=0.0, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("progress", [0.1, 0.95])
def test_same_seed_same_draws(progress: float) -> None:
    sampler = quantile_sampler()
    a = sampler.draw(500, progress, np.random.default_rng(42))
    b = sampler.draw(500, progress, np.random.default_rng(42))
    c = sampler.draw(500, progress, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64 and a.min() >= 0 and a.max() < len(sampler)


def test_empty_class_is_never_drawn() -> None:
    classes = np.array([1, 1, 3, 3, 3])
    sampler = HESSampler(positions_for(5), classes, 3, switch=0.0)
    idx = sampler.draw(1000, progress=0.5, rng=np.random.default_rng(0))
    assert set(sampler.classes[idx].tolist()) == {1, 3}


def test_rejects_bad_pool() -> None:
    with pytest.raises(ValueError):
        HESSampler(positions_for(3), np.array([1, 2, 4]), 3)
    with pytest.raises(ValueError):
        HESSampler(np.zeros((3, 2), dtype=np.int64), np.array([1, 2, 3]), 3)
