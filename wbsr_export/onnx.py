"""ONNX graphs of a bundle: one fp32 (and optionally fp16) graph per subnet, and the router.

All graphs are written by the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): for these small
conv nets it gives a clean graph (Conv, DepthToSpace, Resize, ...) with named dynamic axes directly, and it
does not need onnxscript's rewriter. Opset 17.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from wbsr_train.descriptor import gradient_magnitude

OPSET = 17
SUBNET_INPUT, SUBNET_OUTPUT = "lr", "sr"
ROUTER_INPUTS, ROUTER_OUTPUTS = ("frame", "boxes"), ("scores", "classes")
SUBNET_AXES = {SUBNET_INPUT: {0: "N", 2: "h", 3: "w"}, SUBNET_OUTPUT: {0: "N", 2: "H", 3: "W"}}
ROUTER_AXES = {"frame": {2: "H", 3: "W"}, "boxes": {0: "n"}, "scores": {0: "n"}, "classes": {0: "n"}}


class HalfInside(nn.Module):
    """Wraps a network so it computes in fp16 with fp32 input and output (casts at the boundary)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(net).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half()).float()


def _export(module: nn.Module, args: tuple, path: Path, names: tuple, axes: dict) -> Path:
    """Trace-export `module` to `path` and run the full ONNX checker on the result."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(names[0]),
            output_names=list(names[1]),
            opset_version=OPSET,
            dynamic_axes=axes,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_subnet_onnx(subnet: nn.Module, path: str | Path, *, fp16: bool = False) -> Path:
    """Write `subnet` as ONNX: `lr` (N, 3, h, w) float32 in [0, 1] -> `sr` (N, 3, h*s, w*s) float32.

    With `fp16` the weights and all arithmetic are float16; input and output stay float32.
    """
    net = HalfInside(subnet) if fp16 else subnet
    sample = torch.rand(2, 3, 16, 16)
    return _export(net.eval(), (sample,), Path(path), ((SUBNET_INPUT,), (SUBNET_OUTPUT,)), SUBNET_AXES)


class Router(nn.Module):
    """Descriptor score and class of many boxes of one frame, sharing one gradient map.

    The Sobel magnitude of the luma is computed once over the whole frame (valid convolution); per box the
    sum and the sum of squares of its interior come from float64 integral images (4 corner gathers), so the
    score equals `wbsr_train.descriptor.patch_scores` of the cropped patch.
    """

    def __init__(self, thresholds: Sequence[float]):
        super().__init__()
        self.register_buffer("thresholds", torch.tensor(list(thresholds), dtype=torch.float64))

    def forward(self, frame: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frame (1, 3, H, W) float32 in [0, 1]; boxes (n, 4) int64 `y0, x0, y1, x1`, half-open, >= 3x3.

        Returns scores (n,) float32 and classes (n,) int64 in 1..K.
        """
        g = gradient_magnitude(frame)[0, 0].double()  # (H-2, W-2)
        # Integral images with a zero first row and column: ii[i, j] = sum of g[:i, :j].
        ii = F.pad(torch.stack([g, g * g]).cumsum(1).cumsum(2), (1, 0, 1, 0))
        width = ii.shape[2]
        flat = ii.reshape(2, -1)
        y0, x0, y1, x1 = boxes[:, 0], boxes[:, 1], boxes[:, 2] - 2, boxes[:, 3] - 2

        def corner(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return flat[:, r * width + c]

        sums = corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)  # (2, n)
        count = ((y1 - y0) * (x1 - x0)).double()
        mean = sums[0] / count
        var = torch.clamp(sums[1] / count - mean * mean, min=0.0)
        scores = (mean + torch.sqrt(var)).float()
        # Classify the float32 score, exactly as routing.classify does with patch_scores' output.
        classes = 1 + (scores.double().unsqueeze(1) >= self.thresholds.unsqueeze(0)).long().sum(1)
        return scores, classes


def export_router_onnx(thresholds: Sequence[float], path: str | Path) -> Path:
    """Write the router graph (docs/bundle.md): frame (1, 3, H, W), boxes (n, 4) -> scores, classes (n,)."""
    frame = torch.rand(1, 3, 40, 48)
    boxes = torch.tensor([[0, 0, 32, 32], [4, 8, 40, 48]], dtype=torch.int64)
    return _export(
        Router(thresholds).eval(), (frame, boxes), Path(path), (ROUTER_INPUTS, ROUTER_OUTPUTS), ROUTER_AXES
    )
