"""Images in and out (PNG, JPEG, WebP, TIFF, BMP), alpha handling and the routing map (the paper's Fig. 5).

Reading gives an `Image`: RGB `(H, W, 3)` uint8 or uint16 (16-bit sources stay 16-bit), alpha `(H, W)` of
the same dtype or None, and whether the source was gray (it is written back as gray). EXIF orientation is
applied on read and not written back. Palette, CMYK, YCbCr, 1-bit and other Pillow modes become RGB(A).

Alpha is not sent through the network: `upscale_alpha` resizes it with Pillow's bicubic filter. SR models are
trained on natural RGB content; on a mask they invent halos and cost a second full run per image.

Pillow cannot hold 16-bit colour, so 16-bit RGB(A) and gray+alpha PNGs are written by a tiny encoder here and
16-bit colour sources are decoded through PyAV (FFmpeg) when it is installed (otherwise they are read as
8-bit, with a warning). Video lives in `wbsr_runtime.video`; `upscale_video` is re-exported here.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from . import defaults
from .fileio import atomic_file, one_line

log = logging.getLogger(__name__)

# defaults.MAX_PIXELS is the one pixel limit of images and video frames (LR pixels): Pillow's own default
# MAX_IMAGE_PIXELS (about 9459 x 9459; 8K frames pass). wbsr-run sets Pillow's limit to --max-pixels for the run
# (pillow_pixel_limit), so Pillow never refuses an image that --max-pixels allows, nor lets through one it refuses.
_pillow_limit_lock = threading.Lock()

WRITE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
IMAGE_EXTS = frozenset(WRITE_FORMATS)
VIDEO_EXTS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".avi": "avi", ".webm": "webm"}  # -> container
_ALPHA_FORMATS = {"PNG", "WEBP", "TIFF"}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class MediaError(ValueError):
    """A file that cannot be read or written; the message is one line and names the file."""


@dataclass(frozen=True)
class Image:
    """A decoded image.

    rgb: `(H, W, 3)` uint8 or uint16. alpha: `(H, W)` of rgb's dtype, or None. gray: the source had one colour
    channel (rgb holds it three times; writing averages the channels back). format: Pillow's name of the
    source format ("PNG", ...). icc_profile: the source's ICC profile bytes, carried to the output.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    gray: bool = False
    format: str | None = None
    icc_profile: bytes | None = None


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an `(H, W, ...)` array (the transforms of ImageOps.exif_transpose)."""
    ops = {
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: x.swapaxes(0, 1),
        6: lambda x: np.rot90(x, -1),
        7: lambda x: x[::-1, ::-1].swapaxes(0, 1),
        8: lambda x: np.rot90(x, 1),
    }
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


def _wide_rawmode(im: PILImage.Image) -> str | None:
    """The raw mode ("RGB;16B", "LA;16B", ...) of a 16-bit colour or gray+alpha source Pillow truncates."""
    if im.mode not in ("RGB", "RGBA", "LA") or not im.tile:
        return None
    args = im.tile[0].args
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return rawmode if isinstance(rawmode, str) and ";16" in rawmode else None


def _decode_16bit_av(path: Path, mode: str) -> np.ndarray | None:
    """Decode a 16-bit colour image with FFmpeg: `(H, W, 3 or 4)` uint16, or None without PyAV."""
    try:
        import av
    except ImportError:
        log.warning("%s: 16-bit colour read as 8-bit (install PyAV to keep 16 bits)", path)
        return None
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb48le" if mode == "RGB" else "rgba64le")


def _to_arrays(
    im: PILImage.Image, path: Path, wide: str | None
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Pillow image -> (colour (H, W, 1 or 3), alpha (H, W) or None, gray), 16-bit kept as uint16."""
    if wide:
        a = _decode_16bit_av(path, im.mode)
        if a is not None:
            if wide.startswith("LA"):
                return a[..., :1], a[..., 3], True
            return (a, None, False) if im.mode == "RGB" else (a[..., :3], a[..., 3], False)
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        return np.clip(a, 0, 65535).astype(np.uint16)[..., None], None, True
    if mode == "F":
        raise MediaError(f"{path}: unsupported pixel mode F (floating point)")
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode in ("1", "La"):
        im = im.convert("L" if mode == "1" else "LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    a = np.asarray(im)
    a = a[..., None] if a.ndim == 2 else a
    colour, alpha = (a[..., :-1], a[..., -1]) if im.mode in ("LA", "RGBA") else (a, None)
    return colour, alpha, colour.shape[-1] == 1


def check_regular_file(path: Path) -> None:
    """MediaError (one line, naming `path`) unless it is a regular file that exists: a missing file, a
    dangling link or a symlink loop, and a FIFO or a device (which would block the decoder) are refused."""
    try:
        st = path.stat()
    except OSError as e:
        why = {errno.ENOENT: "no such file", errno.ELOOP: "symlink loop (too many levels of symbolic links)"}
        raise MediaError(f"{path}: {why.get(e.errno, e.strerror or type(e).__name__)}") from None
    if not path.is_file():
        raise MediaError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise MediaError(f"{path}: empty file")


@contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Set `PIL.Image.MAX_IMAGE_PIXELS` to `max_pixels` within the block (restored after), so that Pillow's
    decompression-bomb check and `read_image(path, max_pixels)` refuse exactly the same images. For a program
    (wbsr-run) that reads images with one limit; the setting is process-wide."""
    with _pillow_limit_lock:
        previous, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, int(max_pixels)
    try:
        yield
    finally:
        with _pillow_limit_lock:
            PILImage.MAX_IMAGE_PIXELS = previous


def _frames(im: PILImage.Image, path: Path) -> None:
    """Refuse animations and multi-page files: upscaling only their first frame would drop the rest."""
    n = getattr(im, "n_frames", 1)
    if n > 1:
        raise MediaError(
            f"{path}: refused, {n} frames (an animation or a multi-page file); only single-frame images are "
            "upscaled, so split it into one file per frame first"
        )


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image:
    """Read a single-frame image file; any failure (missing, empty, truncated, unsupported, animated or
    multi-page, decompression bomb) raises `MediaError` with a one-line message naming the file. Images over
    `max_pixels` (default `defaults.MAX_PIXELS`) are refused from their header, before any pixel is decoded, as
    are those over Pillow's `PIL.Image.MAX_IMAGE_PIXELS` (see `pillow_pixel_limit`)."""
    path = Path(path)
    limit = defaults.MAX_PIXELS if max_pixels is None else max_pixels
    check_regular_file(path)
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. corrupt EXIF: one log line, not two
            warnings.simplefilter("always")
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:
                if im.width * im.height > limit:
                    raise MediaError(
                        f"{path}: refused, {im.width}x{im.height} = {im.width * im.height} pixels exceeds "
                        f"the limit of {limit} (--max-pixels)"
                    )
                _frames(im, path)
                wide = _wide_rawmode(im)  # before load(), which clears im.tile
                im.load()
                orientation = int(im.getexif().get(0x0112, 1) or 1)
                colour, alpha, gray = _to_arrays(im, path, wide)
                fmt, icc = im.format, im.info.get("icc_profile")
    except MediaError:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
        raise MediaError(f"{path}: refused, too many pixels ({one_line(e, 200)})") from None
    except Exception as e:  # a decoder boundary: Pillow raises many types on corrupt data
        raise MediaError(f"{path}: cannot read image: {type(e).__name__}: {one_line(e, 200)}") from None
    for w in caught:
        log.warning("%s: %s", path, one_line(w.message, 200))
    colour, alpha = _orient(colour, orientation), None if alpha is None else _orient(alpha, orientation)
    rgb = np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else colour
    return Image(np.ascontiguousarray(rgb), alpha, gray, fmt, icc)


def _png16_bytes(a: np.ndarray) -> bytes:
    """Encode `(H, W, C)` uint16, C in 1..4 (gray, gray+alpha, RGB, RGBA), as a 16-bit PNG."""
    h, w, c = a.shape
    rows = a.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 on every row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return _PNG_SIG + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _planes(image: Image, fmt: str, path: Path) -> np.ndarray:
    """The channels to write, `(H, W, C)`: gray or RGB, plus alpha where the format keeps it."""
    rgb = image.rgb
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype not in (np.uint8, np.uint16):
        raise MediaError(f"{path}: expected (H, W, 3) uint8 or uint16, got {rgb.shape} {rgb.dtype}")
    colour = rgb.mean(axis=-1, keepdims=True).round().astype(rgb.dtype) if image.gray else rgb
    alpha = image.alpha
    if alpha is not None and fmt not in _ALPHA_FORMATS:
        log.warning("%s: %s has no alpha channel; alpha dropped", path, fmt)
        alpha = None
    planes = (
        colour if alpha is None else np.concatenate([colour, alpha.astype(rgb.dtype)[..., None]], axis=-1)
    )
    if planes.dtype == np.uint16 and fmt != "PNG" and not (fmt == "TIFF" and planes.shape[-1] == 1):
        log.warning("%s: %s is written with 8 bits per channel", path, fmt)
        planes = ((planes.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return planes


def _encode(planes: np.ndarray, fmt: str, icc: bytes | None, fh: Any) -> None:
    if planes.dtype == np.uint16 and fmt == "PNG":
        fh.write(_png16_bytes(planes))
        return
    if planes.dtype == np.uint16:
        pil = PILImage.fromarray(planes[..., 0].astype("<u2")).convert("I;16")
    else:
        pil = PILImage.fromarray(planes[..., 0] if planes.shape[-1] == 1 else planes)
    opts: dict[str, Any] = {"icc_profile": icc} if icc and fmt != "BMP" else {}
    if fmt in ("JPEG", "WEBP"):
        opts["quality"] = 95
    pil.save(fh, format=fmt, **opts)


def write_image(path: str | os.PathLike, image: Image, *, overwrite: bool = True) -> Path:
    """Write `image` in the format of `path`'s extension, atomically: a temporary name in the same folder,
    then published in one step (`fileio.publish`), so a failure or interrupt never leaves a partial file under
    `path`. Without `overwrite` an existing `path` is kept and MediaError says so, even when another process
    created it during the write. Returns `path`."""
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MediaError(f"{path}: unsupported output extension (use one of {', '.join(sorted(IMAGE_EXTS))})")
    planes = _planes(image, fmt, path)
    try:
        with atomic_file(path, overwrite=overwrite) as fh:
            _encode(planes, fmt, image.icc_profile, fh)
    except MediaError:
        raise
    except FileExistsError:
        raise MediaError(f"{path}: exists (use --force to overwrite)") from None
    except (OSError, ValueError) as e:
        raise MediaError(f"{path}: cannot write image: {one_line(e, 200)}") from None
    return path


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upscaling of an alpha plane: `(H, W)` uint8/uint16 -> `(H*scale, W*scale)`, same dtype."""
    h, w = alpha.shape
    out = PILImage.fromarray(alpha.astype(np.float32)).resize(
        (w * scale, h * scale), PILImage.Resampling.BICUBIC
    )
    top = np.iinfo(alpha.dtype).max
    return np.clip(np.asarray(out).round(), 0, top).astype(alpha.dtype)


def upscale_image(image: Image, upscaler: Any) -> Image:
    """Upscale an `Image`: RGB through `upscaler.upscale` (dtype kept), alpha with `upscale_alpha`."""
    rgb = upscaler.upscale(image.rgb)
    alpha = None if image.alpha is None else upscale_alpha(image.alpha, int(upscaler.scale))
    return replace(image, rgb=rgb, alpha=alpha)


_RAMP = np.array(
    [[49, 54, 149], [69, 117, 180], [116, 173, 209], [254, 224, 144], [244, 109, 67], [165, 0, 38]],
    np.float64,
)  # cheap (blue) -> expensive (red), RdYlBu reversed


def subnet_colours(num_subnets: int) -> np.ndarray:
    """`(num_subnets, 3)` uint8 colours along a blue -> red ramp, cheapest subnet first."""
    t = np.linspace(0.0, 1.0, max(num_subnets, 1)) * (len(_RAMP) - 1)
    lo = np.minimum(t.astype(int), len(_RAMP) - 2)
    f = (t - lo)[:, None]
    return ((1 - f) * _RAMP[lo] + f * _RAMP[lo + 1]).round().astype(np.uint8)


def draw_routing_map(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    subnets: np.ndarray,
    num_subnets: int,
    scale: int,
    *,
    strength: float = 0.5,
    labels: list[str] | None = None,
) -> np.ndarray:
    """Tint each patch of an upscaled image by the subnet that ran it and outline it (the paper's Fig. 5).

    image_rgb: `(H*scale, W*scale, 3)` uint8 (uint16 is reduced to 8 bits). boxes: `(n, 4)` int rows
    `y0, x0, y1, x1` in LR pixels, half-open. subnets: `(n,)` int in `0..num_subnets-1`, cheapest first.
    strength: tint opacity in [0, 1]. labels: one per subnet (e.g. its width, depth and cost): a legend
    (`routing_legend`) is appended below the image. Returns a new `(H*scale, W*scale [+ legend], 3)` uint8 image.
    """
    img = np.asarray(image_rgb)
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    out = img.astype(np.float32)
    colours = subnet_colours(num_subnets).astype(np.float32)
    hr = np.asarray(boxes, dtype=np.int64).reshape(-1, 4) * int(scale)
    hr = np.minimum(hr, [img.shape[0], img.shape[1]] * 2)  # tiles of a padded frame end past the image
    for (y0, x0, y1, x1), m in zip(hr, np.asarray(subnets).reshape(-1), strict=True):
        region = out[y0:y1, x0:x1]
        region[:] = (1 - strength) * region + strength * colours[int(m)]
    for y0, x0, y1, x1 in hr[
        (hr[:, 2] > hr[:, 0]) & (hr[:, 3] > hr[:, 1])
    ]:  # borders after all tints, so a neighbour's tint never covers them
        out[y0:y1, [x0, max(x1 - 1, x0)]] = 0.0
        out[[y0, max(y1 - 1, y0)], x0:x1] = 0.0
    out = out.round().clip(0, 255).astype(np.uint8)
    return out if labels is None else np.concatenate([out, routing_legend(out.shape[1], labels)])


def routing_legend(width: int, labels: list[str]) -> np.ndarray:
    """A white `(h, width, 3)` uint8 strip with one colour swatch and label per subnet (cheapest first, colours
    of `subnet_colours`), wrapped onto as many rows as `width` needs."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    colours = subnet_colours(len(labels))
    cell = max(int(font.getlength(text)) for text in labels) + 22
    per_row = max(1, width // cell)
    rows = -(-len(labels) // per_row)
    strip = PILImage.new("RGB", (width, 16 * rows + 4), "white")
    draw = ImageDraw.Draw(strip)
    for i, text in enumerate(labels):
        x, y = (i % per_row) * cell + 2, (i // per_row) * 16 + 3
        draw.rectangle([x, y, x + 12, y + 11], fill=tuple(int(c) for c in colours[i]), outline="black")
        draw.text((x + 16, y), text, fill="black", font=font)
    return np.asarray(strip)


def __getattr__(name: str) -> Any:
    if name in ("upscale_video", "VideoResult"):
        from wbsr_runtime import video  # lazy: PyAV is optional

        return getattr(video, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
