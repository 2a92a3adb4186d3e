"""Session fixtures shared by the export and runtime tests: a tiny random-weight checkpoint and its bundle.

No torch import at module level: runtime tests run without torch, and the fixtures that need it skip.
"""

from __future__ import annotations

import functools
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests import DATA

NUM_CLASSES = 10


@functools.cache
def set5_images() -> tuple[np.ndarray, ...]:
    """Set5 HR images as (1, 3, H, W) float32 RGB in [0, 1] (read-only); empty when the data is absent."""
    from PIL import Image

    paths = sorted((DATA / "Set5" / "HR").glob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    images = tuple(np.ascontiguousarray(a.transpose(2, 0, 1)[None]) for a in arrays)
    for img in images:
        img.flags.writeable = False
    return images


def refused_with_peak(call: Callable[[], object], error: type[Exception], match: str) -> tuple[str, int]:
    """Run `call`, which must raise `error` matching `match`: (its message, peak bytes Python allocated)."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match) as e:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(e.value), peak


def textured_images(count: int = 3, size: int = 96, seed: int = 0) -> list[np.ndarray]:
    """Synthetic stand-ins for real images: smooth shading, edges and noise of varied strength."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(count):
        base = 0.5 + 0.3 * np.sin((4 + 3 * i) * xx + 7 * yy**2)
        edges = 0.3 * ((np.sin(20 * xx * (i + 1)) > 0) & (yy > 0.5))
        noise = rng.normal(0, 0.01 + 0.05 * xx, (3, size, size))
        images.append(np.clip(base + edges + noise, 0, 1).astype(np.float32)[None])
    return images


def real_or_textured_images() -> list[np.ndarray]:
    return list(set5_images()) or textured_images()


def tiny_checkpoint_data(
    arch: str = "srresnet",
    calibrated: bool = True,
    seed: int = 0,
    widths: tuple[int, ...] = (8, 16),
    depths: tuple[int, ...] = (1, 2),
):
    """A random-weight x4 supernet `Checkpoint` (default widths (8, 16), depths (1, 2)), thresholds from 32 x 32
    patches; `.to_dict()` is what `save_checkpoint` writes (edit that to test refusals: `save_checkpoint_dict`)."""
    torch = pytest.importorskip("torch")
    from wbsr_runtime.routing import tolerance_map
    from wbsr_train.checkpoint import Checkpoint
    from wbsr_train.config import ModelConfig, to_dict
    from wbsr_train.descriptor import patch_scores, thresholds_from_pool
    from wbsr_train.model import build_supernet, count_flops, subnet_specs

    cfg = ModelConfig(arch, 4, widths, depths, n_groups=2, reduction=4)
    torch.manual_seed(seed)
    net = build_supernet(cfg)
    specs = subnet_specs(cfg)
    patches = torch.from_numpy(
        np.concatenate([img[0:1, :, :32, :32] for img in textured_images(12, 40, seed)])
    )
    pool = torch.cat([patch_scores(patches), patch_scores(torch.rand(8, 3, 32, 32) * 0.2)])
    thresholds = thresholds_from_pool(pool, NUM_CLASSES)
    flops = [count_flops(cfg, s) for s in specs]
    m = len(specs)
    mse = np.array([[40.0 * (1 + k) * (1.2 - 0.05 * j) for j in range(m)] for k in range(NUM_CLASSES)])
    freq = np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
    calibration = {
        "mse_table": mse.tolist(),
        "class_freq": freq.tolist(),
        "tolerance_db": 0.1,
        "budget": None,
        "class_to_subnet": tolerance_map(mse, freq, np.array(flops, float), 0.1).tolist(),
    }
    return Checkpoint(
        model_config=to_dict(cfg),
        model=net.state_dict(),
        specs=tuple(specs),
        flops=tuple(flops),
        num_classes=NUM_CLASSES,
        thresholds=tuple(thresholds.tolist()),
        class_patch=32,
        calibration=calibration if calibrated else None,
    )


def save_checkpoint_dict(path: Path, data: dict) -> Path:
    """Write `data` as a checkpoint file as it stands (`save_checkpoint` takes only a valid `Checkpoint`)."""
    torch = pytest.importorskip("torch")
    torch.save(data, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny srresnet checkpoint (4 subnets, K = 10, calibrated)."""
    pytest.importorskip("torch")
    from wbsr_train.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_checkpoint_data())
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported bundle of `tiny_checkpoint`: fp32 + fp16 graphs, router, .pt2 programs; patch 16.

    Treat it as read-only (copy it with shutil.copytree to modify it).
    """
    pytest.importorskip("onnx")
    from wbsr_export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export_bundle(tiny_checkpoint, out, fp16=True, max_batch=4, patch=16, overlap=2)
