"""The public API: `Upscaler(bundle).upscale(image)`.

    from wbsr_runtime.upscaler import Upscaler
    with Upscaler("bundles/x4", backend="ort", tolerance=0.05) as up:
        sr = up.upscale(rgb)  # (H, W, 3) uint8 / uint16 / float32 in [0, 1] -> (H*s, W*s, 3), same dtype
        print(up.last_stats.flops_ratio)

Modes: "dynamic" (each tile's class from the router, its subnet from the class -> subnet map), "full" (the
full subnet on every tile) and "whole" (the full subnet on the whole frame, no tiling): the last two are the
baselines the dynamic mode is compared with. Needs numpy and onnxruntime only (torch only for the torch
backend).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import routing
from .backends import open_runners
from .manifest import BundleError, Manifest, load_manifest
from .scheduler import run_tiles
from .tiling import as_unit_float, merge_tiles, pad_frame, plan_tiles, route_boxes, to_hwc

log = logging.getLogger(__name__)

MODES = ("dynamic", "full", "whole")
COSTS = ("flops", "measured")
DEFAULT_MAX_PIXELS = 16384 * 16384  # LR pixels; 4K/8K frames pass, a decompression bomb does not
DEFAULT_MERGE = 4  # neighbouring tiles of one subnet run as windows of up to 4 x 4 cores (README: benchmark)
MODELS_DIR = Path(__file__).parent / "models"


class FrameTooLarge(ValueError):
    """The input frame has more pixels than the Upscaler's `max_pixels`."""


@dataclass
class UpscaleStats:
    """What the last `upscale` call did. FLOPs are 2 x MACs of the subnets' convs on the LR pixels actually
    fed to them (tile windows with their context), against the full subnet on the whole frame once; the router
    is not counted. Times in seconds: router, subnets and tiling summed over workers; total is wall clock.
    `boxes` (n, 4) int64 LR tile boxes (y0, x0, y1, x1) and `subnets` (n,) int64, the subnet of each tile,
    are None in "whole" mode; `windows` is how many windows the tiles were merged into (subnet calls' items)."""

    mode: str
    backend: str
    height: int
    width: int
    scale: int
    patch: int | None
    overlap: int | None
    patches_per_subnet: list[int]
    flops: float
    flops_full: float
    router_s: float = 0.0
    subnets_s: float = 0.0
    tiling_s: float = 0.0
    total_s: float = 0.0
    windows: int = 1
    boxes: np.ndarray | None = field(default=None, repr=False)
    subnets: np.ndarray | None = field(default=None, repr=False)

    @property
    def patches(self) -> list[int]:
        return self.patches_per_subnet

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_full if self.flops_full else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (boxes and per-tile subnets as lists)."""
        d = asdict(self)
        for k in ("boxes", "subnets"):
            d[k] = None if d[k] is None else np.asarray(d[k]).tolist()
        return d | {"flops_ratio": self.flops_ratio}


def default_bundle(scale: int) -> Path:
    """The shipped bundle for `scale` (wbsr_runtime/models/x{scale}/); BundleError when there is none."""
    path = MODELS_DIR / f"x{scale}"
    if not (path / "manifest.json").is_file():
        raise BundleError(
            f"no shipped model for x{scale} yet ({path} has no bundle); pass a bundle made by wbsr-export "
            "with --bundle DIR (Upscaler(bundle=DIR))"
        )
    return path


def class_map(
    manifest: Manifest, tolerance: float | None, budget: float | None, costs: np.ndarray | None = None
) -> np.ndarray:
    """(K,) int64 subnet of each class: the manifest's map, or re-derived from its PSNR table for a tolerance
    or a budget. `costs` (M,): rank subnets by these (e.g. measured seconds) instead of FLOPs; without a
    tolerance or budget they re-derive the map at the bundle's own calibration tolerance."""
    if tolerance is not None and budget is not None:
        raise ValueError("give either a tolerance (dB) or a budget (fraction of the full model's cost), not both")
    if tolerance is None and budget is None and costs is None:
        return np.asarray(manifest.routing.class_to_subnet, dtype=np.int64)
    table = manifest.routing.psnr_table
    if table is None:
        raise BundleError(
            f"{manifest.root}: bundle has no psnr_table, so --tolerance/--budget/--cost can't re-derive the "
            "class -> subnet map; export it from a calibrated checkpoint (wbsr-calibrate)"
        )
    if budget is None:
        tolerance = manifest.routing.tolerance_db if tolerance is None else tolerance
        if tolerance is None:
            raise BundleError(f"{manifest.root}: bundle records no calibration tolerance; give a tolerance or budget")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 dB, got {tolerance}")
        return routing.tolerance_map(np.asarray(table), tolerance, costs).astype(np.int64)
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the full model's cost in (0, 1], got {budget}")
    if costs is None:
        costs = np.array([s.flops_per_patch for s in manifest.subnets], dtype=np.float64)
    return routing.budget_map(np.asarray(table), costs, budget).astype(np.int64)


def measure_costs(runner: Any, size: int, batch: int = 2, repeats: int = 3) -> np.ndarray:
    """(M,) median seconds of each subnet of `runner` on a (batch, 3, size, size) input, after a warm-up call;
    the subnets take turns in every repeat, so a change in machine load hits them alike."""
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    subnets = range(len(runner.manifest.subnets))
    for m in subnets:
        runner.run_subnet(m, x)
    times = np.empty((repeats, len(subnets)))
    for r in range(repeats):
        for m in subnets:
            t0 = time.perf_counter()
            runner.run_subnet(m, x)
            times[r, m] = time.perf_counter() - t0
    return np.median(times, axis=0)


def to_chw(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 / uint16 / float in [0, 1] -> (3, H, W) float32 in [0, 1] (floats clipped), converted
    one channel at a time (the "whole" mode's input; the tiled modes never make this copy)."""
    x = np.empty((3, *image.shape[:2]), dtype=np.float32)
    for c in range(3):
        x[c] = as_unit_float(image[..., c])
    return x


def from_chw(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(3, H, W) float32 (any range) -> (H, W, 3) `dtype`, clamped to [0, 1] (integers: scaled, rounded)."""
    return to_hwc(x, dtype)


class Upscaler:
    """Upscales RGB images with a WBSR bundle. A context manager; `upscale` is serialised by a lock, so one
    Upscaler may be shared by threads (for parallelism within a frame use `workers`).

    bundle: bundle folder, or None for the shipped default of `scale` (`scale` is ignored when a bundle is
    given: the bundle's own scale applies). backend: "ort" | "torch" | "trt" | "auto". tolerance (dB) / budget
    (fraction of the full model's cost): re-derive the class -> subnet map from the bundle's PSNR table.
    cost: what "cheapest" means when deriving a map: "flops" (the bundle's) or "measured" (each subnet timed
    on this backend at load, `measure_costs`: on real hardware time need not follow FLOPs; the map then
    depends on those timings, and is re-derived at the bundle's tolerance when none is given).
    patch / overlap: LR core tile size and context (default: the bundle's). merge: neighbouring tiles routed
    to one subnet run as one window of up to `merge` x `merge` cores, each read as what it writes plus its
    context (`tiling.merge_tiles`; 1: every tile alone); 0: equal tiles of patch + 2 x overlap, what
    fixed-shape backends take (TensorRT: always 0). workers: runners (threads, and on a GPU streams). max_pixels:
    larger LR frames are refused (FrameTooLarge). chunk: grid tiles' worth of pixels per batched call.
    backend_opts: passed to the runner (e.g. device="cuda", fp16=True, threads=2).
    """

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        scale: int = 4,
        backend: str = "auto",
        mode: str = "dynamic",
        tolerance: float | None = None,
        budget: float | None = None,
        cost: str = "flops",
        patch: int | None = None,
        overlap: int | None = None,
        merge: int = DEFAULT_MERGE,
        workers: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        chunk: int | None = None,
        verify: bool = True,
        **backend_opts: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.manifest = load_manifest(
            default_bundle(scale) if bundle is None else bundle, verify_hashes=verify
        )
        self.scale = self.manifest.scale
        self.mode, self.max_pixels, self.chunk = mode, max_pixels, chunk
        self.patch = self.manifest.tiling.patch if patch is None else patch
        self.overlap = self.manifest.tiling.overlap if overlap is None else overlap
        if self.patch < 3 or self.overlap < 0 or merge < 0:
            raise ValueError(
                f"need patch >= 3, overlap >= 0 and merge >= 0, got patch={self.patch}, "
                f"overlap={self.overlap}, merge={merge}"
            )
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
        flops = np.array([s.flops_per_patch for s in self.manifest.subnets], dtype=np.float64)
        # Checks the knobs (and that "measured" can re-derive a map) before any backend opens.
        self.class_map = class_map(self.manifest, tolerance, budget, flops if cost == "measured" else None)
        self.full = len(self.manifest.subnets) - 1
        self.runners = open_runners(self.manifest, backend, workers, **backend_opts)
        self.backend = self.runners[0].name
        self.costs: np.ndarray | None = None
        if cost == "measured":
            self.costs = measure_costs(self.runners[0], 2 * self.patch + 2 * self.overlap)
            self.class_map = class_map(self.manifest, tolerance, budget, self.costs)
            log.info("measured subnet costs (s) %s -> map %s", np.round(self.costs, 4), self.class_map.tolist())
        self.merge = 0 if any(r.fixed_tiles for r in self.runners) else merge
        self.last_stats: UpscaleStats | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Upscaler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for r in self.runners:
            r.close()

    def _flops_per_pixel(self, m: int) -> float:
        s = self.manifest.subnets[m]
        return s.flops_per_patch / s.flops_patch**2

    def upscale(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 / uint16 / float32 in [0, 1] -> (H*s, W*s, 3) of the same dtype, clamped."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        if image.dtype not in (np.uint8, np.uint16) and not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"unsupported image dtype {image.dtype}; use uint8, uint16 or float in [0, 1]")
        if image.shape[0] * image.shape[1] > self.max_pixels:
            raise FrameTooLarge(
                f"frame of {image.shape[1]}x{image.shape[0]} = {image.shape[0] * image.shape[1]} "
                f"pixels exceeds max_pixels={self.max_pixels}; raise max_pixels to allow it"
            )
        with self._lock:
            t0 = time.perf_counter()
            if self.mode == "whole":
                out, stats = self._whole(to_chw(image))
                sr = from_chw(out, image.dtype)
            else:
                sr, stats = self._tiled(image)  # stitched straight into the output dtype
            stats.total_s = time.perf_counter() - t0
            self.last_stats = stats
        log.debug("upscaled %dx%d: %s", image.shape[1], image.shape[0], stats)
        return sr

    def _stats(self, h: int, w: int, **kw: Any) -> UpscaleStats:
        return UpscaleStats(
            mode=self.mode,
            backend=self.backend,
            height=h,
            width=w,
            scale=self.scale,
            flops_full=h * w * self._flops_per_pixel(self.full),
            **kw,
        )

    def _whole(self, x: np.ndarray) -> tuple[np.ndarray, UpscaleStats]:
        """The full subnet on the whole frame (tiny frames reflection-padded to >= 3x3, then cropped)."""
        _, h, w = x.shape
        ph, pw = max(3 - h, 0), max(3 - w, 0)
        xp = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect") if ph or pw else x
        t0 = time.perf_counter()
        out = self.runners[0].run_subnet(self.full, xp[None])[0, :, : h * self.scale, : w * self.scale]
        counts = [0] * len(self.manifest.subnets)
        counts[self.full] = 1
        stats = self._stats(
            h,
            w,
            patch=None,
            overlap=None,
            patches_per_subnet=counts,
            flops=xp.shape[1] * xp.shape[2] * self._flops_per_pixel(self.full),
        )
        stats.subnets_s = time.perf_counter() - t0
        return out, stats

    def _tiled(self, image: np.ndarray) -> tuple[np.ndarray, UpscaleStats]:
        """Tiles of `patch` + `overlap` context; each tile's subnet from the router (dynamic) or the full;
        neighbours of one subnet merged into windows (`merge`). Returns the (H*s, W*s, 3) image of the input's
        dtype, converted window by window. Memory: the input, the output and one chunk per worker: tiles are
        read from the input in its own dtype and converted to float32 chunk by chunk, the router band by band.
        """
        t0 = time.perf_counter()
        h, w = image.shape[:2]
        plan = plan_tiles(h, w, self.patch, self.overlap)
        frame = pad_frame(image.transpose(2, 0, 1), plan)  # a (3, H, W) view; copied only when padded
        t1 = time.perf_counter()
        if self.mode == "dynamic":
            _, classes = self.runners[0].route(frame[None], route_boxes(plan))
            tile_subnets = self.class_map[classes - 1]
        else:
            tile_subnets = np.full(plan.num_tiles, self.full, dtype=np.int64)
        windows, window_subnets = (
            (plan, tile_subnets) if self.merge == 0 else merge_tiles(plan, tile_subnets, self.merge)
        )
        t2 = time.perf_counter()
        out, times = run_tiles(self.runners, windows, frame, window_subnets, self.scale, self.chunk, image.dtype)
        fpp = np.array([self._flops_per_pixel(m) for m in range(len(self.manifest.subnets))])
        stats = self._stats(
            h,
            w,
            patch=self.patch,
            overlap=self.overlap,
            patches_per_subnet=np.bincount(tile_subnets, minlength=len(fpp)).tolist(),
            flops=float(windows.sizes.prod(axis=1) @ fpp[window_subnets]),
            windows=windows.num_tiles,
            boxes=plan.boxes,
            subnets=tile_subnets,
        )
        stats.router_s, stats.subnets_s = t2 - t1, times.subnets
        stats.tiling_s = (t1 - t0) + times.tiling
        return out, stats
