"""Run the tiles of one frame over a backend's runners: one implementation shared by all backends.

Tiles are grouped by subnet and window size (so every chunk is one batched call), chunked to a pixel budget
and the runners' `max_batch`, and dispatched over the runners, one thread per runner (each runner is bound to
its own sessions / stream). A worker reads its chunk's tiles from the frame in the frame's own dtype,
converts them to float32, runs them and hands the outputs to a thread-safe `Stitcher`, so at most one chunk
of tiles and outputs per worker exists at a time and no float copy of the frame is made (bounded memory).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import defaults
from .backends.base import Runner
from .tiling import Stitcher, TilePlan, as_unit_float, extract_tiles

log = logging.getLogger(__name__)



@dataclass
class ScheduleTimes:
    """Seconds spent, summed over workers: running subnets, and extracting + stitching tiles."""

    subnets: float = 0.0
    tiling: float = 0.0


def make_chunks(plan: TilePlan, tile_subnets: np.ndarray, chunk: int) -> list[tuple[int, np.ndarray]]:
    """`[(subnet, tile indices)]`: tiles grouped by subnet (ascending) and window size, each group split into
    calls of at most `chunk` tiles' worth of pixels (`chunk` grid tiles; at least one window a call)."""
    chunks = []
    keys = np.column_stack([tile_subnets, plan.sizes])
    for m, h, w in np.unique(keys, axis=0):
        idx = np.flatnonzero((keys == (m, h, w)).all(axis=1))
        n = max(1, min(chunk, chunk * plan.tile**2 // (h * w)))
        chunks += [(int(m), idx[i : i + n]) for i in range(0, len(idx), n)]
    return chunks


def chunk_size(runners: Sequence[Runner], chunk: int | None = None) -> int:
    """The tiles per call: `chunk` (or `defaults.CHUNK`), capped by the smallest runner `max_batch`."""
    limits = [r.max_batch for r in runners if r.max_batch is not None]
    size = chunk or defaults.CHUNK
    return max(1, min([size, *limits]))


def run_tiles(
    runners: Sequence[Runner],
    plan: TilePlan,
    padded: np.ndarray,
    tile_subnets: np.ndarray,
    scale: int,
    chunk: int | None = None,
    dtype: np.dtype | None = None,
) -> tuple[np.ndarray, ScheduleTimes]:
    """Upscale every tile of `plan` with its subnet and stitch.

    padded: `pad_frame(frame, plan)`, (3, Hp, Wp) uint8 / uint16 or float in [0, 1] (a transposed view of an
    (H, W, 3) image works); tile_subnets: (n,) int subnet per tile (window).
    Returns the stitched (3, H*s, W*s) float32 frame (not clamped), or with `dtype` the final (H*s, W*s, 3)
    image of that dtype, converted tile by tile (`tiling.Stitcher`); and the time spent.
    """
    if len(tile_subnets) != plan.num_tiles:
        raise ValueError(f"{len(tile_subnets)} subnet indices for {plan.num_tiles} tiles")
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for job in make_chunks(plan, np.asarray(tile_subnets), chunk_size(runners, chunk)):
        jobs.put(job)
    stitcher = Stitcher(plan, scale, dtype=dtype)
    stop = threading.Event()
    times = [ScheduleTimes() for _ in runners]

    def work(runner: Runner, t: ScheduleTimes) -> None:
        while not stop.is_set():
            try:
                m, idx = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                t0 = time.perf_counter()
                tiles = as_unit_float(extract_tiles(padded, plan, idx))
                t1 = time.perf_counter()
                out = runner.run_subnet(m, tiles)
                t2 = time.perf_counter()
                stitcher.add(idx, out)
                t.tiling += (t1 - t0) + (time.perf_counter() - t2)
                t.subnets += t2 - t1
            except BaseException:
                stop.set()  # the other workers stop after their current chunk
                raise

    if len(runners) == 1:
        work(runners[0], times[0])  # no thread for the common single-worker case
    else:
        with ThreadPoolExecutor(len(runners), thread_name_prefix="wbsr-worker") as pool:
            futures = [pool.submit(work, r, t) for r, t in zip(runners, times, strict=True)]
            for f in futures:
                f.result()  # re-raises a worker's error
    total = ScheduleTimes(sum(t.subnets for t in times), sum(t.tiling for t in times))
    t0 = time.perf_counter()
    out = stitcher.result()
    total.tiling += time.perf_counter() - t0
    return out, total
