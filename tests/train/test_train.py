"""The training loop end to end on tiny runs: checkpoints, exact resume, refusals, DDP, eval and calibrate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests import DATA  # noqa: E402
from wbsr_train import cli  # noqa: E402
from wbsr_train import train as train_mod  # noqa: E402
from wbsr_train.checkpoint import load_checkpoint  # noqa: E402
from wbsr_train.train import TrainConfig, train  # noqa: E402

SET5 = DATA / "Set5"
TINY = dict(preset="srresnet-compact", scale=4, data=(str(SET5 / "HR"),), iters=6, batch=4, patch=12,
            pool=300, val_every=3, log_every=1, seed=3)


def losses(ckpt: Path) -> list[tuple[float, float]]:
    lines = [json.loads(s) for s in ckpt.with_suffix(".jsonl").read_text().splitlines()]
    return [(r["loss_full"], r["loss_routed"]) for r in lines if "loss_full" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run.pt"
    train(TrainConfig(**TINY, out=str(out), val=str(SET5)))
    return out


def test_checkpoint_is_plain_and_complete(trained: Path) -> None:
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["state"]["step"] == 6 and len(ckpt["thresholds"]) == 9
    assert [tuple(s) for s in ckpt["specs"]][-1] == (32, 8) and ckpt["flops"] == sorted(ckpt["flops"])
    assert ckpt["metrics"]["val_psnr_y_full"] > 10
    assert ckpt["train_config"]["preset"] == "srresnet-compact"
    assert ckpt["class_patch"] == 12 and ckpt["flops_patch"] == 32  # thresholds at the training patch
    assert len(losses(trained)) == 6


def test_checkpoint_record_round_trips_and_reads_older_checkpoints(trained: Path) -> None:
    from wbsr_train.checkpoint import FLOPS_PATCH, Checkpoint

    raw = torch.load(trained, weights_only=True)
    ckpt = Checkpoint.from_dict(raw)
    again = ckpt.to_dict()
    assert again.keys() == raw.keys() and again["specs"] == raw["specs"] and again["holdout"] == raw["holdout"]
    assert again["state"]["rng"] == raw["state"]["rng"] and again["thresholds"] == raw["thresholds"]
    older = Checkpoint.from_dict({k: v for k, v in raw.items() if k not in ("class_patch", "flops_patch")})
    assert (older.class_patch, older.flops_patch) == (12, FLOPS_PATCH)  # written before the fields existed
    imported = Checkpoint.from_dict({**older.to_dict(), "class_patch": None, "train_config": None})
    assert imported.class_patch == FLOPS_PATCH  # no training patch known: the 32 x 32 the FLOPs counter used


def test_resume_continues_exactly(tmp_path: Path, trained: Path, monkeypatch) -> None:
    out = tmp_path / "resumed.pt"
    real_save = train_mod.save_checkpoint

    def save_then_die(path, ckpt):
        real_save(path, ckpt)
        raise KeyboardInterrupt  # interrupted right after the step-3 checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY, out=str(out), val=str(SET5)))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert load_checkpoint(out).state.step == 3
    train(TrainConfig(**TINY, out=str(out), val=str(SET5)), resume=True)
    assert losses(out) == losses(trained)  # bit-identical to the uninterrupted run
    ours, theirs = load_checkpoint(out).model, load_checkpoint(trained).model
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_init_starts_from_a_checkpoints_weights(tmp_path: Path, trained: Path, capsys) -> None:
    fresh = dict(TINY, iters=1, val_every=1)
    train(TrainConfig(**fresh, out=str(tmp_path / "a.pt")))
    train(TrainConfig(**fresh, out=str(tmp_path / "b.pt"), init=str(trained)))
    # One step from the trained weights fits better than one step from scratch, and the run is recorded.
    assert losses(tmp_path / "b.pt")[0][0] < losses(tmp_path / "a.pt")[0][0]
    assert load_checkpoint(tmp_path / "b.pt").train_config["init"] == str(trained)
    other = ["--preset", "srresnet-compact", "--data", TINY["data"][0], "--iters", "1", "--batch", "4",
             "--patch", "12", "--pool", "300", "--out", str(tmp_path / "c.pt")]
    assert cli.train_main([*other, "--scale", "2", "--init", str(trained)]) == 2  # another model
    assert cli.train_main([*other, "--scale", "4", "--init", str(tmp_path / "missing.pt")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 2 and "same model" in err[0] and "missing.pt" in err[1]
    assert not (tmp_path / "c.pt").exists()


def test_resume_refuses_other_config(tmp_path: Path, trained: Path) -> None:
    out = tmp_path / "r.pt"
    out.write_bytes(trained.read_bytes())
    code, err = run_cli(cli.train_main, ["--preset", "srresnet-compact", "--scale", "4", "--data", str(SET5 / "HR"),
                                         "--iters", "6", "--batch", "8", "--patch", "12", "--pool", "300",
                                         "--seed", "3", "--out", str(out), "--resume"])
    assert code == 2 and "batch: 4 -> 8" in err and "\n" not in err.strip()


def run_cli(main, argv: list[str], capsys=None) -> tuple[int, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = main(argv)
    return code, buf.getvalue()


@pytest.mark.parametrize("change, message", [
    (["--preset", "nope"], "unknown preset"),
    (["--scale", "5"], "scale 5"),
    (["--data", "/does/not/exist"], "no such folder"),
    (["--loss", "bd", "--batch", "0"], "positive"),
])
def test_train_cli_bad_input(tmp_path: Path, change: list[str], message: str) -> None:
    argv = ["--preset", "srresnet-compact", "--scale", "4", "--data", str(SET5 / "HR"), "--out",
            str(tmp_path / "x.pt")]
    for i in range(0, len(change), 2):
        key = change[i]
        if key in argv:
            argv[argv.index(key) + 1] = change[i + 1]
        else:
            argv += change[i:i + 2]
    code, err = run_cli(cli.train_main, argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unreadable_training_image_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.png").write_bytes((SET5 / "HR" / "bird.png").read_bytes())
    (data / "broken.png").write_bytes((SET5 / "HR" / "bird.png").read_bytes()[:300])
    argv = ["--preset", "srresnet-compact", "--scale", "4", "--data", str(data), "--out", str(tmp_path / "x.pt"),
            "--iters", "1", "--batch", "2", "--patch", "12", "--pool", "50"]
    code, err = run_cli(cli.train_main, argv)
    assert code == 2 and "broken.png" in err and not (tmp_path / "x.pt").exists()
    code, _ = run_cli(cli.train_main, [*argv, "--skip-bad"])
    assert code == 0 and (tmp_path / "x.pt").exists()


def test_existing_output_needs_resume_or_force(tmp_path: Path) -> None:
    out = tmp_path / "x.pt"
    out.write_bytes(b"keep me")
    code, err = run_cli(cli.train_main, ["--preset", "srresnet-compact", "--scale", "4", "--data", str(SET5 / "HR"),
                                         "--out", str(out)])
    assert code == 2 and "--resume" in err and out.read_bytes() == b"keep me"


def test_eval_and_calibrate(tmp_path: Path, trained: Path) -> None:
    ck = tmp_path / "cal.pt"
    code, _ = run_cli(cli.calibrate_main, ["--ckpt", str(trained), "--data", str(SET5), "--out", str(ck)])
    assert code == 0
    cal = load_checkpoint(ck).calibration
    table, freq = np.array(cal["mse_table"]), np.array(cal["class_freq"])
    assert table.shape == (10, 9) and (table > 0).all() and freq.sum() == pytest.approx(1.0)
    assert len(cal["class_to_subnet"]) == 10 and cal["tiles"] > 0 and cal["images"] == 5
    assert 0 <= cal["predicted_loss_db"] <= cal["tolerance_db"] + 1e-9 and 0 < cal["predicted_flops_ratio"] <= 1
    report_path = tmp_path / "report.json"
    code, _ = run_cli(cli.eval_main, ["--ckpt", str(ck), "--data", str(SET5), "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    methods = [r["method"] for r in report["rows"]]
    assert code == 0 and methods[0] == "bicubic" and "dynamic, tiled" in methods and len(methods) == 12
    bicubic = report["rows"][0]["psnr_y"]
    assert 27.5 < bicubic < 29.5  # METHOD.md: 28.43 dB for Set5 x4 under this protocol
    dynamic = next(r for r in report["rows"] if r["method"] == "dynamic, tiled")
    assert 0 < dynamic["flops_pct"] <= 100 and sum(dynamic["tiles_per_subnet"]) > 0
    assert report["routing"] == "calibrated" and len(report["per_class"]) == 10
    code, _ = run_cli(cli.eval_main, ["--ckpt", str(ck), "--data", str(SET5), "--budget", "0.3",
                                      "--json", str(report_path)])
    dynamic = next(r for r in json.loads(report_path.read_text())["rows"] if r["method"] == "dynamic, tiled")
    assert code == 0 and dynamic["flops_pct"] < 50  # the budget holds on the calibration classes' mix


def test_engine_agrees_with_direct_scoring(trained: Path) -> None:
    """One pass per subnet over tiles gives the same images and errors as scoring each case directly."""
    from wbsr_train.checkpoint import supernet_from_checkpoint
    from wbsr_train.data import load_pairs
    from wbsr_train.evaluate import PROTOCOL, RUNTIME, forward_tiles, psnr, rgb_to_y, tiled_runs, to_uint8

    ckpt = load_checkpoint(trained)
    net, specs = supernet_from_checkpoint(ckpt), list(ckpt.specs)
    pairs = load_pairs(SET5, 4)[:2]
    for tiling in (PROTOCOL, RUNTIME):
        for run, (_, lr, hr) in zip(tiled_runs(net, pairs, specs, ckpt.thresholds, tiling), pairs, strict=True):
            assert run.outputs.shape[:2] == (len(specs), run.plan.num_tiles)
            errors, pixels = run.squared_errors(4)
            assert pixels.sum() == hr.shape[0] * hr.shape[1] or tiling.blend  # crop mode partitions the frame
            full = run.stitch(np.full(run.plan.num_tiles, len(specs) - 1), 4)
            if not tiling.blend:  # owned regions partition the frame: summed errors are the image's
                mse = np.mean((rgb_to_y(full) - rgb_to_y(hr)) ** 2)
                assert errors[-1].sum() / pixels.sum() == pytest.approx(mse)
                assert psnr(rgb_to_y(full), rgb_to_y(hr)) > 15
            tile0 = forward_tiles(net, run_tiles_of(run, lr), specs[0])
            np.testing.assert_array_equal(to_uint8(tile0[0]), to_uint8(run.outputs[0, 0]))


def run_tiles_of(run, lr: np.ndarray) -> np.ndarray:
    from wbsr_runtime.tiling import extract_tiles, to_chw

    return extract_tiles(to_chw(lr), run.plan, np.array([0]))


def test_holdout_split_is_recorded_and_calibrates_by_default(tmp_path: Path) -> None:
    out = tmp_path / "h.pt"
    train(TrainConfig(**{**TINY, "iters": 2, "val_every": 2}, out=str(out), holdout=0.4))
    held = load_checkpoint(out).holdout
    assert sorted(Path(p).name for p in held) == ["baby.png", "butterfly.png"]  # the fixed hash split
    code, err = run_cli(cli.calibrate_main, ["--ckpt", str(out)])
    assert code == 0, err
    assert load_checkpoint(out).calibration["images"] == 2
    code, err = run_cli(cli.calibrate_main, ["--ckpt", str(tmp_path / "none.pt")])
    assert code == 2
    plain = tmp_path / "p.pt"
    train(TrainConfig(**{**TINY, "iters": 1, "val_every": 1}, out=str(plain)))
    code, err = run_cli(cli.calibrate_main, ["--ckpt", str(plain)])
    assert code == 2 and "--holdout" in err and "\n" not in err.strip()


def test_holdout_split_is_stable_and_monotone(tmp_path: Path) -> None:
    from wbsr_train.data import holdout_split

    paths = [tmp_path / "set" / f"{i}.png" for i in range(400)]
    small = holdout_split(paths, [tmp_path], 0.1)[1]
    large = holdout_split(paths, [tmp_path], 0.3)[1]
    assert set(small) <= set(large) and 20 < len(small) < 60 and 90 < len(large) < 150
    moved = [tmp_path / "elsewhere" / p.relative_to(tmp_path) for p in paths]  # same relative names
    assert [p.name for p in holdout_split(moved, [tmp_path / "elsewhere"], 0.1)[1]] == [p.name for p in small]


def test_distillation_pulls_routed_outputs_to_the_detached_full() -> None:
    from wbsr_train.loss import make_loss

    loss_fn = make_loss("l1")
    hr, full = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    routed = torch.full((2, 3, 8, 8), 0.25, requires_grad=True)
    assert train_mod.routed_loss(loss_fn, routed, full, hr, 0.0).item() == pytest.approx(0.25)
    loss = train_mod.routed_loss(loss_fn, routed, full, hr, 2.0)
    assert loss.item() == pytest.approx(0.25 + 2 * 0.25)
    loss.backward()
    assert full.grad is None  # the teacher is not pulled towards the student


def test_bf16_distilled_run_trains(tmp_path: Path) -> None:
    out = tmp_path / "bf16.pt"
    metrics = train(TrainConfig(**{**TINY, "iters": 3, "val_every": 3, "preset": "lrnet"}, out=str(out), val=str(SET5),
                                precision="bf16", distill=1.0))
    assert metrics["val_psnr_y_full"] > 10 and all(np.isfinite(v) for pair in losses(out) for v in pair)
    assert load_checkpoint(out).train_config["precision"] == "bf16"


def test_eval_bad_input(tmp_path: Path, trained: Path) -> None:
    code, err = run_cli(cli.eval_main, ["--ckpt", str(tmp_path / "none.pt"), "--data", str(SET5)])
    assert code == 2 and "no such checkpoint" in err
    code, err = run_cli(cli.eval_main, ["--ckpt", str(trained), "--data", str(SET5), "--scale", "2"])
    assert code == 2 and "does not match" in err


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "wbsr_train", "--preset", "srresnet-compact", "--scale", "4", "--data", str(SET5 / "HR"),
           "--iters", "2", "--batch", "2", "--patch", "12", "--pool", "100", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]  # the ranks' own messages come before torchrun's summary
    ckpt = load_checkpoint(out)
    assert ckpt.state.step == 2 and len(ckpt.state.rng) == 2  # both ranks' streams saved
    assert ckpt.state.rng[0] != ckpt.state.rng[1]  # each rank draws its own batches


def test_plain_trains_the_full_network_alone(tmp_path: Path) -> None:
    out = tmp_path / "plain.pt"
    train(TrainConfig(**{**TINY, "iters": 2, "val_every": 2}, out=str(out), plain=True, loss="l1", sampler="uniform"))
    ckpt = load_checkpoint(out)
    assert ckpt.specs == ((32, 8),) and ckpt.model_config["widths"] == [32]
    assert all(routed == 0 for _, routed in losses(out))  # no second pass through the same network
    from wbsr_train.config import preset
    from wbsr_train.model import build_supernet

    build_supernet(preset("srresnet-compact", 4)).load_state_dict(ckpt.model)  # same names and shapes


def test_config_diff_takes_defaults_for_fields_added_later() -> None:
    new = train_mod.to_dict(TrainConfig(**TINY, out="x.pt"))
    old = {k: v for k, v in new.items() if k != "plain"}  # a checkpoint saved before `plain` existed
    assert train_mod.config_diff(old, new) == []
    assert train_mod.config_diff(old, {**new, "plain": True}) == ["plain: False -> True"]


def test_a_checkpoint_from_before_distillation_resumes_without_it() -> None:
    new = train_mod.to_dict(TrainConfig(**TINY, out="x.pt", distill=0.0))
    old = {k: v for k, v in new.items() if k not in ("distill", "precision", "holdout", "device")}
    assert train_mod.config_diff(old, new) == []  # it trained without distillation: resuming stays so
    assert train_mod.config_diff(old, {**new, "distill": 1.0}) == ["distill: 0.0 -> 1.0"]
