"""Every default and every choice of the toolkit's options, in one torch-free place.

The libraries take these as their parameters' defaults; the CLIs pass None for an option the user did not
give, so a default is written down once and `--help` quotes it from here.
"""

from __future__ import annotations

# wbsr-run / Upscaler
BACKENDS = ("ort", "torch", "trt", "auto")
MODES = ("dynamic", "full", "whole")
COSTS = ("flops", "measured")  # what "cheapest" means when a class -> subnet map is derived
MERGE = 4  # neighbouring tiles of one subnet run as windows of up to 4 x 4 cores (README: benchmark)
MAX_PIXELS = 89_478_485  # LR pixels per image or frame: Pillow's own decompression-bomb limit
CHUNK = 16  # grid tiles per batched call when the backend sets no limit: large enough to batch, small in memory

# wbsr-export
EXPORT_DIR = "engines"  # bundles go to engines/<checkpoint stem>, and their TensorRT engines inside them
PATCH = 32  # LR core tile size a bundle records as its default tiling
OVERLAP = 2  # LR context on each side of a tile
MAX_BATCH = 16  # largest tile batch of engine profiles (and of ONNX Runtime's TensorRT provider)
ENGINE_PRECISION = "fp32"  # fp16 engines need the bundle's fp16 graphs, which export writes only with --fp16
WORKSPACE_MB = 1024  # TensorRT builder workspace limit
OPT_LEVEL = 3  # TensorRT builder optimisation level (0-5)
