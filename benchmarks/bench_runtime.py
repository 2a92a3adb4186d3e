"""Quality, FLOPs, wall time and memory of the runtime (`Upscaler`) on a folder of HR images, in one run.

    python benchmarks/bench_runtime.py --data ../shared/data/val/Set14 --scale 4 --bundle engines/x4 \
        --backend ort --tolerances 0.05 0.2 --out benchmarks/results/set14_x4

Rows: bicubic (MATLAB-compatible, `wbsr_train.data.imresize`); the full subnet on the whole frame (`mode="whole"`);
the full subnet tiled (`mode="full"`); dynamic routing with the bundle's class -> subnet map and with two other
tolerances (dB) or FLOPs budgets; the same three with subnets ranked by their measured time instead of FLOPs
(`cost="measured"`); and, when windows are merged (`--merge` >= 1, the runtime's default), the
first two tiled rows once more on the grid's equal tiles (merge 0), to show what merging buys. LR inputs are
made from the mod-cropped HR images with the same bicubic (`wbsr_train.data.load_pairs`). Metrics follow
METHOD.md section 6 (Y channel, border crop = scale).

FLOPs, both as % of the full subnet: "paper" = mean over all tiles of the chosen subnet's per-patch FLOPs
(METHOD.md section 5a, at the runtime's patch); "executed" = `UpscaleStats.flops` summed over images (tile
windows with their context) over the full subnet on the whole frames once (the router is not counted).
Wall time: per image, one warm-up call per row, then `--repeats` calls interleaved across rows, the median
kept; summed over images. Peak memory: see benchmarks/memprobe.py (a fresh process per row, largest image).
Writes OUT.json and OUT.png and prints a Markdown table headed by the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import _machine  # benchmarks/, beside this script
import numpy as np

PROBE = Path(__file__).with_name("memprobe.py")
MB = 2**20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder of HR images (or a set with HR/)")
    p.add_argument("--scale", required=True, type=int)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--imdn", type=Path, metavar="PTH",
                   help="IMDN's published weights (IMDN_x{S}.pth): a row of IMDN on the whole frame, ORT, same threads")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="another bundle (e.g. the previous default) whose whole-frame and bundle-map rows join the run")
    p.add_argument("--backend", default="ort", choices=("ort", "torch", "trt", "auto"))
    knob = p.add_mutually_exclusive_group()
    knob.add_argument("--tolerances", type=float, nargs="+", default=[0.05, 0.2], metavar="DB")
    knob.add_argument("--budgets", type=float, nargs="+", metavar="F")
    p.add_argument("--patch", type=int, help="LR tile core (default: the bundle's)")
    p.add_argument("--overlap", type=int, help="LR context per side (default: the bundle's)")
    p.add_argument("--threads", type=int, help="ORT intra-op threads per session (default: the runner's)")
    p.add_argument("--chunk", type=int, help="tiles per batched call (default: the scheduler's)")
    p.add_argument("--merge", type=int, help="merge neighbouring tiles of one subnet into windows of up to N x N "
                   "cores (default: the runtime's; 0: equal tiles); >= 1 adds rows with merge 0 for comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per image and row (median kept)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--large", type=Path, metavar="IMAGE", help="also measure memory on this large LR frame")
    p.add_argument("--large-width", type=int, default=3840, help="mirror-extend/crop the large frame to this")
    p.add_argument("--large-height", type=int, default=2160)
    p.add_argument("--out", required=True, type=Path, help="report path without extension")
    return p


def _rows(args: argparse.Namespace) -> list[tuple[str, Path, dict[str, Any]]]:
    """(label, bundle, Upscaler keyword arguments) of every runtime row; the bicubic row is handled apart."""
    from wbsr_runtime import defaults

    common = {k: v for k in ("patch", "overlap", "chunk") if (v := getattr(args, k)) is not None}
    if args.backend in ("ort", "auto") and args.threads:
        common["threads"] = args.threads
    knobs = [({"budget": b}, f"budget {b:g}") for b in args.budgets] if args.budgets else \
        [({"tolerance": t}, f"tolerance {t:g} dB") for t in args.tolerances]
    tiled = [("full, tiled", {"mode": "full"}), ("dynamic, bundle map", {"mode": "dynamic"})]
    tiled += [(f"dynamic, {name}", {"mode": "dynamic", **kw}) for kw, name in knobs]
    tiled += [(f"dynamic, measured cost, {name}", {"mode": "dynamic", "cost": "measured", **kw})
              for kw, name in [({}, "bundle tolerance"), *knobs]]
    merge = defaults.MERGE if args.merge is None else args.merge
    rows = [("full, whole frame", {"mode": "whole"})] + [(label, kw | {"merge": merge}) for label, kw in tiled]
    if merge >= 1:
        rows += [(f"{label}, equal tiles (merge 0)", kw | {"merge": 0}) for label, kw in tiled[:2]]
    out = [(label, args.bundle, {"backend": args.backend, **common, **kw}) for label, kw in rows]
    if args.baseline is not None:
        base = [("full, whole frame", {"mode": "whole"}), ("dynamic, bundle map", {"mode": "dynamic", "merge": merge})]
        out += [(f"{args.baseline.name}: {label}", args.baseline, {"backend": args.backend, **common, **kw})
                for label, kw in base]
    return out


class OnnxWhole:
    """A plain ONNX SR model (RGB in [0, 1]) on the whole frame through ONNX Runtime CPU, with the runtime's
    session options: the compact model users would pick instead, timed like the whole-frame row."""

    def __init__(self, path: Path, threads: int | None) -> None:
        from wbsr_runtime.backends.base import cpu_session

        self.session = cpu_session(path, threads or os.cpu_count() or 1)
        self.last_stats = None

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(lr.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        y = self.session.run(None, {"lr": x})[0][0]
        return (np.clip(y, 0, 1) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)


def _imdn(args: argparse.Namespace, folder: Path) -> OnnxWhole:
    sys.path.insert(0, str(Path(__file__).parent))
    from imdn import export_onnx, load_imdn

    return OnnxWhole(export_onnx(load_imdn(args.imdn, args.scale), folder / "imdn.onnx"), args.threads)


def _scores(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    from wbsr_train.evaluate import psnr_y, ssim_y

    return {"psnr_y": psnr_y(sr, hr, scale), "ssim_y": ssim_y(sr, hr, scale)}


def _median_call(samples: list[tuple[float, Any]]) -> tuple[float, Any]:
    """The (seconds, stats) sample of median time (the lower middle one for an even count)."""
    return sorted(samples, key=lambda s: s[0])[(len(samples) - 1) // 2]


def _time_image(lr: np.ndarray, scale: int, ups: list[Any], repeats: int) -> list[dict[str, Any]]:
    """Per row (bicubic first): the output, and the median call's time and stats, for one LR image."""
    from wbsr_train.data import imresize

    def bicubic() -> tuple[np.ndarray, float, None]:
        t0 = time.perf_counter()
        return imresize(lr, scale), time.perf_counter() - t0, None

    def runtime(up: Any) -> tuple[np.ndarray, float, Any]:
        t0 = time.perf_counter()
        out = up.upscale(lr)
        stats = getattr(up, "last_stats", None)
        return out, stats.total_s if stats is not None else time.perf_counter() - t0, stats

    calls = [bicubic] + [lambda up=up: runtime(up) for up in ups]
    for call in calls:  # warm-up: sessions load, ORT plans this input shape
        call()
    samples: list[list[tuple[float, Any]]] = [[] for _ in calls]
    outputs: list[np.ndarray | None] = [None] * len(calls)
    for _ in range(repeats):  # interleaved, so background load hits every row alike
        for i, call in enumerate(calls):
            outputs[i], seconds, stats = call()
            samples[i].append((seconds, stats))
    result = []
    for out, s in zip(outputs, samples, strict=True):
        seconds, stats = _median_call(s)
        result.append({"output": out, "seconds": seconds, "stats": stats})
    return result


def _summarise(label: str, per_image: list[dict[str, Any]], flops_pp: np.ndarray | None) -> dict[str, Any]:
    """One report row from the per-image results of one method."""
    row: dict[str, Any] = {"method": label}
    row["psnr_y"] = float(np.mean([r["psnr_y"] for r in per_image]))
    row["ssim_y"] = float(np.mean([r["ssim_y"] for r in per_image]))
    row["time_s"] = float(sum(r["seconds"] for r in per_image))
    stats = [r["stats"] for r in per_image]
    if stats[0] is None:
        return row | {"flops_paper_pct": None, "flops_exec_pct": None, "shares_pct": None}
    counts = np.sum([s.tiles_per_subnet for s in stats], axis=0)
    row["tiles_per_subnet"] = counts.tolist()
    row["flops_paper_pct"] = 100.0 * float(counts @ flops_pp) / (counts.sum() * flops_pp[-1])
    row["flops_exec_pct"] = 100.0 * sum(s.flops for s in stats) / sum(s.flops_full for s in stats)
    parts = {k: sum(getattr(s, f"{k}_s") for s in stats) for k in ("router", "subnets", "tiling")}
    parts["other"] = sum(s.total_s for s in stats) - sum(parts.values())  # to/from float, clamp
    row["shares_pct"] = {k: 100.0 * v / sum(s.total_s for s in stats) for k, v in parts.items()}
    row["patch"], row["overlap"] = stats[0].patch, stats[0].overlap
    row["predicted_loss_db"], row["predicted_cost_pct"] = stats[0].predicted_loss_db, stats[0].predicted_cost
    if row["predicted_cost_pct"] is not None:
        row["predicted_cost_pct"] *= 100.0
    return row


def _probe(frame: np.ndarray, bundle: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Run memprobe.py on `frame` in a fresh process (see its docstring for what it measures)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frame.npy"
        np.save(path, frame)
        done = subprocess.run(
            [sys.executable, str(PROBE), str(path), str(bundle), json.dumps(opts)],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"memprobe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _large(args: argparse.Namespace, rows: list[tuple[str, Path, dict[str, Any]]]) -> dict[str, Any]:
    """Memory of the tiled rows on a large frame and on its quarter: extra = a + b * (input + output bytes)."""
    from wbsr_train.data import read_rgb8

    img = read_rgb8(args.large)
    h, w = args.large_height, args.large_width
    reps = (-(-h // img.shape[0]), -(-w // img.shape[1]))
    frame = np.ascontiguousarray(
        np.pad(
            img,
            ((0, reps[0] * img.shape[0] - img.shape[0]), (0, reps[1] * img.shape[1] - img.shape[1]), (0, 0)),
            mode="symmetric",
        )[:h, :w]
    )
    crops = {"full": frame, "quarter": np.ascontiguousarray(frame[: h // 2, : w // 2])}
    result: dict[str, Any] = {"image": str(args.large), "width": w, "height": h, "rows": []}
    for label, bundle, opts in rows:
        if opts["mode"] == "whole" or bundle != args.bundle:
            continue  # whole-frame activations grow with the frame by design; not what this checks
        m = {name: _probe(c, bundle, opts) for name, c in crops.items()}
        io = {k: v["input_bytes"] + v["output_bytes"] for k, v in m.items()}
        b = (m["full"]["extra"] - m["quarter"]["extra"]) / (io["full"] - io["quarter"])
        a = m["full"]["extra"] - b * io["full"]
        result["rows"].append({"method": label, "probes": m, "const_mb": a / MB, "per_io_byte": b})
    return result


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, xlabel in (
        (axes[0], "flops_exec_pct", "FLOPs executed (% of full, whole frame)"),
        (axes[1], "time_s", "wall time (s, sum over images)"),
    ):
        for r in rows:
            x = r[key] if r[key] is not None else 0.0
            ax.plot(x, r["psnr_y"], "o")
            ax.annotate(r["method"], (x, r["psnr_y"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Y-PSNR (dB)")
        ax.grid(alpha=0.3)
    fig.suptitle(textwrap.fill(title, 140), fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the command line, then one table row per method."""
    whole = next(r for r in report["rows"] if r["method"] == "full, whole frame")
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['images']} images, x{report['scale']}, backend {report['backend']}, patch "
        f"{report['patch']} + {report['overlap']} context, {report['repeats']} timed repeats; {report['cpu']}",
        "",
        "| method | Y-PSNR | dB vs whole | predicted dB | SSIM | FLOPs paper % | FLOPs exec % | predicted cost % "
        "| time s | x whole | router / subnets / tiling / other % | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        sh = r.get("shares_pct")
        shares = "-" if sh is None else " / ".join(f"{sh[k]:.0f}" for k in ("router", "subnets", "tiling", "other"))
        mem = r.get("memory")
        loss = r.get("predicted_loss_db")
        lines.append(
            f"| {r['method']} | {r['psnr_y']:.3f} | {r['psnr_y'] - whole['psnr_y']:+.3f} | "
            f"{_fmt(loss and -loss, '+.3f')} | {r['ssim_y']:.4f} | {_fmt(r['flops_paper_pct'], '.1f')} "
            f"| {_fmt(r['flops_exec_pct'], '.1f')} | {_fmt(r.get('predicted_cost_pct'), '.1f')} | {r['time_s']:.2f} "
            f"| {r['time_s'] / whole['time_s']:.2f} | {shares} | {_fmt(mem and mem['extra'] / MB, '.0f')} |"
        )
    if report.get("large"):
        lg = report["large"]
        lines += [
            "",
            f"Large frame {lg['width']}x{lg['height']} ({lg['image']}), extra memory = a + b x (input + "
            "output bytes), from the full frame and its quarter; 'beyond output' = extra - output bytes:",
            "",
            "| method | extra MB, quarter | extra MB, full | a (MB) | b | beyond output MB, quarter | full |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in lg["rows"]:
            p = r["probes"]
            beyond = {k: (p[k]["extra"] - p[k]["output_bytes"]) / MB for k in ("quarter", "full")}
            lines.append(
                f"| {r['method']} | {p['quarter']['extra'] / MB:.0f} | {p['full']['extra'] / MB:.0f} | "
                f"{r['const_mb']:.0f} | {r['per_io_byte']:.2f} | {beyond['quarter']:.0f} | {beyond['full']:.0f} |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Measure every row on every image of `args.data`; returns the JSON-ready report."""
    from tqdm import tqdm

    from wbsr_runtime.upscaler import Upscaler
    from wbsr_train.data import load_pairs

    rows = _rows(args)
    pairs = load_pairs(args.data, args.scale)[: args.limit]
    per_row: list[list[dict[str, Any]]] = [[] for _ in range(len(rows) + 1 + bool(args.imdn))]
    with ExitStack() as stack:
        ups = [stack.enter_context(Upscaler(bundle, **kw)) for _, bundle, kw in rows]
        if args.imdn:
            ups.append(_imdn(args, Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        if ups[0].scale != args.scale:
            raise ValueError(f"bundle {args.bundle} is x{ups[0].scale}, --scale is {args.scale}")
        flops_pp = [np.array([s.flops_per_patch for s in u.manifest.subnets], dtype=np.float64)
                    for u in ups[: len(rows)]]
        maps = [u.class_map.tolist() for u in ups[: len(rows)]]
        for name, lr, hr in tqdm(pairs, desc="images", file=sys.stderr):
            for i, res in enumerate(_time_image(lr, args.scale, ups, args.repeats)):
                per_row[i].append({"name": name, **_scores(res.pop("output"), hr, args.scale), **res})
        backend, patch, overlap = ups[0].backend, ups[1].patch, ups[1].overlap
    report_rows = [_summarise("bicubic", per_row[0], None)]
    report_rows += [
        _summarise(label, per_row[i + 1], flops_pp[i]) | {"class_to_subnet": maps[i], "bundle": str(bundle)}
        for i, (label, bundle, _) in enumerate(rows)
    ]
    if args.imdn:
        report_rows.append(_summarise("IMDN (Hui et al. 2019), whole frame", per_row[-1], None))
    biggest = max(pairs, key=lambda p: p[1].shape[0] * p[1].shape[1])
    for r, (_, bundle, kw) in zip(report_rows[1 : 1 + len(rows)], rows, strict=True):
        r["memory"] = _probe(biggest[1], bundle, kw) | {"image": biggest[0]}
    for r, results in zip(report_rows, per_row, strict=True):
        r["per_image"] = [{k: v for k, v in x.items() if k != "stats"} for x in results]
    return {
        "command": command,
        "data": str(args.data),
        "images": len(pairs),
        "scale": args.scale,
        "bundle": str(args.bundle),
        "backend": backend,
        "patch": patch,
        "overlap": overlap,
        "threads": args.threads,
        "chunk": args.chunk,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "cpu": _machine.cpu(),
        "rows": report_rows,
        "large": _large(args, rows) if args.large else None,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    command = "python benchmarks/bench_runtime.py " + shlex.join(argv)
    try:
        report = run(args, command)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = str(args.out)
    Path(out + ".json.tmp").write_text(json.dumps(report, indent=1))
    os.replace(out + ".json.tmp", out + ".json")
    _plot(report["rows"], Path(out + ".png"), report["command"])
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
