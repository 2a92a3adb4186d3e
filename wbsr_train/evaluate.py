"""Evaluation (METHOD.md section 6): Y-PSNR/SSIM per subnet, dynamic routing under the ClassSR/ARM tiling
protocol (32x32 LR patches, step 28, overlaps averaged), FLOPs in the paper's convention, per-class PSNR.

One engine serves evaluation, calibration and the benchmarks: `tiled_runs` tiles each image once, classes
each tile once and runs every subnet once over the tiles; any tile -> subnet assignment is then stitched and
scored from those outputs (`TiledRun.stitch`), and per-tile squared errors feed the calibration table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from wbsr_runtime.routing import classify
from wbsr_runtime.tiling import (
    TilePlan,
    extract_tiles,
    owned_slices,
    pad_frame,
    plan_tiles,
    route_boxes,
    stitch_tiles,
    to_chw,
)

from . import descriptor
from .checkpoint import Checkpoint
from .config import SubnetSpec
from .data import imresize


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 255] -> (H, W) float64 BT.601 luma in [16, 235] (MATLAB's rgb2ycbcr)."""
    img = img.astype(np.float64)
    return 16.0 + img @ np.array([65.481, 128.553, 24.966]) / 255.0


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border] if border > 0 else img


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two arrays on the [0, 255] scale (float64); inf when equal."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """Y-PSNR of two (H, W, 3) uint8 images, `border` pixels cropped on each side."""
    return psnr(_crop(rgb_to_y(sr), border), _crop(rgb_to_y(hr), border))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    return psnr(_crop(sr, border), _crop(hr, border))


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM of the Y channel, 11x11 Gaussian window (sigma 1.5), valid region, as BasicSR/MATLAB compute it."""
    x = torch.from_numpy(_crop(rgb_to_y(sr), border))[None, None]
    y = torch.from_numpy(_crop(rgb_to_y(hr), border))[None, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    win = torch.outer(g, g) / torch.outer(g, g).sum()
    filt = lambda t: F.conv2d(t, win[None, None])  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim.mean())


def to_uint8(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) float in [0, 1] (clamped) -> (H, W, 3) uint8."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
    a = a.reshape(a.shape[-3:])
    return (np.clip(a, 0, 1) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def upscale_whole(net: nn.Module, lr: np.ndarray, spec: SubnetSpec | None) -> np.ndarray:
    """(h, w, 3) uint8 -> (h*s, w*s, 3) uint8 by one subnet on the whole frame."""
    return to_uint8(net(torch.from_numpy(to_chw(lr))[None].to(_device(net)), spec))


@torch.no_grad()
def forward_tiles(net: nn.Module, tiles: np.ndarray, spec: SubnetSpec, batch: int = 64) -> np.ndarray:
    """(n, 3, t, t) float32 -> (n, 3, t*s, t*s) float32 through subnet `spec`, in batches."""
    dev = _device(net)
    outs = [net(torch.from_numpy(tiles[i:i + batch]).to(dev), spec).cpu().numpy() for i in range(0, len(tiles), batch)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


# --- the evaluation engine: tile once, run every subnet once over the tiles, score any assignment ------------
@dataclass(frozen=True)
class Tiling:
    """How the engine cuts LR frames: ClassSR/ARM's protocol (blended tiles) or the runtime's grid."""

    patch: int
    overlap: int
    blend: bool


PROTOCOL = Tiling(32, 4, blend=True)  # 32 x 32 LR tiles at step 28, overlaps averaged (the paper's tables)
RUNTIME = Tiling(32, 2, blend=False)  # the runtime's default grid: 32 x 32 cores read with 2 pixels of context


@dataclass
class TiledRun:
    """One image tiled once and classified once, with the output of every subnet on every tile.

    outputs: (M, n, 3, t*s, t*s) float32, subnets cheapest first; scores (n,) float32 descriptor scores and
    classes (n,) int64 in 1..K of the tiles (crop mode: of their cores, as the runtime's router sees them).
    """

    name: str
    hr: np.ndarray  # (H, W, 3) uint8, mod-cropped
    plan: TilePlan
    scores: np.ndarray
    classes: np.ndarray
    outputs: np.ndarray

    def stitch(self, subnets: np.ndarray, scale: int) -> np.ndarray:
        """(H, W, 3) uint8: every tile from the subnet `subnets[i]` (n,) assigns it."""
        picked = self.outputs[np.asarray(subnets), np.arange(self.plan.num_tiles)]
        return to_uint8(stitch_tiles(picked, self.plan, scale))

    def squared_errors(self, scale: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, n) summed squared Y error ([0, 255] scale, outputs rounded to uint8 as images are) of every
        subnet over each tile's owned HR region, and (n,) the pixels of those regions."""
        y_hr = rgb_to_y(self.hr)
        errors = np.empty(self.outputs.shape[:2])
        pixels = np.empty(self.plan.num_tiles)
        for i in range(self.plan.num_tiles):
            src, dst = owned_slices(self.plan, i, scale)
            rgb = self.outputs[:, i, :, src[0], src[1]].transpose(0, 2, 3, 1)  # (M, h, w, 3)
            y_sr = rgb_to_y((np.clip(rgb, 0, 1) * 255.0).round())  # rounded as to_uint8 rounds
            errors[:, i] = ((y_sr - y_hr[dst]) ** 2).sum(axis=(1, 2))
            pixels[i] = y_hr[dst].size
        return errors, pixels


def tiled_runs(net: nn.Module, pairs: list, specs: list[SubnetSpec], thresholds, tiling: Tiling,
               progress: str | None = None) -> Iterator[TiledRun]:
    """For each (name, lr, hr) uint8 pair: the tiles of `tiling`, their descriptor classes, and every subnet's
    outputs (one network pass per subnet and image), yielded one image at a time to bound memory."""
    for name, lr, hr in tqdm(pairs, desc=progress, unit="img", leave=False, disable=progress is None):
        frame = to_chw(lr)
        plan = plan_tiles(frame.shape[1], frame.shape[2], tiling.patch, tiling.overlap, blend=tiling.blend)
        tiles = extract_tiles(frame, plan)
        boxes = plan.boxes if tiling.blend else route_boxes(plan)  # what the runtime's router scores
        scores = descriptor.box_scores(torch.from_numpy(pad_frame(frame, plan)), torch.from_numpy(boxes))
        classes = classify(scores.numpy(), thresholds)
        outputs = np.stack([forward_tiles(net, tiles, spec) for spec in specs])
        yield TiledRun(name, hr, plan, scores.numpy(), classes, outputs)


def _scores(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    return {"psnr_y": psnr_y(sr, hr, scale), "ssim_y": ssim_y(sr, hr, scale), "psnr_rgb": psnr_rgb(sr, hr, scale)}


def _mean_rows(per_image: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in per_image])) for k in per_image[0]}


def evaluate_model(net: nn.Module, ckpt: Checkpoint, pairs: list, class_map: np.ndarray) -> dict:
    """The full evaluation report of a checkpoint's supernet on (name, lr, hr) uint8 pairs (JSON-able).

    rows: bicubic; every subnet on the whole frame; the full subnet tiled (protocol); dynamic routing (protocol).
    per_class: Y-PSNR of the full subnet's tiles, by descriptor class (the paper's Fig. 4).
    """
    scale, specs, flops = ckpt.model_config["scale"], list(ckpt.specs), list(ckpt.flops)
    rows = [{"method": "bicubic", **_mean_rows([_scores(imresize(lr, scale), hr, scale)
                                                  for _, lr, hr in pairs])}]
    for m, spec in enumerate(specs):
        scores = _mean_rows([_scores(upscale_whole(net, lr, spec), hr, scale) for _, lr, hr in pairs])
        rows.append({"method": f"subnet {m} (w{spec.width} d{spec.depth}) whole frame", **scores,
                     "flops_per_patch": flops[m], "flops_pct": 100.0 * flops[m] / flops[-1]})
    full, dynamic, classes, errors, pixels = [], [], [], [], []
    for run in tiled_runs(net, pairs, specs, list(ckpt.thresholds), PROTOCOL, progress="evaluate"):
        subnets = np.asarray(class_map)[run.classes - 1]
        full.append(_scores(run.stitch(np.full_like(subnets, len(specs) - 1), scale), run.hr, scale))
        dynamic.append((_scores(run.stitch(subnets, scale), run.hr, scale), subnets))
        err, pix = run.squared_errors(scale)
        classes.append(run.classes)
        errors.append(err[-1])
        pixels.append(pix)
    all_subnets = np.concatenate([s for _, s in dynamic])
    rows.append({"method": "full subnet, tiled", **_mean_rows(full), "flops_pct": 100.0,
                 "tiles_per_subnet": np.bincount(np.full(len(all_subnets), len(specs) - 1),
                                                   minlength=len(specs)).tolist()})
    rows.append({"method": "dynamic, tiled", **_mean_rows([r for r, _ in dynamic]),
                 "flops_pct": 100.0 * float(np.mean(np.asarray(flops)[all_subnets])) / flops[-1],
                 "tiles_per_subnet": np.bincount(all_subnets, minlength=len(specs)).tolist()})
    classes, errors, pixels = np.concatenate(classes), np.concatenate(errors), np.concatenate(pixels)
    per_class = [{"class": k, "patches": int((classes == k).sum()),
                  "psnr_y_full": _psnr_of(errors[classes == k].sum(), pixels[classes == k].sum())}
                 for k in range(1, ckpt.num_classes + 1)]
    return {"scale": scale, "images": len(pairs), "class_to_subnet": np.asarray(class_map).tolist(),
            "rows": rows, "per_class": per_class}


def _psnr_of(squared_error: float, pixels: float) -> float | None:
    """PSNR (dB, [0, 255] scale) of a summed squared error over `pixels`; None without pixels."""
    if pixels == 0:
        return None
    return float("inf") if squared_error == 0 else float(10 * np.log10(255.0**2 * pixels / squared_error))
