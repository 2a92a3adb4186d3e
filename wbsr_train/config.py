"""Frozen, JSON-able configs that travel inside every checkpoint (and, in part, every bundle)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple


class SubnetSpec(NamedTuple):
    """One subnet of the supernet: the first `width` channels of every conv, the first `depth` blocks."""

    width: int
    depth: int


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a slimmable supernet.

    `widths` x `depths` is the subnet grid; the largest of each is the full network.
    """

    arch: str  # "srresnet" (BasicSR's MSRResNet), "rcan" or "lrnet" (wbsr_train.model.SlimLRNet)
    scale: int
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    n_groups: int = 10  # rcan only: residual groups; `depths` counts RCABs per group
    reduction: int = 16  # rcan only: channel-attention squeeze ratio at full width

    @property
    def channels(self) -> int:
        return max(self.widths)

    @property
    def blocks(self) -> int:
        return max(self.depths)

    @property
    def full(self) -> SubnetSpec:
        return SubnetSpec(self.channels, self.blocks)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r} (expected {', '.join(ARCHS)})")
        if self.scale not in (2, 3, 4):
            raise ValueError(f"scale {self.scale} is not supported (expected 2, 3 or 4)")
        if not self.widths or not self.depths or min(self.widths) < 1 or min(self.depths) < 1:
            raise ValueError("widths and depths must be non-empty and positive")
        if self.arch == "rcan" and min(self.widths) < self.reduction:
            raise ValueError(f"rcan widths must be >= the attention reduction {self.reduction}")


ARCHS = ("srresnet", "rcan", "lrnet")

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's grids (METHOD.md section 1).
    "srresnet": dict(arch="srresnet", widths=(36, 52, 64), depths=(4, 8, 16)),
    "rcan": dict(arch="rcan", widths=(36, 52, 64), depths=(5, 10, 20)),
    # Same structure, small enough to train on 2 CPU cores in an hour; ~5x FLOPs from smallest to largest.
    "srresnet-compact": dict(arch="srresnet", widths=(16, 24, 32), depths=(2, 4, 8)),
    # Deployment-shaped: the whole slimmable body at LR resolution, widths in multiples of 16 (the block size
    # of AVX-512 and tensor-core kernels; width 16 runs 1.5-2x slower per FLOP than 48 on ONNX Runtime's CPU
    # kernels, so the grid starts at 32); 11-13x measured time from smallest to largest (README: LRNet).
    "lrnet": dict(arch="lrnet", widths=(32, 48, 64), depths=(2, 4, 10)),
}


def preset(name: str, scale: int) -> ModelConfig:
    """The model config of a named preset at `scale`; ValueError for an unknown name or scale."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    cfg = ModelConfig(scale=scale, **PRESETS[name])
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON types (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"model config has unknown fields: {sorted(unknown)}")
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    cfg.validate()
    return cfg
