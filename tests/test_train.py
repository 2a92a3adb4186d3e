"""The training loop end to end on tiny runs: checkpoints, exact resume, refusals, DDP, eval and calibrate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from wbsr_train import cli  # noqa: E402
from wbsr_train import train as train_mod  # noqa: E402
from wbsr_train.checkpoint import load_checkpoint  # noqa: E402
from wbsr_train.train import TrainConfig, train  # noqa: E402

SET5 = Path(__file__).parent / "data" / "Set5"
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
    assert len(losses(trained)) == 6


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
    assert load_checkpoint(out)["state"]["step"] == 3
    train(TrainConfig(**TINY, out=str(out), val=str(SET5)), resume=True)
    assert losses(out) == losses(trained)  # bit-identical to the uninterrupted run
    ours, theirs = load_checkpoint(out)["model"], load_checkpoint(trained)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_init_starts_from_a_checkpoints_weights(tmp_path: Path, trained: Path, capsys) -> None:
    fresh = dict(TINY, iters=1, val_every=1)
    train(TrainConfig(**fresh, out=str(tmp_path / "a.pt")))
    train(TrainConfig(**fresh, out=str(tmp_path / "b.pt"), init=str(trained)))
    # One step from the trained weights fits better than one step from scratch, and the run is recorded.
    assert losses(tmp_path / "b.pt")[0][0] < losses(tmp_path / "a.pt")[0][0]
    assert load_checkpoint(tmp_path / "b.pt")["train_config"]["init"] == str(trained)
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
    cal = load_checkpoint(ck)["calibration"]
    assert len(cal["psnr_table"]) == 10 and len(cal["psnr_table"][0]) == 9
    assert len(cal["class_to_subnet"]) == 10 and sum(cal["class_counts"]) > 0
    report_path = tmp_path / "report.json"
    code, _ = run_cli(cli.eval_main, ["--ckpt", str(ck), "--data", str(SET5), "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    methods = [r["method"] for r in report["rows"]]
    assert code == 0 and methods[0] == "bicubic" and "dynamic, tiled" in methods and len(methods) == 12
    bicubic = report["rows"][0]["psnr_y"]
    assert 27.5 < bicubic < 29.5  # METHOD.md: 28.43 dB for Set5 x4 under this protocol
    dynamic = next(r for r in report["rows"] if r["method"] == "dynamic, tiled")
    assert 0 < dynamic["flops_pct"] <= 100 and sum(dynamic["patches_per_subnet"]) > 0
    assert report["routing"] == "calibrated" and len(report["per_class"]) == 10


def test_eval_bad_input(tmp_path: Path, trained: Path) -> None:
    code, err = run_cli(cli.eval_main, ["--ckpt", str(tmp_path / "none.pt"), "--data", str(SET5)])
    assert code == 2 and "no such checkpoint" in err
    code, err = run_cli(cli.eval_main, ["--ckpt", str(trained), "--data", str(SET5), "--scale", "2"])
    assert code == 2 and "does not match" in err


def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "wbsr_train", "--preset", "srresnet-compact", "--scale", "4", "--data", str(SET5 / "HR"),
           "--iters", "2", "--batch", "2", "--patch", "12", "--pool", "100", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(out)
    assert ckpt["state"]["step"] == 2 and len(ckpt["state"]["rng"]) == 2  # both ranks' streams saved
    assert ckpt["state"]["rng"][0] != ckpt["state"]["rng"][1]  # each rank draws its own batches


def test_plain_trains_the_full_network_alone(tmp_path: Path) -> None:
    out = tmp_path / "plain.pt"
    train(TrainConfig(**{**TINY, "iters": 2, "val_every": 2}, out=str(out), plain=True, loss="l1", sampler="uniform"))
    ckpt = load_checkpoint(out)
    assert ckpt["specs"] == [[32, 8]] and ckpt["model_config"]["widths"] == [32]
    assert all(routed == 0 for _, routed in losses(out))  # no second pass through the same network
    from wbsr_train.config import preset
    from wbsr_train.model import build_supernet

    build_supernet(preset("srresnet-compact", 4)).load_state_dict(ckpt["model"])  # same names and shapes


def test_config_diff_takes_defaults_for_fields_added_later() -> None:
    new = train_mod.to_dict(TrainConfig(**TINY, out="x.pt"))
    old = {k: v for k, v in new.items() if k != "plain"}  # a checkpoint saved before `plain` existed
    assert train_mod.config_diff(old, new) == []
    assert train_mod.config_diff(old, {**new, "plain": True}) == ["plain: False -> True"]
