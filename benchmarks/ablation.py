"""Does balancing pay off? The paper's ablation and routing comparison, reproduced at small scale (issue 7).

What it measures. With one preset (--preset, default srresnet-compact; --scale, default 4) and the same training
data, iterations, batch and seeds, it trains these rows (checkpoints under OUT/checkpoints; a finished one is
reused, a partial one resumed):
    plain  the full network alone (uniform sampling + L1, no supernet; TrainConfig.plain)
    arm    supernet, uniform sampling + L1, one random subnet per step (ARM-style)
    hes    arm + HES sampling
    bd     arm + BDLoss (uniform sampling)
    wbsr   HES + BDLoss, routed schedule (the project's default training)
(`--rows` also accepts hes-bd-random: HES + BDLoss with the random schedule, which isolates the schedule, and
wbsr-distill: wbsr + in-place distillation, weight 1.) plain, wbsr and wbsr-distill train with every --seeds;
the others with the first seed only (--all-seeds: every seed).

Every row is evaluated on --val (METHOD.md section 6) under the paper's tiling protocol (32x32 LR tiles, step
28, overlaps averaged): the full subnet (the paper's WBSR dagger), the dynamic network at the default routing
(the calibrated map: the MSE table measured on --calib, or on the run's held-out split with --holdout, and the
cheapest map within the default tolerance of predicted loss; the plain row has none), its FLOPs in the
paper's convention (2 x MACs per 32x32 patch averaged over all tiles, % of the full network), and the full
subnet's Y-PSNR per descriptor class (the paper's Fig. 4).

On the WBSR weights (every seed) it compares routing rules by Y-PSNR against average FLOPs: the paper's Eq. 15
map; the calibrated (knapsack) map over a budget sweep; ARM's rule (a per-subnet line of tile PSNR on edge score,
fitted on the calibration images, then per tile argmax of predicted PSNR - lambda x cost over a lambda sweep);
random assignment with
the same subnet histogram as the Eq. 15 / calibrated maps. Rules are read off at matched FLOPs (the default
map's and Eq. 15's) by linear interpolation along each curve.

Writes OUT/results.json, OUT/routing.png and OUT/ablation.md (also printed, with the command line). Differences
carry the seed spread; one within it is reported as "not shown at this scale".

    python benchmarks/ablation.py --data ../shared/data/train --val ../shared/data/val/Set14 --holdout 0.25 \
        --iters 2000 --seeds 0 1 --out benchmarks/results/ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import _ablation_eval as ev
import _ablation_report as rep
import numpy as np

from wbsr_runtime.fileio import atomic_file
from wbsr_train.calibrate import DEFAULT_TOLERANCE_DB

NO_DISTILL = dict(distill=0.0)  # the paper's objective (TrainConfig's default is in-place distillation)
ROWS = {  # name: (label, TrainConfig fields)
    "plain": ("plain (uniform + L1, no supernet)",
              dict(plain=True, loss="l1", sampler="uniform", schedule="random", **NO_DISTILL)),
    "arm": ("supernet, uniform + L1, random subnet (ARM-style)",
            dict(loss="l1", sampler="uniform", schedule="random", **NO_DISTILL)),
    "hes": ("+ HES", dict(loss="l1", sampler="hes", schedule="random", **NO_DISTILL)),
    "bd": ("+ BDLoss", dict(loss="bd", sampler="uniform", schedule="random", **NO_DISTILL)),
    "wbsr": ("WBSR (HES + BDLoss, routed)", dict(loss="bd", sampler="hes", schedule="routed", **NO_DISTILL)),
    "hes-bd-random": ("HES + BDLoss, random subnet", dict(loss="bd", sampler="hes", schedule="random", **NO_DISTILL)),
    "wbsr-distill": ("WBSR + in-place distillation", dict(loss="bd", sampler="hes", schedule="routed", distill=1.0)),
}
DEFAULT_ROWS, MULTI_SEED = ("plain", "arm", "hes", "bd", "wbsr"), ("plain", "wbsr", "wbsr-distill")

log = logging.getLogger("ablation")


def run_configs(a: argparse.Namespace) -> list[tuple[str, int, object]]:
    """(row, seed, TrainConfig) of every training run of the study."""
    from wbsr_train.train import TrainConfig

    runs = []
    for row in a.rows:
        for seed in a.seeds if (row in MULTI_SEED or a.all_seeds) else a.seeds[:1]:
            out = Path(a.out) / "checkpoints" / f"{row}-seed{seed}.pt"
            runs.append((row, seed, TrainConfig(
                preset=a.preset, scale=a.scale, data=tuple(a.data), out=str(out), iters=a.iters, batch=a.batch,
                patch=a.patch, pool=a.pool, seed=seed, val_every=max(1, min(a.iters, 500)), lr=a.lr,
                log_every=max(1, min(a.iters, 50)), precision=a.precision, holdout=a.holdout, **ROWS[row][1])))
    return runs


def train_run(cfg, threads: int | None = None) -> dict | None:
    """Train one row unless its finished checkpoint is there; resume a partial one.

    Returns None when skipped, else {"seconds": wall time with setup, "s_per_iter": training loop only}."""
    import torch

    from wbsr_train.checkpoint import load_checkpoint
    from wbsr_train.config import to_dict
    from wbsr_train.train import config_diff, train

    if threads:
        torch.set_num_threads(threads)
    resume = Path(cfg.out).exists()
    start = 0
    if resume:
        ckpt = load_checkpoint(cfg.out)
        diff = config_diff(ckpt.train_config or {}, to_dict(cfg))
        if diff:
            raise ValueError(f"{cfg.out} was trained with another config ({'; '.join(diff)}): use another --out")
        start = ckpt.state.step if ckpt.state else 0
        if start == cfg.iters:
            return None
    t0 = time.time()
    train(cfg, resume=resume)
    last = [json.loads(line) for line in Path(cfg.out).with_suffix(".jsonl").read_text().splitlines()][-1]
    return {"seconds": time.time() - t0, "s_per_iter": last["seconds"] / max(1, last["step"] - start)}


def train_all(runs: list, jobs: int) -> dict[str, dict | None]:
    """Train every run, `jobs` at a time (each with cores / jobs threads); train_run's timing of each."""
    names = [Path(cfg.out).stem for _, _, cfg in runs]
    if jobs <= 1:
        return {n: train_run(cfg) for n, (_, _, cfg) in zip(names, runs, strict=True)}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(train_run, cfg, threads) for _, _, cfg in runs]
        return {n: f.result() for n, f in zip(names, futures, strict=True)}


def evaluate_run(ckpt_path: str, val_pairs: list, calib_pairs: list | None, a, routing: bool) -> dict:
    """Full subnet, dynamic at the default routing, per-class PSNR; with `routing`, every rule's curve.

    Calibration (wbsr_train.calibrate: the MSE table on the runtime's grid) runs on `calib_pairs`, or on the
    checkpoint's held-out split when None; its tile PSNRs also fit ARM's predictor."""
    from wbsr_runtime import routing as rt
    from wbsr_train.calibrate import mse_table
    from wbsr_train.checkpoint import load_checkpoint, supernet_from_checkpoint
    from wbsr_train.data import load_pairs_from_files
    from wbsr_train.evaluate import PROTOCOL, RUNTIME, tiled_runs

    ckpt = load_checkpoint(ckpt_path)
    net = supernet_from_checkpoint(ckpt)
    specs, flops, scale = list(ckpt.specs), list(ckpt.flops), ckpt.model_config["scale"]
    runs = list(tiled_runs(net, val_pairs, specs, ckpt.thresholds, PROTOCOL, progress="evaluate"))
    assign = {"full": [np.full(run.plan.num_tiles, len(specs) - 1) for run in runs]}
    result: dict = {"checkpoint": ckpt_path, "specs": [list(s) for s in specs], "thresholds": list(ckpt.thresholds)}
    rules: dict = {}
    if len(specs) > 1:
        calib_pairs = calib_pairs or load_pairs_from_files(ckpt.holdout, scale)
        cal = mse_table(net, ckpt, calib_pairs)
        cmap = rt.tolerance_map(cal["mse_table"], cal["class_freq"], np.asarray(flops, float), a.tolerance)
        assign["dynamic"] = [cmap[run.classes - 1] for run in runs]
        result["calibration"] = {"mse_table": cal["mse_table"].tolist(), "class_freq": cal["class_freq"].tolist(),
                                 "tiles": cal["tiles"], "tolerance_db": a.tolerance, "class_to_subnet": cmap.tolist()}
        if routing:
            calib_runs = list(tiled_runs(net, calib_pairs, specs, ckpt.thresholds, RUNTIME, progress="arm fit"))
            coef = ev.arm_fit(np.concatenate([r.scores for r in calib_runs]), ev.tile_psnr(calib_runs, scale))
            rules = ev.routing_assignments(runs, cal, coef, flops, a.random_draws, seed=0)
            result["arm_fit"] = coef.tolist()
    everything = {**assign, **{n: r["assign"] for n, r in rules.items()}}
    scored = ev.score_assignments(runs, flops, scale, everything, ssim_for=("full", "dynamic"))
    result["per_class"] = ev.per_class(runs, scale, ckpt.num_classes)
    result.update({k: scored[k] for k in assign})
    if rules:
        result["routing"] = ev.routing_curves(rules, scored)
    return result


def matched(evals: dict[int, dict]) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    """Each rule's PSNR, per seed, at the default map's FLOPs and at Eq. 15's; and those FLOPs (%) per seed."""
    out: dict[str, dict[str, list[float]]] = {}
    targets: dict[str, list[float]] = {}
    for e in evals.values():
        for tname, pct in [("default map", e["dynamic"]["flops_pct"]),
                           ("Eq. 15", e["routing"]["eq15"][0]["flops_pct"])]:
            targets.setdefault(tname, []).append(pct)
            for rule, curve in e["routing"].items():
                v = ev.psnr_at(curve, pct)
                if v is not None:
                    out.setdefault(tname, {}).setdefault(rule, []).append(v)
    return out, targets


def write_json(path: Path, obj) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=1, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))


def study(a: argparse.Namespace) -> str:
    """Train, evaluate, write results.json / routing.png / ablation.md; returns the Markdown."""
    from wbsr_train.data import load_pairs

    out = Path(a.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    runs = run_configs(a)
    t0 = time.time()
    seconds = train_all(runs, a.jobs)
    train_s = time.time() - t0
    val_pairs = load_pairs(a.val, a.scale)
    calib_pairs = load_pairs(a.calib, a.scale) if a.calib else None
    rows: dict[str, dict] = {}
    t1 = time.time()
    for row, seed, cfg in runs:
        log.info("evaluating %s seed %d", row, seed)
        e = evaluate_run(cfg.out, val_pairs, calib_pairs, a, routing=row == "wbsr")
        e["training_time"] = seconds.get(Path(cfg.out).stem)
        rows.setdefault(row, {"label": ROWS[row][0], "seeds": {}})["seeds"][seed] = e
    eval_s = time.time() - t1
    labels = {r: ROWS[r][0] for r in rows}
    base = "plain" if "plain" in rows else a.rows[0]  # what the other rows are compared with
    sup = "arm" if "arm" in rows else a.rows[0]
    if a.calib is None:
        calib_note = f"the held-out {a.holdout:g} of the training images (runtime grid)"
    elif Path(a.calib).resolve() != Path(a.val).resolve():
        calib_note = a.calib
    else:
        calib_note = f"{a.calib} (NOT disjoint from val: dynamic rows optimistic)"
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    md = [f"`{command}`", "",
          f"{a.preset} x{a.scale}; {a.iters} iterations, batch {a.batch}, LR patch {a.patch}, lr {a.lr:g}, "
          f"{a.precision}; train {list(a.data)}; val {a.val} ({len(val_pairs)} images); calibration "
          f"{calib_note} at tolerance {a.tolerance} dB. "
          f"Values: mean [min, max] over seeds. Training {train_s:.0f} s, evaluation {eval_s:.0f} s.", "",
          "Training time per run (None: reused checkpoint): " + ", ".join(
              f"{n} {t['seconds']:.0f} s ({t['s_per_iter']:.2f} s/iter)" if t else f"{n} None"
              for n, t in seconds.items()), "",
          "### Ablation (Y-PSNR dB, val, protocol tiling)", "", *rep.ablation_table(rows, labels, base, sup), "",
          "### Full subnet's Y-PSNR per descriptor class (Fig. 4)", "",
          *rep.per_class_table(rows, labels, a=a.rows[-1], b=base)]
    results = {"command": command, "args": vars(a), "train_seconds_total": train_s, "eval_seconds": eval_s,
               "rows": rows}
    if "wbsr" in rows:
        evals = rows["wbsr"]["seeds"]
        m, targets = matched(evals)
        results["routing_matched"], results["routing_targets_flops_pct"] = m, targets
        md += ["", "### Routing rules on the WBSR weights at matched FLOPs", "", *rep.routing_table(m, targets), "",
               "![routing](routing.png)"]
        plain = [s["full"]["psnr_y"] for s in rows.get("plain", {"seeds": {}})["seeds"].values()]
        rep.plot_routing(str(out / "routing.png"), {s: e["routing"] for s, e in evals.items()}, plain,
                         [e["full"]["psnr_y"] for e in evals.values()])
    write_json(out / "results.json", results)
    text = "\n".join(md) + "\n"
    (out / "ablation.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", required=True, help="HR training folder (repeatable)")
    p.add_argument("--val", required=True, help="evaluation set (Set14)")
    p.add_argument("--calib", help="calibration set, disjoint from --val; default: the held-out split (--holdout)")
    p.add_argument("--preset", default="srresnet-compact")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of training images held out to calibrate")
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="benchmarks/results/ablation")
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel")
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS))
    p.add_argument("--all-seeds", action="store_true", help="train every row with every seed")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=32, help="LR training patch side")
    p.add_argument("--pool", type=int, default=20000, help="patches scored for the HES thresholds")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_DB, help="default routing tolerance (dB)")
    p.add_argument("--random-draws", type=int, default=3)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in [*a.data, a.val, *([a.calib] if a.calib else [])]:
        if not Path(folder).is_dir():
            print(f"error: {folder}: no such folder", file=sys.stderr)
            return 2
    if a.calib is None and a.holdout <= 0:
        print("error: give --calib DIR or --holdout F (a calibration split)", file=sys.stderr)
        return 2
    if a.calib is not None and Path(a.calib).resolve() == Path(a.val).resolve():
        log.warning("calibrating on the --val set: the dynamic rows will be optimistic")
    try:
        print(study(a))
    except ValueError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
