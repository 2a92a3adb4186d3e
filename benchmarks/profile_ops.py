"""Where each subnet's time goes, by ONNX operator, on ONNX Runtime CPU (its built-in profiler).

    python benchmarks/profile_ops.py --bundle wbsr_runtime/models/x4 --size 132 --threads 1

For every subnet of the bundle: FLOPs per patch (% of the full subnet), mean kernel time per call on one
`(1, 3, size, size)` input (% of the full subnet's), and the share of that time per operator type. Explains
why wall time falls more slowly than FLOPs for the small subnets: the operators whose cost does not shrink
with the convolutions (pixel shuffle = DepthToSpace, ORT's layout reorders, the bilinear skip) weigh more.
Prints a Markdown table headed by the command line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np


def profile(path: Path, x: np.ndarray, threads: int, calls: int) -> dict[str, float]:
    """Mean microseconds per call spent in each operator type (first call excluded: warm-up)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "p")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(calls + 1):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            per_op[e["args"]["op_name"]] += e["dur"] / calls
    return dict(per_op)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--size", type=int, default=132, help="LR input side (132 = a 4 x 4-core merged window)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args(argv)
    from wbsr_runtime.manifest import BundleError, load_manifest

    try:
        manifest = load_manifest(args.bundle)
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    x = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
    rows = [(s, profile(manifest.path(s.files["onnx"]), x, args.threads, args.calls)) for s in manifest.subnets]
    full_flops, full_time = rows[-1][0].flops_per_patch, sum(rows[-1][1].values())
    ops = sorted({op for _, r in rows for op in r}, key=lambda op: -sum(r.get(op, 0) for _, r in rows))
    print(f"`python benchmarks/profile_ops.py {shlex.join(argv)}` ({os.cpu_count()} CPUs)\n")
    print("| subnet (width, depth) | FLOPs % | time % | ms / call | " + " | ".join(f"{op} %" for op in ops) + " |")
    print("|---" * (4 + len(ops)) + "|")
    for s, r in rows:
        total = sum(r.values())
        shares = " | ".join(f"{100 * r.get(op, 0) / total:.0f}" for op in ops)
        print(f"| ({s.width}, {s.depth}) | {100 * s.flops_per_patch / full_flops:.0f} | "
              f"{100 * total / full_time:.0f} | {total / 1000:.1f} | {shares} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
