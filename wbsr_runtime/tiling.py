"""Tile plans, tile extraction and stitching: pure numpy, no model (STYLE.md principle 7).

Two modes, both on a low-resolution (LR) frame of `height x width` pixels:

- `blend=False` (the runtime default): core patches of `patch x patch` cover the frame, the last row/column
  shifted inward so every core lies inside the frame; each is read with `overlap` pixels of context on every
  side, so every tile is `patch + 2*overlap` square, and its output is cropped back to the core. At the frame
  borders the window is shifted inward instead of padded (the core sits off-centre in it), so border tiles
  see the real frame edge as whole-frame inference does: with `overlap` >= the network's receptive-field
  radius, tiling reproduces whole-frame inference up to float rounding. Cores that
  overlap because of the inward shift write disjoint parts (`plan.owned`), so the result does not depend on
  the order in which tiles arrive.
- `blend=True` (the ClassSR/ARM evaluation protocol, e.g. patch 32, overlap 4 = step 28): tiles of
  `patch x patch` at step `patch - overlap`, the last shifted inward, outputs averaged where they overlap.
  Only evaluation uses it (`wbsr_train.evaluate`, the paper's tables); it lives here, not there, because it
  is the same plan and stitcher with another step: the arrow train -> runtime is deliberate (README, "What
  is in the box"), so that evaluation tiles with the very code deployment runs.

Only a frame smaller than a tile is padded (at the bottom/right, by reflection: numpy "reflect", mirrored
without repeating the edge pixel), so every tile of a plan has the same size; plans made for `merge_tiles` pad
only up to MIN_WINDOW (`plan_tiles(pad_to=...)`), so that a small or thin frame matches whole-frame inference
as a large one does. Coordinates are LR pixels, boxes half-open `(y0, x0, y1, x1)`.

`merge_tiles` turns a crop-mode plan and a label per tile (its subnet) into a plan of windows of any size, for
backends that take any input shape: rectangles of grid-adjacent cores with one label, each cut to exactly the
region it writes plus `overlap` context on every side (clipped at the frame border). Context is then paid
once per window instead of once per tile, and no pixels are spent on the inward shift, so the work
approaches whole-frame inference where neighbours share a subnet (`full` mode on a frame becomes a few
large windows).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

MIN_WINDOW = 3  # the smallest window side `merge_tiles` makes: torch.export programs take h, w >= 3
# The largest tile side (patch + 2 x overlap, LR pixels) the runtime accepts: a chunk of 16 such tiles is
# 1M LR pixels, whose x4 float32 output is 200 MB, and a frame smaller than one tile is padded to it.
MAX_TILE = 256


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one LR frame are read from and where their outputs go.

    `boxes` (n, 4) int64: the frame region each tile is classified on (core clipped to the frame; blend mode:
    the tile clipped to the frame). `owned` (n, 4) int64: the frame region each tile's output is written to
    (crop mode: a partition of the frame; blend mode: equal to `boxes`, averaged). `origins` (n, 2) int64: the
    top-left corner of each tile window in the padded frame; `sizes` (n, 2) int64 its height and width (all
    `tile` in a grid plan, cut to a padded frame shorter than that; `merge_tiles` makes other sizes). `grid`:
    (rows, columns) of a grid plan, whose tile `i` sits at row `i // columns`; None for merged plans. `pad`:
    (top, bottom, left, right) padding.
    """

    height: int
    width: int
    patch: int
    overlap: int
    blend: bool
    tile: int
    pad: tuple[int, int, int, int]
    boxes: np.ndarray
    owned: np.ndarray
    origins: np.ndarray
    sizes: np.ndarray
    grid: tuple[int, int] | None

    @property
    def num_tiles(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def padded_shape(self) -> tuple[int, int]:
        top, bottom, left, right = self.pad
        return self.height + top + bottom, self.width + left + right


def _starts(size: int, extent: int, step: int) -> np.ndarray:
    """Start offsets of windows of `extent` at `step` over `size`, the last shifted inward (a single 0 when
    the frame is smaller than a window)."""
    if size <= extent:
        return np.zeros(1, dtype=np.int64)
    return np.append(np.arange(0, size - extent, step, dtype=np.int64), size - extent)


def _axis(size: int, patch: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis starts, box ends and owned starts (owned = disjoint tail of each core)."""
    starts = _starts(size, patch, step)
    ends = np.minimum(starts + patch, size)
    owned_start = np.concatenate([[0], np.maximum(starts[1:], ends[:-1])]).astype(np.int64)
    return starts, ends, owned_start


def plan_tiles(
    height: int, width: int, patch: int, overlap: int, blend: bool = False, pad_to: int | None = None
) -> TilePlan:
    """Plan the tiles of an LR frame of `height x width` pixels (any size >= 1x1).

    Crop mode (`blend=False`): ceil(H/patch) x ceil(W/patch) tiles of `patch + 2*overlap` pixels.
    Blend mode: tiles of `patch` pixels at step `patch - overlap` (requires `overlap < patch`).
    pad_to: an axis shorter than this (default: the tile) is padded up to it; a tile is cut to the padded
    frame on an axis shorter than the tile. The default gives every tile its full size (fixed-shape backends
    need that); `merge_tiles` plans pass MIN_WINDOW, so a small or thin frame is run as itself, as whole-frame
    inference runs it, instead of being padded with reflected pixels the network would see.
    """
    if height < 1 or width < 1:
        raise ValueError(f"frame must be at least 1x1, got {height}x{width}")
    if patch < 1 or overlap < 0:
        raise ValueError(f"need patch >= 1 and overlap >= 0, got patch={patch}, overlap={overlap}")
    if blend and overlap >= patch:
        raise ValueError(f"blend mode needs overlap < patch, got patch={patch}, overlap={overlap}")
    step = patch - overlap if blend else patch
    ctx = 0 if blend else overlap
    ys, ye, yo = _axis(height, patch, step)
    xs, xe, xo = _axis(width, patch, step)
    iy, ix = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    iy, ix = iy.ravel(), ix.ravel()
    boxes = np.stack([ys[iy], xs[ix], ye[iy], xe[ix]], axis=1).astype(np.int64)
    owned = boxes.copy() if blend else np.stack([yo[iy], xo[ix], ye[iy], xe[ix]], axis=1).astype(np.int64)
    # Windows stay inside the frame (shifted inward at its borders, core off-centre), so a border tile sees
    # the true frame edge exactly as whole-frame inference does; padding only where the frame is smaller.
    t = patch + 2 * ctx
    least = t if pad_to is None else min(pad_to, t)
    ph, pw = max(height, least), max(width, least)
    th, tw = min(t, ph), min(t, pw)
    origins = np.stack([np.clip(ys[iy] - ctx, 0, ph - th), np.clip(xs[ix] - ctx, 0, pw - tw)], axis=1)
    pad = (0, ph - height, 0, pw - width)
    sizes = np.tile(np.array([th, tw], dtype=np.int64), (len(boxes), 1))
    return TilePlan(
        height, width, patch, overlap, blend, t, pad, boxes, owned, origins.astype(np.int64), sizes, (len(ys), len(xs))
    )


def _runs(labels: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Half-open `(start, end)` runs of equal consecutive labels, each at most `limit` long."""
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start] or i - start == limit:
            runs.append((start, i))
            start = i
    return runs


def merge_tiles(plan: TilePlan, labels: np.ndarray, max_cells: int) -> tuple[TilePlan, np.ndarray]:
    """Merge grid-adjacent tiles of a crop-mode grid plan that share a label into rectangular windows of at
    most `max_cells` x `max_cells` cores; returns the merged plan (tiles = windows) and each window's label.

    Runs of equal labels along each row are cut at `max_cells`, and a run that repeats the one above it
    (same columns, same label) extends that window downward, up to `max_cells` rows. A window writes the
    union of its cores' owned regions and reads that region with `overlap` context on every side, clipped to
    the padded frame (and grown inward to MIN_WINDOW where that is smaller). `max_cells` = 1 keeps every tile
    alone but still cuts its window to what it writes.
    """
    labels = np.asarray(labels)
    if plan.blend or plan.grid is None:
        raise ValueError("merge_tiles needs a crop-mode grid plan")
    if len(labels) != plan.num_tiles or max_cells < 1:
        raise ValueError(f"need one label per tile ({plan.num_tiles}) and max_cells >= 1")
    rows, cols = plan.grid
    grid = labels.reshape(rows, cols)
    done, open_ = [], {}  # windows as [r0, r1, c0, c1]; open_ maps (c0, c1) -> window still growing down
    for r in range(rows):
        grown = {}
        for c0, c1 in _runs(grid[r], max_cells):
            w = open_.get((c0, c1))
            if w is not None and grid[w[0], c0] == grid[r, c0] and w[1] - w[0] < max_cells:
                w[1] = r + 1
            else:
                w = [r, r + 1, c0, c1]
                done.append(w)
            grown[(c0, c1)] = w
        open_ = grown
    win = np.array(done, dtype=np.int64)
    first, last = win[:, 0] * cols + win[:, 2], (win[:, 1] - 1) * cols + win[:, 3] - 1  # corner tiles
    boxes = np.concatenate([plan.boxes[first, :2], plan.boxes[last, 2:]], axis=1)
    owned = np.concatenate([plan.owned[first, :2], plan.owned[last, 2:]], axis=1)
    padded = np.array(plan.padded_shape)
    start = np.maximum(owned[:, :2] - plan.overlap, 0)
    end = np.minimum(np.maximum(owned[:, 2:] + plan.overlap, start + MIN_WINDOW), padded)
    origins = np.maximum(np.minimum(start, end - MIN_WINDOW), 0)
    sizes = end - origins
    merged = TilePlan(plan.height, plan.width, plan.patch, plan.overlap, False, plan.tile, plan.pad,
                      boxes, owned, origins, sizes, None)
    return merged, grid[win[:, 0], win[:, 2]]


def pad_frame(frame: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Pad a (3, H, W) frame by reflection to `plan.padded_shape` (returns the input when no padding)."""
    _check_frame(frame, plan)
    top, bottom, left, right = plan.pad
    if not any(plan.pad):
        return frame
    return np.pad(frame, ((0, 0), (top, bottom), (left, right)), mode="reflect")


def _check_frame(frame: np.ndarray, plan: TilePlan) -> None:
    if frame.ndim != 3 or frame.shape[1:] != (plan.height, plan.width):
        raise ValueError(
            f"frame shape {frame.shape} does not match the plan's (C, {plan.height}, {plan.width})"
        )


def extract_tiles(frame: np.ndarray, plan: TilePlan, indices: np.ndarray | None = None) -> np.ndarray:
    """Tiles `(n, C, h, w)` (same dtype as the frame) of a `(C, H, W)` frame (any dtype; a transposed view
    of an `(H, W, C)` image works), or of the frame already padded by `pad_frame` (shape
    `(C, *plan.padded_shape)`, so chunks don't pad again); `indices` selects tiles (default: all, in plan
    order), which must share one window size."""
    if frame.ndim == 3 and frame.shape[1:] != plan.padded_shape:
        frame = pad_frame(frame, plan)
    if frame.ndim != 3:
        raise ValueError(f"expected a (C, H, W) frame, got shape {frame.shape}")
    idx = np.arange(plan.num_tiles) if indices is None else np.asarray(indices, dtype=np.int64)
    h, w = _window_size(plan, idx)
    out = np.empty((len(idx), frame.shape[0], h, w), dtype=frame.dtype)
    for j, i in enumerate(idx):
        y, x = plan.origins[i]
        out[j] = frame[:, y : y + h, x : x + w]
    return out


def _window_size(plan: TilePlan, idx: np.ndarray) -> tuple[int, int]:
    """The one window size `(h, w)` shared by tiles `idx` (ValueError when they differ)."""
    if len(idx) == 0:
        return plan.tile, plan.tile
    sizes = plan.sizes[idx]
    if (sizes != sizes[0]).any():
        raise ValueError("tiles of one call must share a window size")
    return int(sizes[0, 0]), int(sizes[0, 1])


def as_unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 / uint16 (scaled by the dtype's maximum) or float (clipped) -> float32 in [0, 1], same shape."""
    if x.dtype == np.uint8 or x.dtype == np.uint16:
        return np.multiply(x, np.float32(1.0 / np.iinfo(x.dtype).max), dtype=np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"unsupported image dtype {x.dtype}; use uint8, uint16 or float in [0, 1]")
    return np.clip(x, 0.0, 1.0, dtype=np.float32)


def to_chw(image: np.ndarray) -> np.ndarray:
    """`(H, W, 3)` uint8 / uint16 / float in [0, 1] -> `(3, H, W)` float32 in [0, 1] (`as_unit_float`),
    converted one channel at a time (a whole frame's input; tiles are converted as they are cut)."""
    x = np.empty((3, *image.shape[:2]), dtype=np.float32)
    for c in range(3):
        x[c] = as_unit_float(image[..., c])
    return x


def route_boxes(plan: TilePlan, min_size: int = 3) -> np.ndarray:
    """Classification boxes (n, 4) int64 in padded-frame coordinates, each grown to at least `min_size` on
    both axes (the router's minimum) by extending into the padding; route on `pad_frame(frame, plan)`.

    Boxes already large enough cover exactly the same pixels as `plan.boxes` in the unpadded frame.
    """
    ph, pw = plan.padded_shape
    if ph < min_size or pw < min_size:
        raise ValueError(
            f"padded frame {ph}x{pw} is smaller than the router's {min_size}x{min_size} minimum; "
            "use a larger patch or overlap"
        )
    top, _, left, _ = plan.pad
    b = plan.boxes + np.array([top, left, top, left], dtype=np.int64)
    for lo, hi, limit in ((0, 2, ph), (1, 3, pw)):
        short = b[:, hi] - b[:, lo] < min_size
        b[short, hi] = np.minimum(b[short, lo] + min_size, limit)
        b[short, lo] = b[short, hi] - min_size
    return b


def to_hwc(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`(..., C, H, W)` float32 (any range) -> `(..., H, W, C)` `dtype`, clamped to [0, 1] (integers: scaled
    to the dtype's maximum and rounded)."""
    x = np.moveaxis(np.clip(x, 0.0, 1.0), -3, -1)
    if np.issubdtype(dtype, np.integer):
        return np.rint(x * np.float32(np.iinfo(dtype).max)).astype(dtype)
    return np.ascontiguousarray(x, dtype=dtype)


def owned_slices(plan: TilePlan, i: int, scale: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where tile `i`'s owned region lies, at output resolution: `(rows, cols)` inside its upscaled window and
    `(rows, cols)` in the upscaled frame."""
    s, top, left = scale, plan.pad[0], plan.pad[2]
    y0, x0, y1, x1 = (int(v) for v in plan.owned[i])
    oy = y0 - (int(plan.origins[i, 0]) - top)  # owned start inside the tile, LR pixels
    ox = x0 - (int(plan.origins[i, 1]) - left)
    src = (slice(oy * s, (oy + y1 - y0) * s), slice(ox * s, (ox + x1 - x0) * s))
    return src, (slice(y0 * s, y1 * s), slice(x0 * s, x1 * s))


class Stitcher:
    """Accumulates tile outputs `(n, C, h*s, w*s)` (one window size per call) in any order, chunk by chunk,
    into `(C, H*s, W*s)` float32, or, with `dtype`, into the final `(H*s, W*s, C)` image of that dtype (see `to_hwc`).

    Crop mode writes each tile's owned region straight into the output: with `dtype` each chunk is converted as
    it arrives, so the output image is the only frame-sized buffer (memory is streamed). Blend mode keeps a
    float64 sum (so averaging identical values is exact) and divides by the per-pixel tile count at the end.
    `add` is thread-safe.
    """

    def __init__(self, plan: TilePlan, scale: int, channels: int = 3, dtype: np.dtype | None = None) -> None:
        self.plan, self.scale = plan, scale
        self._dtype = None if dtype is None else np.dtype(dtype)
        shape = (channels, plan.height * scale, plan.width * scale)
        if plan.blend or self._dtype is None:
            self._out = np.zeros(shape, dtype=np.float64 if plan.blend else np.float32)
        else:  # every pixel is owned by exactly one tile, so no initialisation is needed
            self._out = np.empty((*shape[1:], channels), dtype=self._dtype)
        self._count = np.zeros(shape[1:], dtype=np.float32) if plan.blend else None
        self._lock = threading.Lock()
        self._done = 0

    def add(self, indices: np.ndarray, outputs: np.ndarray) -> None:
        """Add the outputs of tiles `indices` (plan order numbers)."""
        s = self.scale
        indices = np.asarray(indices, dtype=np.int64)
        h, w = (v * s for v in _window_size(self.plan, indices))
        if outputs.ndim != 4 or outputs.shape[0] != len(indices) or outputs.shape[2:] != (h, w):
            raise ValueError(f"outputs {outputs.shape} do not match {len(indices)} tiles of {h}x{w}")
        hwc = self._count is None and self._dtype is not None
        if hwc:
            outputs = to_hwc(outputs, self._dtype)  # (n, h*s, w*s, C), converted outside the lock
        with self._lock:
            for j, i in enumerate(indices):
                (rows, cols), dst = owned_slices(self.plan, int(i), s)
                if hwc:
                    self._out[dst] = outputs[j, rows, cols]
                elif self._count is None:
                    self._out[(slice(None), *dst)] = outputs[j, :, rows, cols]
                else:
                    self._out[(slice(None), *dst)] += outputs[j, :, rows, cols]
                    self._count[dst] += 1
            self._done += len(indices)

    def result(self) -> np.ndarray:
        """The stitched `(C, H*s, W*s)` float32 frame, or with `dtype` the `(H*s, W*s, C)` image; every tile
        must have been added."""
        if self._done < self.plan.num_tiles:
            raise RuntimeError(f"only {self._done} of {self.plan.num_tiles} tiles were added")
        if self._count is None:
            return self._out
        out = (self._out / self._count).astype(np.float32)
        return out if self._dtype is None else to_hwc(out, self._dtype)


def stitch_tiles(outputs: np.ndarray, plan: TilePlan, scale: int) -> np.ndarray:
    """Stitch all tile outputs `(n, C, h*s, w*s)` (plan order, one window size) into a `(C, H*s, W*s)` float32
    frame."""
    stitcher = Stitcher(plan, scale, channels=outputs.shape[1])
    stitcher.add(np.arange(plan.num_tiles), outputs)
    return stitcher.result()
