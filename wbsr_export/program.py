"""torch.export programs (`.pt2`) of the subnets, for the runtime's torch backend."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim


def export_subnet_program(subnet: nn.Module, path: str | Path) -> Path:
    """Save `subnet` as a torch.export program with dynamic N, h, w.

    The program maps (N, 3, h, w) float32 in [0, 1] to (N, 3, h*s, w*s) float32; load it with
    `torch.export.load(path).module()`.
    """
    sample = torch.rand(2, 3, 16, 16)
    dims = {0: Dim("N", min=1, max=4096), 2: Dim("h", min=3, max=8192), 3: Dim("w", min=3, max=8192)}
    with torch.no_grad():
        program = torch.export.export(
            subnet.eval(), (sample,), dynamic_shapes=({k: v for k, v in dims.items()},)
        )
    torch.export.save(program, str(path))
    return Path(path)
