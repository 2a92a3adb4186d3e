"""What machine a benchmark ran on, for its report: timings from two machines are not comparable."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu() -> str:
    """'<model name>, <N> CPUs' (Linux: /proc/cpuinfo; elsewhere what `platform` knows)."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {os.cpu_count()} CPUs"
