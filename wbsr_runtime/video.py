"""Video upscaling through PyAV: decode -> upscale -> encode, overlapped with two threads and bounded queues.

The decode thread demuxes and decodes; the calling thread upscales (so Ctrl-C lands there); the encode thread
encodes and muxes. Audio packets travel through the same queues and are remuxed untouched. Frames keep their
timestamps and time base, so frame rate and timing are the input's. The output is written under a temporary
name in the target folder and renamed at the end; on any error or interrupt the temporary file is removed.
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

from tqdm import tqdm

from wbsr_runtime.media import MediaError, _one_line

log = logging.getLogger(__name__)

VIDEO_EXTS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".avi": "avi", ".webm": "webm"}
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
    if not src.is_file():  # a FIFO or device would block the demuxer
        raise MediaError(f"{src}: {'not a regular file' if src.exists() else 'no such file'}")
    try:
        inp = av.open(str(src))
    except Exception as e:
        raise MediaError(f"{src}: cannot open video: {_one_line(e)}") from None
    if not inp.streams.video:
        inp.close()
        raise MediaError(f"{src}: no video stream")
    vstream = inp.streams.video[0]
    vstream.thread_type = "AUTO"
    return inp, vstream, (inp.streams.audio[0] if inp.streams.audio else None)


def _open_output(
    av: Any, tmp: Path, fmt: str, vstream: Any, astream: Any, scale: int, codec: str, options: dict[str, str]
) -> tuple[Any, Any, Any]:
    out = av.open(str(tmp), "w", format=fmt)
    rate = vstream.average_rate or vstream.guessed_rate or Fraction(25)
    ostream = out.add_stream(codec, rate=rate, options=options)
    w, h = vstream.codec_context.width * scale, vstream.codec_context.height * scale
    ostream.width, ostream.height = w, h
    ostream.pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"
    ostream.time_base = vstream.time_base
    ostream.codec_context.time_base = vstream.time_base
    oaudio = None
    if astream is not None:
        try:
            oaudio = out.add_stream_from_template(astream)
        except Exception as e:  # e.g. a codec this container cannot hold: keep the video, say so
            log.warning("audio not copied (%s)", _one_line(e))
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
    codec: str = "libx264",
    crf: int | None = 18,
    preset: str | None = "medium",
    queue_size: int = 8,
    progress: bool = True,
) -> VideoResult:
    """Upscale every frame of `src` into `dst` with `upscaler.upscale`, (H, W, 3) -> (H*s, W*s, 3) uint8.

    Same frame timestamps and time base (so the same frame rate), size times `upscaler.scale`, the first
    audio stream copied without re-encoding. `crf`/`preset` are x264/x265 options (ignored by others). Raises
    `MediaError` (naming the file) for a missing, unreadable or frameless video or a video without a video
    stream; `dst` never exists partially.
    """
    av = _import_av()
    src, dst = Path(src), Path(dst)
    fmt = VIDEO_EXTS.get(dst.suffix.lower())
    if fmt is None:
        raise MediaError(f"{dst}: unsupported video extension (use one of {', '.join(VIDEO_EXTS)})")
    options = {
        k: str(v)
        for k, v in (("crf", crf), ("preset", preset))
        if v is not None and codec in ("libx264", "libx265")
    }
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    inp, vstream, astream = _open_input(av, src)
    w, h, limit = vstream.codec_context.width, vstream.codec_context.height, getattr(upscaler, "max_pixels", None)
    if limit is not None and w * h > limit:
        inp.close()
        raise MediaError(f"{src}: refused, {w}x{h} = {w * h} pixels per frame exceeds the limit of {limit}")
    out = None
    try:
        out, ostream, oaudio = _open_output(
            av, tmp, fmt, vstream, astream, int(upscaler.scale), codec, options
        )
        frames = _run(av, src, inp, out, (vstream, astream, ostream, oaudio), upscaler, queue_size, progress)
        if frames == 0:
            raise MediaError(f"{src}: no video frames could be decoded")
        out.close()
        out = None
        os.replace(tmp, dst)
    except BaseException as e:
        if out is not None:
            try:
                out.close()
            except Exception:  # the container is broken already; removing the file is what matters
                pass
        tmp.unlink(missing_ok=True)
        if isinstance(e, av.FFmpegError):
            raise MediaError(f"{src}: video error: {_one_line(e)}") from None
        raise
    finally:
        inp.close()
    return VideoResult(dst, frames, vstream.average_rate, ostream.width, ostream.height, oaudio is not None)


def _run(
    av: Any, src: Path, inp: Any, out: Any, streams: tuple, upscaler: Any, queue_size: int, progress: bool
) -> int:
    """The three-stage pipeline; returns the number of frames encoded."""
    vstream, astream, ostream, oaudio = streams
    stop, errors = threading.Event(), []
    decoded: queue.Queue = queue.Queue(queue_size)
    upscaled: queue.Queue = queue.Queue(queue_size)
    threads = [_thread(lambda: _decode(inp, vstream, astream, decoded, stop), errors, stop)]
    threads.append(_thread(lambda: _encode(out, ostream, oaudio, upscaled, stop), errors, stop))
    n = 0
    try:
        with tqdm(
            total=vstream.frames or None, unit="frame", desc=src.name, disable=not progress, leave=False
        ) as bar:
            for kind, obj in _frames(decoded, stop, errors):
                if kind == "v":
                    sr = upscaler.upscale(obj.to_ndarray(format="rgb24"))
                    frame = av.VideoFrame.from_ndarray(sr, format="rgb24")
                    frame.pts, frame.time_base = obj.pts if obj.pts is not None else n, vstream.time_base
                    obj, n = frame, n + 1
                    bar.update(1)
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
