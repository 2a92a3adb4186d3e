"""`wbsr-run`: upscale images, folders of images and videos with a WBSR bundle.

Every bad input prints one line on stderr naming the file and is skipped; the others are still processed, a
count of failures closes the run and the exit code is 2. SIGINT exits 130 and SIGTERM 143, after removing
temporary files; outputs are only ever renamed into place when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from wbsr_runtime.manifest import BundleError
from wbsr_runtime.media import IMAGE_EXTS, MediaError, read_image, upscale_image, write_image

DEFAULT_MAX_PIXELS = 16384 * 16384  # as wbsr_runtime.upscaler.DEFAULT_MAX_PIXELS, without importing it
DEFAULT_MERGE = 4  # as wbsr_runtime.upscaler.DEFAULT_MERGE
VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi", ".webm")  # as wbsr_runtime.video.VIDEO_EXTS, without PyAV
_EXPECTED = (MediaError, BundleError, OSError, ValueError)

EPILOG = """\
OUT is a file when there is one input file, else a folder (created; outputs keep the input names). Folder
inputs are read non-recursively: files with an image (.png .jpg .jpeg .webp .tif .tiff .bmp) or video
(.mp4 .mkv .mov .avi .webm) extension. Any other file given by name is tried as an image. Audio of a video is
copied. --routing-map: with one image input, the map is written to that path; with several inputs, each
image's map goes into OUT as <name>.routing.png. --stats: one input -> that call's stats; several -> a JSON
object keyed by input path (for a video, the stats of its last frame). Exit codes: 0 ok, 2 any input failed
or bad usage, 130 interrupted (SIGINT), 143 terminated (SIGTERM)."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so every temporary file is cleaned up on the way out."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wbsr-run",
        description="Upscale images and videos with a WBSR bundle.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, metavar="DIR", help="bundle folder (from wbsr-export)")
    src.add_argument("--scale", type=int, metavar="S", help="use the shipped default model for scale S")
    p.add_argument("--backend", choices=("ort", "torch", "trt", "auto"), default="auto")
    p.add_argument("--mode", choices=("dynamic", "full", "whole"), default="dynamic")
    knob = p.add_mutually_exclusive_group()
    knob.add_argument("--tolerance", type=float, metavar="DB", help="PSNR loss allowed per class (dB)")
    knob.add_argument("--budget", type=float, metavar="F", help="FLOPs as a fraction of the full model")
    p.add_argument(
        "--cost",
        choices=("flops", "measured"),
        help="rank subnets by FLOPs (default) or by their time measured on this backend at start-up",
    )
    p.add_argument("--patch", type=int, metavar="P", help="LR tile core size (default: the bundle's)")
    p.add_argument("--overlap", type=int, metavar="O", help="LR context per side (default: the bundle's)")
    p.add_argument(
        "--merge",
        type=int,
        metavar="N",
        help="run neighbouring tiles of one subnet as windows of up to N x N tiles "
        f"(default {DEFAULT_MERGE}; 0: equal tiles, as TensorRT engines take)",
    )
    p.add_argument("--workers", type=int, default=1, metavar="N")
    p.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help=f"refuse images and video frames of more than N LR pixels (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument("--routing-map", type=Path, metavar="PNG", help="draw the subnet chosen per tile")
    p.add_argument("--stats", type=Path, metavar="JSON", help="write the upscaler's stats as JSON")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    return p


def _make_upscaler(args: argparse.Namespace) -> Any:
    from wbsr_runtime.upscaler import Upscaler

    kw = {
        k: getattr(args, k)
        for k in ("tolerance", "budget", "cost", "patch", "overlap", "merge", "max_pixels")
        if getattr(args, k) is not None
    }
    if args.bundle is None:
        kw["scale"] = 4 if args.scale is None else args.scale
    return Upscaler(args.bundle, backend=args.backend, mode=args.mode, workers=args.workers, **kw)


def _expand(inputs: Sequence[Path]) -> tuple[list[Path], bool]:
    """Input files in order (folders listed, sorted, non-recursive) and whether OUT must be a folder."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            exts = IMAGE_EXTS | set(VIDEO_EXTS)
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in exts)
        else:
            files.append(p)  # a missing file is reported when its turn comes
    return files, len(inputs) > 1 or any(p.is_dir() for p in inputs)


def _out_name(src: Path) -> str:
    ext = src.suffix.lower()
    return src.name if ext in IMAGE_EXTS or ext in VIDEO_EXTS else src.stem + ".png"


def _check_target(dst: Path, inputs: set[Path], force: bool) -> None:
    """Refuse writing over an input, or over an existing file without --force."""
    if dst.resolve() in inputs:
        raise MediaError(f"{dst}: output is also an input; refusing to overwrite it")
    if dst.exists() and not force:
        raise MediaError(f"{dst}: exists (use --force to overwrite)")


def _atomic_json(path: Path, obj: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray | np.generic):
            return o.tolist()
        return str(o)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stats_dict(upscaler: Any) -> dict[str, Any] | None:
    stats = getattr(upscaler, "last_stats", None)
    if stats is None:
        return None
    return stats.as_dict() if hasattr(stats, "as_dict") else dataclasses.asdict(stats)


def _routing_map(upscaler: Any, sr_rgb: np.ndarray, path: Path) -> None:
    from wbsr_runtime.media import Image, draw_routing_map

    stats = upscaler.last_stats
    if stats is None or getattr(stats, "boxes", None) is None or getattr(stats, "subnets", None) is None:
        raise MediaError(f"{path}: no routing map in this mode (no tiles)")
    n = len(upscaler.manifest.subnets)
    write_image(path, Image(draw_routing_map(sr_rgb, stats.boxes, stats.subnets, n, int(upscaler.scale))))


def _process(src: Path, dst: Path, upscaler: Any, map_path: Path | None) -> str:
    """Upscale one input into `dst`; returns the line to print."""
    if src.suffix.lower() in VIDEO_EXTS:
        from wbsr_runtime.video import upscale_video

        r = upscale_video(src, dst, upscaler, progress=sys.stderr.isatty())
        audio = ", audio copied" if r.audio else ""
        return f"{dst} ({r.frames} frames, {r.width}x{r.height} at {float(r.fps or 0):.3f} fps{audio})"
    sr = upscale_image(read_image(src, getattr(upscaler, "max_pixels", None)), upscaler)
    write_image(dst, sr)
    if map_path is not None:
        _routing_map(upscaler, sr.rgb, map_path)
        return f"{dst} (routing map: {map_path})"
    return str(dst)


def _jobs(args: argparse.Namespace) -> Iterator[tuple[Path, Path, Path | None]]:
    files, folder_out = _expand(args.inputs)
    folder_out = folder_out or args.output.is_dir()
    if folder_out:
        args.output.mkdir(parents=True, exist_ok=True)
    for src in files:
        dst = args.output / _out_name(src) if folder_out else args.output
        map_path = None
        if args.routing_map is not None and src.suffix.lower() not in VIDEO_EXTS:
            map_path = (
                args.output / f"{Path(_out_name(src)).stem}.routing.png" if folder_out else args.routing_map
            )
        yield src, dst, map_path


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _err(msg: str) -> None:
    print(f"wbsr-run: error: {' '.join(msg.split())}", file=sys.stderr)


def _run_all(args: argparse.Namespace, upscaler: Any) -> tuple[int, int, dict[str, Any]]:
    """Process every input; returns (inputs, failures, stats keyed by input)."""
    inputs = {p.resolve() for p in _expand(args.inputs)[0]}
    done: set[Path] = set()
    total = failures = 0
    stats: dict[str, Any] = {}
    for src, dst, map_path in _jobs(args):
        total += 1
        try:
            if dst.resolve() in done:
                raise MediaError(f"{src}: another input already wrote {dst}")
            for target in (dst, map_path) if map_path is not None else (dst,):
                _check_target(target, inputs, args.force)
            print(_process(src, dst, upscaler, map_path), flush=True)
            done.add(dst.resolve())
            stats[str(src)] = _stats_dict(upscaler)
        except _EXPECTED as e:
            failures += 1
            _err(str(e) if str(src) in str(e) or str(dst) in str(e) else f"{src}: {e}")
        except Exception as e:  # never a traceback: one line with the type, the run goes on
            failures += 1
            _err(f"{src}: unexpected {type(e).__name__}: {e}")
    return total, failures, stats


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    inputs = {p.resolve() for p in _expand(args.inputs)[0]}
    if args.stats is not None:
        try:
            _check_target(args.stats, inputs, args.force)
        except MediaError as e:
            _err(str(e))
            return 2
    with _sigterm_as_interrupt():
        try:
            try:
                upscaler = _make_upscaler(args)
            except Exception as e:  # missing/tampered bundle, no default model, backend unavailable
                _err(f"{type(e).__name__}: {e}" if not isinstance(e, _EXPECTED) else str(e))
                return 2
            with upscaler:
                total, failures, stats = _run_all(args, upscaler)
            if args.stats is not None and stats:
                _atomic_json(args.stats, next(iter(stats.values())) if total == 1 else stats)
                print(f"{args.stats} (stats)")
        except KeyboardInterrupt as e:
            _err("terminated" if isinstance(e, _Terminated) else "interrupted")
            return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    if failures:
        _err(f"{failures} of {total} inputs failed")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
