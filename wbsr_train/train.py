"""The training loop of the balanced supernet: one readable function, `train(cfg)`.

Each step draws a batch of LR/HR patches (uniform, then class-balanced by HES), trains the full supernet on it
and, on the same batch, every patch through the subnet its class routes to (METHOD.md section 4), with
BDLoss or L1. Multi-process through torchrun: every rank draws its own batches, gradients are averaged by
DistributedDataParallel, rank 0 validates and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from wbsr_runtime.routing import classify, eq15_map

from . import descriptor
from .checkpoint import FLOPS_PATCH, Checkpoint, CheckpointError, ResumeState, load_checkpoint, save_checkpoint
from .config import ModelConfig, SubnetSpec, model_config_from_dict, preset, to_dict
from .data import TrainSet, augment, load_pairs
from .loss import make_loss, optimizer_groups
from .model import build_supernet, count_flops, subnet_specs
from .sampler import HESSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    preset: str
    scale: int
    data: tuple[str, ...]
    out: str
    val: str | None = None
    iters: int = 20000
    batch: int = 16
    patch: int = 32  # LR patch side; HR crops are patch * scale; the thresholds are computed at it (class_patch)
    lr: float = 2e-4
    lr_min: float = 1e-7
    loss: str = "bd"  # "bd" (Balanced Diversity Loss) or "l1"
    sampler: str = "hes"  # "hes" or "uniform"
    schedule: str = "routed"  # "routed" (METHOD.md 4) or "random" (ARM-style: one random subnet per step)
    plain: bool = False  # train only the full network, no subnets (the ablation's baseline); ignores schedule
    delta: float = 0.85
    switch: float = 0.7  # fraction of training after which HES draws class-balanced batches
    num_classes: int = 10
    pool: int = 20000  # patches scored for the thresholds and the HES pool
    sigma_init: float = 0.05
    sigma_lr: float = 0.0  # METHOD.md's learned sigma (1e-2) collapses to 0: see loss.BalancedL1
    weight_decay: float = 0.0
    val_every: int = 1000
    log_every: int = 50
    seed: int = 0
    skip_bad: bool = False
    init: str | None = None  # start from this checkpoint's weights (same model); fresh optimizer and schedule
    distill: float = 1.0  # in-place distillation weight: routed subnets also regress the full's detached output
    precision: str = "fp32"  # "bf16": autocast to bfloat16 (CPUs with AMX/AVX512-BF16, GPUs); weights stay fp32
    holdout: float = 0.0  # fraction of training images set aside for calibration (see data.holdout_split)
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda"; under torchrun each rank takes its GPU

    def validate(self) -> None:
        preset(self.preset, self.scale)  # raises on unknown preset or scale
        for name, value, allowed in [("loss", self.loss, ("bd", "l1")), ("sampler", self.sampler, ("hes", "uniform")),
                                     ("schedule", self.schedule, ("routed", "random")),
                                     ("precision", self.precision, ("fp32", "bf16"))]:
            if value not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.iters < 1 or self.batch < 1 or self.patch < 3:
            raise ValueError("--iters and --batch must be positive and --patch at least 3")
        if not (0 <= self.distill < float("inf")) or not (0 <= self.holdout < 1):
            raise ValueError("--distill must be a finite weight >= 0 and --holdout a fraction in [0, 1)")


# Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = ("out", "val", "val_every", "log_every", "skip_bad", "device")  # monitoring and placement


# Fields added since the first checkpoints, with the value every run had before them (for `distill` that is
# not today's default: the distillation study made 1.0 the default later, README: Training).
ADDED_FIELDS = {"distill": 0.0, "precision": "fp32", "holdout": 0.0, "device": "auto"}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    # A field added since `old` was saved counts as what it was then, so older checkpoints still resume.
    old = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)
              if f.default is not dataclasses.MISSING}, **ADDED_FIELDS, **old}
    keys = sorted((set(old) | set(new)) - set(RESUMABLE_CHANGES))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class SupernetStep(nn.Module):
    """One training forward: the full supernet on the batch, and each patch through its routed subnet.

    Wrapping both passes in one module lets DistributedDataParallel see a single forward per step.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, lr: torch.Tensor, groups: list[tuple[SubnetSpec, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        full = self.net(lr)
        routed = torch.empty_like(full)
        for spec, idx in groups:
            routed[idx] = self.net(lr[idx], spec)
        return full, routed


def build_pool(data: TrainSet, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Score `cfg.pool` uniformly drawn LR patches: positions (N, 3), classes (N,) in 1..K, thresholds (K-1,)."""
    rng = np.random.default_rng([cfg.seed, 1])  # a stream of its own: the pool is the same on every rank/resume
    positions = data.random_positions(cfg.pool, cfg.patch, rng)
    scores = torch.cat([
        descriptor.patch_scores(torch.from_numpy(data.crops(positions[i:i + 2048], cfg.patch)[0]))
        for i in range(0, len(positions), 2048)
    ])
    thresholds = descriptor.thresholds_from_pool(scores, cfg.num_classes)
    return positions, classify(scores.numpy(), thresholds.numpy()), thresholds


def route_groups(classes: np.ndarray, specs: list[SubnetSpec], class_map: np.ndarray,
                 schedule: str, rng: np.random.Generator) -> list[tuple[SubnetSpec, torch.Tensor]]:
    """Which batch rows go through which subnet this step."""
    if schedule == "random":
        return [(specs[rng.integers(len(specs))], torch.arange(len(classes)))]
    subnet = class_map[classes - 1]
    return [(specs[m], torch.from_numpy(np.flatnonzero(subnet == m))) for m in np.unique(subnet)]


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset's supernet, or with `cfg.plain` its full network alone (one width, one depth: one subnet)."""
    mcfg = preset(cfg.preset, cfg.scale)
    return dataclasses.replace(mcfg, widths=(mcfg.channels,), depths=(mcfg.blocks,)) if cfg.plain else mcfg


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train a balanced supernet and write its checkpoint to `cfg.out`; returns the last metrics."""
    cfg.validate()
    rank, world, device = _init_distributed(cfg.device)
    mcfg = model_config(cfg)
    ckpt = _resume_state(cfg, mcfg) if resume else None
    init = _init_weights(cfg.init, mcfg) if cfg.init and ckpt is None else None  # refused before any work
    torch.manual_seed(cfg.seed)
    net = build_supernet(mcfg)
    loss_fn = make_loss(cfg.loss, cfg.sigma_init)
    loss_fn.requires_grad_(cfg.sigma_lr > 0)  # sigma is fixed unless it has a learning rate
    specs = subnet_specs(mcfg)
    data = TrainSet(cfg.data, cfg.scale, skip_bad=cfg.skip_bad, holdout=cfg.holdout)
    val = load_pairs(cfg.val, cfg.scale) if cfg.val and rank == 0 else []
    positions, classes, thresholds = build_pool(data, cfg)
    sampler = HESSampler(positions, classes, cfg.num_classes, cfg.delta,
                         switch=cfg.switch if cfg.sampler == "hes" else 1.0)
    class_map = eq15_map(cfg.num_classes, len(specs))

    net.to(device, memory_format=torch.channels_last)  # measured: 1.1x (fp32), 1.3x (bf16) faster on CPU
    loss_fn.to(device)
    step_module = SupernetStep(net)
    model = torch.nn.parallel.DistributedDataParallel(step_module) if world > 1 else step_module
    opt = torch.optim.Adam(optimizer_groups(net, loss_fn, cfg.lr, cfg.sigma_lr, cfg.weight_decay), betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=cfg.lr_min)
    rng = np.random.default_rng([cfg.seed, 2, rank])
    start, metrics = 0, {}
    if init is not None:
        net.load_state_dict(init)
    if ckpt is not None:
        net.load_state_dict(ckpt.model)  # onto the parameters' device; optimizer state follows them
        loss_fn.load_state_dict(ckpt.state.loss)
        opt.load_state_dict(ckpt.state.optimizer)
        sched.load_state_dict(ckpt.state.scheduler)
        rng.bit_generator.state = json.loads(ckpt.state.rng[rank])
        start, metrics = ckpt.state.step, ckpt.metrics

    def save(step: int) -> None:
        rng_states = _gather_rng(rng, world)  # a collective: every rank takes part
        if rank == 0:
            state = ResumeState(step, loss_fn.state_dict(), opt.state_dict(), sched.state_dict(), tuple(rng_states))
            save_checkpoint(cfg.out, _checkpoint(cfg, mcfg, net, specs, thresholds, state, metrics, data.held_out))

    log_path = Path(cfg.out).with_suffix(".jsonl")
    if rank == 0 and ckpt is None:
        log_path.unlink(missing_ok=True)
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=rank != 0, desc="train")
    t0 = time.time()
    for step in bar:
        idx = sampler.draw(cfg.batch, step / cfg.iters, rng)
        lr_np, hr_np = augment(*data.crops(positions[idx], cfg.patch), rng)
        lr_t = torch.from_numpy(lr_np).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        hr_t = torch.from_numpy(hr_np).to(device, non_blocking=True)
        # A plain network has no subnets: routing would only run the full network a second time.
        groups = [] if cfg.plain else route_groups(classes[idx], specs, class_map, cfg.schedule, rng)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            full, routed = model(lr_t, groups)
        full, routed = full.float(), routed.float()
        loss_full = loss_fn(full, hr_t)
        loss_routed = routed_loss(loss_fn, routed, full, hr_t, cfg.distill) if groups else full.new_zeros(())
        opt.zero_grad(set_to_none=True)
        (loss_full + loss_routed).backward()
        opt.step()
        sched.step()
        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.iters):
            record = {"step": done, "loss_full": loss_full.item(), "loss_routed": loss_routed.item(),
                      "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)}
            record.update({"sigma": float(loss_fn.sigma.detach().abs())} if cfg.loss == "bd" else {})
            _append_jsonl(log_path, record)
            bar.set_postfix(loss=f"{record['loss_full']:.4g}")
        if val and (done % cfg.val_every == 0 or done == cfg.iters):
            metrics = {"step": done, **_validate(net, val, cfg.scale)}
            _append_jsonl(log_path, metrics)
            log.info("step %d: %s", done, metrics)
        if done % cfg.val_every == 0 or done == cfg.iters:
            save(done)
    if world > 1:
        torch.distributed.barrier()  # no rank tears its connections down while another still saves
        torch.distributed.destroy_process_group()
    return metrics


def routed_loss(loss_fn: nn.Module, routed: torch.Tensor, full: torch.Tensor, hr: torch.Tensor,
                distill: float) -> torch.Tensor:
    """The routed subnets' loss against HR, plus with `distill` > 0 in-place distillation: an L1 pull towards
    the full subnet's detached output on the same patches (slimmable networks, BigNAS, OFA)."""
    loss = loss_fn(routed, hr)
    return loss + distill * F.l1_loss(routed, full.detach()) if distill > 0 else loss


def _validate(net: nn.Module, val: list, scale: int) -> dict[str, float]:
    from .evaluate import psnr_y, upscale_whole

    psnrs = [psnr_y(upscale_whole(net, lr, None), hr, scale) for _, lr, hr in val]
    return {"val_psnr_y_full": float(np.mean(psnrs))}


def _checkpoint(cfg: TrainConfig, mcfg: ModelConfig, net: nn.Module, specs: list[SubnetSpec],
                thresholds: torch.Tensor, state: ResumeState, metrics: dict[str, Any], held: list[str]) -> Checkpoint:
    return Checkpoint(
        model_config=to_dict(mcfg),
        train_config=to_dict(cfg),
        model={k: v.cpu() for k, v in net.state_dict().items()},
        specs=tuple(specs),
        flops=tuple(count_flops(mcfg, s, FLOPS_PATCH, FLOPS_PATCH) for s in specs),
        flops_patch=FLOPS_PATCH,
        num_classes=cfg.num_classes,
        thresholds=tuple(float(t) for t in thresholds),
        class_patch=cfg.patch,  # build_pool scored patches of this size
        state=state,
        metrics=metrics,
        holdout=tuple(held),
    )


def _resume_state(cfg: TrainConfig, mcfg: ModelConfig) -> Checkpoint:
    if not Path(cfg.out).exists():
        raise CheckpointError(f"{cfg.out}: nothing to resume (no checkpoint there)")
    ckpt = load_checkpoint(cfg.out)
    if ckpt.state is None:
        raise CheckpointError(f"{cfg.out}: checkpoint has no training state to resume from")
    diff = config_diff(ckpt.train_config or {}, to_dict(cfg))
    if diff:
        raise CheckpointError(f"{cfg.out}: cannot resume with a different config ({'; '.join(diff)})")
    if model_config_from_dict(ckpt.model_config) != mcfg:
        raise CheckpointError(f"{cfg.out}: the checkpoint's model differs from preset {cfg.preset!r}"
                              + (" (plain)" if cfg.plain else ""))
    return ckpt


def _init_weights(path: str, mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The supernet weights of the checkpoint at `path`, refused unless its model is exactly `mcfg`."""
    ckpt = load_checkpoint(path)
    if model_config_from_dict(ckpt.model_config) != mcfg:
        raise CheckpointError(f"{path}: --init needs a checkpoint of the same model (preset and scale)")
    return ckpt.model


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); initialises the process group when launched by torchrun."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        if device != "auto":
            raise ValueError(f"--device {device}: PyTorch sees no CUDA GPU here")
        device = "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cpu") if device == "cpu" else torch.device(device if ":" in device else f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return 0, 1, dev
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return torch.distributed.get_rank(), world, dev


def _gather_rng(rng: np.random.Generator, world: int) -> list[str]:
    state = json.dumps(rng.bit_generator.state)
    if world == 1:
        return [state]
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, state)
    return states


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def config_from_args(**kwargs: Any) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in kwargs.items() if k in fields and v is not None})
    cfg.validate()
    return cfg

