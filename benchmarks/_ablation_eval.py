"""Evaluation core of `ablation.py`, on the shared engine (`wbsr_train.evaluate.tiled_runs`): every image is
tiled once and every subnet runs once over its tiles; any number of per-tile subnet assignments (routing rules)
is then stitched and scored from those outputs, so a sweep costs one network pass per subnet.

An assignment is a list (one entry per image) of (n_tiles,) int arrays of subnet indices, cheapest first.
Protocol (METHOD.md sections 5-6): 32x32 LR tiles at step 28, overlaps averaged, Y-PSNR/SSIM with border = scale.
"""

from __future__ import annotations

import numpy as np

from wbsr_runtime import routing
from wbsr_train.evaluate import TiledRun, psnr_y, ssim_y

BUDGETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # knapsack sweep (FLOPs)
LAMBDAS_DB = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 1000.0)  # dB per full-model cost


def score_assignments(runs: list[TiledRun], flops, scale: int, assignments: dict[str, list],
                      ssim_for=()) -> dict[str, dict]:
    """Mean Y-PSNR (and SSIM for `ssim_for`) over images of each assignment, with its FLOPs (% of full, the
    paper's convention: per 32x32 patch, averaged over all tiles) and how many tiles each subnet served."""
    flops = np.asarray(flops, dtype=np.float64)
    results = {}
    for name, assign in assignments.items():
        images = [run.stitch(a, scale) for run, a in zip(runs, assign, strict=True)]
        a = np.concatenate(assign).astype(np.int64)
        r = {"psnr_y": float(np.mean([psnr_y(sr, run.hr, scale) for sr, run in zip(images, runs, strict=True)])),
             "flops_pct": 100.0 * float(flops[a].mean()) / flops[-1],
             "tiles_per_subnet": np.bincount(a, minlength=len(flops)).tolist()}
        if name in ssim_for:
            r["ssim_y"] = float(np.mean([ssim_y(sr, run.hr, scale) for sr, run in zip(images, runs, strict=True)]))
        results[name] = r
    return results


def tile_psnr(runs: list[TiledRun], scale: int) -> np.ndarray:
    """(n, M) Y-PSNR of every tile (all images) from every subnet, capped at 100 dB for flat tiles."""
    per_image = []
    for run in runs:
        err, pix = run.squared_errors(scale)
        per_image.append(10 * np.log10(255.0**2 * pix[None] / np.maximum(err, 1e-12)).T)
    return np.minimum(np.concatenate(per_image), 100.0)


def per_class(runs: list[TiledRun], scale: int, num_classes: int) -> list[dict]:
    """Fig. 4: the full subnet's Y-PSNR by descriptor class (pooled squared error; None without tiles)."""
    err = np.concatenate([run.squared_errors(scale)[0][-1] for run in runs])
    pix = np.concatenate([run.squared_errors(scale)[1] for run in runs])
    c = np.concatenate([run.classes for run in runs])
    return [{"class": k, "patches": int((c == k).sum()),
             "psnr_y": float(10 * np.log10(255.0**2 * pix[c == k].sum() / err[c == k].sum())) if (c == k).any()
             else None} for k in range(1, num_classes + 1)]


def arm_fit(scores: np.ndarray, psnr: np.ndarray) -> np.ndarray:
    """ARM's edge-score -> PSNR predictor, one per subnet: a least-squares line, (M, 2) [slope, intercept]."""
    return np.array([np.polyfit(scores.astype(np.float64), psnr[:, m], 1) for m in range(psnr.shape[1])])


def routing_assignments(runs: list[TiledRun], cal: dict, arm_coef: np.ndarray, flops, draws: int,
                        seed: int) -> dict[str, dict]:
    """Per-tile assignments of every routing rule, deduplicated: {name: {"rule", "param", "assign"}}.

    eq15: the paper's map. calibrated: the exact knapsack map on the MSE table (`cal`: mse_table, class_freq)
    at every budget of BUDGETS. arm: per tile, argmax over subnets of predicted PSNR - lambda x cost (cost =
    FLOPs / full), over LAMBDAS_DB. random: the tiles' subnets of each eq15/calibrated assignment shuffled over
    all tiles (same histogram, so the same FLOPs), `draws` times.
    """
    table, freq = np.asarray(cal["mse_table"]), np.asarray(cal["class_freq"])
    flops = np.asarray(flops, dtype=np.float64)
    sizes = np.cumsum([run.plan.num_tiles for run in runs])[:-1]
    by_map = lambda cmap: [np.asarray(cmap)[run.classes - 1] for run in runs]  # noqa: E731
    eq15 = routing.eq15_map(*table.shape)
    out: dict[str, dict] = {"eq15": {"rule": "eq15", "param": None, "assign": by_map(eq15)}}
    seen = set()
    for budget in BUDGETS:
        cmap = routing.budget_map(table, freq, flops, budget)
        if tuple(cmap) not in seen:
            seen.add(tuple(cmap))
            out[f"calibrated budget={budget:g}"] = {"rule": "calibrated", "param": budget, "assign": by_map(cmap)}
    seen_arm = set()
    cost = flops / flops[-1]
    for lam in LAMBDAS_DB:
        assign = [np.argmax(np.polyval(arm_coef.T, run.scores[:, None].astype(np.float64)) - lam * cost, axis=1)
                  for run in runs]
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
