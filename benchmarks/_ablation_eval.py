"""Evaluation core of `ablation.py`: tile each image once, run every needed subnet once per tile, then stitch
and score any number of per-tile subnet assignments from those outputs.

An assignment is a list (one entry per image) of (n_tiles,) int arrays of subnet indices, cheapest first.
Stitching the chosen subnet's output of every tile is what `wbsr_train.evaluate.upscale_routed` does for a
class map; here the same tile outputs serve every routing rule, so a sweep costs one network pass per subnet.
Protocol (METHOD.md sections 5-6): 32x32 LR tiles at step 28, overlaps averaged, Y-PSNR/SSIM with border = scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from wbsr_runtime.routing import eq15_map, tolerance_map
from wbsr_runtime.tiling import TilePlan, extract_tiles, plan_tiles, stitch_tiles
from wbsr_train import descriptor
from wbsr_train.evaluate import (
    PROTOCOL_OVERLAP,
    PROTOCOL_PATCH,
    psnr_y,
    run_tiles,
    ssim_y,
    tile_psnr_y,
    to_chw,
    to_uint8,
)

TOLERANCES_DB = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 100.0)
LAMBDAS_DB = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 1000.0)  # dB per full-model cost


@dataclass
class TiledImage:
    name: str
    hr: np.ndarray  # (H, W, 3) uint8, mod-cropped
    plan: TilePlan
    tiles: np.ndarray  # (n, 3, 32, 32) float32 in [0, 1]
    scores: np.ndarray  # (n,) float32 descriptor scores


def tile_images(pairs: list) -> list[TiledImage]:
    """(name, lr, hr) uint8 pairs -> the protocol tiling of each LR frame, with descriptor scores."""
    images = []
    for name, lr, hr in pairs:
        frame = to_chw(lr)
        plan = plan_tiles(frame.shape[1], frame.shape[2], PROTOCOL_PATCH, PROTOCOL_OVERLAP, blend=True)
        tiles = extract_tiles(frame, plan)
        images.append(TiledImage(name, hr, plan, tiles, descriptor.patch_scores(torch.from_numpy(tiles)).numpy()))
    return images


def classify(images: list[TiledImage], thresholds: list[float]) -> list[np.ndarray]:
    """Class in 1..K of every tile, per image, with a checkpoint's thresholds."""
    t = torch.as_tensor(thresholds)
    return [descriptor.classify(torch.from_numpy(im.scores), t).numpy() for im in images]


@torch.no_grad()
def score_assignments(net, specs, flops, scale: int, images: list[TiledImage], assignments: dict[str, list],
                      ssim_for=(), tile_psnr_for=()) -> dict[str, dict]:
    """Mean Y-PSNR (and SSIM for `ssim_for`) over images of each assignment, with its FLOPs (% of full, the
    paper's convention: per 32x32 patch, averaged over all tiles) and, for `tile_psnr_for`, every tile's
    Y-PSNR (concatenated over images, capped at 100 dB for flat tiles)."""
    acc = {name: {"psnr_y": [], "ssim_y": [], "tile_psnr": []} for name in assignments}
    for i, im in enumerate(tqdm(images, desc="evaluate", leave=False)):
        needed = np.unique(np.concatenate([np.asarray(a[i]) for a in assignments.values()]))
        outs = {int(m): run_tiles(net, im.tiles, specs[m]) for m in needed}
        for name, assign in assignments.items():
            a = np.asarray(assign[i])
            out = np.empty_like(outs[int(needed[0])])
            for m in np.unique(a):
                out[a == m] = outs[int(m)][a == m]
            sr = to_uint8(stitch_tiles(out, im.plan, scale))
            acc[name]["psnr_y"].append(psnr_y(sr, im.hr, scale))
            if name in ssim_for:
                acc[name]["ssim_y"].append(ssim_y(sr, im.hr, scale))
            if name in tile_psnr_for:
                acc[name]["tile_psnr"].append(np.minimum(tile_psnr_y(sr, im.hr, im.plan.boxes, scale), 100.0))
    flops = np.asarray(flops, dtype=np.float64)
    results = {}
    for name, assign in assignments.items():
        a = np.concatenate(assign).astype(np.int64)
        r = {"psnr_y": float(np.mean(acc[name]["psnr_y"])), "flops_pct": 100.0 * float(flops[a].mean()) / flops[-1],
             "patches_per_subnet": np.bincount(a, minlength=len(flops)).tolist()}
        if acc[name]["ssim_y"]:
            r["ssim_y"] = float(np.mean(acc[name]["ssim_y"]))
        if acc[name]["tile_psnr"]:
            r["tile_psnr"] = np.concatenate(acc[name]["tile_psnr"])
        results[name] = r
    return results


def per_class(tile_psnr: np.ndarray, classes: list[np.ndarray], num_classes: int) -> list[dict]:
    """Fig. 4: mean tile Y-PSNR by descriptor class (None for a class with no tiles)."""
    c = np.concatenate(classes)
    return [{"class": k, "patches": int((c == k).sum()),
             "psnr_y": float(tile_psnr[c == k].mean()) if (c == k).any() else None} for k in range(1, num_classes + 1)]


def class_table(tile_psnr: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, M) tile PSNRs of every subnet -> the (K, M) calibration table, by the rule of
    `wbsr_train.calibrate.psnr_table` (class means; a class without tiles takes the mean of all tiles)."""
    return np.array([tile_psnr[classes == k].mean(0) if (classes == k).any() else tile_psnr.mean(0)
                     for k in range(1, num_classes + 1)])


def arm_fit(scores: np.ndarray, tile_psnr: np.ndarray) -> np.ndarray:
    """ARM's edge-score -> PSNR predictor, one per subnet: a least-squares line, (M, 2) [slope, intercept]."""
    return np.array([np.polyfit(scores.astype(np.float64), tile_psnr[:, m], 1) for m in range(tile_psnr.shape[1])])


def routing_assignments(images: list[TiledImage], classes: list[np.ndarray], table: np.ndarray,
                        arm_coef: np.ndarray, flops, draws: int, seed: int) -> dict[str, dict]:
    """Per-tile assignments of every routing rule, deduplicated: {name: {"rule", "param", "assign"}}.

    eq15: the paper's map. calibrated: tolerance_map over TOLERANCES_DB. arm: per tile, argmax over subnets of
    predicted PSNR - lambda x cost (cost = FLOPs / full), over LAMBDAS_DB. random: the tiles' subnets of each
    eq15/calibrated assignment shuffled over all tiles (same histogram, so the same FLOPs), `draws` times.
    """
    k_count, m_count = table.shape
    cost = np.asarray(flops, dtype=np.float64) / max(flops)
    sizes = np.cumsum([len(c) for c in classes])[:-1]
    by_map = lambda cmap: [np.asarray(cmap)[c - 1] for c in classes]  # noqa: E731
    out: dict[str, dict] = {"eq15": {"rule": "eq15", "param": None, "assign": by_map(eq15_map(k_count, m_count))}}
    seen = set()
    for tol in TOLERANCES_DB:
        cmap = tolerance_map(table, tol)
        if tuple(cmap) not in seen:
            seen.add(tuple(cmap))
            out[f"calibrated tol={tol:g}"] = {"rule": "calibrated", "param": tol, "assign": by_map(cmap)}
    seen_arm = set()
    for lam in LAMBDAS_DB:
        assign = [np.argmax(np.polyval(arm_coef.T, im.scores[:, None].astype(np.float64)) - lam * cost, axis=1)
                  for im in images]
        key = np.concatenate(assign).tobytes()
        if key not in seen_arm:
            seen_arm.add(key)
            out[f"arm lambda={lam:g}"] = {"rule": "arm", "param": lam, "assign": assign}
    rng = np.random.default_rng(seed)
    for name in [n for n, v in out.items() if v["rule"] in ("eq15", "calibrated")]:
        flat = np.concatenate(out[name]["assign"])
        for d in range(draws):
            out[f"random of {name} #{d}"] = {"rule": "random", "param": name,
                                             "assign": np.split(rng.permutation(flat), sizes)}
    return out


def routing_curves(assignments: dict[str, dict], scored: dict[str, dict]) -> dict[str, list[dict]]:
    """{rule: [{"param", "flops_pct", "psnr_y"}, ...] sorted by FLOPs}; random draws of one map averaged."""
    curves: dict[str, dict] = {}
    for name, spec in assignments.items():
        key = spec["param"] if spec["rule"] == "random" else name
        point = curves.setdefault(spec["rule"], {}).setdefault(key, {"param": spec["param"], "psnr_draws": []})
        point["flops_pct"] = scored[name]["flops_pct"]
        point["psnr_draws"].append(scored[name]["psnr_y"])
    result = {}
    for rule, points in curves.items():
        rows = [{"param": p["param"], "flops_pct": p["flops_pct"], "psnr_y": float(np.mean(p["psnr_draws"])),
                 **({"psnr_draws": p["psnr_draws"]} if rule == "random" else {})} for p in points.values()]
        result[rule] = sorted(rows, key=lambda r: r["flops_pct"])
    return result


def psnr_at(curve: list[dict], flops_pct: float, tol_pct: float = 0.5) -> float | None:
    """A rule's PSNR at `flops_pct`, linearly interpolated between its points; None outside its range."""
    x = np.array([p["flops_pct"] for p in curve])
    y = np.array([p["psnr_y"] for p in curve])
    if flops_pct < x.min() - tol_pct or flops_pct > x.max() + tol_pct:
        return None
    return float(np.interp(flops_pct, x, y))
