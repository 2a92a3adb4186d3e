"""Bad input through `wbsr-run`: a corpus of >= 100 broken, odd and hostile files, generated here.

Every input gives either a correct output or exit 2 with one line on stderr naming the file (then the count
line); never a traceback, a hang, a partial output or a leftover temporary file, and the input is untouched.
Each case runs in-process (`cli.main`) with a real bundle (the nearest-neighbour stand-in, so a correct output
is checked exactly against nearest upscaling of a reference decode); one subprocess run of the whole corpus
proves that nothing reaches stderr but those lines. Interrupted runs, tampered bundles and the other safety
cases are in tests/test_safety.py.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageOps

from tests import ROOT
from tests.nearest_bundle import build_nearest_bundle
from tests.samples import bomb_png, make_clip, make_size_change_clip, probe
from wbsr_runtime import cli
from wbsr_runtime.media import Image, _png16_bytes, read_image, upscale_alpha, write_image
from wbsr_runtime.plan import out_name

S = 2  # the bundle's scale
LOSSLESS_OUT = (".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Case:
    """name: the input's file name; make: writes it; check(src, out): asserts a correct output (None: the input
    must be refused); may_fail: a refusal is also fine; msg: a refusal must contain this."""

    name: str
    make: Callable[[Path], None]
    check: Callable[[Path, Path], None] | None = None
    may_fail: bool = False
    msg: str = ""


# --- inputs -------------------------------------------------------------------------------------------------
def _noise(h: int, w: int, c: int = 3, dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 31 * h + w)
    a = rng.integers(0, np.iinfo(dtype).max, (h, w, c), dtype=dtype, endpoint=True)
    return a[..., 0] if c == 1 else a


def _smooth(h: int = 48, w: int = 64) -> np.ndarray:
    """Gradients and one bright quadrant: survives JPEG, and any flip or rotation changes it a lot."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * x / w, 255 * y / h, np.where((y < h // 2) & (x < w // 2), 230, 30)], axis=-1)
    return rgb.round().astype(np.uint8)


def _encode(array_or_image: np.ndarray | PILImage.Image, fmt: str, **kw: object) -> bytes:
    im = array_or_image if isinstance(array_or_image, PILImage.Image) else PILImage.fromarray(array_or_image)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_jpeg() -> bytes:
    """A real JPEG whose frame header claims 65535 x 65535 pixels."""
    data = bytearray(_encode(_smooth(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = b"\xff\xff\xff\xff"
    return bytes(data)


def _bomb_bmp(width: int = 50_000, height: int = 50_000) -> bytes:
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + dib + b"\0" * 64


def _exif_image(fmt: str, orientation: int, **kw: object) -> bytes:
    im = PILImage.fromarray(_smooth())
    exif = im.getexif()
    exif[0x0112] = orientation
    return _encode(im, fmt, exif=exif, **kw)


def _garbage_exif_jpeg() -> bytes:
    data = _encode(_smooth(), "JPEG")
    app1 = b"Exif\0\0II*\0" + bytes(range(7, 250, 3)) * 2
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _flip(data: bytes, frac: float) -> bytes:
    out = bytearray(data)
    i = int(len(out) * frac)
    out[i : i + 4] = bytes(b ^ 0x5A for b in out[i : i + 4])
    return bytes(out)


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _save(make_image: Callable[[], PILImage.Image], **kw: object) -> Callable[[Path], None]:
    return lambda p: make_image().save(p, **kw)


def _clip(**kw: object) -> Callable[[Path], None]:
    return lambda p: make_clip(p, **kw)


def _frames(fmt: str, count: int = 3, **kw: object) -> Callable[[Path], None]:
    """An animation (GIF, APNG) or a multi-page TIFF of `count` different frames."""

    def make(p: Path) -> None:
        frames = [PILImage.fromarray(_noise(8, 10, seed=i)) for i in range(count)]
        frames[0].save(p, format=fmt, save_all=True, append_images=frames[1:], **kw)

    return make


def _clip_bytes(ext: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        full = p.with_name(f"full{ext}")
        _clip()(full)
        p.write_bytes(edit(full.read_bytes()))
        full.unlink()

    return make


# --- checks -------------------------------------------------------------------------------------------------
def nn(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(a, S, axis=0), S, axis=1)


def _reference(src: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Pillow's own decode, EXIF orientation applied: RGB (H, W, 3) uint8 and alpha (H, W) or None."""
    with PILImage.open(src) as im:
        im = ImageOps.exif_transpose(im)
        has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
        if not has_alpha:
            return np.asarray(im.convert("RGB")), None
        rgba = np.asarray(im.convert("RGBA"))
    return rgba[..., :3], rgba[..., 3]


def _no_orientation(out: Path) -> None:
    with PILImage.open(out) as im:
        assert im.getexif().get(0x0112, 1) == 1, "output must not carry an EXIF rotation (applied already)"


def image_ok(src: Path, out: Path) -> None:
    """The output is nearest upscaling of the reference decode: exact for a lossless output format."""
    _no_orientation(out)
    rgb, alpha = _reference(src)
    got = read_image(out)
    assert got.rgb.shape == (rgb.shape[0] * S, rgb.shape[1] * S, 3) and got.rgb.dtype == np.uint8
    if out.suffix.lower() in LOSSLESS_OUT:
        np.testing.assert_array_equal(got.rgb, nn(rgb))
    else:  # lossy: exactly what the writer makes of nearest upscaling (alpha and gray as in the output)
        expected = out.with_name(f"expected{out.suffix}")
        write_image(expected, Image(nn(rgb), got.alpha, got.gray))
        np.testing.assert_array_equal(got.rgb, read_image(expected).rgb)
        expected.unlink()
    if alpha is not None and out.suffix.lower() in (".png", ".tif", ".tiff"):
        np.testing.assert_array_equal(got.alpha, upscale_alpha(alpha, S))


def wide_ok(rgb: np.ndarray, alpha: np.ndarray | None = None) -> Callable[[Path, Path], None]:
    """16-bit in, 16-bit out, exact."""

    def check(src: Path, out: Path) -> None:
        got = read_image(out)
        assert got.rgb.dtype == np.uint16
        np.testing.assert_array_equal(got.rgb, nn(rgb if rgb.ndim == 3 else np.repeat(rgb[..., None], 3, -1)))
        if alpha is not None:
            np.testing.assert_array_equal(got.alpha, upscale_alpha(alpha, S))

    return check


def video_ok(src: Path, out: Path) -> None:
    """A playable video of the source's frame size times the scale."""
    import av

    with av.open(str(src)) as c:
        size = c.streams.video[0].codec_context.width * S, c.streams.video[0].codec_context.height * S
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    assert frames and (frames[0].width, frames[0].height) == size


def same_video(src: Path, out: Path) -> None:
    """Every frame, at the source's times and rate, upright the same way, with its audio: nothing dropped."""
    video_ok(src, out)
    a, b = probe(src), probe(out)
    assert (b["frames"], b["rate"], b["rotation"], b["audio"]) == (a["frames"], a["rate"], a["rotation"], a["audio"])
    np.testing.assert_allclose(b["times"], a["times"], atol=2e-3)


# --- the corpus ---------------------------------------------------------------------------------------------
def _truncated() -> list[Case]:
    sources = {
        ".png": _encode(_noise(48, 64), "PNG"),
        ".jpg": _encode(_smooth(), "JPEG", quality=90),
        ".webp": _encode(_smooth(), "WEBP", lossless=True),
    }
    cases = []
    for ext, data in sources.items():
        cuts = [1, 2, 7, 8, 12, 20, 33, 64, 100] + [int(len(data) * f) for f in (0.25, 0.5, 0.75, 0.9, 0.98)]
        cuts = sorted({n for n in cuts if n < len(data) - 1})
        cases += [Case(f"trunc{n}{ext}", _write(data[:n]), image_ok, may_fail=True) for n in cuts]
        cases += [Case(f"cut_tail{ext}", _write(data[:-1]), image_ok, may_fail=True)]
        cases += [
            Case(f"flip{int(f * 100)}{ext}", _write(_flip(data, f)), image_ok, may_fail=True) for f in (0.3, 0.6, 0.9)
        ]
    return cases


def _odd_images() -> list[Case]:
    cases = [
        Case(f"tiny{h}x{w}.png", _write(_encode(_noise(h, w), "PNG")), image_ok)
        for h, w in [(1, 1), (1, 2), (2, 1), (1, 7), (7, 1), (1, 33), (33, 1), (2, 2), (3, 5)]
    ]
    cases += [
        Case("tiny1x1.jpg", _write(_encode(_noise(1, 1), "JPEG")), image_ok),
        Case("tiny1x9.jpg", _write(_encode(_noise(1, 9), "JPEG")), image_ok),
        Case("tiny1x1.webp", _write(_encode(_noise(1, 1), "WEBP", lossless=True)), image_ok),
        Case("tiny9x1.webp", _write(_encode(_smooth(9, 1), "WEBP", lossless=True)), image_ok),
        Case("tiny1x1.bmp", _write(_encode(_noise(1, 1), "BMP")), image_ok),
        Case("tiny1x5.tif", _write(_encode(_noise(1, 5), "TIFF")), image_ok),
    ]
    g16, rgb16, a16 = _noise(6, 5, 1, np.uint16), _noise(5, 7, 3, np.uint16, 1), _noise(5, 7, 1, np.uint16, 2)
    cases += [
        Case("gray16.png", _write(_encode(PILImage.fromarray(g16), "PNG")), wide_ok(g16)),
        Case("gray16.tif", _write(_encode(PILImage.fromarray(g16), "TIFF")), wide_ok(g16)),
        Case("rgb16.png", _write(_png16_bytes(rgb16)), wide_ok(rgb16)),
        Case("rgba16.png", _write(_png16_bytes(np.dstack([rgb16, a16]))), wide_ok(rgb16, a16)),
        Case("la16.png", _write(_png16_bytes(np.dstack([g16, g16[..., ::-1]]))), wide_ok(g16, g16[..., ::-1])),
        Case("int32.tif", _write(_encode(PILImage.fromarray(g16.astype(np.int32)), "TIFF")), wide_ok(g16)),
        Case("float.tif", _write(_encode(PILImage.fromarray(g16.astype(np.float32)), "TIFF")), msg="mode F"),
    ]
    pal = lambda: PILImage.fromarray(_noise(12, 10)).convert("P")  # noqa: E731
    cases += [
        Case("palette.png", _save(pal), image_ok),
        Case("palette_trns.png", _save(pal, transparency=0), image_ok),
        Case("palette.bmp", _save(pal), image_ok),
        Case("palette_gif.gif", _save(pal), image_ok),  # not an image extension: tried as an image, written as PNG
        Case("bilevel.png", _save(lambda: PILImage.fromarray(_noise(9, 11)).convert("1")), image_ok),
        Case("cmyk.jpg", _write(_encode(PILImage.fromarray(_noise(8, 8, 4), "CMYK"), "JPEG")), image_ok),
        Case("cmyk.tif", _write(_encode(PILImage.fromarray(_noise(8, 8, 4), "CMYK"), "TIFF")), image_ok),
        Case("ycbcr.tif", _save(lambda: PILImage.fromarray(_smooth()).convert("YCbCr")), image_ok),
        Case("gray_alpha.png", _write(_encode(PILImage.fromarray(_noise(8, 6, 2), "LA"), "PNG")), image_ok),
        Case("gray_alpha.tif", _write(_encode(PILImage.fromarray(_noise(8, 6, 2), "LA"), "TIFF")), image_ok),
        Case("gray_alpha.webp", _write(_encode(PILImage.fromarray(_smooth(), "RGB").convert("LA"), "WEBP")), image_ok),
        Case("rgba.png", _write(_encode(_noise(7, 9, 4), "PNG")), image_ok),
        Case("rgba.webp", _write(_encode(np.dstack([_smooth(), _smooth()[..., 1]]), "WEBP", lossless=True)), image_ok),
    ]
    cases += [Case(f"exif{o}.jpg", _write(_exif_image("JPEG", o, quality=95)), image_ok) for o in range(1, 9)]
    cases += [
        Case("exif6.png", _write(_exif_image("PNG", 6)), image_ok),
        Case("exif3.webp", _write(_exif_image("WEBP", 3, lossless=True)), image_ok),
        Case("exif0.jpg", _write(_exif_image("JPEG", 0)), image_ok),  # invalid values mean "as stored"
        Case("exif9.jpg", _write(_exif_image("JPEG", 9)), image_ok),
        Case("exif_garbage.jpg", _write(_garbage_exif_jpeg()), image_ok, may_fail=True),
    ]
    return cases


def _hostile() -> list[Case]:
    png, jpg = _encode(_noise(10, 12), "PNG"), _encode(_smooth(), "JPEG")
    cases = [Case(f"empty{ext}", _write(b""), msg="empty file") for ext in (".png", ".jpg", ".webp", ".tif", ".bmp")]
    cases += [
        Case("empty.mp4", _write(b"")),
        Case("text.png", _write(b"hello, not an image\n")),
        Case("html.webp", _write(b"<html><body>hi</body></html>\n")),
        Case("pdf.jpg", _write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")),
        Case("zip.tif", _write(b"PK\x03\x04" + bytes(60))),
        Case("random.bmp", _write(np.random.default_rng(5).bytes(700))),
        Case("zeros.png", _write(bytes(64))),
        Case("ones.jpg", _write(b"\xff" * 100)),
        Case("signature_only.png", _write(png[:8])),
        Case("soi_only.jpg", _write(b"\xff\xd8")),
        Case("riff_only.webp", _write(b"RIFF\0\0\0\0WEBP")),
        Case("bomb100k.png", _write(bomb_png(100_000, 100_000)), msg="too many pixels"),
        Case("bomb30k.png", _write(bomb_png(30_000, 30_000)), msg="too many pixels"),
        Case("bomb12k.png", _write(bomb_png(12_000, 12_000)), msg="too many pixels"),
        Case("bomb.jpg", _write(_bomb_jpeg()), msg="too many pixels"),
        Case("bomb.bmp", _write(_bomb_bmp()), msg="too many pixels"),
        Case("png_as.jpg", _write(png), image_ok),  # wrong extensions: read by content
        Case("jpeg_as.png", _write(jpg), image_ok),
        Case("webp_as.bmp", _write(_encode(_noise(5, 6), "WEBP", lossless=True)), image_ok),
        Case("png_as.txt", _write(png), image_ok),
        Case("png_as_noext", _write(png), image_ok),
        Case("png_as.mp4", _write(png), video_ok, may_fail=True),  # FFmpeg may read it as a 1-frame video
        Case("missing.png", lambda p: None, msg="no such file"),
        Case("missing.mp4", lambda p: None, msg="no such file"),
        Case("dangling.png", lambda p: p.symlink_to(p.with_name("nowhere.png")), msg="no such file"),
        Case("fifo.png", lambda p: os.mkfifo(p), msg="not a regular file"),  # must not hang on open
        Case("fifo.mp4", lambda p: os.mkfifo(p), msg="not a regular file"),
        # symlink loops and an empty folder named like an image are reported, the run goes on
        Case("loop.png", lambda p: p.symlink_to(p.name), msg="symlink loop"),
        Case("loop_a.jpg", lambda p: (p.symlink_to("loop_b.jpg"), p.with_name("loop_b.jpg").symlink_to(p.name)),
             msg="symlink loop"),
        Case("adir.png", lambda p: p.mkdir(), msg="folder holds no image or video"),
        # animations and multi-page files: every frame or none, never the first one silently
        Case("anim_gif.gif", _frames("GIF", duration=100, loop=0), msg="3 frames"),
        Case("anim.png", _frames("PNG", duration=100), msg="3 frames"),  # APNG
        Case("anim.webp", _frames("WEBP", lossless=True), msg="3 frames"),
        Case("pages.tif", _frames("TIFF", 2), msg="2 frames"),
    ]
    return cases


def _videos() -> list[Case]:
    rng = np.random.default_rng(9)

    def garbage_middle(data: bytes) -> bytes:
        n = len(data)
        return data[: n // 3] + rng.bytes(n // 3) + data[2 * n // 3 :]

    cases = [
        Case("text.mp4", _write(b"not a video\n")),
        Case("zero_frames.mkv", _clip(frames=0), msg="no video frames"),
        Case("audio_only.mp4", _clip(video=False), msg="no video stream"),
        Case("audio_only.mkv", _clip(video=False), msg="no video stream"),
        Case("clip_as.png", _clip_bytes(".mp4", lambda d: d)),  # a video where an image is expected
        Case("garbage_head.mp4", _clip_bytes(".mp4", lambda d: rng.bytes(64) + d[64:]), video_ok, may_fail=True),
        Case("garbage_mid.mp4", _clip_bytes(".mp4", garbage_middle), video_ok, may_fail=True),
        Case("garbage_mid.mkv", _clip_bytes(".mkv", garbage_middle), video_ok, may_fail=True),
    ]
    cases += [  # every listed container round-trips (AVI at its rate, WebM as VP9), rotation kept
        Case(f"rate10{ext}", _clip(frames=10, rate=10), same_video) for ext in (".mp4", ".mkv", ".mov", ".avi", ".webm")
    ]
    cases += [
        Case("rotated90.mp4", _clip(rotation=90), same_video),
        Case("rotated180.mkv", _clip(rotation=180), same_video),
        Case("size_change.mkv", make_size_change_clip, msg="frame size changes at frame 5"),
    ]
    for ext in (".mp4", ".mkv"):
        cases += [
            Case(f"vtrunc{int(f * 100)}{ext}", _clip_bytes(ext, lambda d, f=f: d[: int(len(d) * f)]), video_ok, True)
            for f in (0.1, 0.5, 0.9)
        ]
    return cases


CORPUS = _truncated() + _odd_images() + _hostile() + _videos()


def test_corpus_is_large_and_outputs_do_not_collide() -> None:
    assert len(CORPUS) >= 100
    names = [c.name for c in CORPUS]
    assert len(set(names)) == len(names)
    outs = [out_name(Path(n)) for n in names]
    assert len(set(outs)) == len(outs)  # so the whole corpus can run as one batch into one folder


# --- running ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return build_nearest_bundle(tmp_path_factory.mktemp("nn") / "b", scale=S, patch=16, overlap=2)


def _needs(case: Case) -> None:
    if case.name.endswith((".mp4", ".mkv", ".mov", ".avi", ".webm")) or case.name.startswith("clip_as"):
        pytest.importorskip("av")
    if "fifo" in case.name and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_bad_input_fails_by_name_or_gives_a_correct_output(
    case: Case, bundle: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    _needs(case)
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    src = tmp_path / "in" / case.name
    case.make(src)
    before = src.read_bytes() if src.is_file() else None
    code = cli.main([str(src), "-o", str(out), "--bundle", str(bundle), "--backend", "ort"])
    captured = capfd.readouterr()  # file-descriptor level: FFmpeg or Pillow writing to stderr is caught too
    err = [line for line in captured.err.splitlines() if line.strip()]
    written = sorted(p.name for p in out.iterdir())
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert (src.read_bytes() if src.is_file() else None) == before  # the input is never touched
    if code == 0:
        assert case.check is not None, f"{case.name} was accepted: {captured.out.strip()}"
        assert written == [out_name(src)], "exactly the output, no temporary files"
        assert all(str(src) in line and "error" not in line for line in err), err  # warnings: one line, named
        case.check(src, out / written[0])
    else:
        assert case.check is None or case.may_fail, f"{case.name} was refused: {err}"
        assert code == 2 and written == [], "no output and no temporary file after a failure"
        assert len(err) == 2, err
        assert err[0].startswith("wbsr-run: error: ") and str(src) in err[0] and case.msg in err[0]
        assert err[1] == "wbsr-run: error: 1 of 1 inputs failed"


@pytest.mark.slow
def test_whole_corpus_in_one_subprocess_run(bundle: Path, tmp_path: Path) -> None:
    """One process, every input: the batch goes on after each failure, stderr holds only one-line errors."""
    pytest.importorskip("av")
    (tmp_path / "in").mkdir()
    srcs = []
    for case in CORPUS:
        case.make(tmp_path / "in" / case.name)
        srcs.append(tmp_path / "in" / case.name)
    good = tmp_path / "in" / "good.png"
    PILImage.fromarray(_noise(9, 13)).save(good)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "wbsr_runtime.cli", *map(str, [*srcs, good]), "-o", str(out)]
    r = subprocess.run(
        [*argv, "--bundle", str(bundle), "--backend", "ort"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.splitlines()
    failed = [line for line in err[:-1] if line.startswith("wbsr-run: error: ")]
    assert err[-1] == f"wbsr-run: error: {len(failed)} of {len(srcs) + 1} inputs failed"
    warned = [line for line in err[:-1] if line not in failed]  # e.g. corrupt EXIF: one line naming the file
    assert all(any(f"{s}:" in line for s in srcs) for line in warned), warned
    written = {p.name for p in out.iterdir()}
    assert not [n for n in written if n.endswith(".tmp") or n.startswith(".")]
    named = [s for s in srcs if any(f"{s}:" in line for line in failed)]
    assert len(named) == len(failed)  # each error line names one input
    for s in srcs:  # and each input either failed by name or has its output
        assert (s in named) != (out_name(s) in written), s.name
    assert "good.png" in written and len(failed) >= 50
    assert sum(1 for c in CORPUS if c.check is None) <= len(failed)
