"""Calibration of the gradient-projection router (METHOD.md section 5).

On validation images, every subnet upscales every protocol tile; the mean Y-PSNR of subnet m on the tiles of
class k fills a K x M table. The class -> subnet map for a tolerance is derived from it (cheapest subnet within
`tolerance` dB of the class's best), and the table travels on so the runtime can re-derive maps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wbsr_runtime.routing import tolerance_map

from .config import SubnetSpec
from .evaluate import tile_psnr_y, upscale_routed

DEFAULT_TOLERANCE_DB = 0.15  # see the README design notes


@torch.no_grad()
def psnr_table(net: nn.Module, ckpt: dict, pairs: list) -> tuple[np.ndarray, np.ndarray]:
    """(K, M) mean tile Y-PSNR of every subnet on every class, and (K,) tile counts per class.

    A class with no validation tiles takes the mean row of all tiles, so every class has a map entry.
    """
    scale, k_count = ckpt["model_config"]["scale"], ckpt["num_classes"]
    specs = [SubnetSpec(*s) for s in ckpt["specs"]]
    per_subnet, classes = [], None
    for m in range(len(specs)):
        only_m = np.full(k_count, m)
        runs = [(upscale_routed(net, lr, scale, specs, ckpt["thresholds"], only_m), hr) for _, lr, hr in pairs]
        per_subnet.append(np.concatenate([tile_psnr_y(r.sr, hr, r.plan.boxes, scale) for r, hr in runs]))
        classes = np.concatenate([r.classes for r, _ in runs])
    tiles = np.stack(per_subnet, axis=1)  # (n, M)
    tiles = np.minimum(tiles, 100.0)  # a perfectly flat tile would be inf
    counts = np.bincount(classes, minlength=k_count + 1)[1:]
    table = np.array([tiles[classes == k].mean(0) if counts[k - 1] else tiles.mean(0)
                      for k in range(1, k_count + 1)])
    return table, counts


def calibrate(net: nn.Module, ckpt: dict, pairs: list, tolerance_db: float = DEFAULT_TOLERANCE_DB) -> dict:
    """The checkpoint's `calibration` entry: table, tile counts, tolerance and the derived map."""
    table, counts = psnr_table(net, ckpt, pairs)
    return {"psnr_table": table.round(4).tolist(), "class_counts": counts.tolist(), "tolerance_db": tolerance_db,
            "class_to_subnet": tolerance_map(table, tolerance_db).tolist()}
