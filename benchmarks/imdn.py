"""IMDN (Hui et al., "Lightweight Image Super-Resolution with Information Multi-distillation Network", ACM MM
2019), rebuilt from the paper's description so its published weights load, and exported to ONNX: the compact
model users pick instead, measured side by side with WBSR in `bench_runtime.py --imdn`.

The weights are the authors' `checkpoints/IMDN_x{2,4}.pth` (github.com/Zheng222/IMDN; keys prefixed
`module.`); they are not part of this project. Input and output: RGB in [0, 1], as their test script feeds it.

    python benchmarks/imdn.py IMDN_x4.pth --scale 4 --out runs/imdn_x4.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class ContrastAttention(nn.Module):
    """Contrast-aware channel attention: per channel (std + mean) over the image -> squeeze -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.conv_du = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        return x * self.conv_du(std + mean)


class DistillationBlock(nn.Module):
    """Information multi-distillation block: three 3x3 convs each keep a quarter of their channels and pass
    the rest on, a fourth makes the last quarter; the four are fused by attention and a 1x1 conv."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.kept, rest = channels // 4, channels - channels // 4
        self.c1, self.c2, self.c3 = _conv(channels, channels), _conv(rest, channels), _conv(rest, channels)
        self.c4, self.c5 = _conv(rest, self.kept), _conv(channels, channels, 1)
        self.cca = ContrastAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, rest = [], x
        for conv in (self.c1, self.c2, self.c3):
            k, rest = torch.split(F.leaky_relu(conv(rest), 0.05), (self.kept, conv.out_channels - self.kept), dim=1)
            kept.append(k)
        return self.c5(self.cca(torch.cat([*kept, self.c4(rest)], dim=1))) + x


class IMDN(nn.Module):
    def __init__(self, scale: int, channels: int = 64, blocks: int = 6):
        super().__init__()
        self.fea_conv = _conv(3, channels)
        for i in range(1, blocks + 1):
            self.add_module(f"IMDB{i}", DistillationBlock(channels))
        self.blocks = blocks
        self.c = nn.Sequential(nn.Conv2d(channels * blocks, channels, 1), nn.LeakyReLU(0.05))
        self.LR_conv = _conv(channels, channels)
        self.upsampler = nn.Sequential(_conv(channels, 3 * scale * scale), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) RGB in [0, 1] -> (N, 3, h*s, w*s)."""
        feat = self.fea_conv(x)
        outs, out = [], feat
        for i in range(1, self.blocks + 1):
            out = getattr(self, f"IMDB{i}")(out)
            outs.append(out)
        return self.upsampler(self.LR_conv(self.c(torch.cat(outs, dim=1))) + feat)


def load_imdn(path: str | Path, scale: int) -> IMDN:
    """The published weights in an `IMDN` (strict: every tensor name and shape must match)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = IMDN(scale)
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return net.eval()


def export_onnx(net: nn.Module, out: str | Path) -> Path:
    """ONNX with dynamic N, h, w (input `lr`, output `sr`), as the project exports its subnets."""
    axes = {"lr": {0: "N", 2: "h", 3: "w"}, "sr": {0: "N", 2: "H", 3: "W"}}
    with torch.no_grad():
        torch.onnx.export(net, (torch.rand(1, 3, 16, 16),), str(out), input_names=["lr"], output_names=["sr"],
                          opset_version=17, dynamic_axes=axes, dynamo=False)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--scale", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    export_onnx(load_imdn(a.weights, a.scale), a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
