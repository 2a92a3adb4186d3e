"""Evaluation (METHOD.md section 6): Y-PSNR/SSIM per subnet, dynamic routing under the ClassSR/ARM tiling
protocol (32x32 LR patches, step 28, overlaps averaged), FLOPs in the paper's convention, per-class PSNR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wbsr_runtime.tiling import TilePlan, extract_tiles, plan_tiles, stitch_tiles

from . import descriptor
from .config import SubnetSpec
from .data import imresize

PROTOCOL_PATCH, PROTOCOL_OVERLAP = 32, 4  # ClassSR/ARM: 32x32 LR patches at step 28


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


def to_chw(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0


@torch.no_grad()
def upscale_whole(net: nn.Module, lr: np.ndarray, spec: SubnetSpec | None) -> np.ndarray:
    """(h, w, 3) uint8 -> (h*s, w*s, 3) uint8 by one subnet on the whole frame."""
    return to_uint8(net(torch.from_numpy(to_chw(lr))[None], spec))


@torch.no_grad()
def run_tiles(net: nn.Module, tiles: np.ndarray, spec: SubnetSpec, batch: int = 64) -> np.ndarray:
    """(n, 3, t, t) float32 -> (n, 3, t*s, t*s) float32 through subnet `spec`, in batches."""
    outs = [net(torch.from_numpy(tiles[i:i + batch]), spec).numpy() for i in range(0, len(tiles), batch)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


@dataclass
class Routed:
    sr: np.ndarray  # (h*s, w*s, 3) uint8
    plan: TilePlan
    classes: np.ndarray  # (n,) int64 in 1..K
    subnets: np.ndarray  # (n,) int64 subnet index


@torch.no_grad()
def upscale_routed(net: nn.Module, lr: np.ndarray, scale: int, specs: list[SubnetSpec], thresholds,
                   class_map: np.ndarray | None, patch: int = PROTOCOL_PATCH,
                   overlap: int = PROTOCOL_OVERLAP) -> Routed:
    """Tile under the ClassSR protocol, class every tile, run it through its subnet, average the overlaps.

    `class_map=None` runs the full (last) subnet on every tile.
    """
    frame = to_chw(lr)
    plan = plan_tiles(frame.shape[1], frame.shape[2], patch, overlap, blend=True)
    tiles = extract_tiles(frame, plan)
    classes = descriptor.classify(descriptor.patch_scores(torch.from_numpy(tiles)),
                                  torch.as_tensor(thresholds)).numpy()
    subnets = np.full(len(tiles), len(specs) - 1) if class_map is None else np.asarray(class_map)[classes - 1]
    out = None
    for m in np.unique(subnets):
        idx = np.flatnonzero(subnets == m)
        y = run_tiles(net, tiles[idx], specs[m])
        out = np.zeros((len(tiles), *y.shape[1:]), np.float32) if out is None else out
        out[idx] = y
    return Routed(to_uint8(stitch_tiles(out, plan, scale)), plan, classes, subnets)


def tile_psnr_y(sr: np.ndarray, hr: np.ndarray, boxes: np.ndarray, scale: int) -> np.ndarray:
    """Y-PSNR of each LR box's region of two (H, W, 3) uint8 images (no border crop): (n,) float64."""
    ysr, yhr = rgb_to_y(sr), rgb_to_y(hr)
    return np.array([psnr(ysr[y0 * scale:y1 * scale, x0 * scale:x1 * scale],
                          yhr[y0 * scale:y1 * scale, x0 * scale:x1 * scale]) for y0, x0, y1, x1 in boxes])


def _scores(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    return {"psnr_y": psnr_y(sr, hr, scale), "ssim_y": ssim_y(sr, hr, scale), "psnr_rgb": psnr_rgb(sr, hr, scale)}


def _mean_rows(per_image: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in per_image])) for k in per_image[0]}


def evaluate_model(net: nn.Module, ckpt: dict, pairs: list, class_map: np.ndarray) -> dict:
    """The full evaluation report of a checkpoint's supernet on (name, lr, hr) uint8 pairs (JSON-able).

    rows: bicubic; every subnet on the whole frame; the full subnet tiled (protocol); dynamic routing (protocol).
    per_class: Y-PSNR of the full subnet's tiles, by descriptor class (the paper's Fig. 4).
    """
    scale, specs, flops = ckpt["model_config"]["scale"], [SubnetSpec(*s) for s in ckpt["specs"]], ckpt["flops"]
    rows = [{"method": "bicubic", **_mean_rows([_scores(imresize(lr, scale), hr, scale)
                                                  for _, lr, hr in pairs])}]
    for m, spec in enumerate(specs):
        scores = _mean_rows([_scores(upscale_whole(net, lr, spec), hr, scale) for _, lr, hr in pairs])
        rows.append({"method": f"subnet {m} (w{spec.width} d{spec.depth}) whole frame", **scores,
                     "flops_per_patch": flops[m], "flops_pct": 100.0 * flops[m] / flops[-1]})
    full_runs = [(upscale_routed(net, lr, scale, specs, ckpt["thresholds"], None), hr) for _, lr, hr in pairs]
    dyn_runs = [(upscale_routed(net, lr, scale, specs, ckpt["thresholds"], class_map), hr) for _, lr, hr in pairs]
    for label, runs in [("full subnet, tiled", full_runs), ("dynamic, tiled", dyn_runs)]:
        subnets = np.concatenate([r.subnets for r, _ in runs])
        rows.append({"method": label, **_mean_rows([_scores(r.sr, hr, scale) for r, hr in runs]),
                     "flops_pct": 100.0 * float(np.mean(np.asarray(flops)[subnets])) / flops[-1],
                     "patches_per_subnet": np.bincount(subnets, minlength=len(specs)).tolist()})
    tile_psnr = np.concatenate([tile_psnr_y(r.sr, hr, r.plan.boxes, scale) for r, hr in full_runs])
    classes = np.concatenate([r.classes for r, _ in full_runs])
    per_class = [{"class": k, "patches": int((classes == k).sum()),
                  "psnr_y_full": float(np.mean(tile_psnr[classes == k])) if (classes == k).any() else None}
                 for k in range(1, ckpt["num_classes"] + 1)]
    return {"scale": scale, "images": len(pairs), "class_to_subnet": np.asarray(class_map).tolist(),
            "rows": rows, "per_class": per_class}
