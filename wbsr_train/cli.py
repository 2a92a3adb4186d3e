"""Command lines: wbsr-train, wbsr-eval, wbsr-calibrate. Each parses, builds a config, calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from wbsr_runtime.fileio import atomic_file


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _run(fn, args) -> int:
    """Call `fn(args)`, turning user errors into one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return fn(args)
    except (ValueError, OSError) as e:  # CheckpointError, ImageError and bad options are ValueErrors
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        return 130


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("wbsr-train", description="Train a balanced WBSR supernet.")
    p.add_argument("--preset", required=True, help="srresnet, rcan or srresnet-compact")
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
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return _run(_train, p.parse_args(argv))


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


def _load(ckpt_path: str, data: str, scale: int | None):
    from .checkpoint import load_checkpoint, supernet_from_checkpoint
    from .data import load_pairs

    ckpt = load_checkpoint(ckpt_path)
    if scale is not None and scale != ckpt["model_config"]["scale"]:
        raise ValueError(f"--scale {scale} does not match the checkpoint's scale {ckpt['model_config']['scale']}")
    if not Path(data).is_dir():
        raise ValueError(f"{data}: no such folder")
    return ckpt, supernet_from_checkpoint(ckpt), load_pairs(data, ckpt["model_config"]["scale"])


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("wbsr-eval", description="Evaluate a WBSR checkpoint (Y-PSNR/SSIM, FLOPs).")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="folder of HR images (or a benchmark set with HR/)")
    p.add_argument("--scale", type=int)
    p.add_argument("--tolerance", type=float, help="re-derive the routing map from the calibration table")
    p.add_argument("--json", help="write the report here")
    return _run(_eval, p.parse_args(argv))


def _eval(a: argparse.Namespace) -> int:
    from wbsr_runtime.routing import eq15_map, tolerance_map

    from .evaluate import evaluate_model

    ckpt, net, pairs = _load(a.ckpt, a.data, a.scale)
    cal = ckpt.get("calibration")
    if a.tolerance is not None and not cal:
        raise ValueError("--tolerance needs a calibrated checkpoint: run wbsr-calibrate first")
    if cal:
        class_map = tolerance_map(np.array(cal["psnr_table"]), a.tolerance) if a.tolerance is not None \
            else np.array(cal["class_to_subnet"])
    else:
        class_map = eq15_map(ckpt["num_classes"], len(ckpt["specs"]))
    report = evaluate_model(net, ckpt, pairs, class_map)
    report["routing"] = "calibrated" if cal else "eq15"
    print(format_report(report))
    if a.json:
        with atomic_file(a.json, "w") as f:
            json.dump(report, f, indent=2)
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
    p = argparse.ArgumentParser("wbsr-calibrate", description="Measure the class x subnet PSNR table.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="validation folder (never training images)")
    p.add_argument("--tolerance", type=float, help="dB from each class's best subnet (default 0.15)")
    p.add_argument("--out", help="write the calibrated checkpoint here instead of updating --ckpt")
    return _run(_calibrate, p.parse_args(argv))


def _calibrate(a: argparse.Namespace) -> int:
    from .calibrate import DEFAULT_TOLERANCE_DB, calibrate
    from .checkpoint import save_checkpoint

    ckpt, net, pairs = _load(a.ckpt, a.data, None)
    ckpt["calibration"] = calibrate(net, ckpt, pairs, DEFAULT_TOLERANCE_DB if a.tolerance is None else a.tolerance)
    save_checkpoint(a.out or a.ckpt, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    table = np.array(ckpt["calibration"]["psnr_table"])
    print("class x subnet Y-PSNR (dB):")
    for k, row in enumerate(table, 1):
        print(f"  class {k:2d}: " + " ".join(f"{v:6.2f}" for v in row))
    print(f"map (tolerance {ckpt['calibration']['tolerance_db']} dB): {ckpt['calibration']['class_to_subnet']}")
    print(f"wrote {a.out or a.ckpt}")
    return 0
