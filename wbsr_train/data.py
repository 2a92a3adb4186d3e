"""Training and validation data: image reading, folder listing, LR synthesis, random aligned patches.

Everything here works on numpy: images are (H, W, 3) uint8 RGB, patches (N, 3, p, p) float32 in [0, 1].
The bicubic itself lives in `imresize.py` (re-exported here).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wbsr_runtime.media import IMAGE_EXTS, MediaError, read_image

from .imresize import imresize, make_lr, mod_crop

__all__ = [
    "TrainSet",
    "augment",
    "holdout_split",
    "imresize",
    "is_lr_folder",
    "list_images",
    "load_pairs",
    "make_lr",
    "mod_crop",
    "read_rgb8",
]

log = logging.getLogger(__name__)

def read_rgb8(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, read by the runtime's reader (`wbsr_runtime.media.read_image`:
    upright per EXIF, any mode Pillow reads, MediaError naming the file for anything unreadable); alpha is
    dropped (training uses RGB only) and 16-bit samples are rounded to 8 bits (v / 257), i.e. training sees
    8-bit data."""
    rgb = read_image(path).rgb
    return rgb if rgb.dtype == np.uint8 else ((rgb.astype(np.uint32) + 128) // 257).astype(np.uint8)


def is_lr_folder(name: str) -> bool:
    """A folder of low-resolution copies: `LR_bicubic`, `LR*`, `*_LR_*` (benchmark and DIV2K layouts)."""
    return name.startswith("LR") or "_LR_" in name or name.endswith("_LR")


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


def _walk_images(folder: Path, skip_lr: bool) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (skip_lr and is_lr_folder(d))]
        found += [Path(root) / f for f in files if not f.startswith(".") and _is_image_name(f)]
    return found


def list_images(folders: Sequence[str | Path], skip_lr: bool = True) -> list[Path]:
    """All image files under `folders`, recursively, sorted, without duplicates.

    With `skip_lr` (default) sub-folders holding LR copies (see `is_lr_folder`) are not entered, so a
    benchmark set (`Set5/HR`, `Set5/LR_bicubic/X4`) or DIV2K (`DIV2K_train_HR`, `DIV2K_train_LR_bicubic`)
    yields only its HR images. A missing folder, or one without images, raises ValueError.
    """
    if isinstance(folders, (str, Path)):
        folders = [folders]
    paths: set[Path] = set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ValueError(f"image folder {folder} does not exist or is not a folder")
        found = _walk_images(folder, skip_lr)
        if not found:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {folder}")
        paths.update(found)
    return sorted(paths)


def holdout_split(paths: Sequence[Path], folders: Sequence[str | Path], fraction: float) -> tuple[list, list]:
    """(kept, held out) by a fixed hash of each image's path relative to the folder it was found under.

    An image is held out when sha256 of that relative path (posix), read as a number in [0, 1), is below
    `fraction`: the split is the same on every machine and run, does not depend on which other images are
    present, and grows monotonically with `fraction`. Held-out images are the calibration split.
    """
    roots = [Path(f) for f in folders]
    kept, held = [], []
    for path in paths:
        root = next(r for r in roots if path.is_relative_to(r))
        digest = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else kept).append(path)
    return kept, held


def _lr_index(lr_folders: Sequence[str | Path], scale: int) -> dict[str, Path]:
    """LR files by the stem of their HR image: `0001x4.png` and `0001.png` both answer to `0001`."""
    index = {}
    for p in list_images(lr_folders, skip_lr=False):
        stem = p.stem
        if stem.lower().endswith(f"x{scale}"):
            stem = stem[: -len(f"x{scale}")]
        index[stem] = p
    return index


def _load_pair(path: Path, scale: int, lr_index: dict[str, Path] | None) -> tuple[np.ndarray, np.ndarray]:
    """(HR mod-cropped (H, W, 3), LR (H/s, W/s, 3)) uint8 for one HR file; LR made or read from lr_index."""
    hr = np.ascontiguousarray(mod_crop(read_rgb8(path), scale))
    if lr_index is None:
        return hr, make_lr(hr, scale)
    if path.stem not in lr_index:
        raise ValueError(f"no LR image for {path} in the LR folders")
    lr = read_rgb8(lr_index[path.stem])
    if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
        raise ValueError(
            f"LR {lr_index[path.stem]} is {lr.shape[1]}x{lr.shape[0]}, expected "
            f"{hr.shape[1] // scale}x{hr.shape[0] // scale} for {path} at x{scale}"
        )
    return hr, lr


class TrainSet:
    """HR/LR training images held in memory as uint8, and the random aligned patches drawn from them.

    `hr[i]` is (H, W, 3) uint8 mod-cropped to `scale`; `lr[i]` is (H/s, W/s, 3) uint8, made with MATLAB
    bicubic (`make_lr`) or read from `lr_folders` (matched by file stem, `name` or `namex{s}`).
    An unreadable image raises MediaError, or with `skip_bad` is skipped and counted in `skipped`.
    `holdout`: the fraction of images set aside (`holdout_split`), listed in `held_out`, never loaded.
    """

    def __init__(
        self,
        folders: Sequence[str | Path],
        scale: int,
        skip_bad: bool = False,
        lr_folders: Sequence[str | Path] | None = None,
        holdout: float = 0.0,
    ) -> None:
        self.scale = scale
        self.hr: list[np.ndarray] = []
        self.lr: list[np.ndarray] = []
        self.names: list[str] = []
        self.skipped = 0
        lr_index = _lr_index(lr_folders, scale) if lr_folders is not None else None
        paths, held = holdout_split(list_images(folders), folders, holdout)
        self.held_out = [str(p) for p in held]
        for path in tqdm(paths, desc=f"loading x{scale} training images", unit="img", leave=False):
            try:
                hr, lr = _load_pair(path, scale, lr_index)
            except MediaError as e:
                if not skip_bad:
                    raise
                log.warning("skipping %s", e)
                self.skipped += 1
                continue
            self.hr.append(hr)
            self.lr.append(lr)
            self.names.append(str(path))
        if not self.hr:
            raise ValueError(f"no readable training images under {', '.join(map(str, folders))}")
        log.info("loaded %d training images (%d skipped, %d held out)", len(self.hr), self.skipped, len(held))

    def __len__(self) -> int:
        return len(self.hr)

    def position_counts(self, lr_patch: int) -> np.ndarray:
        """(len,) int64: number of valid LR crop origins per image (0 for images smaller than the patch)."""
        h = np.array([im.shape[0] for im in self.lr], dtype=np.int64) - lr_patch + 1
        w = np.array([im.shape[1] for im in self.lr], dtype=np.int64) - lr_patch + 1
        return np.clip(h, 0, None) * np.clip(w, 0, None)

    def too_small(self, lr_patch: int) -> int:
        """How many images are smaller than an LR patch of `lr_patch` (HR patch lr_patch * scale)."""
        return int((self.position_counts(lr_patch) == 0).sum())

    def random_positions(self, n: int, lr_patch: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 3) int64 rows (image index, y, x) of LR crop origins, uniform over all possible patches.

        An image is picked with probability proportional to its number of valid origins; images smaller
        than the patch are never picked.
        """
        counts = self.position_counts(lr_patch)
        total = int(counts.sum())
        if total == 0:
            raise ValueError(f"every training image is smaller than the LR patch {lr_patch}")
        ends = np.cumsum(counts)
        flat = rng.integers(0, total, size=n, dtype=np.int64)
        img = np.searchsorted(ends, flat, side="right")
        offset = flat - (ends[img] - counts[img])
        widths = np.array([im.shape[1] for im in self.lr], dtype=np.int64)[img] - lr_patch + 1
        return np.stack([img, offset // widths, offset % widths], axis=1).astype(np.int64)

    def crops(self, positions: np.ndarray, lr_patch: int) -> tuple[np.ndarray, np.ndarray]:
        """Aligned patches at `positions` ((n, 3) rows of image, y, x as from `random_positions`).

        Returns LR (n, 3, p, p) and HR (n, 3, p*s, p*s) float32 in [0, 1], HR origin = LR origin * s.
        """
        p, s = lr_patch, self.scale
        lr = np.empty((len(positions), 3, p, p), dtype=np.float32)
        hr = np.empty((len(positions), 3, p * s, p * s), dtype=np.float32)
        for j, (i, y, x) in enumerate(np.asarray(positions, dtype=np.int64)):
            lr[j] = self.lr[i][y : y + p, x : x + p].transpose(2, 0, 1)
            hr[j] = self.hr[i][y * s : (y + p) * s, x * s : (x + p) * s].transpose(2, 0, 1)
        lr /= 255.0
        hr /= 255.0
        return lr, hr


def augment(lr: np.ndarray, hr: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal flip, vertical flip and transpose (each p = 0.5; together the 8 flips/90-degree
    rotations), independent per sample, identical within each LR/HR pair.

    lr (n, C, p, p), hr (n, C, P, P) float arrays -> new arrays of the same shapes and dtypes.
    """
    if lr.shape[0] != hr.shape[0]:
        raise ValueError(f"batch sizes differ: LR {lr.shape[0]}, HR {hr.shape[0]}")
    flags = rng.random((lr.shape[0], 3)) < 0.5
    out_lr, out_hr = np.empty_like(lr), np.empty_like(hr)
    for j, (hflip, vflip, rot) in enumerate(flags):
        a, b = lr[j], hr[j]
        if hflip:
            a, b = a[:, :, ::-1], b[:, :, ::-1]
        if vflip:
            a, b = a[:, ::-1, :], b[:, ::-1, :]
        if rot:
            a, b = a.transpose(0, 2, 1), b.transpose(0, 2, 1)
        out_lr[j], out_hr[j] = a, b
    return out_lr, out_hr


def load_pairs(folder: str | Path, scale: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Validation pairs of a set folder: [(name, LR (h, w, 3) uint8, HR (h*s, w*s, 3) uint8)], sorted.

    HR is read from `folder/HR` when it exists (else `folder`), mod-cropped; LR is `make_lr(HR)`.
    Grayscale images come out as 3 identical channels.
    """
    folder = Path(folder)
    return load_pairs_from_files(list_images([folder / "HR" if (folder / "HR").is_dir() else folder]), scale)


def load_pairs_from_files(paths: Sequence[str | Path], scale: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`load_pairs` for a list of HR image files (e.g. a checkpoint's held-out calibration split)."""
    return [(Path(p).stem, *_load_pair(Path(p), scale, None)[::-1]) for p in paths]
