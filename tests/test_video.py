"""Video: frames, rate, timestamps, size and audio survive; bad videos fail by name; no partial outputs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.standin import NearestUpscaler
from wbsr_runtime.media import MediaError
from wbsr_runtime.video import upscale_video

av = pytest.importorskip("av")


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
    import io

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


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_clip(path)
    return path


def test_video_keeps_frames_rate_timestamps_and_audio(clip: Path, tmp_path: Path) -> None:
    res = upscale_video(clip, tmp_path / "out.mp4", NearestUpscaler(scale=2), progress=False)
    src, out = probe(clip), probe(tmp_path / "out.mp4")
    assert out["frames"] == src["frames"] == res.frames == 8
    assert out["rate"] == src["rate"] == Fraction(12) and out["size"] == (64, 48) == (res.width, res.height)
    assert np.allclose(out["times"], src["times"], atol=1e-3)
    assert src["audio"] == out["audio"] == int(res.audio) == int("aac" in av.codecs_available)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_video_to_mkv(clip: Path, tmp_path: Path) -> None:
    res = upscale_video(clip, tmp_path / "out.mkv", NearestUpscaler(scale=3), progress=False)
    assert probe(tmp_path / "out.mkv")["frames"] == 8 and (res.width, res.height) == (96, 72)


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_failure_midway_leaves_no_output(clip: Path, tmp_path: Path, exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        upscale_video(clip, tmp_path / "out.mp4", NearestUpscaler(fail_on=(3, exc)), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_audio_only_zero_frames_truncated_and_missing_fail_by_name(clip: Path, tmp_path: Path) -> None:
    make_clip(tmp_path / "audio.mp4", video=False)
    make_clip(tmp_path / "empty.mkv", frames=0)  # a video stream with no frames (and audio)
    (tmp_path / "trunc.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    (tmp_path / "text.mp4").write_text("not a video\n")
    for name, what in [
        ("audio.mp4", "no video stream"),
        ("empty.mkv", "no video frames"),
        ("trunc.mp4", None),
        ("text.mp4", None),
        ("missing.mp4", "no such file"),
    ]:
        with pytest.raises(MediaError, match=what) as e:
            upscale_video(tmp_path / name, tmp_path / "out.mp4", NearestUpscaler(), progress=False)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "out.mp4").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".mov", ".avi", ".webm"])
def test_every_listed_container_keeps_frames_rate_timestamps_and_audio(tmp_path: Path, ext: str) -> None:
    """Issue 13: AVI came out at 600 fps with out-of-order timestamps and WebM always failed (H.264 in WebM)."""
    src, out = tmp_path / f"in{ext}", tmp_path / f"out{ext}"
    make_clip(src, frames=10, rate=10)
    res = upscale_video(src, out, NearestUpscaler(scale=2), progress=False)
    got = probe(out)
    assert got["frames"] == res.frames == 10 and got["rate"] == Fraction(10) and got["size"] == (64, 48)
    np.testing.assert_allclose(got["times"], np.arange(10) / 10, atol=2e-3)  # in order, at 10 fps, from 0
    assert got["audio"] == probe(src)["audio"] == int(res.audio) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".mov", ".webm"])
def test_display_rotation_is_kept(tmp_path: Path, ext: str) -> None:
    """A phone clip stored sideways with a 90-degree display matrix must play upright after upscaling."""
    make_clip(tmp_path / "rotated.mp4", rotation=90)
    assert probe(tmp_path / "rotated.mp4")["rotation"] == 90
    upscale_video(tmp_path / "rotated.mp4", tmp_path / f"out{ext}", NearestUpscaler(scale=2), progress=False)
    assert probe(tmp_path / f"out{ext}")["rotation"] == 90 and probe(tmp_path / f"out{ext}")["size"] == (64, 48)


def test_rotation_into_avi_and_a_size_change_are_refused_in_one_line(tmp_path: Path) -> None:
    make_clip(tmp_path / "rotated.mp4", rotation=-90)
    make_size_change_clip(tmp_path / "change.mkv")
    up = NearestUpscaler(scale=2)
    with pytest.raises(MediaError, match="AVI cannot store") as e:
        upscale_video(tmp_path / "rotated.mp4", tmp_path / "out.avi", up, progress=False)
    assert up.calls == 0, "refused before any frame was upscaled"
    with pytest.raises(MediaError, match=r"frame size changes at frame 5 \(32x24 -> 48x32\)") as e2:
        upscale_video(tmp_path / "change.mkv", tmp_path / "out.mkv", up, progress=False)
    for err in (e, e2):
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["change.mkv", "rotated.mp4"]
