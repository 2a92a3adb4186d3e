"""The prepared GPU check: one command for the day a GPU machine is lent (<= 8 minutes on an H200 with
PyTorch + CUDA, cuda-python, CuPy, onnx and onnxruntime's CPU build; no TensorRT, no onnxruntime-gpu, no
network).

    python benchmarks/gpu_check.py --out gpu_check          # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # anywhere: the same code paths on the CPU

Sections (each timed; one that fails records its error and the others still run):
  environment   versions, GPU, ONNX Runtime providers
  pytest_gpu    `pytest -m gpu` (--dry-run: collected only; CI runs the suite itself)
  parity        torch backend (fp32, fp16; 1/2/4 workers) against ONNX Runtime CPU on the shipped x2/x4 bundles
  entry_points  TorchRunner.run_tensor on an external stream with device tensors; TrtRunner.run_subnet_device
                on device pointers (CuPy arrays) with stand-in engines
  trt_plumbing  the trt backend's cuda-python plumbing (pinned buffers, async copies, a stream per worker,
                partial batches, 1/2/4 workers) with a CuPy stand-in engine in place of TensorRT
  throughput    frames/s at 1280x720 LR -> x2 and x4: whole frame, full tiled, dynamic (merged windows and
                equal tiles), 1/2/4 streams x batch sizes, torch backend, fp16
--dry-run swaps CUDA for the CPU: FakeCudart and numpy engines for cuda-python and CuPy, torch on the CPU,
frames of 64 x 36; its numbers mean nothing, its point is that every path runs.

Writes into --out (at most 3 files): gpu_check.json (everything), gpu_check.md (the report) and
pytest_gpu.log. Exit code 0 when every section passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing: the packages and tests/ helpers
    sys.path.insert(0, str(ROOT))

from benchmarks import _gpu_sections as sections  # noqa: E402

SECTIONS = ("environment", "pytest_gpu", "parity", "entry_points", "trt_plumbing", "throughput")


def run_section(name: str, p: sections.Platform, out: Path) -> dict[str, Any]:
    if p.late():
        return {"status": "skipped: time budget spent"}
    t0 = time.monotonic()
    try:
        fn = getattr(sections, name)
        result = fn(p, out / "pytest_gpu.log") if name == "pytest_gpu" else fn(p)
        result.setdefault("status", "ok")
    except Exception as err:  # recorded, and the check goes on
        result = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)", flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check ({'DRY RUN on the CPU: numbers mean nothing' if report['dry_run'] else 'GPU'})", ""]
    lines += [f"`{report['command']}` on {report['host']}, {report['started']}, {report['seconds']} s.", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec.get('seconds', 0)} s)", ""]
        if "error" in sec:
            lines += ["```", sec["error"], "```", ""]
        for key, value in sec.items():
            if key not in ("status", "seconds", "error", "traceback", "header", "rows"):
                lines.append(f"- {key}: {json.dumps(value) if not isinstance(value, str) else value}")
        if "rows" in sec:
            lines += ["", "| " + " | ".join(sec["header"]) + " |", "|" + "---|" * len(sec["header"])]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in sec["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, pytest_gpu.log")
    ap.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU, without CUDA")
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting new work after this (default 450)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sections": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as work:
        p = sections.Platform(args.dry_run, "cpu" if args.dry_run else "cuda:0", Path(work), t0 + args.budget_s)
        for name in args.only or SECTIONS:
            report["sections"][name] = run_section(name, p, args.out)
    report["seconds"] = round(time.monotonic() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    ok = all(s["status"] == "ok" for s in report["sections"].values())
    print(f"gpu_check: {'all sections passed' if ok else 'FAILED'}; report in {args.out}/gpu_check.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
