"""Command lines: wbsr-train, wbsr-eval, wbsr-calibrate. Each parses, builds a config, calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from wbsr_runtime import CPU_TORCH
from wbsr_runtime.fileio import exit_code, interrupts_as_exceptions, one_line, write_json


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def missing_torch(prog: str, extra: str, err: ModuleNotFoundError) -> str | None:
    """The one line for a tool run on an install without its extra (torch, onnx), or None for another
    missing module (a real bug, left to surface)."""
    if err.name not in ("torch", "onnx"):
        return None
    first = f" (for the CPU-only build of PyTorch, first: {CPU_TORCH})" if err.name == "torch" else ""
    return f'{prog} needs {err.name}, which is not installed: pip install "wbsr-deploy[{extra}]"{first}'


def _run(fn, args, prog: str) -> int:
    """Call `fn(args)`, turning user errors into one line on stderr and exit code 2; SIGTERM and SIGHUP act as
    Ctrl-C (temporary files removed, exit 128 + signal)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with interrupts_as_exceptions():
            return fn(args)
    except ModuleNotFoundError as e:
        line = missing_torch(prog, "train", e)
        if line is None:
            raise
        return _fail(line)
    except (ValueError, OSError) as e:  # CheckpointError, ImageError and bad options are ValueErrors
        return _fail(one_line(e))
    except KeyboardInterrupt as e:
        return exit_code(e)


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("wbsr-train", description="Train a balanced WBSR supernet.")
    p.add_argument("--preset", required=True, help="lrnet (deployment-shaped), srresnet-compact, srresnet or rcan")
    p.add_argument("--scale", type=int, required=True)
    p.add_argument("--data", action="append", required=True, help="HR image folder (repeatable)")
    p.add_argument("--val", help="validation folder (e.g. Set5), evaluated whole-image")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--iters", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--patch", type=int, help="LR patch side (HR crop = patch x scale); default 32")
    p.add_argument("--lr", type=float)
    p.add_argument("--loss", choices=["bd", "l1"])
    p.add_argument("--sampler", choices=["hes", "uniform"])
    p.add_argument("--schedule", choices=["routed", "random"])
    p.add_argument("--plain", action="store_true", default=None,
                   help="train the full network alone, no subnets (the ablation baseline)")
    p.add_argument("--delta", type=float)
    p.add_argument("--sigma-init", type=float, help="BDLoss noise std (default 0.05)")
    p.add_argument("--sigma-lr", type=float, help="learning rate of sigma (default 0: fixed)")
    p.add_argument("--pool", type=int, help="patches scored for thresholds and HES")
    p.add_argument("--val-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--skip-bad", action="store_true", default=None, help="skip unreadable images, count them")
    p.add_argument("--init", help="start from this checkpoint's weights (fine-tuning: new optimizer and schedule)")
    p.add_argument("--distill", type=float, metavar="W",
                   help="in-place distillation weight: routed subnets also regress the full subnet's output "
                   "(default 1; 0: off)")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="bf16: autocast to bfloat16 (2x faster on CPUs with AMX; default fp32)")
    p.add_argument("--holdout", type=float, metavar="F",
                   help="fraction of the training images set aside as the calibration split (default 0)")
    p.add_argument("--device", help="auto (CUDA when available; default), cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return _run(_train, p.parse_args(argv), "wbsr-train")


def _train(a: argparse.Namespace) -> int:
    from .train import config_from_args, train

    options = {k: v for k, v in vars(a).items() if k not in ("resume", "force")}
    cfg = config_from_args(**{**options, "data": tuple(a.data)})
    for folder in [*cfg.data, *([cfg.val] if cfg.val else [])]:
        if not Path(folder).is_dir():
            raise ValueError(f"{folder}: no such folder")
    if Path(cfg.out).exists() and not (a.resume or a.force):
        raise ValueError(f"{cfg.out} exists: pass --resume to continue it or --force to start over")
    metrics = train(cfg, resume=a.resume)
    print(f"wrote {cfg.out}" + (f" ({json.dumps(metrics)})" if metrics else ""))
    return 0


def _load(ckpt_path: str, data: str | None, scale: int | None):
    """(checkpoint, supernet, (name, lr, hr) pairs): `data` a folder, or None for the checkpoint's held-out
    calibration split."""
    from .checkpoint import load_checkpoint, supernet_from_checkpoint
    from .data import load_pairs, load_pairs_from_files

    ckpt = load_checkpoint(ckpt_path)
    net = supernet_from_checkpoint(ckpt, ckpt_path)  # refuses a checkpoint without a (valid) model, as export does
    if scale is not None and scale != net.cfg.scale:
        raise ValueError(f"--scale {scale} does not match the checkpoint's scale {net.cfg.scale}")
    if data is not None:
        if not Path(data).is_dir():
            raise ValueError(f"{data}: no such folder")
        return ckpt, net, load_pairs(data, net.cfg.scale)
    held = ckpt.holdout
    if not held:
        raise ValueError(f"{ckpt_path}: no held-out calibration split (train with --holdout F); pass --data DIR")
    missing = [p for p in held if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{missing[0]}: held-out image not found (run from where training ran, or pass --data)")
    return ckpt, net, load_pairs_from_files(held, net.cfg.scale)


def _knob(p: argparse.ArgumentParser, what: str) -> None:
    knob = p.add_mutually_exclusive_group()
    knob.add_argument("--tolerance", type=float, metavar="DB",
                      help=f"{what} the cheapest map within DB of the full subnet's predicted image PSNR")
    knob.add_argument("--budget", type=float, metavar="F",
                      help=f"{what} the best map within F x the full subnet's FLOPs")


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("wbsr-eval", description="Evaluate a WBSR checkpoint (Y-PSNR/SSIM, FLOPs).")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="folder of HR images (or a benchmark set with HR/)")
    p.add_argument("--scale", type=int)
    _knob(p, "route with")
    p.add_argument("--json", help="write the report here")
    return _run(_eval, p.parse_args(argv), "wbsr-eval")


def _eval(a: argparse.Namespace) -> int:
    from wbsr_runtime import routing

    from .evaluate import evaluate_model

    ckpt, net, pairs = _load(a.ckpt, a.data, a.scale)
    cal = ckpt.calibration
    if (a.tolerance is not None or a.budget is not None) and not cal:
        raise ValueError("--tolerance/--budget need a calibrated checkpoint: run wbsr-calibrate first")
    if cal and (a.tolerance is not None or a.budget is not None):
        table, freq, flops = np.array(cal["mse_table"]), np.array(cal["class_freq"]), np.array(ckpt.flops, float)
        class_map = routing.tolerance_map(table, freq, flops, a.tolerance) if a.tolerance is not None \
            else routing.budget_map(table, freq, flops, a.budget)
    elif cal:
        class_map = np.array(cal["class_to_subnet"])
    else:
        class_map = routing.eq15_map(ckpt.num_classes, len(ckpt.specs))
    report = evaluate_model(net, ckpt, pairs, class_map)
    report["routing"] = "calibrated" if cal else "eq15"
    print(format_report(report))
    if a.json:
        write_json(a.json, report)
    return 0


def format_report(report: dict) -> str:
    lines = [f"x{report['scale']} on {report['images']} images   (routing map: {report['routing']}, "
             f"classes->subnets {report['class_to_subnet']})",
             f"{'method':40s} {'Y-PSNR':>8s} {'SSIM':>7s} {'RGB-PSNR':>9s} {'FLOPs %':>8s}"]
    for r in report["rows"]:
        pct = f"{r['flops_pct']:.1f}" if "flops_pct" in r else "-"
        lines.append(f"{r['method']:40s} {r['psnr_y']:8.3f} {r['ssim_y']:7.4f} {r['psnr_rgb']:9.3f} {pct:>8s}")
    lines.append("per-class Y-PSNR of the full subnet: " + ", ".join(
        f"{c['class']}:{c['psnr_y_full']:.2f}" for c in report["per_class"] if c["psnr_y_full"] is not None))
    return "\n".join(lines)


def calibrate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("wbsr-calibrate", description="Measure the class x subnet MSE table.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", help="calibration folder (default: the checkpoint's held-out split; never Set5/14)")
    _knob(p, "the bundle's default map:")
    p.add_argument("--out", help="write the calibrated checkpoint here instead of updating --ckpt")
    return _run(_calibrate, p.parse_args(argv), "wbsr-calibrate")


def _calibrate(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from .calibrate import calibrate
    from .checkpoint import save_checkpoint

    if a.tolerance is not None and not 0 <= a.tolerance < float("inf"):
        raise ValueError(f"--tolerance must be a finite number of dB >= 0, got {a.tolerance}")
    if a.budget is not None and not 0 < a.budget <= 1:
        raise ValueError(f"--budget must be a fraction in (0, 1], got {a.budget}")
    ckpt, net, pairs = _load(a.ckpt, a.data, None)
    cal = calibrate(net, ckpt, pairs, a.tolerance, a.budget)
    save_checkpoint(a.out or a.ckpt, replace(ckpt, calibration=cal))
    print(f"class x subnet Y MSE on {cal['tiles']} tiles of {cal['images']} images (class share %):")
    for k, (row, f) in enumerate(zip(cal["mse_table"], cal["class_freq"], strict=True), 1):
        print(f"  class {k:2d} ({100 * f:4.1f}): " + " ".join(f"{v:7.2f}" for v in row))
    knob = f"tolerance {cal['tolerance_db']} dB" if cal["budget"] is None else f"budget {cal['budget']}"
    print(f"map ({knob}): {cal['class_to_subnet']}, predicted {cal['predicted_loss_db']:.3f} dB below the full "
          f"subnet at {100 * cal['predicted_flops_ratio']:.1f}% of its FLOPs")
    print(f"wrote {a.out or a.ckpt}")
    return 0
