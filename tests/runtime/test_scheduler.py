"""Chunking: one subnet and one window size per call, at most a chunk's worth of pixels (one window at least)."""

from __future__ import annotations

import numpy as np

from wbsr_runtime.scheduler import make_chunks
from wbsr_runtime.tiling import merge_tiles, plan_tiles


def test_chunks_group_by_subnet_and_size_within_the_pixel_budget() -> None:
    plan = plan_tiles(200, 330, 32, 2)  # 7 x 11 tiles of 36 x 36
    labels = (np.arange(plan.num_tiles) // 5) % 3
    merged, subnets = merge_tiles(plan, labels, 4)
    chunks = make_chunks(merged, subnets, 4)
    seen = np.concatenate([idx for _, idx in chunks])
    assert sorted(seen.tolist()) == list(range(merged.num_tiles))  # every window exactly once
    budget = 4 * plan.tile**2
    for m, idx in chunks:
        assert (subnets[idx] == m).all() and (merged.sizes[idx] == merged.sizes[idx[0]]).all()
        assert len(idx) == 1 or merged.sizes[idx].prod(axis=1).sum() <= budget
    grid = make_chunks(plan, labels, 4)  # equal tiles: plain count chunks
    assert all(len(idx) <= 4 for _, idx in grid) and sum(len(idx) for _, idx in grid) == plan.num_tiles
