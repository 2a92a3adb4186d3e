"""WBSR runtime: bundles, tiling, routing, backends, the `Upscaler` API and `wbsr-run`. Needs no torch."""

# PyTorch's CPU-only wheels (for the torch backend and wbsr-train/export on machines without a GPU): a plain
# `pip install torch` on Linux pulls the multi-GB CUDA build.
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
