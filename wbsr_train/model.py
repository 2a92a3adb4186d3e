"""Slimmable SRResNet (BasicSR's MSRResNet), RCAN and LRNet: one set of weights, many subnets.

A subnet (width w, depth d) runs every conv on its first w output channels and on the first channels of the
incoming tensor, and only the first d residual blocks (RCAN: of every group). SRResNet and RCAN keep
BasicSR's parameter names and shapes, so a plain pretrained checkpoint loads unchanged and is the full subnet.
LRNet is the deployment-shaped backbone: all of its slimmable work at LR resolution (METHOD.md section 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, SubnetSpec


class SlimConv2d(nn.Conv2d):
    """A conv that can run on a prefix of its channels: `weight[:out, :in]`, `bias[:out]`."""

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
        out_channels = self.out_channels if out_channels is None else out_channels
        if out_channels == self.out_channels and x.shape[1] == self.in_channels:
            return super().forward(x)
        weight = self.weight[:out_channels, : x.shape[1]]
        bias = None if self.bias is None else self.bias[:out_channels]
        return F.conv2d(x, weight, bias, self.stride, self.padding)


def conv3x3(cin: int, cout: int) -> SlimConv2d:
    return SlimConv2d(cin, cout, 3, padding=1)


class ResidualBlockNoBN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x, width)), width)


def _residual_trunk(cfg: ModelConfig) -> tuple[SlimConv2d, nn.ModuleList]:
    """conv_first and the residual blocks shared by MSRResNet and LRNet (BasicSR's names and order)."""
    return conv3x3(3, cfg.channels), nn.ModuleList(ResidualBlockNoBN(cfg.channels) for _ in range(cfg.blocks))


class SlimMSRResNet(nn.Module):
    """MSRResNet: conv_first, residual blocks, pixel-shuffle upsampler, conv_hr, conv_last, bilinear skip."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, s = cfg.channels, cfg.scale
        self.cfg = cfg
        self.conv_first, self.body = _residual_trunk(cfg)
        # x2 and x3 shuffle once by the scale, x4 twice by 2.
        self.shuffles = [2, 2] if s == 4 else [s]
        self.upconv1 = conv3x3(c, c * self.shuffles[0] ** 2)
        if s == 4:
            self.upconv2 = conv3x3(c, c * 4)
        self.conv_hr = conv3x3(c, c)
        self.conv_last = conv3x3(c, 3)

    def forward(self, x: torch.Tensor, spec: SubnetSpec | None = None) -> torch.Tensor:
        """(N, 3, h, w) float32 in [0, 1] -> (N, 3, h*s, w*s), not clamped."""
        width, depth = spec or self.cfg.full
        feat = F.leaky_relu(self.conv_first(x, width), 0.1)
        out = feat
        for block in self.body[:depth]:
            out = block(out, width)
        upconvs = [self.upconv1, self.upconv2] if self.cfg.scale == 4 else [self.upconv1]
        for conv, r in zip(upconvs, self.shuffles, strict=True):
            out = F.leaky_relu(F.pixel_shuffle(conv(out, width * r * r), r), 0.1)
        out = self.conv_last(F.leaky_relu(self.conv_hr(out, width), 0.1), 3)
        base = F.interpolate(x, scale_factor=self.cfg.scale, mode="bilinear", align_corners=False)
        return out + base


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.squeeze_full = channels // reduction
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            SlimConv2d(channels, self.squeeze_full, 1),
            nn.ReLU(inplace=True),
            SlimConv2d(self.squeeze_full, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor, full_width: int) -> torch.Tensor:
        width = x.shape[1]
        squeeze = self.squeeze_full * width // full_width
        y = self.attention[0](x)
        y = F.relu(self.attention[1](y, squeeze))
        return x * torch.sigmoid(self.attention[3](y, width))


class RCAB(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        # Indices match BasicSR's rcab Sequential(conv, ReLU, conv, ChannelAttention).
        self.rcab = nn.ModuleList(
            [conv3x3(channels, channels), nn.ReLU(inplace=True), conv3x3(channels, channels),
             ChannelAttention(channels, reduction)]
        )
        self.channels = channels

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        y = self.rcab[2](F.relu(self.rcab[0](x, width)), width)
        return x + self.rcab[3](y, self.channels)


class ResidualGroup(nn.Module):
    def __init__(self, channels: int, blocks: int, reduction: int):
        super().__init__()
        # BasicSR names: residual_group.{i} (RCABs), conv (the group's tail conv).
        self.residual_group = nn.ModuleList([RCAB(channels, reduction) for _ in range(blocks)])
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, width: int, depth: int) -> torch.Tensor:
        y = x
        for block in self.residual_group[:depth]:
            y = block(y, width)
        return x + self.conv(y, width)


class SlimRCAN(nn.Module):
    """RCAN: n_groups residual groups of RCABs with channel attention, as BasicSR names it."""

    RGB_MEAN = (0.4488, 0.4371, 0.4040)
    IMG_RANGE = 255.0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, s = cfg.channels, cfg.scale
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(self.RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = conv3x3(3, c)
        self.body = nn.ModuleList(ResidualGroup(c, cfg.blocks, cfg.reduction) for _ in range(cfg.n_groups))
        self.conv_after_body = conv3x3(c, c)
        self.shuffles = [2, 2] if s == 4 else [s]
        # BasicSR's Upsample is Sequential(conv, PixelShuffle, ...): convs at upsample.0 (and upsample.2).
        self.upsample = nn.ModuleList()
        for r in self.shuffles:
            self.upsample.extend([conv3x3(c, c * r * r), nn.PixelShuffle(r)])
        self.conv_last = conv3x3(c, 3)

    def forward(self, x: torch.Tensor, spec: SubnetSpec | None = None) -> torch.Tensor:
        """(N, 3, h, w) float32 in [0, 1] -> (N, 3, h*s, w*s), not clamped."""
        width, depth = spec or self.cfg.full
        x = (x - self.mean) * self.IMG_RANGE
        feat = self.conv_first(x, width)
        out = feat
        for group in self.body:
            out = group(out, width, depth)
        out = self.conv_after_body(out, width) + feat
        for conv, r in zip(self.upsample[::2], self.shuffles, strict=True):
            out = F.pixel_shuffle(conv(out, width * r * r), r)
        return self.conv_last(out, 3) / self.IMG_RANGE + self.mean


class SlimLRNet(nn.Module):
    """LR-space residual network: conv_first, residual blocks, one conv to 3 * s^2 channels, one pixel
    shuffle, plus a bilinear skip of the input (the ESPCN / IMDN / SRVGGNetCompact shape).

    Every slimmable conv runs at LR resolution and the only HR-resolution work is the shuffle and the skip,
    so a subnet's cost follows its width and depth (MSRResNet's unsliced HR tail is ~70% of its FLOPs).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, s = cfg.channels, cfg.scale
        self.cfg = cfg
        self.conv_first, self.body = _residual_trunk(cfg)
        self.conv_up = conv3x3(c, 3 * s * s)
        for block in self.body:  # residual branches start small (BasicSR's default_init_weights, scale 0.1)
            for conv in (block.conv1, block.conv2):
                nn.init.kaiming_normal_(conv.weight)
                conv.weight.data *= 0.1
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, spec: SubnetSpec | None = None) -> torch.Tensor:
        """(N, 3, h, w) float32 in [0, 1] -> (N, 3, h*s, w*s), not clamped."""
        width, depth = spec or self.cfg.full
        s = self.cfg.scale
        out = self.conv_first(x, width)
        for block in self.body[:depth]:
            out = block(out, width)
        out = F.pixel_shuffle(self.conv_up(out, 3 * s * s), s)
        return out + F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)


ARCHS = {"srresnet": SlimMSRResNet, "rcan": SlimRCAN, "lrnet": SlimLRNet}


def build_supernet(cfg: ModelConfig) -> nn.Module:
    cfg.validate()
    return ARCHS[cfg.arch](cfg)


def count_flops(cfg: ModelConfig, spec: SubnetSpec, height: int = 32, width: int = 32) -> int:
    """2 x MACs of every conv of subnet `spec` on one (1, 3, height, width) input.

    Counted by torch's FlopCounterMode on the meta device, so no memory or time is spent on real tensors.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_supernet(cfg)
        x = torch.empty(1, 3, height, width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, spec)
    return int(counter.get_total_flops())


def subnet_specs(cfg: ModelConfig) -> list[SubnetSpec]:
    """Every (width, depth) of the grid, cheapest first (the routing rule depends on this order)."""
    specs = [SubnetSpec(w, d) for w in cfg.widths for d in cfg.depths]
    return sorted(specs, key=lambda s: (count_flops(cfg, s), s))
