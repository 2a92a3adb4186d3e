"""Supernet -> standalone subnet: a plain static network holding only its own weights.

A subnet (w, d) of a supernet is exactly the plain network built with `widths=(w,)`, `depths=(d,)` whose every
tensor is the leading slice of the supernet's tensor of the same name (`weight[:out, :in]`, `bias[:out]`,
the first d blocks). So extraction is one generic op over the plain network's state dict.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from wbsr_train.config import ModelConfig, SubnetSpec
from wbsr_train.model import build_supernet


def subnet_config(cfg: ModelConfig, spec: SubnetSpec) -> ModelConfig:
    """The config of the plain network that is subnet `spec` of `cfg` (a single width and depth)."""
    return dataclasses.replace(cfg, widths=(int(spec[0]),), depths=(int(spec[1]),))


def leading_slice(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`tensor[:shape[0], :shape[1], ...]`; ValueError when the tensor is smaller than `shape` anywhere."""
    if tensor.dim() != len(shape) or any(t < s for t, s in zip(tensor.shape, shape, strict=True)):
        raise ValueError(f"cannot slice {tuple(shape)} out of a tensor of shape {tuple(tensor.shape)}")
    return tensor[tuple(slice(0, s) for s in shape)]


@torch.no_grad()
def extract_subnet(supernet: nn.Module, spec: SubnetSpec) -> nn.Module:
    """A plain network equal to `supernet(x, spec)`, in eval mode, with copies of the sliced weights.

    `supernet` is a wbsr_train.model supernet (it carries its ModelConfig as `.cfg`); `spec` must be a
    (width, depth) with width <= its channels and depth <= its blocks.
    """
    cfg: ModelConfig = supernet.cfg
    if not (1 <= spec[0] <= cfg.channels and 1 <= spec[1] <= cfg.blocks):
        raise ValueError(f"subnet {tuple(spec)} is outside the supernet ({cfg.channels}, {cfg.blocks})")
    if (
        cfg.arch == "rcan"
        and (cfg.channels // cfg.reduction) * spec[0] // cfg.channels != spec[0] // cfg.reduction
    ):
        raise ValueError(f"rcan subnet width {spec[0]} has no plain equivalent (attention squeeze differs)")
    plain = build_supernet(subnet_config(cfg, spec))
    source = supernet.state_dict()
    sliced = {}
    for name, target in plain.state_dict().items():
        if name not in source:
            raise ValueError(f"supernet has no tensor {name!r} needed by subnet {tuple(spec)}")
        sliced[name] = leading_slice(source[name], target.shape).clone()
    plain.load_state_dict(sliced)
    return plain.eval()
