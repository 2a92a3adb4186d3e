"""MATLAB-compatible bicubic resize (`imresize(img, scale)` with its defaults) and LR synthesis.

MATLAB's algorithm: cubic kernel a = -0.5, widened by 1/scale when downscaling (antialiasing), symmetric
border padding, two separable 1-D passes (the dimension with the smaller scale first; height first for equal
scales). For uint8 input MATLAB rounds to uint8 after *each* pass; doing the same is what reproduces the
benchmark's MATLAB-made LR files (METHOD.md section 4). Each pass is a gather of ~4/scale taps per output
pixel, never a dense (out x in) matrix, so a 3000x2000 image takes a fraction of a second.
"""

from __future__ import annotations

import math

import numpy as np

KERNEL_WIDTH = 4.0  # support of the bicubic kernel, in input pixels at scale 1


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`), elementwise on float64."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


def contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Taps of one 1-D pass: (out_len, P) int64 input indices (symmetric padding applied) and float64 weights.

    Mirrors MATLAB's `contributions`: output pixel i (1-based) maps to u = i/scale + (1 - 1/scale)/2;
    weights are normalised to sum 1; taps whose weight is zero for every output pixel are dropped.
    """
    antialias = scale < 1
    width = KERNEL_WIDTH / scale if antialias else KERNEL_WIDTH
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may leave [1, in_len]
    dist = u[:, None] - idx
    weights = scale * cubic(scale * dist) if antialias else cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    # Symmetric padding: ... 2 1 | 1 2 ... n | n n-1 ...
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)
    return idx[:, keep], weights[:, keep]


def _resize_axis(img: np.ndarray, axis: int, out_len: int, scale: float) -> np.ndarray:
    """One 1-D pass along `axis` (0 = height, 1 = width) of a float64 (H, W, C) array."""
    idx, weights = contributions(img.shape[axis], out_len, scale)
    shape = [1, 1, 1]
    shape[axis] = out_len
    out = None
    for k in range(idx.shape[1]):
        term = np.take(img, idx[:, k], axis=axis) * weights[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and round half away from zero, as MATLAB's double -> uint8 conversion."""
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def output_size(in_len: int, scale: float) -> int:
    """MATLAB's ceil(scale * in_len), tolerant of float error (1/3 * 255 must give 85, not 86)."""
    return int(math.ceil(in_len * scale - 1e-9))


def imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB `imresize(img, scale)` (bicubic, antialiased when downscaling).

    img: (H, W, C) or (H, W), uint8 or float (any range; floats are not clipped). Returns (ceil(H*scale),
    ceil(W*scale)[, C]) of the input's dtype: uint8 input is rounded and clipped after each 1-D pass, as
    MATLAB does; float input is computed in float64 and cast back.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    squeeze = img.ndim == 2
    x = img[:, :, None] if squeeze else img
    if x.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {img.shape}")
    is_uint8 = x.dtype == np.uint8
    out = x.astype(np.float64)
    for axis in (0, 1):  # equal scales: MATLAB goes dim 1 (height), then dim 2 (width)
        out = _resize_axis(out, axis, output_size(x.shape[axis], scale), scale)
        if is_uint8:
            out = _to_uint8(out).astype(np.float64) if axis == 0 else _to_uint8(out)
    if not is_uint8:
        out = out.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)
    return out[:, :, 0] if squeeze else out


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop (H, W, ...) to (H - H % scale, W - W % scale, ...), keeping the top-left corner (a view)."""
    h, w = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    return img[:h, :w]


def make_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """LR image of a mod-cropped HR image: (H, W, 3) uint8 -> (H/scale, W/scale, 3) uint8, MATLAB bicubic."""
    if hr.dtype != np.uint8:
        raise ValueError(f"make_lr expects uint8, got {hr.dtype}")
    if hr.shape[0] % scale or hr.shape[1] % scale:
        raise ValueError(f"HR size {hr.shape[:2]} is not a multiple of the scale {scale}: mod_crop it first")
    return imresize(hr, 1.0 / scale)
