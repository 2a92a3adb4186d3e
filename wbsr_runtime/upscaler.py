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
import math
import numbers
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import defaults, routing
from .backends import backend_options, choose_backend, open_runners
from .backends.base import Runner
from .graphs import check_graphs
from .manifest import BundleError, Manifest, load_manifest
from .router import Router
from .scheduler import run_tiles
from .tiling import MAX_TILE, MIN_WINDOW, merge_tiles, pad_frame, plan_tiles, route_boxes, to_chw, to_hwc

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "models"


class FrameTooLarge(ValueError):
    """The input frame has more pixels than the Upscaler's `max_pixels`."""


@dataclass
class UpscaleStats:
    """What the last `upscale` call did. FLOPs are 2 x MACs of the subnets' convs on the LR pixels actually
    fed to them (tile windows with their context), against the full subnet on the whole frame once; the router
    is not counted. Times in seconds: router, subnets and tiling summed over workers; total is wall clock.
    `tiles_per_subnet`: how many tiles each subnet ran (cheapest first; the whole frame counts as one tile).
    `boxes` (n, 4) int64 LR tile boxes (y0, x0, y1, x1) and `subnets` (n,) int64, the subnet of each tile,
    are None in "whole" mode; `windows` is how many windows the tiles were merged into (subnet calls' items).
    `predicted_loss_db` / `predicted_cost`: what calibration predicts for the map in use (dynamic mode with a
    calibrated bundle; else None): image PSNR lost against the full subnet, and cost as a fraction of it
    (by `cost`: FLOPs or measured time), on the calibration distribution, not on this frame."""

    mode: str
    backend: str
    height: int
    width: int
    scale: int
    patch: int | None
    overlap: int | None
    tiles_per_subnet: list[int]
    flops: float
    flops_full: float
    router_s: float = 0.0
    subnets_s: float = 0.0
    tiling_s: float = 0.0
    total_s: float = 0.0
    windows: int = 1
    predicted_loss_db: float | None = None
    predicted_cost: float | None = None
    boxes: np.ndarray | None = field(default=None, repr=False)
    subnets: np.ndarray | None = field(default=None, repr=False)

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


def _number(name: str, value: Any, integer: bool) -> float:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    return value


def check_options(
    *,
    tolerance: float | None = None,
    budget: float | None = None,
    patch: int | None = None,
    overlap: int | None = None,
    merge: int | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
) -> None:
    """ValueError (one line) for a knob out of range; None means "not given". tolerance: finite dB >= 0;
    budget: a fraction of the full model's cost in (0, 1]; patch >= 3 and overlap >= 0 LR pixels with
    patch + 2 x overlap <= MAX_TILE (what one tile, and a small frame's padding, may cost is bounded); merge
    >= 0; workers >= 1; max_pixels >= 1. Shared by the Upscaler and wbsr-run, which checks before loading."""
    ranges = {
        "tolerance": (tolerance, False, 0, math.inf),
        "budget": (budget, False, 0, 1),
        "patch": (patch, True, MIN_WINDOW, MAX_TILE),
        "overlap": (overlap, True, 0, (MAX_TILE - MIN_WINDOW) // 2),
        "merge": (merge, True, 0, math.inf),
        "workers": (workers, True, 1, math.inf),
        "max_pixels": (max_pixels, True, 1, math.inf),
    }
    for name, (value, integer, lo, hi) in ranges.items():
        if value is None:
            continue
        v = _number(name, value, integer)
        if not lo <= v <= hi or (name == "budget" and v == 0):
            span = "(0, 1]" if name == "budget" else f">= {lo}" if hi == math.inf else f"in {lo}..{hi}"
            raise ValueError(f"{name} must be {span}, got {value!r}")
    if patch is not None and overlap is not None and patch + 2 * overlap > MAX_TILE:
        raise ValueError(
            f"a tile (patch + 2 x overlap) must be at most {MAX_TILE} LR pixels, got {patch} + 2 x {overlap}"
        )


def class_map(
    manifest: Manifest, tolerance: float | None, budget: float | None, costs: np.ndarray | None = None
) -> np.ndarray:
    """(K,) int64 subnet of each class: the manifest's map, or re-derived from its calibration (MSE table and
    class frequencies) for a `tolerance` (predicted image PSNR loss in dB against the full subnet: the
    cheapest map within it) or a `budget` (fraction of the full subnet's cost: the map with the least predicted
    error within it). `costs` (M,): rank subnets by these (e.g. measured seconds) instead of FLOPs; without a
    tolerance or budget they re-derive the map at the bundle's own knob."""
    if tolerance is not None and budget is not None:
        raise ValueError("give either a tolerance (dB) or a budget (fraction of the full model's cost), not both")
    if tolerance is None and budget is None and costs is None:
        return np.asarray(manifest.routing.class_to_subnet, dtype=np.int64)
    r = manifest.routing
    if r.mse_table is None:
        raise BundleError(
            f"{manifest.root}: bundle has no calibration (mse_table), so --tolerance/--budget/--cost can't "
            "re-derive the class -> subnet map; export it from a calibrated checkpoint (wbsr-calibrate)"
        )
    if tolerance is None and budget is None:
        tolerance, budget = r.tolerance_db, r.budget
        if tolerance is None and budget is None:
            raise BundleError(f"{manifest.root}: bundle records no calibration knob; give a tolerance or budget")
    costs = flops_costs(manifest) if costs is None else costs
    table, freq = np.asarray(r.mse_table), np.asarray(r.class_freq)
    if budget is not None:
        return routing.budget_map(table, freq, costs, budget).astype(np.int64)
    return routing.tolerance_map(table, freq, costs, tolerance).astype(np.int64)


def flops_costs(manifest: Manifest) -> np.ndarray:
    """(M,) FLOPs per patch of every subnet, cheapest first."""
    return np.array([s.flops_per_patch for s in manifest.subnets], dtype=np.float64)


def measure_costs(runner: Runner, count: int, size: int, batch: int = 2, repeats: int = 3) -> np.ndarray:
    """(count,) median seconds of subnets 0..count-1 of `runner` on a (batch, 3, size, size) input, after a
    warm-up call; the subnets take turns in every repeat, so a change in machine load hits them alike."""
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    subnets = range(count)
    for m in subnets:
        runner.run_subnet(m, x)
    times = np.empty((repeats, len(subnets)))
    for r in range(repeats):
        for m in subnets:
            t0 = time.perf_counter()
            runner.run_subnet(m, x)
            times[r, m] = time.perf_counter() - t0
    return np.median(times, axis=0)


class Upscaler:
    """Upscales RGB images with a WBSR bundle. A context manager; `upscale` is serialised by a lock, so one
    Upscaler may be shared by threads (for parallelism within a frame use `workers`).

    bundle: bundle folder, or None for the shipped default of `scale` (`scale` is ignored when a bundle is
    given: the bundle's own scale applies). backend: "ort" | "torch" | "trt" | "auto" and device: "cpu" | "cuda" |
    "cuda:N" | None (`backends.choose_backend`: "auto" takes TensorRT when the bundle has engines for this GPU,
    else PyTorch on CUDA, else ONNX Runtime's CUDA provider, else ONNX Runtime on the CPU; `choice` says which
    and why). tolerance (dB: the predicted image PSNR loss against the full subnet) / budget (fraction of the
    full subnet's cost): re-derive the class -> subnet map from the bundle's calibration (`class_map`).
    cost: what "cheapest" means when deriving a map: "flops" (the bundle's) or "measured" (each subnet timed
    on this backend at load, `measure_costs`: on real hardware time need not follow FLOPs; the map then
    depends on those timings, and is re-derived at the bundle's tolerance when none is given).
    patch / overlap: LR core tile size and context (default: the bundle's; a fixed-shape backend's own, see
    below). merge: neighbouring tiles routed to one subnet run as one window of up to `merge` x `merge` cores,
    each read as what it writes plus its context (`tiling.merge_tiles`; 1: every tile alone); 0: equal tiles
    of patch + 2 x overlap. Fixed-shape backends (TensorRT engines, ORT's TensorRT provider: `runner.fixed_tiles`)
    get only their tiles: merge 0, their tiling (explicit patch / overlap must match engines built for them),
    "measured" costs timed on their tiles, and mode "whole" refused. workers: runners (threads, and on a GPU
    streams). max_pixels: larger LR frames are refused (FrameTooLarge). chunk: grid tiles' worth of pixels
    per batched call.
    threads / fp16 / stream / tensorrt / max_batch / trt_cache (None: not given): the chosen backend's options
    (`backends.options`; a backend refuses, with a ValueError, one it does not take). threads: intra-op threads
    (ort, torch on the CPU); fp16: half-precision graphs (ort), arithmetic (torch) or engines (trt); stream: a
    caller's non-blocking CUDA stream, an int handle (torch, trt; torch also takes a torch stream); tensorrt:
    ORT's TensorRT provider (ort on CUDA); max_batch: tiles per call at most (a cap below the engines' for trt);
    trt_cache: the TensorRT provider's engine cache folder (ort).
    The router (`router.Router`, ONNX Runtime on the CPU whatever the backend) classifies the tiles.
    """

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        scale: int = 4,
        backend: str = "auto",
        device: str | None = None,
        mode: str = "dynamic",
        tolerance: float | None = None,
        budget: float | None = None,
        cost: str = "flops",
        patch: int | None = None,
        overlap: int | None = None,
        merge: int = defaults.MERGE,
        workers: int = 1,
        max_pixels: int = defaults.MAX_PIXELS,
        chunk: int | None = None,
        verify: bool = True,
        threads: int | None = None,
        fp16: bool | None = None,
        stream: Any = None,
        tensorrt: bool | None = None,
        max_batch: int | None = None,
        trt_cache: str | Path | None = None,
    ) -> None:
        if mode not in defaults.MODES:
            raise ValueError(f"mode must be one of {', '.join(defaults.MODES)}, got {mode!r}")
        check_options(tolerance=tolerance, budget=budget, patch=patch, overlap=overlap, merge=merge,
                      workers=workers, max_pixels=max_pixels)
        self.manifest = load_manifest(
            default_bundle(scale) if bundle is None else bundle, verify_hashes=verify
        )
        if verify:
            check_graphs(self.manifest)  # the graphs are what the manifest says (width, depth, scale, classes)
        self.scale = self.manifest.scale
        self.mode, self.max_pixels, self.chunk, self.cost = mode, max_pixels, chunk, cost
        self.patch = self.manifest.tiling.patch if patch is None else patch
        self.overlap = self.manifest.tiling.overlap if overlap is None else overlap
        check_options(patch=self.patch, overlap=self.overlap)  # one given, the other the bundle's
        if cost not in defaults.COSTS:
            raise ValueError(f"cost must be one of {', '.join(defaults.COSTS)}, got {cost!r}")
        flops = flops_costs(self.manifest)
        # Checks the knobs (and that "measured" can re-derive a map) before any backend opens.
        self.class_map = class_map(self.manifest, tolerance, budget, flops if cost == "measured" else None)
        self.full_index = len(self.manifest.subnets) - 1
        tiling = (self.patch, self.overlap) if patch is not None or overlap is not None else None
        self.choice = choose_backend(self.manifest, backend, device, tiling)
        given = {"threads": threads, "fp16": fp16, "stream": stream, "tensorrt": tensorrt}
        options = backend_options(self.choice.backend, given | {"max_batch": max_batch, "trt_cache": trt_cache})
        self.runners = open_runners(self.manifest, self.choice, workers, tiling=tiling, options=options)
        self.router = Router(self.manifest)
        self.backend, self.merge = self.runners[0].name, merge
        self.costs = flops
        try:
            self._fit_fixed_shapes()
            if cost == "measured":
                self.costs = self._measure_costs()
                self.class_map = class_map(self.manifest, tolerance, budget, self.costs)
                log.info("measured subnet costs (s) %s", np.round(self.costs, 4))
            self.prediction = self._predict()
        except BaseException:
            self.close()
            raise
        self.last_stats: UpscaleStats | None = None
        self._lock = threading.Lock()

    def _fit_fixed_shapes(self) -> None:
        """A backend bound to one tile shape gets that shape only: its tiling, equal tiles, no whole frames."""
        fixed = self.runners[0].fixed_tiles
        if fixed is None:
            return
        tile = fixed[0] + 2 * fixed[1]
        if self.mode == "whole":
            raise ValueError(
                f"mode 'whole' runs the full subnet on the whole frame, but the {self.backend} backend takes only "
                f"{tile}x{tile} tiles (engines are built for one shape): use mode 'full' (the same subnet, "
                "tiled) or another backend"
            )
        if fixed != (self.patch, self.overlap):
            log.info("tiling as the %s engines were built: patch %d + overlap %d", self.backend, *fixed)
        self.patch, self.overlap = fixed
        self.merge = 0

    def _measure_costs(self) -> np.ndarray:
        """`measure_costs` on the shapes this backend takes: tiles for a fixed-shape one, else windows of
        2 x 2 cores (2P + 2O)."""
        runner = self.runners[0]
        count = len(self.manifest.subnets)
        if runner.fixed_tiles is None:
            return measure_costs(runner, count, 2 * self.patch + 2 * self.overlap)
        return measure_costs(runner, count, self.patch + 2 * self.overlap, batch=min(2, runner.max_batch or 2))

    def __enter__(self) -> Upscaler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for r in self.runners:
            r.close()
        self.router.close()

    def _predict(self) -> routing.Prediction | None:
        """Calibration's prediction for the map in use (logged), or None (uncalibrated bundle, baselines)."""
        r = self.manifest.routing
        if self.mode != "dynamic" or r.mse_table is None:
            return None
        p = routing.predict(np.asarray(r.mse_table), np.asarray(r.class_freq), self.class_map, self.costs)
        log.info("routing map %s: predicted %.3f dB below the full subnet at %.1f%% of its cost (%s)",
                 self.class_map.tolist(), p.loss_db, 100 * p.cost, self.cost)
        return p

    def _flops_per_pixel(self, m: int) -> float:
        s = self.manifest.subnets[m]
        return s.flops_per_patch / s.flops_patch**2

    def upscale(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 / uint16 / float in [0, 1] -> (H*s, W*s, 3) of the same dtype, clamped to [0, 1].

        Float values outside [0, 1] are clipped; NaN or infinity anywhere raises ValueError (a NaN would
        spread through every convolution it reaches, into a whole window of the output). Frames of more than
        `max_pixels` raise FrameTooLarge."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        if image.dtype not in (np.uint8, np.uint16) and not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"unsupported image dtype {image.dtype}; use uint8, uint16 or float in [0, 1]")
        # min and max propagate NaN and show +-inf, without a frame-sized mask.
        if image.dtype.kind == "f" and image.size and not (np.isfinite(image.min()) and np.isfinite(image.max())):
            raise ValueError("image holds NaN or infinite values; give finite values in [0, 1]")
        if image.shape[0] * image.shape[1] > self.max_pixels:
            raise FrameTooLarge(
                f"frame of {image.shape[1]}x{image.shape[0]} = {image.shape[0] * image.shape[1]} "
                f"pixels exceeds max_pixels={self.max_pixels}; raise max_pixels to allow it"
            )
        with self._lock:
            t0 = time.perf_counter()
            if self.mode == "whole":
                out, stats = self._whole(to_chw(image))
                sr = to_hwc(out, image.dtype)  # clamped to [0, 1]; integers scaled and rounded
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
            flops_full=h * w * self._flops_per_pixel(self.full_index),
            **kw,
        )

    def _whole(self, x: np.ndarray) -> tuple[np.ndarray, UpscaleStats]:
        """The full subnet on the whole frame (tiny frames reflection-padded to >= 3x3, then cropped)."""
        _, h, w = x.shape
        ph, pw = max(3 - h, 0), max(3 - w, 0)
        xp = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect") if ph or pw else x
        t0 = time.perf_counter()
        out = self.runners[0].run_subnet(self.full_index, xp[None])[0, :, : h * self.scale, : w * self.scale]
        counts = [0] * len(self.manifest.subnets)
        counts[self.full_index] = 1
        stats = self._stats(
            h,
            w,
            patch=None,
            overlap=None,
            tiles_per_subnet=counts,
            flops=xp.shape[1] * xp.shape[2] * self._flops_per_pixel(self.full_index),
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
        # Windows (merge >= 1) take any size: a small or thin frame is run as itself, like the whole frame.
        plan = plan_tiles(h, w, self.patch, self.overlap, pad_to=None if self.merge == 0 else MIN_WINDOW)
        frame = pad_frame(image.transpose(2, 0, 1), plan)  # a (3, H, W) view; copied only when padded
        t1 = time.perf_counter()
        if self.mode == "dynamic":
            _, classes = self.router.route(frame[None], route_boxes(plan))
            tile_subnets = self.class_map[classes - 1]
        else:
            tile_subnets = np.full(plan.num_tiles, self.full_index, dtype=np.int64)
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
            tiles_per_subnet=np.bincount(tile_subnets, minlength=len(fpp)).tolist(),
            flops=float(windows.sizes.prod(axis=1) @ fpp[window_subnets]),
            windows=windows.num_tiles,
            predicted_loss_db=None if self.prediction is None else self.prediction.loss_db,
            predicted_cost=None if self.prediction is None else self.prediction.cost,
            boxes=plan.boxes,
            subnets=tile_subnets,
        )
        stats.router_s, stats.subnets_s = t2 - t1, times.subnets
        stats.tiling_s = (t1 - t0) + times.tiling
        return out, stats
