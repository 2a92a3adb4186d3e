"""Hostile checkpoints and the training/export tools: zip bombs refused before decompressing, configs that
would expand into a GB manifest, a refused pickle described in our own words, a checkpoint without a model,
an install without torch, and SIGTERM to wbsr-export: each one line, nothing written, nothing left over.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests import ROOT
from tests.conftest import refused_with_peak


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # the CLIs call basicConfig
    monkeypatch.setattr(logging.root, "level", logging.root.level)


def _save(path: Path, **edits: object) -> Path:
    pytest.importorskip("torch")
    from tests.conftest import save_checkpoint_dict, tiny_checkpoint_data

    ckpt = tiny_checkpoint_data().to_dict()
    for key, value in edits.items():
        if value is None:
            ckpt.pop(key)
        else:
            ckpt[key] = value
    return save_checkpoint_dict(path, ckpt)


def _tool(tool: str, ckpt: Path, tmp_path: Path) -> int:
    if tool == "wbsr-export":
        from wbsr_export.cli import main

        return main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bundle")])
    from wbsr_train.cli import calibrate_main, eval_main

    (tmp_path / "data").mkdir(exist_ok=True)
    argv = ["--ckpt", str(ckpt), "--data", str(tmp_path / "data")]
    return eval_main(argv) if tool == "wbsr-eval" else calibrate_main([*argv, "--out", str(tmp_path / "c.pt")])


def _one_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and all(n in err[0] for n in needles), (needles, err)
    return err[0]


@pytest.mark.parametrize("tool", ["wbsr-export", "wbsr-eval", "wbsr-calibrate"])
def test_a_checkpoint_without_model_config_is_one_line(tmp_path: Path, capsys, tool: str) -> None:
    """wbsr-eval and wbsr-calibrate raised KeyError; they now share export's check."""
    ckpt = _save(tmp_path / "c.pt", model_config=None)
    capsys.readouterr()
    assert _tool(tool, ckpt, tmp_path) == 2
    _one_line(capsys, str(ckpt), "lacks model_config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", *(["data"] if tool != "wbsr-export" else [])]


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"specs": [[8, "1"], [16, 2]]}, "invalid specs"),
        ({"num_classes": 10.0}, "invalid num_classes"),
        ({"state": {"step": 3}}, "invalid state"),
        ({"holdout": [1]}, "invalid holdout"),
        ({"class_patch": True}, "invalid class_patch"),
    ],
)
def test_a_field_of_the_wrong_type_is_one_line(tmp_path: Path, capsys, edit: dict, needle: str) -> None:
    """Checkpoint.from_dict types every field, so no tool meets a KeyError or TypeError later."""
    ckpt = _save(tmp_path / "c.pt", **edit)
    capsys.readouterr()
    assert _tool("wbsr-eval", ckpt, tmp_path) == 2
    _one_line(capsys, str(ckpt), needle)


@pytest.mark.parametrize("tool", ["wbsr-export", "wbsr-eval"])
def test_a_model_config_the_weights_do_not_fit_allocates_nothing(tmp_path: Path, capsys, tool: str) -> None:
    """A config claiming 2^20 channels would need terabytes; it is compared with the weights' shapes first."""
    from tests.conftest import tiny_checkpoint_data

    cfg = tiny_checkpoint_data().model_config
    ckpt = _save(tmp_path / "c.pt", model_config={**cfg, "widths": [8, 1 << 20]})
    capsys.readouterr()
    assert _tool(tool, ckpt, tmp_path) == 2
    _one_line(capsys, str(ckpt), "do not fit its model config")


def _zip_bomb(src: Path, dst: Path, megabytes: int) -> Path:
    """`src` (a torch.save archive) with one more member: `megabytes` of zeros, deflated to a few hundred KB."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        prefix = zin.namelist()[0].split("/")[0]
        zout.writestr(f"{prefix}/data/bomb", bytes(megabytes << 20), compress_type=zipfile.ZIP_DEFLATED)
    return dst


def test_a_zip_bomb_checkpoint_is_refused_before_decompressing(tmp_path: Path, capsys) -> None:
    from wbsr_train.checkpoint import CheckpointError, load_checkpoint

    bomb = _zip_bomb(_save(tmp_path / "c.pt"), tmp_path / "bomb.pt", 64)
    assert bomb.stat().st_size < 2 << 20
    message, peak = refused_with_peak(lambda: load_checkpoint(bomb), CheckpointError, "would expand to")
    assert str(bomb) in message and peak < 4 << 20  # the 64 MB member was never inflated
    assert _tool("wbsr-export", bomb, tmp_path) == 2
    _one_line(capsys, str(bomb), "zip bomb")


def test_a_plain_pickle_is_refused_as_not_a_torch_save_archive(tmp_path: Path, capsys) -> None:
    """The legacy format allocates whatever storage sizes its pickle declares, so only torch.save's zip
    archives are read."""
    import pickle

    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"format": "wbsr-checkpoint", "version": 1}))
    assert _tool("wbsr-eval", path, tmp_path) == 2
    _one_line(capsys, str(path), "not a checkpoint written by torch.save")


def test_a_train_config_that_expands_on_writing_is_refused(tmp_path: Path, capsys) -> None:
    """Shared references: 8 levels of a list holding the level below 7 times pickle into a few hundred bytes
    and write out as 5.7 million values (a 945 KB checkpoint made a 12 GB manifest this way)."""
    config: object = [0.5]
    for _ in range(8):
        config = [config] * 7
    ckpt = _save(tmp_path / "c.pt", train_config={"preset": "x", "data": config})
    capsys.readouterr()
    t0 = time.perf_counter()
    assert _tool("wbsr-export", ckpt, tmp_path) == 2
    _one_line(capsys, str(ckpt), "train_config.data", "larger or deeper than a config can be")
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "bundle").exists()


def test_the_refused_pickle_is_explained_in_our_own_words(tmp_path: Path, capsys) -> None:
    torch = pytest.importorskip("torch")

    class Evil:
        def __reduce__(self) -> tuple:
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').close()",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "wbsr-checkpoint", "version": 1, "model_config": Evil()}, path)
    assert _tool("wbsr-eval", path, tmp_path) == 2
    line = _one_line(capsys, str(path), "refused", "`exec`", "could run code", "nothing ran")
    assert "weights_only" not in line and "Re-running" not in line and "trust" not in line
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "tool, call, extra",
    [
        ("wbsr-train", "from wbsr_train.cli import train_main as m; argv = ['--preset', 'srresnet-compact', "
         "'--scale', '4', '--data', '.', '--out', 'x.pt']", "train"),
        ("wbsr-eval", "from wbsr_train.cli import eval_main as m; argv = ['--ckpt', 'x.pt', '--data', '.']", "train"),
        ("wbsr-calibrate", "from wbsr_train.cli import calibrate_main as m; argv = ['--ckpt', 'x.pt', '--data', '.']",
         "train"),
        ("wbsr-export", "from wbsr_export.cli import main as m; argv = ['--ckpt', 'x.pt']", "export"),
    ],
    ids=["wbsr-train", "wbsr-eval", "wbsr-calibrate", "wbsr-export"],
)
@pytest.mark.slow
def test_tools_without_torch_say_which_extra_to_install(tmp_path: Path, tool: str, call: str, extra: str) -> None:
    code = f"import sys; sys.modules['torch'] = None; {call}; sys.exit(m(argv))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and f'pip install "wbsr-deploy[{extra}]"' in r.stderr and tool in r.stderr
    assert "download.pytorch.org/whl/cpu" in r.stderr  # the CPU build, not a multi-GB CUDA one


@pytest.mark.slow
def test_sigterm_to_wbsr_export_leaves_no_temporary_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    out = tmp_path / "bundle"
    p = subprocess.Popen([sys.executable, "-m", "wbsr_export.cli", "--ckpt", str(tiny_checkpoint), "--out", str(out),
                          "--fp16"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".bundle.tmp-*/subnet_00.onnx")) and time.time() < deadline:
        time.sleep(0.02)  # mid-export: the temporary folder holds a graph
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_to_wbsr_train_exits_143_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data = ROOT / "tests" / "data" / "Set5" / "HR"
    argv = ["--preset", "srresnet-compact", "--scale", "4", "--data", str(data), "--out", str(tmp_path / "run.pt"),
            "--iters", "100000", "--batch", "2", "--patch", "12", "--pool", "200", "--val-every", "100000"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "wbsr_train", *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.time() + 120
        while "loading" not in log.read_text() and time.time() < deadline:
            time.sleep(0.02)  # its first progress bar: the handlers are installed, work has begun
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    err = log.read_text()
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []
