"""Images: round trips (8/16-bit, gray, alpha, palette, CMYK, EXIF rotation), bad files, the routing map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageOps

from tests.samples import bad_image_corpus, bomb_png
from tests.standin import NearestUpscaler
from wbsr_runtime.media import (
    Image,
    MediaError,
    draw_routing_map,
    read_image,
    subnet_colours,
    upscale_alpha,
    upscale_image,
    write_image,
)

RNG = np.random.default_rng(0)


def _noise(h: int, w: int, c: int = 3, dtype: type = np.uint8) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max + 1, (h, w, c), dtype=dtype)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp", ".webp"])
def test_uint8_rgb_round_trip_lossless(tmp_path: Path, ext: str) -> None:
    a = _noise(7, 5)
    write_image(tmp_path / f"a{ext}", Image(a))
    b = read_image(tmp_path / f"a{ext}")
    assert b.rgb.dtype == np.uint8 and b.rgb.shape == (7, 5, 3) and not b.gray and b.alpha is None
    if ext != ".webp":  # lossy at quality 95
        assert np.array_equal(a, b.rgb)
    assert _no_temp_files(tmp_path)


def test_jpeg_round_trip_approximate(tmp_path: Path) -> None:
    a = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    write_image(tmp_path / "a.jpg", Image(a))
    b = read_image(tmp_path / "a.jpg")
    assert b.rgb.shape == a.shape and np.abs(b.rgb.astype(int) - a).max() <= 4


def test_uint16_rgb_and_rgba_stay_16bit(tmp_path: Path) -> None:
    pytest.importorskip("av")  # Pillow reads 16-bit colour as 8-bit; media decodes it with FFmpeg
    a, alpha = _noise(5, 7, dtype=np.uint16), _noise(5, 7, 1, np.uint16)[..., 0]
    write_image(tmp_path / "a.png", Image(a))
    write_image(tmp_path / "b.png", Image(a, alpha))
    b, c = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert b.rgb.dtype == np.uint16 and np.array_equal(b.rgb, a) and b.alpha is None
    assert np.array_equal(c.rgb, a) and c.alpha is not None and np.array_equal(c.alpha, alpha)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_uint16_gray_stays_gray_16bit(tmp_path: Path, ext: str) -> None:
    g = _noise(6, 4, 1, np.uint16)[..., 0]
    PILImage.fromarray(g).save(tmp_path / f"g{ext}")
    img = read_image(tmp_path / f"g{ext}")
    assert img.gray and img.rgb.dtype == np.uint16 and np.array_equal(img.rgb[..., 1], g)
    write_image(tmp_path / f"o{ext}", img)
    out = PILImage.open(tmp_path / f"o{ext}")
    assert out.mode.startswith("I;16") and np.array_equal(np.asarray(out).astype(np.uint16), g)


def test_gray_and_gray_alpha_stay_gray(tmp_path: Path) -> None:
    g, a = _noise(5, 6, 1)[..., 0], _noise(5, 6, 1)[..., 0]
    PILImage.fromarray(g).save(tmp_path / "g.png")
    PILImage.fromarray(np.stack([g, a], -1), "LA").save(tmp_path / "la.png")
    img, la = read_image(tmp_path / "g.png"), read_image(tmp_path / "la.png")
    assert img.gray and img.rgb.shape == (5, 6, 3) and la.gray and np.array_equal(la.alpha, a)
    write_image(tmp_path / "g2.png", img)
    write_image(tmp_path / "la2.png", la)
    assert PILImage.open(tmp_path / "g2.png").mode == "L"
    assert PILImage.open(tmp_path / "la2.png").mode == "LA"
    assert np.array_equal(np.asarray(PILImage.open(tmp_path / "la2.png")), np.stack([g, a], -1))


def test_rgba_keeps_alpha_and_alpha_is_upscaled_bicubic(tmp_path: Path) -> None:
    a = _noise(6, 5, 4)
    PILImage.fromarray(a, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert np.array_equal(img.rgb, a[..., :3]) and np.array_equal(img.alpha, a[..., 3])
    up = upscale_image(img, NearestUpscaler(scale=3))
    assert up.rgb.shape == (18, 15, 3) and up.alpha.shape == (18, 15) and up.alpha.dtype == np.uint8
    write_image(tmp_path / "b.png", up)
    assert PILImage.open(tmp_path / "b.png").mode == "RGBA"
    write_image(tmp_path / "b.jpg", up)  # JPEG has no alpha: dropped with a warning, not an error
    assert PILImage.open(tmp_path / "b.jpg").mode == "RGB"


def test_upscale_alpha_constant_and_16bit() -> None:
    assert np.array_equal(upscale_alpha(np.full((3, 2), 77, np.uint8), 4), np.full((12, 8), 77, np.uint8))
    assert upscale_alpha(np.full((3, 2), 60000, np.uint16), 2).dtype == np.uint16


def test_palette_cmyk_and_tiny_images(tmp_path: Path) -> None:
    p = PILImage.fromarray(_noise(4, 4)).convert("P")
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "pt.png", transparency=0)
    PILImage.fromarray(_noise(4, 4, 4), "CMYK").save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "p.png").alpha is None
    assert read_image(tmp_path / "pt.png").alpha is not None
    assert read_image(tmp_path / "c.jpg").rgb.shape == (4, 4, 3)
    for h, w in [(1, 1), (1, 9), (9, 1)]:
        PILImage.fromarray(_noise(h, w)).save(tmp_path / "t.png")
        assert read_image(tmp_path / "t.png").rgb.shape == (h, w, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_honoured(tmp_path: Path, orientation: int) -> None:
    im = PILImage.fromarray(_noise(4, 6))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    ref = np.asarray(ImageOps.exif_transpose(PILImage.open(tmp_path / "o.jpg")))
    assert np.array_equal(read_image(tmp_path / "o.jpg").rgb, ref)
    assert read_image(tmp_path / "o.jpg").rgb.shape[:2] == ((6, 4) if orientation >= 5 else (4, 6))


@pytest.mark.parametrize("name,data", bad_image_corpus(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_images_raise_one_line_media_error(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        img = read_image(path)
    except MediaError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg
        return
    assert img.rgb.shape == (24, 32, 3)  # a truncation past the pixel data still decodes completely


def test_bomb_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    with pytest.raises(MediaError, match="too many pixels"):
        read_image(tmp_path / "bomb.png")


def test_wrong_extension_but_readable_is_fine(tmp_path: Path) -> None:
    PILImage.fromarray(_noise(3, 3)).save(tmp_path / "x.jpg", format="PNG")
    assert read_image(tmp_path / "x.jpg").format == "PNG"


def test_write_is_atomic_and_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="unsupported output extension"):
        write_image(tmp_path / "a.xyz", Image(_noise(2, 2)))
    with pytest.raises(MediaError, match="missing"):
        write_image(tmp_path / "missing" / "a.png", Image(_noise(2, 2)))
    with pytest.raises(MediaError):
        write_image(tmp_path / "a.png", Image(np.zeros((2, 2, 3), np.float32)))
    assert list(tmp_path.iterdir()) == []


def test_routing_map_tints_by_subnet_and_draws_borders() -> None:
    img = np.full((32, 32, 3), 128, np.uint8)
    boxes = np.array([[0, 0, 8, 8], [0, 8, 8, 16], [8, 0, 16, 16]])  # LR; the last tile is clipped at 16
    out = draw_routing_map(img, boxes, np.array([0, 2, 1]), 3, 2)
    colours = subnet_colours(3).astype(int)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out[5, 5].astype(int) - (128 + colours[0]) / 2).max() <= 1
    assert np.abs(out[5, 25].astype(int) - (128 + colours[2]) / 2).max() <= 1
    assert (out[0, :] == 0).all() and (out[:, 0] == 0).all() and (out[:16, 15] == 0).all()
    assert not np.array_equal(colours[0], colours[2])


def test_routing_map_legend_names_every_subnet_with_its_colour() -> None:
    img = np.full((40, 300, 3), 128, np.uint8)
    labels = [f"w{w} d2 {p}% FLOPs" for w, p in ((32, 7), (48, 14), (64, 100))]
    out = draw_routing_map(img, np.array([[0, 0, 10, 75]]), np.array([1]), 3, 4, labels=labels)
    legend = out[40:]
    assert out.shape[1] == 300 and legend.shape[0] >= 16 and np.array_equal(out[:40], draw_routing_map(
        img, np.array([[0, 0, 10, 75]]), np.array([1]), 3, 4))
    flat = legend.reshape(-1, 3)
    for c in subnet_colours(3):  # every subnet's swatch is in the legend, and some text is drawn
        assert (flat == c).all(axis=1).sum() >= 100
    assert (flat == 0).all(axis=1).sum() > 50
    narrow = draw_routing_map(img[:, :60], np.array([[0, 0, 10, 15]]), np.array([0]), 3, 4, labels=labels)
    assert narrow.shape[0] - 40 >= 3 * 16  # one label per row when the image is narrow
