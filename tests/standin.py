"""A nearest-neighbour stand-in with the `Upscaler` interface, for media and CLI tests without a model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np


@dataclass
class StandinStats:
    tiles_per_subnet: list[int] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    subnets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class NearestUpscaler:
    """`upscale((H, W, 3) uint8/uint16/float32) -> (H*s, W*s, 3)` by pixel repetition; 8x8 tiles, subnet by
    tile index; `fail_on` raises that exception on that call number (0-based); `delay` sleeps per call."""

    manifest = SimpleNamespace(subnets=[SimpleNamespace(width=8 * (m + 1), depth=1) for m in range(3)])
    costs, cost = np.array([1.0, 2.0, 4.0]), "flops"  # what the routing map's legend reads

    def __init__(self, scale: int = 2, fail_on: tuple[int, BaseException] | None = None, delay: float = 0.0):
        self.scale, self.fail_on, self.delay, self.calls = scale, fail_on, delay, 0
        self.last_stats: StandinStats | None = None

    def __enter__(self) -> NearestUpscaler:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def upscale(self, image: np.ndarray) -> np.ndarray:
        if self.fail_on is not None and self.calls == self.fail_on[0]:
            raise self.fail_on[1]
        self.calls += 1
        time.sleep(self.delay)
        h, w = image.shape[:2]
        boxes = np.array(
            [(y, x, min(y + 8, h), min(x + 8, w)) for y in range(0, h, 8) for x in range(0, w, 8)]
        )
        subnets = np.arange(len(boxes)) % len(self.manifest.subnets)
        self.last_stats = StandinStats(np.bincount(subnets, minlength=3).tolist(), boxes, subnets)
        return np.repeat(np.repeat(image, self.scale, axis=0), self.scale, axis=1)
