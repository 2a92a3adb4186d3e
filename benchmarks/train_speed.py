"""Training throughput on this machine: patches/s of the real training step (full supernet + routed subnets,
BDLoss, backward, Adam) for a preset, under each way torch can speed it up on a CPU.

    python benchmarks/train_speed.py --preset lrnet --scale 4 --threads 1 --out benchmarks/results/train_speed_x4

Variants: fp32 or bf16 autocast (`--precision`), channels_last memory format or not, and `torch.compile` of
the supernet. Every variant runs the same random batches (`--batch` x 3 x patch^2 LR) with the same routing,
after `--warmup` steps; steps of all variants are interleaved so machine load hits them alike; the median
step time is kept. `--quality N` also trains N real iterations fp32 and bf16 from the same seed (one process
each, in parallel) and reports the full subnet's Y-PSNR on `--val`: does bf16 hurt quality at equal steps?
Writes OUT.json and prints a Markdown table headed by the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _step_fn(preset: str, scale: int, batch: int, patch: int, precision: str, channels_last: bool, compiled: bool):
    """A closure running one training step of the real loop's modules on fixed random data."""
    from wbsr_runtime.routing import eq15_map
    from wbsr_train.config import preset as make_preset
    from wbsr_train.loss import make_loss
    from wbsr_train.model import build_supernet, subnet_specs
    from wbsr_train.train import SupernetStep, route_groups, routed_loss

    torch.manual_seed(0)
    cfg = make_preset(preset, scale)
    net, specs = build_supernet(cfg), subnet_specs(cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    step = SupernetStep(net)
    model = torch.compile(step, dynamic=True) if compiled else step
    loss_fn = make_loss("bd")
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    lr = torch.rand(batch, 3, patch, patch).contiguous(memory_format=fmt)
    hr = torch.rand(batch, 3, patch * scale, patch * scale)
    groups = route_groups(rng.integers(1, 11, batch), specs, eq15_map(10, len(specs)), "routed", rng)

    def run() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            full, routed = model(lr, groups)
        full, routed = full.float(), routed.float()
        loss = loss_fn(full, hr) + routed_loss(loss_fn, routed, full, hr, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return run


def throughput(a: argparse.Namespace) -> list[dict]:
    variants = [(p, cl, c) for p in ("fp32", "bf16") for cl in (False, True) for c in ((False, True) if a.compile
                                                                                       else (False,))]
    runs = {}
    for v in variants:
        fn = _step_fn(a.preset, a.scale, a.batch, a.patch, *v)
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            fn()
        runs[v] = (fn, time.perf_counter() - t0, [])
    for _ in range(a.steps):
        for fn, _, times in runs.values():
            times.append(fn())
    rows = []
    for (precision, cl, compiled), (_, warm_s, times) in runs.items():
        s = float(np.median(times))
        rows.append({"precision": precision, "channels_last": cl, "compile": compiled, "step_s": s,
                     "patches_per_s": a.batch / s, "warmup_s": warm_s})
    base = next(r["step_s"] for r in rows if r["precision"] == "fp32" and not r["channels_last"] and not r["compile"])
    for r in rows:
        r["speedup"] = base / r["step_s"]
    return rows


def quality(a: argparse.Namespace) -> dict[str, float]:
    """Full-subnet Y-PSNR on --val after --quality iterations, fp32 and bf16 trained from one seed in parallel."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for precision in ("fp32", "bf16"):
            cmd = [sys.executable, "-m", "wbsr_train", "--preset", a.preset, "--scale", str(a.scale),
                   "--data", str(a.data), "--val", str(a.val), "--iters", str(a.quality), "--val-every",
                   str(a.quality), "--lr", "1e-3", "--precision", precision, "--holdout", str(a.holdout),
                   "--out", str(Path(tmp) / f"{precision}.pt")]
            procs[precision] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        out = {}
        for precision, proc in procs.items():
            if proc.wait() != 0:
                raise RuntimeError(f"the {precision} training run failed")
            lines = (Path(tmp) / f"{precision}.jsonl").read_text().splitlines()
            out[precision] = [json.loads(s) for s in lines if "val_psnr_y_full" in s][-1]["val_psnr_y_full"]
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lrnet")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants (slow to compile)")
    p.add_argument("--quality", type=int, metavar="N", help="also train N iterations fp32 vs bf16 (needs --data)")
    p.add_argument("--data", type=Path)
    p.add_argument("--val", type=Path)
    p.add_argument("--holdout", type=float, default=0.25)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    report = {"command": "python benchmarks/train_speed.py " + shlex.join(argv), "rows": throughput(a)}
    if a.quality:
        report["quality_psnr_y_full"] = quality(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps(report, indent=1))
    print(f"`{report['command']}`\n")
    print("| precision | channels_last | compile | step ms | patches/s | x fp32 | warm-up s |")
    print("|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['precision']} | {r['channels_last']} | {r['compile']} | {1000 * r['step_s']:.0f} | "
              f"{r['patches_per_s']:.1f} | {r['speedup']:.2f} | {r['warmup_s']:.1f} |")
    if a.quality:
        q = report["quality_psnr_y_full"]
        print(f"\nAfter {a.quality} iterations, full subnet Y-PSNR on {a.val}: "
              f"fp32 {q['fp32']:.3f}, bf16 {q['bf16']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
