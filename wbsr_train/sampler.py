"""Hierarchical Equalization Sampling (METHOD.md section 2), pure numpy.

A pool of N candidate patches, each with a class in 1..K from the gradient descriptor, is sampled
uniformly (sample level) for the first `switch` fraction of training, then class first (class level):
a class k drawn with probability P_k of Eq. 8, then a uniform member of that class.
"""

from __future__ import annotations

import numpy as np


def class_probabilities(class_counts: np.ndarray, delta: float) -> np.ndarray:
    """Eq. 8: P_k = (sum_j 1/N_j) / (N_k delta^k), k = 1..K, normalised to sum 1.

    class_counts: (K,) non-negative ints N_1..N_K (entry k-1 is class k); delta > 0. Empty classes get 0
    and are left out of the sum. Returns (K,) float64 summing to 1; ValueError when every class is empty.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or np.any(counts < 0):
        raise ValueError("class_counts must be a 1-D array of non-negative counts")
    if delta <= 0:
        raise ValueError(f"delta must be positive, got {delta}")
    present = counts > 0
    if not present.any():
        raise ValueError("every class is empty")
    k = np.arange(1, len(counts) + 1, dtype=np.float64)
    p = np.zeros_like(counts)
    p[present] = (1.0 / counts[present]).sum() / (counts[present] * delta ** k[present])
    return p / p.sum()


class HESSampler:
    """Draws patch indices from a fixed pool, uniformly before `switch` and class-balanced after it.

    positions: (N, 3) int64 patch positions (e.g. image index, top, left); the sampler only carries them,
    `draw` returns indices into the pool, so `positions[idx]` are the patches to crop.
    classes: (N,) ints in 1..num_classes. delta: Eq. 8's decay (0.85 by default, METHOD.md section 2).
    switch: training progress in [0, 1] from which class-level sampling starts (0.7: the paper's epochs
    71-100 of 100). `switch >= 1` means never switch: plain uniform sampling (`--sampler uniform`).
    """

    def __init__(
        self,
        positions: np.ndarray,
        classes: np.ndarray,
        num_classes: int,
        delta: float = 0.85,
        switch: float = 0.7,
    ):
        positions = np.asarray(positions, dtype=np.int64)
        classes = np.asarray(classes, dtype=np.int64)
        if positions.ndim != 2 or positions.shape[1] != 3 or len(positions) == 0:
            raise ValueError(f"positions must be a non-empty (N, 3) array, got shape {positions.shape}")
        if classes.shape != (len(positions),):
            raise ValueError(f"classes must have shape ({len(positions)},), got {classes.shape}")
        if classes.min() < 1 or classes.max() > num_classes:
            raise ValueError(f"classes must lie in 1..{num_classes}")
        self.positions = positions
        self.classes = classes
        self.num_classes = num_classes
        self.delta = delta
        self.switch = switch
        self.class_counts = np.bincount(classes - 1, minlength=num_classes)
        self.class_probs = class_probabilities(self.class_counts, delta)
        # Pool indices grouped by class: members of class k are _by_class[_start[k-1] : _start[k-1] + N_k].
        self._by_class = np.argsort(classes, kind="stable")
        self._start = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])

    def __len__(self) -> int:
        return len(self.positions)

    def class_level(self, progress: float) -> bool:
        """Whether a draw at training `progress` in [0, 1] samples class first."""
        return self.switch < 1.0 and progress >= self.switch

    def draw(self, n: int, progress: float, rng: np.random.Generator) -> np.ndarray:
        """(n,) int64 indices into the pool, drawn with replacement at training `progress` in [0, 1]."""
        if not self.class_level(progress):
            return rng.integers(0, len(self), size=n)
        k = rng.choice(self.num_classes, size=n, p=self.class_probs)  # 0-based class
        member = rng.integers(0, self.class_counts[k])  # counts[k] > 0: empty classes have P_k = 0
        return self._by_class[self._start[k] + member]
