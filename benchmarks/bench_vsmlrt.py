"""WBSR through its VapourSynth filter against vs-mlrt's ONNX Runtime CPU plugin, on the same frames.

    python benchmarks/bench_vsmlrt.py --images ../shared/data/val/Set14 --videos ../shared/data/video/*.mp4 \
        --scales 4 2 --out benchmarks/results/vsmlrt

Runs in a Python >= 3.12 venv with `pip install -e ".[cpu,vapoursynth]" vapoursynth-mlrt-ort av` (no torch).
Frames: the HR images of `--images` and `--video-frames` evenly spaced frames of each `--videos` file, each
mod-cropped to the scale, with LR made by the MATLAB-exact bicubic (`wbsr_train.imresize.make_lr`); one RGBS
clip per image and per video. Rows: vs-mlrt (`core.ort.Model`, provider CPU) running the bundle's full fp32
graph on whole frames and on `--mlrt-tilesize` tiles with `--mlrt-overlap` (vs-mlrt's own meaning: the
network's input tile, overlap included); wbsr (`wbsr_runtime.vapoursynth.upscale`, backend ort) with
mode whole, full (tiled) and dynamic (the bundle's map). Frames too small for vs-mlrt's tile are left out
of every row. All rows take the same RGBS clip and give RGBS, rounded to 8 bits for the Y-PSNR (against HR,
border = scale, MATLAB's BT.601 luma).
Timing: per clip, one untimed pass per row (sessions load; its output is scored), then `--repeats` timed
passes interleaved across rows (each with the row's frame cache cleared), the median kept; frames/s = frames
over the sum of the medians. Settings, each in a fresh process: "default" (every runtime's own thread
defaults) and "one-core" (the process pinned to one CPU, VapourSynth at 1 thread, wbsr at 1 ORT thread;
vs-mlrt has no thread option: its ORT sessions keep their default pool, which then shares that CPU).
Writes OUT.json and OUT.md (the command line, versions, machine load, one table per setting).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _machine  # benchmarks/, beside this script
import numpy as np

SETTINGS = ("default", "one-core")
WHOLE = "wbsr, whole frame"  # the row the others' times are compared with


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, help="folder of held-out HR images (or a set with HR/)")
    p.add_argument("--videos", type=Path, nargs="*", default=[], help="held-out video files (their frames are HR)")
    p.add_argument("--video-frames", type=int, default=4, help="evenly spaced frames taken from each video")
    p.add_argument("--scales", type=int, nargs="+", default=[4, 2])
    p.add_argument("--bundles", type=Path, nargs="*", help="one bundle per scale (default: the shipped ones)")
    p.add_argument("--mlrt-tilesize", type=int, default=64, help="vs-mlrt tile: network input, overlap included")
    p.add_argument("--mlrt-overlap", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per clip and row (median kept)")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--out", type=Path, required=True, help="report path without extension")
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)  # one setting, in this process
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return p


def _psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """Y-PSNR of two (H, W, 3) uint8 images, as `wbsr_train.evaluate.psnr_y` (which imports torch, absent
    from the VapourSynth venv): MATLAB's BT.601 luma, `border` pixels cropped on each side."""

    def luma(x: np.ndarray) -> np.ndarray:
        return 16.0 + x[border:-border, border:-border].astype(np.float64) @ [65.481, 128.553, 24.966] / 255

    return float(10 * np.log10(255.0**2 / np.mean((luma(sr) - luma(hr)) ** 2)))


@functools.cache
def _video_frames(path: Path, count: int) -> tuple[np.ndarray, ...]:
    """`count` evenly spaced frames of a video as (H, W, 3) uint8 RGB (decoded twice: to count, to keep)."""
    import av

    with av.open(str(path)) as container:
        total = sum(1 for _ in container.decode(video=0))
    picks = set(np.linspace(0, total - 1, count).round().astype(int).tolist())
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in picks]
    return tuple(frames)


def _groups(args: argparse.Namespace, scale: int) -> list[tuple[str, list[np.ndarray], list[np.ndarray]]]:
    """[(name, LR frames, HR frames)], one group (clip) per image and per video; LR (h, w, 3) uint8."""
    from wbsr_train.data import load_pairs
    from wbsr_train.imresize import make_lr, mod_crop

    groups = [(name, [lr], [hr]) for name, lr, hr in (load_pairs(args.images, scale) if args.images else [])]
    for path in args.videos:
        hrs = [np.ascontiguousarray(mod_crop(f, scale)) for f in _video_frames(path, args.video_frames)]
        groups.append((path.name, [make_lr(hr, scale) for hr in hrs], hrs))
    return groups


def _rgbs_clip(frames: list[np.ndarray]) -> Any:
    """An RGBS clip whose frame n is frames[n] / 255 ((h, w, 3) uint8)."""
    import vapoursynth as vs

    h, w = frames[0].shape[:2]
    base = vs.core.std.BlankClip(format=vs.RGBS, width=w, height=h, length=len(frames), keep=True)

    def fill(n: int, f: Any) -> Any:
        out = f.copy()
        for p in range(3):
            np.copyto(np.asarray(out[p]), frames[n][..., p] / np.float32(255))
        return out

    return base.std.ModifyFrame(base, fill)


def _rows(args: argparse.Namespace, bundle: Path, threads: int | None) -> list[tuple[str, Any]]:
    """(label, function of the RGBS clip -> upscaled RGBS clip) per method."""
    import vapoursynth as vs

    import wbsr_runtime.vapoursynth as wbsr

    onnx = str(bundle / json.loads((bundle / "manifest.json").read_text())["subnets"][-1]["files"]["onnx"])
    t, o = args.mlrt_tilesize, args.mlrt_overlap
    tiles = {"tilesize": [t, t], "overlap": [o, o]}
    opts = {"bundle": bundle, "backend": "ort", "threads": threads}
    return [
        ("vs-mlrt, whole frame", lambda c: vs.core.ort.Model(c, network_path=onnx, provider="CPU")),
        (
            f"vs-mlrt, tiles {t} (overlap {o})",
            lambda c: vs.core.ort.Model(c, network_path=onnx, provider="CPU", **tiles),
        ),
        (WHOLE, lambda c: wbsr.upscale(c, mode="whole", **opts)),
        ("wbsr, full tiled", lambda c: wbsr.upscale(c, mode="full", **opts)),
        ("wbsr, dynamic", lambda c: wbsr.upscale(c, mode="dynamic", **opts)),
    ]


def _to_uint8(frame: Any) -> np.ndarray:
    rgb = np.stack([np.asarray(frame[p]) for p in range(3)], axis=-1)
    return np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _render(node: Any) -> float:
    """Seconds to render every frame of `node` (VapourSynth's own concurrent frame requests), cache cleared."""
    node.clear_cache()
    t0 = time.perf_counter()
    for _ in node.frames(close=True):
        pass
    return time.perf_counter() - t0


def _measure(lrs: list[np.ndarray], hrs: list[np.ndarray], rows: list[tuple[str, Any]], scale: int, repeats: int):
    """Per row: (median seconds over the timed passes, Y-PSNR of each frame)."""
    src = _rgbs_clip(lrs)
    nodes = [build(src) for _, build in rows]
    psnrs = [[_psnr_y(_to_uint8(f), hr, scale) for f, hr in zip(n.frames(), hrs, strict=True)] for n in nodes]
    times = np.array([[_render(n) for n in nodes] for _ in range(repeats)])  # interleaved across rows
    return list(zip(np.median(times, axis=0).tolist(), psnrs, strict=True))


def run_setting(args: argparse.Namespace) -> dict[str, Any]:
    """Every scale and row in this process, under `args.child`'s thread setting."""
    if args.child == "one-core":  # before VapourSynth or ONNX Runtime start any thread
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import vapoursynth as vs
    from tqdm import tqdm

    from wbsr_runtime.upscaler import default_bundle

    if args.child == "one-core":
        vs.core.num_threads = 1
    threads = 1 if args.child == "one-core" else None
    result: dict[str, Any] = {"setting": args.child, "vs_threads": vs.core.num_threads, "scales": {}}
    result["load_before"] = os.getloadavg()
    for i, scale in enumerate(args.scales):
        bundle = args.bundles[i] if args.bundles else default_bundle(scale)
        rows = _rows(args, bundle, threads)
        per_row: list[list[tuple[str, float, list[float]]]] = [[] for _ in rows]
        skipped = []
        for name, lrs, hrs in tqdm(_groups(args, scale), desc=f"{args.child} x{scale}", file=sys.stderr):
            if min(lrs[0].shape[:2]) < args.mlrt_tilesize:
                skipped.append(name)  # vs-mlrt refuses frames smaller than its tile
                continue
            for acc, res in zip(per_row, _measure(lrs, hrs, rows, scale, args.repeats), strict=True):
                acc.append((name, *res))
        result["scales"][str(scale)] = {"bundle": str(bundle), "skipped": skipped, "rows": _summary(rows, per_row)}
    result["load_after"] = os.getloadavg()
    return result


def _summary(rows: list[tuple[str, Any]], per_row: list[list[tuple[str, float, list[float]]]]) -> list[dict]:
    out = []
    for (label, _), clips in zip(rows, per_row, strict=True):
        frames = sum(len(p) for _, _, p in clips)
        seconds = sum(s for _, s, _ in clips)
        psnr = float(np.mean([v for _, _, p in clips for v in p]))
        per_clip = [{"clip": n, "seconds": s, "psnr_y": p} for n, s, p in clips]
        out.append(
            {
                "method": label,
                "frames": frames,
                "seconds": seconds,
                "fps": frames / seconds,
                "psnr_y": psnr,
                "clips": per_clip,
            }
        )
    whole = next(r["seconds"] for r in out if r["method"] == WHOLE)
    for r in out:
        r["x_wbsr_whole"] = r["seconds"] / whole
    return out


def _versions() -> dict[str, str]:
    import onnxruntime
    import vapoursynth as vs

    core = vs.core
    return {
        "vapoursynth": f"R{core.core_version.release_major}",
        "vs-mlrt ort": core.ort.Version()["version"],
        "vs-mlrt onnxruntime": core.ort.Version()["onnxruntime_version"],
        "onnxruntime": onnxruntime.__version__,
    }


def _table(res: dict[str, Any]) -> list[str]:
    """One setting's Markdown table: a row per method, three columns per scale."""
    scales = list(res["scales"])
    notes = [f"x{s}: {res['scales'][s]['rows'][0]['frames']} frames" for s in scales]
    notes += [f"x{s} left out {', '.join(res['scales'][s]['skipped'])}" for s in scales if res["scales"][s]["skipped"]]
    head = " | ".join(f"x{s} frames/s | x{s} Y-PSNR | x{s} time x wbsr whole" for s in scales)
    lines = [f"**{res['setting']}** (VapourSynth threads {res['vs_threads']}; {'; '.join(notes)})", ""]
    lines += [f"| method | {head} |", "|---" * (1 + 3 * len(scales)) + "|"]
    for i, row in enumerate(res["scales"][scales[0]]["rows"]):
        rs = [res["scales"][s]["rows"][i] for s in scales]
        cells = [f"{r['fps']:.2f} | {r['psnr_y']:.3f} | {r['x_wbsr_whole']:.2f}" for r in rs]
        lines.append(f"| {row['method']} | {' | '.join(cells)} |")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The command line, versions and machine load, then one table per setting."""
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    load = report["load"]
    lines = [
        f"`{report['command']}`",
        "",
        f"{versions}; {report['cpu']}, load average {load[0]:.1f} before and {load[1]:.1f} after (1 min)",
        "",
    ]
    for res in report["settings"]:
        lines += _table(res)
    return "\n".join(lines)


def _child(argv: list[str], setting: str) -> dict[str, Any]:
    """Run one setting in a fresh process (thread pools and CPU affinity start clean); its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run(
            [sys.executable, __file__, *argv, "--child", setting, "--child-out", str(out)], check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"the {setting} run failed (exit {done.returncode})")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(run_setting(args) | {"versions": _versions()}))
        return 0
    if not args.images and not args.videos:
        print("error: give --images and/or --videos", file=sys.stderr)
        return 2
    if args.bundles and len(args.bundles) != len(args.scales):
        print("error: give one --bundles entry per --scales entry", file=sys.stderr)
        return 2
    command = "python benchmarks/bench_vsmlrt.py " + shlex.join(argv)
    try:
        results = [_child(argv, s) for s in args.settings]
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {
        "command": command,
        "versions": results[0].pop("versions"),
        "cpu_count": os.cpu_count(),
        "cpu": _machine.cpu(),
        "load": (results[0]["load_before"][0], results[-1]["load_after"][0]),
        "settings": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for ext, text in (("json", json.dumps(report, indent=1)), ("md", markdown(report))):
        tmp = args.out.with_name(f"{args.out.name}.{ext}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out.with_name(f"{args.out.name}.{ext}"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
