"""The gradient descriptor that classes patches, in training (HES) and at inference (the router).

score = mean(|grad|) + std(|grad|) of the Sobel gradient magnitude of the BT.601 luma of an LR patch in
[0, 1], over the patch's interior ("valid" convolution: no padding, so a patch's score depends on its
pixels alone and a whole-frame gradient map gives the same numbers). Thresholds are K-1 pool quantiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# BT.601 luma as MATLAB's rgb2ycbcr computes it (also used for Y-PSNR), for RGB in [0, 1].
Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
Y_OFFSET = 16.0 / 255.0
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def gradient_magnitude(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) in [0, 1] -> (N, 1, h-2, w-2) Sobel gradient magnitude of the luma."""
    y = (rgb * rgb.new_tensor(Y_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True) + Y_OFFSET
    kx = rgb.new_tensor(SOBEL_X).view(1, 1, 3, 3)
    kernels = torch.cat([kx, kx.transpose(2, 3)])
    g = F.conv2d(y, kernels)
    return torch.sqrt(g[:, :1] ** 2 + g[:, 1:] ** 2)


def patch_scores(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) in [0, 1], h, w >= 3 -> (N,) float32 scores (mean + population std of |grad|)."""
    g = gradient_magnitude(rgb.float()).flatten(1)
    return g.mean(1) + g.std(1, correction=0)


def box_scores(frame: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Scores (n,) of the boxes (n, 4) int64 `y0, x0, y1, x1` (each >= 3 x 3) of one (3, H, W) frame in
    [0, 1]: `patch_scores` of each crop, boxes of one size scored in one batch."""
    scores = torch.empty(len(boxes), dtype=torch.float32)
    sizes = boxes[:, 2:] - boxes[:, :2]
    for size in torch.unique(sizes, dim=0):
        idx = torch.nonzero((sizes == size).all(1)).flatten()
        scores[idx] = patch_scores(torch.stack([frame[:, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes[idx].tolist()]))
    return scores


def thresholds_from_pool(scores: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 7: the K-1 interior quantiles t_k = sorted[floor(k N / K)], k = 1..K-1, of a pool of scores."""
    ordered = torch.sort(scores.flatten().double()).values
    n = ordered.numel()
    if n < num_classes:
        raise ValueError(f"need at least {num_classes} pool patches, got {n}")
    idx = torch.tensor([k * n // num_classes for k in range(1, num_classes)])
    return ordered[idx]


