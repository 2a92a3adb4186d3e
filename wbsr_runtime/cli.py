"""`wbsr-run`: upscale images, folders of images and videos with a WBSR bundle.

Every bad input prints one line on stderr naming the file and is skipped; the others are still processed, a
count of failures closes the run and the exit code is 2. What the run would write is checked before any work
(`wbsr_runtime.plan`): colliding outputs, unwritable folders or impossible extensions refuse the whole run in
one line. SIGINT exits 130, SIGTERM 143 and SIGHUP 129, after removing temporary files; outputs are only ever
published when complete, and never over an existing file without --force, even one another process has just
written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from wbsr_runtime import CPU_TORCH, defaults
from wbsr_runtime.fileio import exit_code, interrupts_as_exceptions, one_line, write_json
from wbsr_runtime.manifest import BundleError
from wbsr_runtime.media import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    MediaError,
    pillow_pixel_limit,
    read_image,
    upscale_image,
    write_image,
)
from wbsr_runtime.plan import Job, Plan, UsageError, plan_run, real_path

_EXPECTED = (MediaError, BundleError, OSError, ValueError)

EPILOG = f"""\
OUT is a file when there is one input file, else a folder (created; outputs keep the input names). Folder
inputs are read non-recursively: files with an image ({' '.join(sorted(IMAGE_EXTS))}) or video
({' '.join(VIDEO_EXTS)}) extension. Any other file given by name is tried as an image. Audio of a video is
copied where the container can hold it. --routing-map: with one image input, the map is written to that path;
with several inputs, each image's map goes into OUT as <name>.routing.png. --stats: one input -> that call's
stats; several -> a JSON object keyed by input path (for a video, the stats of its last frame). Two outputs
that would be the same file are refused before any work, with or without --force. --backend torch needs
PyTorch; for the CPU build (a multi-GB CUDA build is what a plain `pip install torch` pulls on Linux):
{CPU_TORCH}. Exit codes: 0 ok, 2 any input failed or bad usage, 130 interrupted (SIGINT), 143 terminated
(SIGTERM), 129 hung up (SIGHUP)."""


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
    p.add_argument(
        "--backend",
        choices=defaults.BACKENDS,
        help="auto (default): TensorRT if the bundle has engines for this GPU, else PyTorch on CUDA, else ONNX "
        f"Runtime's CUDA provider, else ONNX Runtime on the CPU; torch: PyTorch (CPU build: `{CPU_TORCH}`)",
    )
    p.add_argument(
        "--device",
        metavar="cpu|cuda|cuda:N",
        help="where to run (default: auto uses GPU 0 when it can, ort and torch the CPU, trt cuda:0)",
    )
    p.add_argument("--mode", choices=defaults.MODES, help=f"default {defaults.MODES[0]}")
    knob = p.add_mutually_exclusive_group()
    knob.add_argument("--tolerance", type=float, metavar="DB", help="PSNR loss allowed per class (dB, >= 0)")
    knob.add_argument("--budget", type=float, metavar="F", help="cost as a fraction of the full model's, in (0, 1]")
    p.add_argument(
        "--cost",
        choices=defaults.COSTS,
        help="rank subnets by FLOPs (default) or by their time measured on this backend at start-up",
    )
    p.add_argument("--patch", type=int, metavar="P", help="LR tile core size (default: the bundle's)")
    p.add_argument("--overlap", type=int, metavar="O", help="LR context per side (default: the bundle's)")
    p.add_argument(
        "--merge",
        type=int,
        metavar="N",
        help="run neighbouring tiles of one subnet as windows of up to N x N tiles "
        f"(default {defaults.MERGE}; 0: equal tiles, as TensorRT engines take)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="runners working on one frame's tiles in parallel (threads; on a GPU, streams); on the CPU the "
        "cores are shared among them (default 1)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help=f"refuse images and video frames of more than N LR pixels, from their header, before decoding "
        f"(default {defaults.MAX_PIXELS:,}, Pillow's own default limit; this is the only limit)",
    )
    p.add_argument("--routing-map", type=Path, metavar="PNG", help="draw the subnet chosen per tile")
    p.add_argument("--stats", type=Path, metavar="JSON", help="write the upscaler's stats as JSON")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log progress on stderr, e.g. which backend runs and why"
    )
    return p


@contextmanager
def _verbose(on: bool) -> Iterator[None]:
    """With -v, the runtime's INFO log lines (the backend chosen and why, measured costs) go to stderr."""
    if not on:
        yield
        return
    logger, handler = logging.getLogger("wbsr_runtime"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("wbsr-run: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _check_options(args: argparse.Namespace) -> None:
    """The numeric options, before anything loads (the Upscaler checks its own arguments the same way)."""
    from wbsr_runtime.upscaler import check_options

    check_options(
        tolerance=args.tolerance,
        budget=args.budget,
        patch=args.patch,
        overlap=args.overlap,
        merge=args.merge,
        workers=args.workers,
        max_pixels=args.max_pixels,
    )


def _make_upscaler(args: argparse.Namespace) -> Any:
    from wbsr_runtime.upscaler import Upscaler

    given = ("scale", "backend", "device", "mode", "tolerance", "budget", "cost", "patch", "overlap", "merge",
             "workers", "max_pixels")  # the others take the Upscaler's defaults
    return Upscaler(args.bundle, **{k: getattr(args, k) for k in given if getattr(args, k) is not None})


def _check_target(dst: Path, inputs: set[Path], force: bool) -> None:
    """Refuse writing over an input, or over an existing file without --force (checked again, atomically,
    when the output is published: another process may create it meanwhile)."""
    if real_path(dst) in inputs:
        raise MediaError(f"{dst}: output is also an input; refusing to overwrite it")
    if dst.is_symlink() or dst.exists():
        if not force:
            raise MediaError(f"{dst}: exists (use --force to overwrite)")


def _write_json(path: Path, obj: Any, force: bool) -> None:
    try:
        write_json(path, obj, overwrite=force)
    except FileExistsError:
        raise MediaError(f"{path}: exists (use --force to overwrite)") from None
    except OSError as e:
        raise MediaError(f"{path}: cannot write stats: {e.strerror or type(e).__name__}") from None


def _stats_dict(upscaler: Any) -> dict[str, Any] | None:
    stats = getattr(upscaler, "last_stats", None)
    if stats is None:
        return None
    return stats.as_dict() if hasattr(stats, "as_dict") else dataclasses.asdict(stats)


def _routing_map(upscaler: Any, sr_rgb: np.ndarray, path: Path, force: bool) -> None:
    from wbsr_runtime.media import Image, draw_routing_map

    stats = upscaler.last_stats
    if stats is None or getattr(stats, "boxes", None) is None or getattr(stats, "subnets", None) is None:
        raise MediaError(f"{path}: no routing map in this mode (no tiles)")
    n = len(upscaler.manifest.subnets)
    drawn = draw_routing_map(sr_rgb, stats.boxes, stats.subnets, n, int(upscaler.scale), labels=legend_labels(upscaler))
    write_image(path, Image(drawn), overwrite=force)


def legend_labels(upscaler: Any) -> list[str]:
    """One legend label per subnet: its width and depth, and its cost as a share of the full subnet's (FLOPs,
    or the time measured at start-up with --cost measured)."""
    subnets, costs = upscaler.manifest.subnets, np.asarray(upscaler.costs, dtype=np.float64)
    unit = "time" if getattr(upscaler, "cost", "flops") == "measured" else "FLOPs"
    return [f"w{s.width} d{s.depth} {100 * c / costs[-1]:.0f}% {unit}" for s, c in zip(subnets, costs, strict=True)]


def _process(job: Job, upscaler: Any, force: bool, progress: bool) -> str:
    """Upscale one input; returns the line to print."""
    if job.video:
        from wbsr_runtime.video import upscale_video

        r = upscale_video(job.src, job.dst, upscaler, progress=progress, overwrite=force)
        audio = ", audio copied" if r.audio else ""
        return f"{job.dst} ({r.frames} frames, {r.width}x{r.height} at {float(r.fps or 0):.3f} fps{audio})"
    sr = upscale_image(read_image(job.src, getattr(upscaler, "max_pixels", None)), upscaler)
    write_image(job.dst, sr, overwrite=force)
    if job.routing_map is not None:
        _routing_map(upscaler, sr.rgb, job.routing_map, force)
        return f"{job.dst} (routing map: {job.routing_map})"
    return str(job.dst)


def _err(msg: str) -> None:
    tqdm.write(f"wbsr-run: error: {one_line(msg)}", file=sys.stderr)


def _run_job(job: Job, upscaler: Any, args: argparse.Namespace, inputs: set[Path]) -> str:
    """Check and process one job; any error comes back as one line naming the input."""
    for target in (job.dst, job.routing_map) if job.routing_map is not None else (job.dst,):
        _check_target(target, inputs, args.force)
    return _process(job, upscaler, args.force, progress=sys.stderr.isatty())


def _run_all(args: argparse.Namespace, upscaler: Any, jobs: list[Job], inputs: set[Path]) -> tuple[int, dict]:
    """Process every job, with progress (N of M, and a bar on a terminal); returns (failures, stats)."""
    failures, stats = 0, {}
    n = len(jobs)
    with tqdm(total=n, unit="file", disable=n < 2 or not sys.stderr.isatty(), leave=False) as bar:
        for i, job in enumerate(jobs, 1):
            try:
                line = _run_job(job, upscaler, args, inputs)
                tqdm.write(f"({i}/{n}) {line}" if n > 1 else line, file=sys.stdout)
                stats[str(job.src)] = _stats_dict(upscaler)
            except _EXPECTED as e:
                failures += 1
                text = str(e)
                _err(text if str(job.src) in text or str(job.dst) in text else f"{job.src}: {text}")
            except Exception as e:  # never a traceback: one line with the type, the run goes on
                failures += 1
                _err(f"{job.src}: unexpected {type(e).__name__}: {e}")
            bar.update(1)
    return failures, stats


def _plan(args: argparse.Namespace) -> Plan:
    """What the run will do, after every refusal of the whole run (UsageError, MediaError, ValueError)."""
    _check_options(args)
    plan = plan_run(args.inputs, args.output, args.routing_map, args.stats)
    if args.stats is not None:
        _check_target(args.stats, plan.inputs, args.force)
    return plan


def _write_stats(args: argparse.Namespace, stats: dict[str, Any], total: int) -> int:
    """Write --stats (one input: its stats; several: keyed by input); returns the exit code it calls for."""
    try:
        _write_json(args.stats, next(iter(stats.values())) if total == 1 else stats, args.force)
    except MediaError as e:  # a full disk, or a file another process created meanwhile
        _err(str(e))
        return 2
    print(f"{args.stats} (stats)")
    return 0


def _work(args: argparse.Namespace) -> int:
    """Everything after parsing: refusals of the whole run first, then the inputs one by one."""
    try:
        plan = _plan(args)
    except (UsageError, MediaError, ValueError) as e:
        _err(str(e))
        return 2
    for line in plan.failed:
        _err(line)
    total, failures, stats = len(plan.jobs) + len(plan.failed), len(plan.failed), {}
    if plan.jobs:
        try:
            upscaler = _make_upscaler(args)
        except Exception as e:  # missing/tampered bundle, no default model, backend unavailable
            _err(f"{type(e).__name__}: {e}" if not isinstance(e, _EXPECTED) else str(e))
            return 2
        with upscaler:
            try:  # checked by plan_run; this fails only if the filesystem changed meanwhile
                if plan.folder is not None:
                    plan.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                _err(f"{plan.folder}: cannot create the output folder ({e.strerror or type(e).__name__})")
                return 2
            failed, stats = _run_all(args, upscaler, plan.jobs, plan.inputs)
        failures += failed
    code = _write_stats(args, stats, total) if args.stats is not None and stats else 0
    if failures:
        _err(f"{failures} of {total} inputs failed")
        return 2
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with _verbose(args.verbose), interrupts_as_exceptions(), pillow_pixel_limit(args.max_pixels or defaults.MAX_PIXELS):
        try:
            return _work(args)
        except KeyboardInterrupt as e:
            code = exit_code(e)
            _err({130: "interrupted", 143: "terminated", 129: "hung up"}.get(code, "interrupted"))
            return code


if __name__ == "__main__":
    sys.exit(main())
