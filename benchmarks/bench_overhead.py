"""Where tiling costs time: the full subnet tiled (and dynamic routing) against the full subnet on the whole frame,
over patch / context sizes, ORT threads, chunk (tiles per batched call) and merging (`--merge`, default 0: the
grid's equal tiles).

    python benchmarks/bench_overhead.py --data ../shared/data/val/Set14 --scale 4 --bundle engines/x4 \
        --tiles 32/2 32/4 48/4 64/4 64/8 --threads 1 2 --chunks 4 16 64 --limit 4

For each thread count: the whole-frame time, then per (patch/overlap, chunk) the tiled full subnet's time and
executed FLOPs as ratios of the whole frame's, the Y-PSNR change against the whole frame (tiling error; HR as
reference), and the same for dynamic routing (`--budget` or `--tolerance`, else the bundle's map). Timing as in
bench_runtime.py: a warm-up call, then `--repeats` interleaved calls, median per image, summed over images.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--scale", required=True, type=int)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--tiles", nargs="+", default=["32/2", "32/4", "48/4", "64/4", "64/8"], metavar="P/O")
    p.add_argument("--threads", nargs="+", type=int, default=[1], help="ORT intra-op threads per session")
    p.add_argument("--chunks", nargs="+", type=int, default=[16], help="tiles per batched call")
    p.add_argument("--merge", type=int, default=0, help="windows of up to N x N tiles (0: equal tiles)")
    knob = p.add_mutually_exclusive_group()
    knob.add_argument("--budget", type=float, help="dynamic rows: FLOPs budget (fraction of full)")
    knob.add_argument("--tolerance", type=float, help="dynamic rows: tolerance (dB)")
    p.add_argument("--no-dynamic", action="store_true", help="only the full subnet, tiled")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, help="use only the first N images")
    return p


def _measure(ups: dict[str, Any], pairs: list, scale: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per upscaler: summed median seconds, summed executed FLOPs and full FLOPs, mean Y-PSNR."""
    from wbsr_train.evaluate import psnr_y

    acc = {k: {"time_s": 0.0, "flops": 0.0, "flops_full": 0.0, "psnr": 0.0} for k in ups}
    for _, lr, hr in pairs:
        times: dict[str, list[float]] = {k: [] for k in ups}
        outs: dict[str, np.ndarray] = {}
        for up in ups.values():
            up.upscale(lr)  # warm-up
        for _ in range(repeats):
            for k, up in ups.items():
                outs[k] = up.upscale(lr)
                times[k].append(up.last_stats.total_s)
        for k, up in ups.items():
            s = up.last_stats
            acc[k]["time_s"] += sorted(times[k])[(repeats - 1) // 2]
            acc[k]["flops"] += s.flops
            acc[k]["flops_full"] += s.flops_full
            acc[k]["psnr"] += psnr_y(outs[k], hr, scale) / len(pairs)
    return acc


def run(args: argparse.Namespace) -> list[str]:
    from wbsr_runtime.upscaler import Upscaler
    from wbsr_train.data import load_pairs

    pairs = load_pairs(args.data, args.scale)[: args.limit]
    knob = {"budget": args.budget} if args.budget else {"tolerance": args.tolerance} if args.tolerance else {}
    lines = [
        "| threads | tiles P/O | chunk | mode | time s | time x whole | FLOPs exec x whole | dPSNR vs whole dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for threads in args.threads:
        ups = {"whole": Upscaler(args.bundle, backend="ort", mode="whole", threads=threads)}
        for tiles in args.tiles:
            patch, overlap = map(int, tiles.split("/"))
            for chunk in args.chunks:
                kw = dict(backend="ort", patch=patch, overlap=overlap, chunk=chunk, threads=threads, merge=args.merge)
                ups[f"{tiles}|{chunk}|full"] = Upscaler(args.bundle, mode="full", **kw)
                if not args.no_dynamic:
                    ups[f"{tiles}|{chunk}|dynamic"] = Upscaler(args.bundle, mode="dynamic", **kw, **knob)
        acc = _measure(ups, pairs, args.scale, args.repeats)
        w = acc["whole"]
        lines.append(f"| {threads} | whole | - | full | {w['time_s']:.3f} | 1.00 | 1.00 | 0 |")
        for k, a in acc.items():
            if k == "whole":
                continue
            tiles, chunk, mode = k.split("|")
            lines.append(
                f"| {threads} | {tiles} | {chunk} | {mode} | {a['time_s']:.3f} | "
                f"{a['time_s'] / w['time_s']:.2f} | {a['flops'] / w['flops']:.2f} | "
                f"{a['psnr'] - w['psnr']:+.3f} |"
            )
        for up in ups.values():
            up.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        lines = run(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"`python benchmarks/bench_overhead.py {shlex.join(argv)}`\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
