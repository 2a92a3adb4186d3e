"""Peak memory of one `Upscaler.upscale` call, measured in a fresh process (imports wbsr_runtime only).

    python benchmarks/memprobe.py FRAME.npy BUNDLE '{"mode": "dynamic", "backend": "ort"}'

prints one JSON line: `base_rss` (bytes resident after the imports and after loading the (H, W, 3) uint8 frame,
before the Upscaler exists), `peak_rss` (the process's resident high-water mark, Linux VmHWM, over creating the
Upscaler and upscaling the frame once), `extra` = peak - base, and the input and output sizes in bytes.
`extra` therefore counts everything the call needs beyond the input: ONNX Runtime sessions and their memory
arena, tiles in flight, the stitched float32 frame, conversions and the uint8 output. A fresh process is used
because ORT's arena never shrinks and RSS is process-wide, so in-process deltas would depend on what ran before.
"""

from __future__ import annotations

import json
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def main(argv: list[str]) -> int:
    import numpy as np

    from wbsr_runtime.upscaler import Upscaler

    frame = np.load(argv[0])
    opts = json.loads(argv[2]) if len(argv) > 2 else {}
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    with Upscaler(argv[1], **opts) as up:
        out = up.upscale(frame)
        peak = _status_kb("VmHWM")
        total_s = up.last_stats.total_s
    print(
        json.dumps(
            {
                "base_rss": base,
                "peak_rss": peak,
                "extra": peak - base,
                "input_bytes": frame.nbytes,
                "output_bytes": out.nbytes,
                "total_s": total_s,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
