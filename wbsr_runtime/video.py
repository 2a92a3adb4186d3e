"""Video upscaling through PyAV: decode -> upscale -> encode, overlapped with two threads and bounded queues.

The decode thread demuxes and decodes; the calling thread upscales (so Ctrl-C lands there); the encode thread
encodes and muxes. Audio packets travel through the same queues and are remuxed untouched where the container
can hold their codec (else the video is written without audio, with a warning). Frames keep their timestamps
and time base, so frame rate and timing are the input's; AVI, which has no timestamps, gets the frames at the
average rate. The display matrix (rotation, flips) of the source is written to the output, so it plays the
same way up. A stream whose frame size changes midway is refused. The output is written under a temporary name
in the target folder and published at the end; on any error or interrupt the temporary file is removed.

Encoders per container (`ENCODERS`): H.264 (libx264) in MP4, Matroska and QuickTime, MPEG-4 Part 2 in AVI
(FFmpeg's AVI reader shifts H.264 timestamps by a frame), VP9 (libvpx-vp9) in WebM, which takes VP8/VP9/AV1
only. One that this FFmpeg build lacks is refused before anything is decoded.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from wbsr_runtime.fileio import one_line, publish
from wbsr_runtime.media import VIDEO_EXTS, MediaError, check_regular_file

log = logging.getLogger(__name__)

# Container -> (encoder, its options): constant quality everywhere (x264 CRF 18; VP9 CRF 24 with no bitrate
# cap, multi-threaded rows; MPEG-4 Part 2 quantiser 2, set as qscale in `_open_output`).
ENCODERS = {
    "mp4": ("libx264", {"crf": "18", "preset": "medium"}),
    "matroska": ("libx264", {"crf": "18", "preset": "medium"}),
    "mov": ("libx264", {"crf": "18", "preset": "medium"}),
    "avi": ("mpeg4", {}),
    "webm": ("libvpx-vp9", {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}),
}
_MPEG4_QSCALE = 2  # MPEG-4 Part 2 quantiser: 2 is the finest that players handle well
_FF_QP2LAMBDA = 118  # FFmpeg's quantiser -> lambda factor (global_quality is in lambda units)
_IDENTITY = [65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30]  # FFmpeg's display matrix of "no rotation"
_END = object()


@dataclass(frozen=True)
class VideoResult:
    """What was written: frame count, average frame rate, output size in pixels, whether audio was copied."""

    path: Path
    frames: int
    fps: Fraction | None
    width: int
    height: int
    audio: bool


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise MediaError('video needs PyAV: pip install "wbsr-deploy[video]"') from None
    return av


class _Stop(Exception):
    """Raised in a worker thread when the run is being abandoned."""


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while True:  # bounded put that gives up when the run stops, so no thread blocks forever
        if stop.is_set():
            raise _Stop
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue


def _thread(target: Callable[[], None], errors: list, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except _Stop:
            pass
        except BaseException as e:  # handed to the calling thread, which re-raises it
            errors.append(e)
            stop.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _decode(inp: Any, vstream: Any, astream: Any, out_q: queue.Queue, stop: threading.Event) -> None:
    """Demux and decode: ("v", frame) for video, ("a", packet) for audio, then _END."""
    streams = [s for s in (vstream, astream) if s is not None]
    for packet in inp.demux(*streams):
        if packet.stream is vstream:
            for frame in packet.decode():
                _put(out_q, ("v", frame), stop)
        elif packet.dts is not None:
            _put(out_q, ("a", packet), stop)
    _put(out_q, _END, stop)


def _encode(out: Any, ostream: Any, oaudio: Any, in_q: queue.Queue, stop: threading.Event) -> None:
    while (item := _get(in_q, stop)) is not _END:
        kind, obj = item
        if kind == "a":
            obj.stream = oaudio
            out.mux(obj)
        else:
            out.mux(ostream.encode(obj))
    out.mux(ostream.encode(None))


def _open_input(av: Any, src: Path) -> tuple[Any, Any, Any]:
    check_regular_file(src)  # a FIFO or device would block the demuxer
    try:
        inp = av.open(str(src))
    except Exception as e:
        raise MediaError(f"{src}: cannot open video: {one_line(e, 200)}") from None
    if not inp.streams.video:
        inp.close()
        raise MediaError(f"{src}: no video stream")
    vstream = inp.streams.video[0]
    vstream.thread_type = "AUTO"
    return inp, vstream, (inp.streams.audio[0] if inp.streams.audio else None)


def _display_matrix(av: Any, src: Path) -> list[int] | None:
    """The source's display matrix (9 ints, FFmpeg's layout) when it rotates or flips, read from the first
    decoded frame, else None. PyAV exposes it on frames, not streams, and the output needs it before its first
    frame, hence this separate pass over one frame."""
    try:
        with av.open(str(src)) as c:
            for frame in c.decode(video=0):
                data = frame.side_data.get("DISPLAYMATRIX")
                matrix = None if data is None else [int(v) for v in np.frombuffer(bytes(data), np.int32)]
                return None if matrix == _IDENTITY else matrix
    except Exception:  # an unreadable file: the main pass reports it
        return None
    return None


def _source(av: Any, src: Path, fmt: str, limit: int | None) -> tuple[Any, Any, Any, list[int] | None]:
    """Open `src`: (container, video stream, audio stream or None, display matrix or None), after refusing,
    before decoding, frames over `limit` pixels and a rotation the container `fmt` cannot store."""
    inp, vstream, astream = _open_input(av, src)
    try:
        w, h = vstream.codec_context.width, vstream.codec_context.height
        if limit is not None and w * h > limit:
            raise MediaError(f"{src}: refused, {w}x{h} = {w * h} pixels per frame exceeds the limit of {limit}")
        matrix = _display_matrix(av, src)  # rotation and flips, so the output plays the same way up
        if matrix is not None and fmt == "avi":
            raise MediaError(f"{src}: has a display rotation, which AVI cannot store; write .mp4, .mkv, .mov or .webm")
    except BaseException:
        inp.close()
        raise
    return inp, vstream, astream, matrix


def _encoder(fmt: str, dst: Path, codec: str | None) -> tuple[str, dict[str, str]]:
    """The encoder and options for container `fmt`; MediaError (before anything is decoded) without it."""
    default, options = ENCODERS[fmt]
    name = codec or default
    av = _import_av()
    if name not in av.codecs_available:
        raise MediaError(f"{dst}: this FFmpeg build has no {name} encoder, which {dst.suffix} needs; use .mp4 or .mkv")
    return name, dict(options) if name == default else {}


def _open_output(
    av: Any, tmp: Path, fmt: str, streams: tuple[Any, Any], scale: int, codec: str, options: dict[str, str]
) -> tuple[Any, Any, Any]:
    vstream, astream = streams
    out = av.open(str(tmp), "w", format=fmt)
    rate = vstream.average_rate or vstream.guessed_rate or Fraction(25)
    ostream = out.add_stream(codec, rate=rate, options=options)
    w, h = vstream.codec_context.width * scale, vstream.codec_context.height * scale
    ostream.width, ostream.height = w, h
    even = w % 2 == 0 and h % 2 == 0
    ostream.pix_fmt = "yuv420p" if even or codec == "mpeg4" else "yuv444p"
    tb = Fraction(1, 1) / rate if fmt == "avi" else vstream.time_base  # AVI: one tick per frame
    ostream.time_base = ostream.codec_context.time_base = tb
    if codec == "mpeg4":
        ostream.codec_context.qscale = True
        ostream.codec_context.global_quality = _MPEG4_QSCALE * _FF_QP2LAMBDA
    oaudio = None
    if astream is not None and astream.codec_context.name not in out.supported_codecs:
        log.warning("audio not copied (%s cannot go into %s)", astream.codec_context.name, fmt)
    elif astream is not None:
        try:
            oaudio = out.add_stream_from_template(astream)
        except Exception as e:  # e.g. a codec this container cannot hold: keep the video, say so
            log.warning("audio not copied (%s)", one_line(e, 200))
    return out, ostream, oaudio


def _frames(q: queue.Queue, stop: threading.Event, errors: list) -> Iterator[tuple[str, Any]]:
    while (item := _get(q, stop)) is not _END:
        yield item
    if errors:
        raise errors[0]


def upscale_video(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    upscaler: Any,
    *,
    codec: str | None = None,
    queue_size: int = 8,
    progress: bool = True,
    overwrite: bool = True,
) -> VideoResult:
    """Upscale every frame of `src` into `dst` with `upscaler.upscale`, (H, W, 3) -> (H*s, W*s, 3) uint8.

    Same frame timestamps and time base (so the same frame rate; AVI: the average rate), same display matrix,
    size times `upscaler.scale`, the first audio stream copied without re-encoding where `dst`'s container
    takes its codec. `codec`: an FFmpeg encoder name instead of the container's (`ENCODERS`). Raises
    `MediaError` (naming the file) for a missing, unreadable or frameless video, a video without a video stream
    or whose frame size changes midway, an unsupported extension or a missing encoder (those two before
    decoding), or an existing `dst` without `overwrite`; `dst` never exists partially.
    """
    av = _import_av()
    src, dst = Path(src), Path(dst)
    fmt = VIDEO_EXTS.get(dst.suffix.lower())
    if fmt is None:
        raise MediaError(f"{dst}: unsupported video extension (use one of {', '.join(VIDEO_EXTS)})")
    codec, options = _encoder(fmt, dst, codec)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    inp, vstream, astream, matrix = _source(av, src, fmt, getattr(upscaler, "max_pixels", None))
    out = None
    try:
        out, ostream, oaudio = _open_output(av, tmp, fmt, (vstream, astream), int(upscaler.scale), codec, options)
        if matrix is not None:
            ostream.set_display_matrix(matrix)
        frames = _run(av, src, inp, out, (vstream, astream, ostream, oaudio), upscaler, queue_size, progress)
        if frames == 0:
            raise MediaError(f"{src}: no video frames could be decoded")
        out.close()
        out = None
        publish(tmp, dst, overwrite)
    except BaseException as e:
        if out is not None:
            try:
                out.close()
            except Exception:  # the container is broken already; removing the file is what matters
                pass
        tmp.unlink(missing_ok=True)
        if isinstance(e, FileExistsError):
            raise MediaError(f"{dst}: exists (use --force to overwrite)") from None
        if isinstance(e, av.FFmpegError):
            raise MediaError(f"{src}: video error: {one_line(e, 200)}") from None
        raise
    finally:
        inp.close()
    return VideoResult(dst, frames, vstream.average_rate, ostream.width, ostream.height, oaudio is not None)


def _upscaled(av: Any, src: Path, frame: Any, n: int, upscaler: Any, ostream: Any, numbered: bool) -> Any:
    """Frame `n` (0-based) upscaled, with its timestamp in the output's time base (AVI: its number)."""
    if (frame.width, frame.height) != (ostream.width // upscaler.scale, ostream.height // upscaler.scale):
        raise MediaError(
            f"{src}: the frame size changes at frame {n + 1} ({ostream.width // upscaler.scale}x"
            f"{ostream.height // upscaler.scale} -> {frame.width}x{frame.height}); split the video where it changes"
        )
    sr = av.VideoFrame.from_ndarray(upscaler.upscale(frame.to_ndarray(format="rgb24")), format="rgb24")
    sr.pts = n if numbered or frame.pts is None else frame.pts
    sr.time_base = ostream.time_base
    return sr


def _run(
    av: Any, src: Path, inp: Any, out: Any, streams: tuple, upscaler: Any, queue_size: int, progress: bool
) -> int:
    """The three-stage pipeline; returns the number of frames encoded."""
    vstream, astream, ostream, oaudio = streams
    stop, errors = threading.Event(), []
    decoded: queue.Queue = queue.Queue(queue_size)
    upscaled: queue.Queue = queue.Queue(queue_size)
    audio_in = astream if oaudio is not None else None  # audio the container cannot take is not even read
    threads = [_thread(lambda: _decode(inp, vstream, audio_in, decoded, stop), errors, stop)]
    threads.append(_thread(lambda: _encode(out, ostream, oaudio, upscaled, stop), errors, stop))
    numbered = out.format.name == "avi"  # no timestamps: frame numbers at the average rate
    n = 0
    try:
        with tqdm(
            total=vstream.frames or None, unit="frame", desc=src.name, disable=not progress, leave=False
        ) as bar:
            for kind, obj in _frames(decoded, stop, errors):
                if kind == "v":
                    obj, n = _upscaled(av, src, obj, n, upscaler, ostream, numbered), n + 1
                    bar.update(1)
                elif numbered and obj.dts < 0:
                    continue  # AVI cannot place audio before 0 (AAC priming): it would shift the video
                _put(upscaled, (kind, obj), stop)
        _put(upscaled, _END, stop)
        threads[1].join()
    except _Stop:
        pass
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return n
