"""Calibration of the gradient-projection router (METHOD.md section 5).

On a calibration split of the training distribution (images set aside from training, `--holdout`), every
subnet upscales every tile of the runtime's default grid (`evaluate.RUNTIME`: 32 x 32 cores with 2 pixels of
context); the Y-channel squared error of subnet m summed over the cores of class k, divided by their pixels,
fills a K x M MSE table, and the share of pixels in each class gives the class frequencies. Image PSNR is a
function of the MSE over all pixels, so the map for a budget or a tolerance is chosen on the frequency-weighted
MSE (`wbsr_runtime.routing`); the table travels in the bundle so the runtime can re-derive maps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wbsr_runtime import routing

from .checkpoint import Checkpoint
from .evaluate import RUNTIME, Tiling, tiled_runs

DEFAULT_TOLERANCE_DB = 0.05  # predicted image PSNR loss against the full subnet (README: the trade-off curve)


@torch.no_grad()
def mse_table(net: nn.Module, ckpt: Checkpoint, pairs: list, tiling: Tiling = RUNTIME) -> dict:
    """(K, M) Y MSE of every subnet on the cores of every class, (K,) pixel share of each class, tile count.

    A class without calibration tiles gets frequency 0 and the mean row of all tiles (it then follows the
    nearest class in every map, see `routing.pareto_maps`).
    """
    scale, k_count = ckpt.model_config["scale"], ckpt.num_classes
    errors, pixels, classes = [], [], []
    for run in tiled_runs(net, pairs, list(ckpt.specs), list(ckpt.thresholds), tiling, progress="calibrate"):
        err, pix = run.squared_errors(scale)
        errors.append(err)
        pixels.append(pix)
        classes.append(run.classes)
    errors, pixels, classes = np.concatenate(errors, axis=1), np.concatenate(pixels), np.concatenate(classes)
    class_pixels = np.array([pixels[classes == k].sum() for k in range(1, k_count + 1)])
    mean_row = errors.sum(axis=1) / pixels.sum()
    table = np.array([errors[:, classes == k].sum(axis=1) / class_pixels[k - 1] if class_pixels[k - 1] else mean_row
                      for k in range(1, k_count + 1)])
    return {"mse_table": table, "class_freq": class_pixels / class_pixels.sum(), "tiles": int(len(classes))}


def calibrate(net: nn.Module, ckpt: Checkpoint, pairs: list, tolerance_db: float | None = None,
              budget: float | None = None) -> dict:
    """The checkpoint's `calibration` entry: MSE table, class frequencies, the knob and the map it gives
    (by FLOPs): the cheapest map within `tolerance_db` of the full subnet's predicted PSNR, or the best map
    within `budget` x its FLOPs; the default tolerance when neither is given."""
    if tolerance_db is not None and budget is not None:
        raise ValueError("give a tolerance or a budget, not both")
    stats = mse_table(net, ckpt, pairs)
    flops = np.asarray(ckpt.flops, dtype=np.float64)
    if budget is None:
        tolerance_db = DEFAULT_TOLERANCE_DB if tolerance_db is None else tolerance_db
        class_map = routing.tolerance_map(stats["mse_table"], stats["class_freq"], flops, tolerance_db)
    else:
        class_map = routing.budget_map(stats["mse_table"], stats["class_freq"], flops, budget)
    predicted = routing.predict(stats["mse_table"], stats["class_freq"], class_map, flops)
    return {"mse_table": stats["mse_table"].tolist(), "class_freq": stats["class_freq"].tolist(),
            "tiles": stats["tiles"], "images": len(pairs), "tiling": [RUNTIME.patch, RUNTIME.overlap],
            "tolerance_db": tolerance_db, "budget": budget, "class_to_subnet": class_map.tolist(),
            "predicted_loss_db": predicted.loss_db, "predicted_flops_ratio": predicted.cost}
