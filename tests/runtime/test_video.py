"""Video: frames, rate, timestamps, size and audio survive; bad videos fail by name; no partial outputs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.samples import make_clip, make_size_change_clip, probe
from tests.standin import NearestUpscaler
from wbsr_runtime.media import MediaError
from wbsr_runtime.video import upscale_video

av = pytest.importorskip("av")


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
    """AVI keeps its rate and timestamp order (it once came out at 600 fps), WebM is written as VP9 + Opus."""
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
