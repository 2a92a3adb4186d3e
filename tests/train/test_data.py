"""Tests for wbsr_train.data and wbsr_train.imresize (CPU, tiny images, < 30 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import DATA
from wbsr_runtime.media import MediaError
from wbsr_train.data import (
    TrainSet,
    augment,
    imresize,
    list_images,
    load_pairs,
    make_lr,
    mod_crop,
    read_rgb8,
)

SET5 = DATA / "Set5"
NAMES = ("baby", "bird", "butterfly", "head", "woman")


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- bicubic --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_matches_matlab_set5(scale: int) -> None:
    diffs = []
    for name in NAMES:
        hr = mod_crop(np.asarray(Image.open(SET5 / "HR" / f"{name}.png").convert("RGB")), scale)
        ref = np.asarray(Image.open(SET5 / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png").convert("RGB"))
        ours = make_lr(np.ascontiguousarray(hr), scale)
        assert ours.shape == ref.shape and ours.dtype == np.uint8
        diffs.append(np.abs(ours.astype(np.int16) - ref).ravel())
    d = np.concatenate(diffs)
    assert d.max() <= 1
    assert (d == 0).mean() >= 0.99


def test_imresize_float_constant_and_ramp() -> None:
    const = np.full((40, 36, 3), 0.3, dtype=np.float32)
    out = imresize(const, 0.25)
    assert out.shape == (10, 9, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, atol=1e-6)
    ramp = np.tile(np.arange(64, dtype=np.float64)[None, :, None], (16, 1, 1))
    down = imresize(ramp, 0.5)[:, 3:-3, 0]  # away from the mirrored borders
    np.testing.assert_allclose(np.diff(down, axis=1), 2.0, atol=1e-9)
    np.testing.assert_allclose(down[:, 0], 2 * 3 + 0.5, atol=1e-9)  # out pixel j covers in 2j, 2j+1


def test_imresize_gray_upscale_and_errors() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert imresize(gray, 2.0).shape == (6, 8)
    with pytest.raises(ValueError, match="mod_crop"):
        make_lr(_rgb(10, 10), 4)


def test_imresize_large_image_shape() -> None:
    # speed is a benchmark's business (no timing assertions in tests); this checks a large frame's geometry
    out = make_lr(_rgb(1500, 1000), 4)
    assert out.shape == (375, 250, 3) and out.dtype == np.uint8


def test_mod_crop() -> None:
    assert mod_crop(np.zeros((13, 10, 3)), 4).shape == (12, 8, 3)


# ---- reading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "RGB"])
def test_read_image_modes(tmp_path: Path, mode: str) -> None:
    src = _rgb(6, 5)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"im{suffix}"
    Image.fromarray(src).convert(mode).save(path)
    out = read_rgb8(path)
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    if mode == "RGB" or mode == "RGBA":
        np.testing.assert_array_equal(out, src)
    if mode in ("L", "LA"):
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_read_image_formats(tmp_path: Path, fmt: str) -> None:
    src = _rgb(7, 9)
    Image.fromarray(src).save(
        tmp_path / f"im.{fmt.lower()}", format=fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    np.testing.assert_array_equal(read_rgb8(tmp_path / f"im.{fmt.lower()}"), src)


def test_read_image_palette_transparency(tmp_path: Path) -> None:
    im = Image.fromarray(_rgb(6, 6)).convert("P")
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    assert read_rgb8(tmp_path / "p.png").shape == (6, 6, 3)


def test_read_image_16bit(tmp_path: Path) -> None:
    v = np.array([[0, 257, 65535], [32896, 1000, 60000]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "a.png")
    out = read_rgb8(tmp_path / "a.png")
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], np.floor(v / 257 + 0.5).astype(np.uint8))


def test_read_image_exif_orientation(tmp_path: Path) -> None:
    src = np.zeros((20, 40, 3), dtype=np.uint8)
    src[:, :20] = 255  # stored: white left half, 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    Image.fromarray(src).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_rgb8(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def test_read_image_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(64, 64)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:300])
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    for bad in (trunc, junk, tmp_path / "missing.png"):
        with pytest.raises(MediaError, match=bad.name) as info:
            read_rgb8(bad)
        assert "\n" not in str(info.value)


def test_read_image_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(MediaError, match="big.png"):
        read_rgb8(tmp_path / "big.png")


# ---- listing --------------------------------------------------------------------------------------------


def test_list_images_layouts(tmp_path: Path) -> None:
    im = _rgb(4, 4)
    for rel in (
        "Set5/HR/a.png",
        "Set5/LR_bicubic/X4/ax4.png",
        "DIV2K/DIV2K_train_HR/0001.png",
        "DIV2K/DIV2K_train_LR_bicubic/X4/0001x4.png",
        "DIV2K/LRunknown/0001.png",
        "flat/b.JPG",
        "flat/sub/c.bmp",
        "flat/.hidden.png",
    ):
        _save(tmp_path / rel, im)
    (tmp_path / "flat/notes.txt").write_text("x")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])]
    assert rel == ["DIV2K/DIV2K_train_HR/0001.png", "Set5/HR/a.png", "flat/b.JPG", "flat/sub/c.bmp"]
    assert [p.name for p in list_images([tmp_path / "Set5"])] == ["a.png"]
    # An LR folder given explicitly is listed.
    assert [p.name for p in list_images([tmp_path / "Set5/LR_bicubic"])] == ["ax4.png"]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        list_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images([tmp_path / "empty"])


# ---- training patches -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    for i, (h, w) in enumerate([(50, 70), (99, 35), (20, 20)]):  # last is smaller than a 32-px HR patch
        Image.fromarray(_rgb(h, w, seed=i)).save(root / f"im{i}.png")
    return root


def test_trainset_loads_and_crops_align(train_dir: Path) -> None:
    ts = TrainSet([train_dir], scale=4)
    assert len(ts) == 3 and ts.skipped == 0
    assert [im.shape for im in ts.hr] == [(48, 68, 3), (96, 32, 3), (20, 20, 3)]
    assert [im.shape for im in ts.lr] == [(12, 17, 3), (24, 8, 3), (5, 5, 3)]
    assert ts.too_small(8) == 1
    pos = ts.random_positions(50, 8, np.random.default_rng(0))
    assert pos.shape == (50, 3) and pos.dtype == np.int64
    lr, hr = ts.crops(pos, 8)
    assert lr.shape == (50, 3, 8, 8) and hr.shape == (50, 3, 32, 32) and lr.dtype == np.float32
    assert 0.0 <= lr.min() and hr.max() <= 1.0
    for (i, y, x), a, b in zip(pos, lr, hr, strict=True):
        full_lr = make_lr(ts.hr[i], 4)
        want_lr = full_lr[y : y + 8, x : x + 8].transpose(2, 0, 1)
        want_hr = ts.hr[i][y * 4 : y * 4 + 32, x * 4 : x * 4 + 32].transpose(2, 0, 1)
        np.testing.assert_array_equal(np.round(a * 255).astype(np.uint8), want_lr)
        np.testing.assert_array_equal(np.round(b * 255).astype(np.uint8), want_hr)


def test_random_positions_uniform(train_dir: Path) -> None:
    ts = TrainSet([train_dir], scale=4)
    counts = ts.position_counts(8)  # (12-8+1)*(17-8+1)=50, (24-8+1)*(8-8+1)=17, 0
    assert counts.tolist() == [50, 17, 0]
    pos = ts.random_positions(67_000, 8, np.random.default_rng(1))
    freq = np.bincount(pos[:, 0], minlength=3) / len(pos)
    np.testing.assert_allclose(freq, [50 / 67, 17 / 67, 0], atol=0.01)
    assert (pos[:, 1] >= 0).all() and (pos[:, 2] >= 0).all()
    sizes = np.array([im.shape[:2] for im in ts.lr])[pos[:, 0]]
    assert (pos[:, 1] + 8 <= sizes[:, 0]).all() and (pos[:, 2] + 8 <= sizes[:, 1]).all()
    # Every origin of image 1 (17 of them, all x = 0) is hit about equally often.
    ys = np.bincount(pos[pos[:, 0] == 1, 1], minlength=17)
    assert ys.min() > 0.8 * ys.mean()
    with pytest.raises(ValueError, match="smaller"):
        ts.random_positions(1, 30, np.random.default_rng(0))


def test_augment_keeps_pairs(train_dir: Path) -> None:
    ts = TrainSet([train_dir], scale=4)
    lr, hr = ts.crops(ts.random_positions(64, 8, np.random.default_rng(2)), 8)
    n, c, h, w = hr.shape
    pooled = hr.reshape(n, c, h // 4, 4, w // 4, 4).mean(axis=(3, 5))  # an LR exactly aligned with hr
    alr, ahr = augment(pooled, hr, np.random.default_rng(3))
    assert alr.shape == pooled.shape and ahr.shape == hr.shape
    # Block-averaging commutes with every flip/transpose, so the pairs stay aligned iff this holds.
    np.testing.assert_allclose(ahr.reshape(n, c, h // 4, 4, w // 4, 4).mean(axis=(3, 5)), alr, atol=1e-6)
    lr = pooled
    changed = [not np.array_equal(a, b) for a, b in zip(alr, lr, strict=True)]
    assert 40 < sum(changed) < 64  # independent per sample; identity has probability 1/8


def test_trainset_skip_bad(train_dir: Path, tmp_path: Path) -> None:
    for p in train_dir.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(MediaError, match="broken.png"):
        TrainSet([tmp_path], scale=4)
    ts = TrainSet([tmp_path], scale=4, skip_bad=True)
    assert len(ts) == 3 and ts.skipped == 1


def test_trainset_paired_lr_folders(tmp_path: Path) -> None:
    ts = TrainSet([SET5 / "HR"], scale=4, lr_folders=[SET5 / "LR_bicubic" / "X4"])
    assert len(ts) == 5
    for hr, lr in zip(ts.hr, ts.lr, strict=True):
        assert np.abs(make_lr(hr, 4).astype(int) - lr).max() <= 1
    with pytest.raises(ValueError, match="no LR image"):
        TrainSet([SET5 / "HR"], scale=2, lr_folders=[SET5 / "LR_bicubic" / "X4"])
    _save(tmp_path / "hr" / "a.png", _rgb(16, 16))
    _save(tmp_path / "lr" / "ax4.png", _rgb(5, 4))
    with pytest.raises(ValueError, match=r"ax4.png is 4x5, expected 4x4"):
        TrainSet([tmp_path / "hr"], scale=4, lr_folders=[tmp_path / "lr"])


def test_load_pairs_gray_and_set(tmp_path: Path) -> None:
    Image.fromarray(_rgb(30, 22)[..., 0]).save(tmp_path / "bridge.png")  # 8-bit grayscale
    [(name, lr, hr)] = load_pairs(tmp_path, 4)
    assert name == "bridge" and lr.shape == (7, 5, 3) and hr.shape == (28, 20, 3)
    pairs = load_pairs(SET5, 2)
    assert [p[0] for p in pairs] == list(NAMES)
    for _, lr, hr in pairs:
        assert lr.shape[0] * 2 == hr.shape[0] and lr.shape[1] * 2 == hr.shape[1]
