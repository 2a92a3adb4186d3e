"""Slimmable SRResNet/RCAN: FLOPs, plug-and-play with BasicSR-named plain networks, and subnet slicing.

The plain references below are written from BasicSR's definitions (MSRResNet in srresnet_arch.py, RCAN in
rcan_arch.py, Upsample in arch_util.py) with the same module names, so `strict=True` loading checks that the
supernet keeps BasicSR's parameter names and shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wbsr_train.config import ModelConfig, SubnetSpec, preset
from wbsr_train.model import build_supernet, count_flops, subnet_specs


def conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, 1, k // 2)


class PlainResidualBlockNoBN(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = conv(c, c), conv(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class PlainMSRResNet(nn.Module):
    """BasicSR's MSRResNet(num_in_ch=3, num_out_ch=3, num_feat, num_block, upscale)."""

    def __init__(self, num_feat: int, num_block: int, upscale: int):
        super().__init__()
        self.upscale = upscale
        self.conv_first = conv(3, num_feat)
        self.body = nn.Sequential(*[PlainResidualBlockNoBN(num_feat) for _ in range(num_block)])
        if upscale in (2, 3):
            self.upconv1 = conv(num_feat, num_feat * upscale * upscale)
            self.pixel_shuffle = nn.PixelShuffle(upscale)
        else:
            self.upconv1 = conv(num_feat, num_feat * 4)
            self.upconv2 = conv(num_feat, num_feat * 4)
            self.pixel_shuffle = nn.PixelShuffle(2)
        self.conv_hr = conv(num_feat, num_feat)
        self.conv_last = conv(num_feat, 3)
        self.lrelu = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(self.lrelu(self.conv_first(x)))
        out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        if self.upscale == 4:
            out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        return out + F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)


class PlainChannelAttention(nn.Module):
    def __init__(self, c: int, squeeze_factor: int):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv(c, c // squeeze_factor, 1), nn.ReLU(),
            conv(c // squeeze_factor, c, 1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class PlainRCAB(nn.Module):
    def __init__(self, c: int, squeeze_factor: int):
        super().__init__()
        self.rcab = nn.Sequential(conv(c, c), nn.ReLU(), conv(c, c), PlainChannelAttention(c, squeeze_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.rcab(x)


class PlainResidualGroup(nn.Module):
    def __init__(self, c: int, num_block: int, squeeze_factor: int):
        super().__init__()
        self.residual_group = nn.Sequential(*[PlainRCAB(c, squeeze_factor) for _ in range(num_block)])
        self.conv = conv(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.residual_group(x))


def plain_upsample(scale: int, c: int) -> nn.Sequential:
    """BasicSR's Upsample: Sequential of (conv c -> r*r*c, PixelShuffle(r)) pairs; r = 2 twice for x4."""
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [conv(c, 9 * c), nn.PixelShuffle(3)]
    else:
        for _ in range(int(math.log2(scale))):
            layers += [conv(c, 4 * c), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


class PlainRCAN(nn.Module):
    """BasicSR's RCAN(3, 3, num_feat, num_group, num_block, squeeze_factor, upscale)."""

    def __init__(self, num_feat: int, num_group: int, num_block: int, squeeze_factor: int, upscale: int):
        super().__init__()
        self.mean = torch.tensor((0.4488, 0.4371, 0.4040)).view(1, 3, 1, 1)
        self.conv_first = conv(3, num_feat)
        self.body = nn.Sequential(
            *[PlainResidualGroup(num_feat, num_block, squeeze_factor) for _ in range(num_group)]
        )
        self.conv_after_body = conv(num_feat, num_feat)
        self.upsample = plain_upsample(upscale, num_feat)
        self.conv_last = conv(num_feat, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_first((x - self.mean) * 255.0)
        res = self.conv_after_body(self.body(x)) + x
        return self.conv_last(self.upsample(res)) / 255.0 + self.mean


class PlainLRNet(nn.Module):
    """The LR-space net written out plainly: conv, residual blocks, conv to 3 s^2, shuffle, + bilinear input."""

    def __init__(self, width: int, depth: int, scale: int):
        super().__init__()
        self.scale = scale
        self.conv_first = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.ModuleList(PlainResidualBlockNoBN(width) for _ in range(depth))
        self.conv_up = nn.Conv2d(width, 3 * scale * scale, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_first(x)
        for block in self.body:
            out = block(out)
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return F.pixel_shuffle(self.conv_up(out), self.scale) + base


def plain_like(cfg: ModelConfig, spec: SubnetSpec) -> nn.Module:
    if cfg.arch == "srresnet":
        return PlainMSRResNet(spec.width, spec.depth, cfg.scale)
    if cfg.arch == "lrnet":
        return PlainLRNet(spec.width, spec.depth, cfg.scale)
    return PlainRCAN(spec.width, cfg.n_groups, spec.depth, cfg.reduction, cfg.scale)


def sliced_state(supernet: nn.Module, plain: nn.Module) -> dict[str, torch.Tensor]:
    """The supernet's weights cut to the plain net's shapes: each dim keeps its prefix (weight[:out, :in])."""
    full = supernet.state_dict()
    return {k: full[k][tuple(slice(0, n) for n in v.shape)] for k, v in plain.state_dict().items()}


SMALL = {
    "srresnet": dict(widths=(16, 32), depths=(2, 4)),
    "rcan": dict(widths=(16, 32), depths=(1, 2), n_groups=2),
    "lrnet": dict(widths=(16, 32), depths=(1, 3)),
}


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("arch", ["srresnet", "rcan"])
def test_plain_checkpoint_loads_strict_and_is_the_full_subnet(arch: str, scale: int) -> None:
    torch.manual_seed(scale)
    cfg = ModelConfig(arch, scale, **SMALL[arch])
    plain = plain_like(cfg, cfg.full).eval()
    net = build_supernet(cfg).eval()
    net.load_state_dict(plain.state_dict(), strict=True)
    x = torch.rand(2, 3, 12, 10)
    with torch.no_grad():
        diff = (net(x) - plain(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("arch", ["srresnet", "rcan", "lrnet"])
def test_subnet_equals_plain_net_of_sliced_weights(arch: str, scale: int) -> None:
    torch.manual_seed(10 + scale)
    cfg = ModelConfig(arch, scale, **SMALL[arch])
    net = build_supernet(cfg).eval()
    x = torch.rand(1, 3, 11, 9)
    for spec in [SubnetSpec(w, d) for w in cfg.widths for d in cfg.depths]:
        plain = plain_like(cfg, spec).eval()
        plain.load_state_dict(sliced_state(net, plain), strict=True)
        with torch.no_grad():
            assert (net(x, spec) - plain(x)).abs().max().item() <= 1e-5, spec


def test_srresnet_x4_flops_exact() -> None:
    cfg = preset("srresnet", 4)
    expected = {36: 1_658_216_448, 52: 3_438_010_368, 64: 5_193_990_144}
    for width, flops in expected.items():
        assert count_flops(cfg, SubnetSpec(width, 16)) == flops


def test_srresnet_x4_paper_grid_in_flops_order() -> None:
    cfg = preset("srresnet", 4)
    specs = subnet_specs(cfg)
    expected = [
        ((36, 4), 1.085), ((36, 8), 1.276), ((36, 16), 1.658), ((52, 4), 2.242), ((52, 8), 2.641),
        ((64, 4), 3.382), ((52, 16), 3.438), ((64, 8), 3.986), ((64, 16), 5.194),
    ]
    assert [tuple(s) for s in specs] == [spec for spec, _ in expected]
    assert [round(count_flops(cfg, s) / 1e9, 3) for s in specs] == [g for _, g in expected]


def test_rcan_x4_full_flops() -> None:
    cfg = preset("rcan", 4)
    assert round(count_flops(cfg, cfg.full) / 1e9, 2) == 32.60


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_compact_preset_specs_and_flops_range(scale: int) -> None:
    cfg = preset("srresnet-compact", scale)
    specs = subnet_specs(cfg)
    assert len(specs) == len(cfg.widths) * len(cfg.depths)
    assert set(specs) == {SubnetSpec(w, d) for w in cfg.widths for d in cfg.depths}
    flops = [count_flops(cfg, s) for s in specs]
    assert flops == sorted(flops)
    assert specs[-1] == cfg.full
    assert flops[-1] >= 4 * flops[0]


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_lrnet_preset_flops_are_all_lr_space_convs(scale: int) -> None:
    """Every conv of LRNet runs at LR resolution: 2 x MACs per 32 x 32 patch = 2 * 1024 * (head 27 w + body
    18 w^2 d + up 27 s^2 w), and the preset spans more than 10x from its smallest subnet to its full one."""
    cfg = preset("lrnet", scale)
    specs = subnet_specs(cfg)
    flops = [count_flops(cfg, s) for s in specs]
    assert flops == [2 * 1024 * (27 * w + 18 * w * w * d + 27 * scale**2 * w) for w, d in specs]
    assert len(specs) == 9 and specs[-1] == cfg.full and flops == sorted(flops)
    assert all(w % 16 == 0 for w in cfg.widths) and flops[-1] > 10 * flops[0]
