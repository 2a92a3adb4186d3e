"""The VapourSynth filter (`wbsr_runtime.vapoursynth`) against `Upscaler.upscale` on the same frames.

VapourSynth's wheels need Python >= 3.12: the default suite skips this module, and CI runs it in a 3.12 venv
(`.ci/run`). The shipped x4 bundle is the model (no torch needed); frames are crops of the Set5 test images.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

vs = pytest.importorskip(
    "vapoursynth", reason="VapourSynth is not installed (Python >= 3.12; CI runs these tests in a 3.12 venv)"
)

from PIL import Image  # noqa: E402

import wbsr_runtime.vapoursynth as wbsr  # noqa: E402
from tests import DATA  # noqa: E402
from wbsr_runtime.upscaler import Upscaler  # noqa: E402

core = vs.core
SET5 = DATA / "Set5" / "HR"


def crops(count: int = 3, h: int = 72, w: int = 88) -> list[np.ndarray]:
    """(h, w, 3) uint8 crops of different Set5 images: real textures, so routing picks several subnets."""
    paths = sorted(SET5.glob("*.png"))[:count]
    return [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))[:h, :w]) for p in paths]


def clip_of(arrays: list[np.ndarray], fmt: vs.PresetVideoFormat) -> vs.VideoNode:
    """A clip whose frame n is arrays[n] ((h, w, 3), of the format's sample type)."""
    h, w = arrays[0].shape[:2]
    base = core.std.BlankClip(format=fmt, width=w, height=h, length=len(arrays))

    def fill(n: int, f: vs.VideoFrame) -> vs.VideoFrame:
        out = f.copy()
        for p in range(3):
            np.copyto(np.asarray(out[p]), arrays[n][..., p])
        return out

    return base.std.ModifyFrame(base, fill)


def planes(frame: vs.VideoFrame) -> list[np.ndarray]:
    return [np.asarray(frame[p]).copy() for p in range(frame.format.num_planes)]


def rgb_frames(clip: vs.VideoNode) -> list[np.ndarray]:
    return [np.stack(planes(f), axis=-1) for f in clip.frames()]


@pytest.mark.parametrize("mode", ["dynamic", "full", "whole"])
def test_rgb24_equals_upscaler_bit_for_bit(mode: str) -> None:
    frames = crops()
    out = wbsr.upscale(clip_of(frames, vs.RGB24), mode=mode, workers=2, stats=True)
    assert (out.format.id, out.width, out.height, out.num_frames) == (vs.RGB24, 352, 288, 3)
    with Upscaler(scale=4, mode=mode) as up:
        for lr, f in zip(frames, out.frames(), strict=True):
            np.testing.assert_array_equal(np.stack(planes(f), axis=-1), up.upscale(lr))
            counts = up.last_stats.tiles_per_subnet
            assert list(f.props["WbsrSubnetShare"]) == pytest.approx([c / sum(counts) for c in counts])
            assert f.props["WbsrFlops"] == pytest.approx(up.last_stats.flops)
            assert f.props["WbsrFlopsRatio"] == pytest.approx(up.last_stats.flops_ratio)
    if mode == "dynamic":  # real routing: more than one subnet ran somewhere in the clip
        shares = np.array([list(f.props["WbsrSubnetShare"]) for f in out.frames()])
        assert (shares.sum(axis=0) > 0).sum() > 1


@pytest.mark.parametrize(("fmt", "dtype", "atol"), [("RGBS", np.float32, 1e-6), ("RGBH", np.float16, 1e-3)])
def test_float_clips_equal_upscaler(fmt: str, dtype: type, atol: float) -> None:
    frames = [(c / 255.0).astype(dtype) for c in crops(2)]
    out = wbsr.upscale(clip_of(frames, getattr(vs, fmt)), device="cpu", backend="ort")
    assert out.format.id == getattr(vs, fmt) and not any(k.startswith("Wbsr") for k in out.get_frame(0).props)
    with Upscaler(scale=4, backend="ort") as up:
        for lr, sr in zip(frames, rgb_frames(out), strict=True):
            assert sr.dtype == dtype
            np.testing.assert_allclose(sr.astype(np.float32), up.upscale(lr).astype(np.float32), atol=atol, rtol=0)


def test_rgb48_and_other_depths() -> None:
    frames16 = [c.astype(np.uint16) * 257 for c in crops(2)]
    out = wbsr.upscale(clip_of(frames16, vs.RGB48), mode="full")
    with Upscaler(scale=4, mode="full") as up:
        for lr, sr in zip(frames16, rgb_frames(out), strict=True):
            np.testing.assert_array_equal(sr, up.upscale(lr))
    rgb30 = clip_of(frames16, vs.RGB48).resize.Point(format=vs.RGB30)
    out30 = wbsr.upscale(rgb30, mode="full")
    assert (out30.format.id, out30.width) == (vs.RGB30, 352)
    ref = wbsr.upscale(rgb30.resize.Point(format=vs.RGBS), mode="full").resize.Point(format=vs.RGB30)
    for a, b in zip(rgb_frames(out30), rgb_frames(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def yuv_clip(fmt: vs.PresetVideoFormat = vs.YUV420P8) -> vs.VideoNode:
    """A tagged (BT.709, limited range) clip with the props a source filter sets."""
    clip = clip_of(crops(), vs.RGB24).resize.Bicubic(format=fmt, matrix_s="709", range_s="limited")
    return clip.std.SetFrameProps(_SARNum=4, _SARDen=3, _SceneChangePrev=1, _DurationNum=1001, _DurationDen=24000)


@pytest.mark.parametrize("fmt", ["YUV420P8", "YUV444P10", "GRAY8"])
def test_yuv_and_gray_through_rgb_and_back(fmt: str) -> None:
    clip = yuv_clip(getattr(vs, fmt))
    out = wbsr.upscale(clip)
    assert (out.format.id, out.width, out.height) == (getattr(vs, fmt), 352, 288)
    props = out.get_frame(1).props
    for key, value in clip.get_frame(1).props.items():
        assert props[key] == value, key  # matrix, range, SAR, durations, scene change
    # The documented conversion, written out by hand, around Upscaler.upscale.
    rgb = clip.resize.Bicubic(format=vs.RGBS, matrix_in=1, range_in=0)
    with Upscaler(scale=4) as up:
        sr = [up.upscale(x) for x in rgb_frames(rgb)]
    ref = clip_of(sr, vs.RGBS).resize.Bicubic(format=clip.format.id, matrix=1, range=0)
    for a, b in zip(out.frames(), ref.frames(), strict=True):
        for pa, pb in zip(planes(a), planes(b), strict=True):
            np.testing.assert_array_equal(pa, pb)
    # And the colours are right: luma close to a plain bicubic upscale of the same clip.
    bicubic = clip.resize.Bicubic(352, 288)
    y, y_bic = (np.asarray(c.get_frame(0)[0], dtype=np.float64) for c in (out, bicubic))
    peak = (1 << clip.format.bits_per_sample) - 1
    assert 10 * np.log10(peak**2 / np.mean((y - y_bic) ** 2)) > 25


def test_untagged_yuv_refused_naming_the_prop() -> None:
    clip = yuv_clip()
    for removed, name in ((["_Matrix"], "_Matrix"), (["_Range", "_ColorRange"], "_Range")):
        with pytest.raises(vs.Error) as err:
            wbsr.upscale(clip.std.RemoveFrameProps(removed))
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(vs.Error, match=r"_Matrix is 2 \(unspecified\)"):
        wbsr.upscale(clip.std.SetFrameProps(_Matrix=2))


def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    clip = clip_of(crops(1), vs.RGB24)
    cases = [
        (lambda: wbsr.upscale(clip, mode="fast"), "mode"),
        (lambda: wbsr.upscale(clip, bundle=tmp_path / "none"), "none"),
        (lambda: wbsr.upscale(clip, tolerance=0.1, budget=0.5), "either"),
        (lambda: wbsr.upscale(clip, workers=0), "workers"),
        (lambda: wbsr.upscale(clip, backend="cuda"), "backend"),
        (lambda: wbsr.upscale(np.zeros((4, 4, 3))), "VideoNode"),
        (lambda: wbsr.upscale(core.std.Splice([clip, clip.resize.Point(40, 40)], mismatch=True)), "variable"),
    ]
    for call, word in cases:
        with pytest.raises(vs.Error) as err:
            call()
        message = str(err.value)
        assert message.startswith("wbsr.upscale: ") and "\n" not in message and word in message, message


def test_frame_error_ends_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Upscaler, image: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    out = wbsr.upscale(clip_of(crops(1), vs.RGB24))
    monkeypatch.setattr(Upscaler, "upscale", broken)
    with pytest.raises(vs.Error) as err:
        out.get_frame(0)
    assert str(err.value).strip().splitlines()[-1] == "vapoursynth.Error: wbsr.upscale: frame 0: RuntimeError: boom"


@pytest.mark.parametrize("workers", [1, 2])
def test_frames_run_concurrently_up_to_workers(workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    lock, active, peak = threading.Lock(), [0], [0]
    real = Upscaler.upscale

    def counted(self: Upscaler, image: np.ndarray) -> np.ndarray:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)  # long enough for the other VapourSynth threads to ask for their frames
        try:
            return real(self, image)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(Upscaler, "upscale", counted)
    threads = core.num_threads
    core.num_threads = 4
    try:
        frames = crops(1) * 6
        out = wbsr.upscale(clip_of(frames, vs.RGB24), workers=workers, mode="full")
        got = rgb_frames(out)
    finally:
        core.num_threads = threads
    assert peak[0] == workers
    with Upscaler(scale=4, mode="full") as up:
        np.testing.assert_array_equal(got[5], up.upscale(frames[5]))


def _read_y4m(path: Path, frame_bytes: int) -> tuple[str, list[bytes]]:
    """Header line and the raw frames (`frame_bytes` each) of a YUV4MPEG2 file."""
    header, _, rest = path.read_bytes().partition(b"\n")
    frames = []
    while rest:
        tag, _, rest = rest.partition(b"\n")
        assert tag.startswith(b"FRAME"), tag[:20]
        frames.append(rest[:frame_bytes])
        rest = rest[frame_bytes:]
    return header.decode(), frames


@pytest.mark.slow
def test_vspipe_end_to_end(tmp_path: Path) -> None:
    """The README's pipeline: a tagged video file -> bs.VideoSource -> wbsr.upscale -> vspipe -c y4m."""
    av = pytest.importorskip("av")
    if not hasattr(core, "bs"):
        pytest.skip("the bestsource plugin is not installed (pip install vapoursynth-bestsource)")
    video = tmp_path / "in.mkv"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("ffv1", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        cc = stream.codec_context
        cc.color_range, cc.colorspace, cc.color_primaries, cc.color_trc = 1, 1, 1, 1  # limited, BT.709
        for lr in crops(5, 48, 64):
            frame = av.VideoFrame.from_ndarray(lr, format="rgb24").reformat(format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    script = tmp_path / "upscale.vpy"
    script.write_text(
        "import vapoursynth as vs\nimport wbsr_runtime.vapoursynth as wbsr\n"
        f"clip = vs.core.bs.VideoSource({str(video)!r}, cachemode=0)\n"
        "wbsr.upscale(clip, workers=2).set_output()\n"
    )
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "out.y4m"
    # vspipe finds its Python through `vapoursynth config` (run for it on first use, from PATH), which writes
    # under XDG_CONFIG_HOME: a folder of the test's own, so the user's configuration is left alone.
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "XDG_CONFIG_HOME": str(tmp_path)}
    done = subprocess.run(
        [str(bin_dir / "vspipe"), "-c", "y4m", str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    header, frames = _read_y4m(out, 256 * 192 * 3 // 2)
    assert {"YUV4MPEG2", "W256", "H192", "C420"} <= set(header.split()), header
    expected = wbsr.upscale(core.bs.VideoSource(str(video), cachemode=0), workers=2)
    assert len(frames) == expected.num_frames == 5
    for raw, f in zip(frames, expected.frames(), strict=True):
        assert raw == b"".join(p.tobytes() for p in planes(f))
