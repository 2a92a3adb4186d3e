"""`benchmarks/gpu_check.py --dry-run`: the prepared GPU check's code paths, on the CPU, in CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "report"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and [s["status"] for s in report["sections"].values()] == ["ok"] * 6
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "pytest_gpu.log"]
    sections = report["sections"]
    assert len(sections["parity"]["rows"]) == 12 and {r[2] for r in sections["parity"]["rows"]} == {1, 2, 4}
    assert sections["trt_plumbing"]["batch_sizes_run"][0] == 1 and len(sections["trt_plumbing"]["rows"]) == 6
    methods = {r[1] for r in sections["throughput"]["rows"]}
    assert methods == {"whole frame", "full, tiled", "dynamic", "dynamic, equal tiles"}
    assert "DRY RUN" in (out / "gpu_check.md").read_text()
