"""Where each subnet's time goes, by ONNX operator, on ONNX Runtime CPU (its built-in profiler).

    python benchmarks/profile_ops.py --bundle wbsr_runtime/models/x4 --size 132 --threads 1

For every subnet of the bundle: FLOPs per patch (% of the full subnet), mean kernel time per call on one
`(1, 3, size, size)` input (% of the full subnet's), and the share of that time per operator type. Explains
why wall time falls more slowly than FLOPs for the small subnets: the operators whose cost does not shrink
with the convolutions (pixel shuffle = DepthToSpace, ORT's layout reorders, the bilinear skip) weigh more.
`--conv-widths 8 16 24 32 48` adds a sweep of one 3 x 3 convolution (C -> C channels, on `(1, C, 2*size,
2*size)`, as in the x4 tail) against its channel count: how time follows the channel width on this CPU.
Prints Markdown tables headed by the command line.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import _machine  # benchmarks/, beside this script
import numpy as np

from wbsr_runtime.backends.base import cpu_session, session_options


def profile(path: Path, x: np.ndarray, threads: int, calls: int) -> dict[str, float]:
    """Mean microseconds per call spent in each operator type (first call excluded: warm-up)."""
    opts = session_options(threads)  # the runtime's settings, with profiling on
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "p")
        session = cpu_session(path, threads, opts)
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


def conv_sweep(widths: list[int], side: int, threads: int, calls: int) -> list[tuple[int, float]]:
    """(channels, median seconds) of one 3 x 3 convolution C -> C on (1, C, side, side); calls interleaved."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sessions = {}
    for c in widths:
        w = numpy_helper.from_array(rng.random((c, c, 3, 3), dtype=np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, side, side])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = cpu_session(model.SerializeToString(), threads)
        x = rng.random((1, c, side, side), dtype=np.float32)
        session.run(None, {"x": x})
        sessions[c] = (session, x)
    times: dict[int, list[float]] = {c: [] for c in widths}
    for _ in range(calls):
        for c, (session, x) in sessions.items():
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            times[c].append(time.perf_counter() - t0)
    return [(c, float(np.median(times[c]))) for c in widths]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--size", type=int, default=132, help="LR input side (132 = a 4 x 4-core merged window)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--conv-widths", type=int, nargs="*", default=[], metavar="C")
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
    print(f"`python benchmarks/profile_ops.py {shlex.join(argv)}` ({_machine.cpu()})\n")
    print("| subnet (width, depth) | FLOPs % | time % | ms / call | " + " | ".join(f"{op} %" for op in ops) + " |")
    print("|---" * (4 + len(ops)) + "|")
    for s, r in rows:
        total = sum(r.values())
        shares = " | ".join(f"{100 * r.get(op, 0) / total:.0f}" for op in ops)
        print(f"| ({s.width}, {s.depth}) | {100 * s.flops_per_patch / full_flops:.0f} | "
              f"{100 * total / full_time:.0f} | {total / 1000:.1f} | {shares} |")
    if args.conv_widths:
        sweep = conv_sweep(args.conv_widths, 2 * args.size, args.threads, max(args.calls, 5))
        ref_c, ref_t = sweep[-1]
        print(f"\nOne 3 x 3 convolution C -> C on (1, C, {2 * args.size}, {2 * args.size}), median of "
              f"{max(args.calls, 5)} calls:\n")
        print(f"| channels | MACs vs {ref_c} | time vs {ref_c} | ms |\n|---|---|---|---|")
        for c, t in sweep:
            print(f"| {c} | {c * c / ref_c**2:.2f} | {t / ref_t:.2f} | {1000 * t:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
