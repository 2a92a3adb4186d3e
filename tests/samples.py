"""Media generated for the tests: short clips (PyAV), and broken or hostile images (bytes)."""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

CLIP_CODECS = {".webm": ("libvpx-vp9", "libopus"), ".avi": ("mpeg4", "aac")}  # others: H.264 + AAC


def make_clip(
    path: Path,
    frames: int = 8,
    size: tuple[int, int] = (32, 24),
    audio: bool = True,
    video: bool = True,
    rate: int = 12,
    rotation: int | None = None,
) -> None:
    """A tiny clip in the container of `path`'s extension (H.264 or MPEG-4 + AAC; WebM: VP9 + Opus) with an
    optional tone; frames=0 leaves the video stream empty; `rotation`: a display matrix rotating it (degrees)."""
    import av

    vcodec, acodec = CLIP_CODECS.get(path.suffix, ("libx264" if "libx264" in av.codecs_available else "mpeg4", "aac"))
    with av.open(str(path), "w") as out:
        vs = out.add_stream(vcodec, rate=rate) if video else None
        if vs is not None:
            vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
            if rotation is not None:
                vs.set_display_rotation(rotation)
        a_s = out.add_stream(acodec, rate=48000) if audio and acodec in av.codecs_available else None
        if a_s is not None:
            a_s.layout = "mono"
        for i in range(frames if video else 0):
            img = np.full((size[1], size[0], 3), (i * 30) % 256, np.uint8)
            img[:, : size[0] // 2, 1] = 200
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        if a_s is not None:
            t = np.arange(48000 * max(frames, 8) // rate) / 48000
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for k in range(0, len(tone) - 1023, 1024):
                f = av.AudioFrame.from_ndarray(tone[None, k : k + 1024], format="fltp", layout="mono")
                f.sample_rate, f.pts = 48000, k
                # AVI cannot place the AAC priming packet (before 0): FFmpeg would shift the video for it
                out.mux([pk for pk in a_s.encode(f) if path.suffix != ".avi" or pk.dts >= 0])
            out.mux(a_s.encode(None))
        if vs is not None:
            out.mux(vs.encode(None))
        out.start_encoding()  # writes the header even when there is nothing to mux


def make_size_change_clip(path: Path, sizes: tuple[tuple[int, int], ...] = ((32, 24), (48, 32))) -> None:
    """A Matroska clip whose H.264 stream changes frame size midway (4 frames of each size), as a concatenated
    broadcast or screen recording can: two raw H.264 streams back to back, remuxed."""
    import av

    raw = b""
    for w, h in sizes:
        buf = io.BytesIO()
        with av.open(buf, "w", format="h264") as out:
            vs = out.add_stream("libx264", rate=10)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            for i in range(4):
                out.mux(vs.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 * i, np.uint8), format="rgb24")))
            out.mux(vs.encode(None))
        raw += buf.getvalue()
    with av.open(io.BytesIO(raw), format="h264") as inp, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for i, packet in enumerate(p for p in inp.demux(video=0) if p.size):
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 10)
            out.mux(packet)


def probe(path: Path) -> dict:
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = list(c.decode(video=0))
        return {
            "frames": len(frames),
            "rate": v.average_rate,
            "size": (v.codec_context.width, v.codec_context.height),
            "audio": len(c.streams.audio),
            "times": [float(f.pts * f.time_base) for f in frames],
            "rotation": frames[0].rotation if frames else None,
            "codec": v.codec_context.name,
        }


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    PILImage.fromarray(noise).save(buf, format=fmt)
    return buf.getvalue()


def bad_image_corpus() -> list[tuple[str, bytes]]:
    """(file name, bytes) of broken images: each must give MediaError or a complete image, never a crash."""
    corpus = [
        ("empty.png", b""),
        ("text.png", b"hello, not an image\n"),
        ("bomb.png", bomb_png(100_000, 100_000)),
        ("zero.png", b"\0" * 64),
    ]
    for fmt, ext in (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")):
        data = _encoded(fmt)
        for frac in (0.01, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
            corpus.append((f"trunc{int(frac * 100)}{ext}", data[: int(len(data) * frac)]))
    corpus.append(("png_as.jpg", _encoded("PNG")[:200]))
    return corpus
