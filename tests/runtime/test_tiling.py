"""Tiling is tested without a model: a nearest-neighbour stand-in must stitch to nearest upscaling exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wbsr_runtime.tiling import (
    MIN_WINDOW,
    Stitcher,
    as_unit_float,
    extract_tiles,
    merge_tiles,
    plan_tiles,
    route_boxes,
    stitch_tiles,
)

SIZES = [(1, 1), (1, 7), (9, 1), (2, 3), (5, 5), (8, 8), (8, 9), (13, 17), (16, 16), (31, 29), (37, 41)]
PATCH_OVERLAP = [(4, 0), (4, 1), (5, 2), (8, 3), (16, 4)]


def nearest(x: np.ndarray, s: int) -> np.ndarray:
    """Nearest-neighbour upscaling of the last two axes: the stand-in for the network."""
    return np.repeat(np.repeat(x, s, axis=-2), s, axis=-1)


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((3, h, w), dtype=np.float32)


@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("patch,overlap", PATCH_OVERLAP)
@pytest.mark.parametrize("h,w", SIZES)
def test_nearest_stand_in_stitches_exactly(h: int, w: int, patch: int, overlap: int, blend: bool) -> None:
    img = frame(h, w, seed=h * 100 + w)
    plan = plan_tiles(h, w, patch, overlap, blend=blend)
    tiles = extract_tiles(img, plan)
    t = patch if blend else patch + 2 * overlap
    assert tiles.shape == (plan.num_tiles, 3, t, t) and tiles.dtype == np.float32
    for s in (2, 3, 4):
        out = stitch_tiles(nearest(tiles, s), plan, s)
        assert out.shape == (3, h * s, w * s) and out.dtype == np.float32
        np.testing.assert_array_equal(out, nearest(img, s))


@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("h,w", [(1, 1), (7, 3), (33, 65), (29, 31)])
def test_boxes_cover_the_frame_and_count_is_minimal(h: int, w: int, blend: bool) -> None:
    patch, overlap = 8, 2
    plan = plan_tiles(h, w, patch, overlap, blend=blend)
    step = patch - overlap if blend else patch

    def per_axis(n: int) -> int:
        return 1 if n <= patch else math.ceil((n - patch) / step) + 1

    assert plan.num_tiles == per_axis(h) * per_axis(w)
    assert plan.boxes.dtype == np.int64 and plan.boxes.shape == (plan.num_tiles, 4)
    cover = np.zeros((h, w), dtype=int)
    owned = np.zeros((h, w), dtype=int)
    for (y0, x0, y1, x1), (a, b, c, d) in zip(plan.boxes, plan.owned, strict=True):
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        cover[y0:y1, x0:x1] += 1
        owned[a:c, b:d] += 1
    assert (cover >= 1).all()
    if not blend:  # crop mode: the written regions partition the frame
        assert (owned == 1).all()


def test_streaming_chunks_in_any_order_equal_one_shot() -> None:
    img = frame(45, 38)
    for blend in (False, True):
        plan = plan_tiles(45, 38, 8, 3, blend=blend)
        padded = np.pad(img, ((0, 0), plan.pad[:2], plan.pad[2:]), mode="reflect")
        whole = stitch_tiles(nearest(extract_tiles(img, plan), 2) * 0.5 + 0.25, plan, 2)
        stitcher = Stitcher(plan, 2)
        order = np.random.default_rng(1).permutation(plan.num_tiles)
        for chunk in np.array_split(order, 5):
            tiles = extract_tiles(padded, plan, chunk)  # pre-padded frame: no padding per chunk
            stitcher.add(chunk, nearest(tiles, 2) * 0.5 + 0.25)
        np.testing.assert_array_equal(stitcher.result(), whole)


def test_incomplete_stitch_and_bad_arguments_are_refused() -> None:
    plan = plan_tiles(20, 20, 8, 2)
    stitcher = Stitcher(plan, 2)
    stitcher.add(np.array([0]), np.zeros((1, 3, 24, 24), np.float32))
    with pytest.raises(RuntimeError):
        stitcher.result()
    with pytest.raises(ValueError):
        stitcher.add(np.array([1]), np.zeros((1, 3, 16, 16), np.float32))
    for args in [(0, 5, 8, 2, False), (5, 5, 0, 0, False), (5, 5, 8, -1, False), (5, 5, 8, 8, True)]:
        with pytest.raises(ValueError):
            plan_tiles(*args[:4], blend=args[4])


@pytest.mark.parametrize("blend", [False, True])
def test_route_boxes_are_at_least_3x3_and_match_frame_boxes(blend: bool) -> None:
    for h, w in [(1, 1), (2, 40), (40, 40)]:
        plan = plan_tiles(h, w, 16, 4, blend=blend)
        rb = route_boxes(plan)
        ph, pw = plan.padded_shape
        assert (rb[:, 2] - rb[:, 0] >= 3).all() and (rb[:, 3] - rb[:, 1] >= 3).all()
        assert (rb[:, :2] >= 0).all() and (rb[:, 2] <= ph).all() and (rb[:, 3] <= pw).all()
        if h >= 3 and w >= 3:
            top, _, left, _ = plan.pad
            np.testing.assert_array_equal(rb - [top, left, top, left], plan.boxes)


def labels_for(plan, n_labels: int, seed: int) -> np.ndarray:
    """Blocky random labels on the tile grid (neighbours often agree, so windows merge)."""
    rows, cols = plan.grid
    coarse = np.random.default_rng(seed).integers(0, n_labels, (rows // 2 + 1, cols // 2 + 1))
    return np.repeat(np.repeat(coarse, 2, 0), 2, 1)[:rows, :cols].ravel()


@pytest.mark.parametrize("max_cells", [2, 3, 4])
@pytest.mark.parametrize("patch,overlap", [(4, 0), (5, 2), (8, 3)])
@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (8, 9), (13, 17), (31, 29), (37, 41), (50, 23), (17, 33)])
def test_merged_windows_stitch_exactly(h: int, w: int, patch: int, overlap: int, max_cells: int) -> None:
    img = frame(h, w, seed=h + w)
    plan = plan_tiles(h, w, patch, overlap)
    labels = labels_for(plan, 3, seed=h * w + max_cells)
    merged, window_labels = merge_tiles(plan, labels, max_cells)
    stitcher = Stitcher(merged, 3)
    for size in np.unique(merged.sizes, axis=0):
        idx = np.flatnonzero((merged.sizes == size).all(axis=1))
        tiles = extract_tiles(img, merged, idx)
        assert tiles.shape == (len(idx), 3, *size)
        stitcher.add(idx, nearest(tiles, 3))
    np.testing.assert_array_equal(stitcher.result(), nearest(img, 3))
    # Written regions partition the frame; each window holds its cores and lies inside the (padded) frame.
    owned = np.zeros((h, w), dtype=int)
    ph, pw = plan.padded_shape
    for (a, b, c, d), (oy, ox), (sh, sw) in zip(merged.owned, merged.origins, merged.sizes, strict=True):
        owned[a:c, b:d] += 1  # read what is written plus `overlap` context, inside the padded frame
        for o, n, lo, hi, size in ((oy, sh, a, c, ph), (ox, sw, b, d, pw)):
            lo, hi = max(lo - overlap, 0), min(hi + overlap, size)
            assert 0 <= o <= lo and hi <= o + n <= size
            assert n == max(hi - lo, MIN_WINDOW)  # exactly that, unless grown to the minimum
    assert (owned == 1).all()
    # No window mixes labels or exceeds max_cells cores per side.
    for (y0, x0, y1, x1), label in zip(merged.boxes, window_labels, strict=True):
        inside = ((plan.boxes[:, :2] >= (y0, x0)) & (plan.boxes[:, 2:] <= (y1, x1))).all(axis=1)
        assert (labels[inside] == label).all()
        rows = len(np.unique(plan.boxes[inside, 0]))
        cols = len(np.unique(plan.boxes[inside, 1]))
        assert rows <= max_cells and cols <= max_cells


def test_merging_one_label_reads_each_pixel_once_and_windows_are_tight() -> None:
    plan = plan_tiles(96, 128, 32, 2)  # 3 x 4 cores
    merged, labels = merge_tiles(plan, np.zeros(plan.num_tiles, dtype=np.int64), 4)
    assert merged.num_tiles == 1 and labels.tolist() == [0]
    np.testing.assert_array_equal(merged.origins, [[0, 0]])
    np.testing.assert_array_equal(merged.sizes, [[96, 128]])  # the whole frame: no context pixels at all
    checker = np.indices(plan.grid).sum(axis=0).ravel() % 2  # no two neighbours agree: nothing merges
    alone, _ = merge_tiles(plan, checker, 4)
    assert alone.num_tiles == plan.num_tiles
    assert alone.sizes[:, 0].tolist() == [34] * 4 + [36] * 4 + [34] * 4  # context inside the frame only
    assert alone.sizes.prod(axis=1).sum() < plan.sizes.prod(axis=1).sum()
    split, _ = merge_tiles(plan_tiles(32, 330, 32, 2), np.zeros(11, dtype=np.int64), 4)
    assert split.sizes[:, 1].tolist() == [130, 132, 76]  # 4 + 4 + 3 cores, the last shifted inward


def test_merge_refuses_blend_plans_and_bad_arguments() -> None:
    plan = plan_tiles(20, 20, 8, 2)
    for bad in [(plan_tiles(20, 20, 8, 2, blend=True), np.zeros(9), 2), (plan, np.zeros(3), 2),
                (plan, np.zeros(9), 0)]:
        with pytest.raises(ValueError):
            merge_tiles(*bad)
    merged, _ = merge_tiles(plan, np.zeros(9, dtype=np.int64), 3)
    with pytest.raises(ValueError):
        merge_tiles(merged, np.zeros(1), 2)  # not a grid plan


def test_as_unit_float_scales_integers_and_clips_floats() -> None:
    assert as_unit_float(np.array([0, 51, 255], np.uint8)).tolist() == pytest.approx([0, 0.2, 1])
    assert as_unit_float(np.array([65535], np.uint16)).tolist() == [1.0]
    out = as_unit_float(np.array([-1.0, 0.25, 2.0]))
    assert out.dtype == np.float32 and out.tolist() == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError):
        as_unit_float(np.array([1], np.int32))
