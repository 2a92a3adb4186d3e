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


def make_clip(
    path: Path,
    frames: int = 8,
    size: tuple[int, int] = (32, 24),
    audio: bool = True,
    video: bool = True,
    rate: int = 12,
) -> None:
    """A tiny H.264 (or MPEG-4) clip with an optional AAC tone; frames=0 leaves the video stream empty."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=rate) if video else None
        if vs is not None:
            vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        a_s = out.add_stream("aac", rate=48000) if audio and "aac" in av.codecs_available else None
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
                out.mux(a_s.encode(f))
            out.mux(a_s.encode(None))
        if vs is not None:
            out.mux(vs.encode(None))
        out.start_encoding()  # writes the header even when there is nothing to mux


def probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        times = [float(f.pts * f.time_base) for f in c.decode(video=0)]
        return {
            "frames": len(times),
            "rate": v.average_rate,
            "size": (v.codec_context.width, v.codec_context.height),
            "audio": len(c.streams.audio),
            "times": times,
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
