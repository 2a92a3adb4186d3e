"""wbsr-run: outputs, refusals, bad inputs in batches, routing maps, stats, video, signals, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from tests import ROOT
from tests.samples import bad_image_corpus, make_clip, probe
from tests.standin import NearestUpscaler
from wbsr_runtime import cli


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_make_upscaler", lambda args: NearestUpscaler(scale=2))


def _png(path: Path, h: int = 12, w: int = 16) -> Path:
    rng = np.random.default_rng(len(str(path)))
    PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _stderr_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_single_image(tmp_path: Path, standin: None, capsys: pytest.CaptureFixture) -> None:
    src = _png(tmp_path / "a.png")
    assert cli.main([str(src), "-o", str(tmp_path / "b.png")]) == 0
    out = np.asarray(PILImage.open(tmp_path / "b.png"))
    assert out.shape == (24, 32, 3) and str(tmp_path / "b.png") in capsys.readouterr().out


def test_existing_output_needs_force_and_input_is_never_output(tmp_path: Path, standin: None, capsys) -> None:
    src, dst = _png(tmp_path / "a.png"), tmp_path / "b.png"
    dst.write_bytes(b"keep me")
    assert cli.main([str(src), "-o", str(dst)]) == 2
    assert dst.read_bytes() == b"keep me" and "--force" in capsys.readouterr().err
    assert cli.main([str(src), "-o", str(dst), "--force"]) == 0 and dst.read_bytes() != b"keep me"
    before = src.read_bytes()
    assert cli.main([str(src), "-o", str(src), "--force"]) == 2
    assert src.read_bytes() == before and "also an input" in capsys.readouterr().err
    assert cli.main([str(tmp_path), "-o", str(tmp_path), "--force"]) == 2  # folder onto itself
    assert src.read_bytes() == before


def test_batch_with_bad_inputs_writes_the_good_ones(tmp_path: Path, standin: None, capsys) -> None:
    good = [_png(tmp_path / "g1.png"), _png(tmp_path / "g2.jpg")]
    bad = []
    for name, data in bad_image_corpus():
        (tmp_path / name).write_bytes(data)
        bad.append(tmp_path / name)
    out = tmp_path / "out"
    argv = [str(p) for p in [good[0], *bad, good[1], tmp_path / "missing.png"]] + ["-o", str(out)]
    assert cli.main(argv) == 2
    err = _stderr_lines(capsys)
    failed = len(err) - 1
    assert err[-1] == f"wbsr-run: error: {failed} of {len(bad) + 3} inputs failed"
    assert failed >= 5 and all(line.startswith("wbsr-run: error: ") for line in err)
    assert (out / "g1.png").is_file() and (out / "g2.jpg").is_file()
    written = {p.name for p in out.iterdir()}
    assert not [n for n in written if n.endswith(".tmp")]
    for line in err[:-1]:  # every failure names its file, and that file has no output
        name = next(p.name for p in [*bad, tmp_path / "missing.png"] if str(p) in line)
        assert name not in written


def test_folder_input_routing_maps_and_stats(tmp_path: Path, standin: None) -> None:
    (tmp_path / "in").mkdir()
    for n in ("a.png", "b.png"):
        _png(tmp_path / "in" / n)
    (tmp_path / "in" / "notes.txt").write_text("skipped: not an image extension")
    out, stats = tmp_path / "out", tmp_path / "s.json"
    assert cli.main([str(tmp_path / "in"), "-o", str(out), "--routing-map", "x", "--stats", str(stats)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a.routing.png", "b.png", "b.routing.png"]
    assert set(json.loads(stats.read_text())) == {str(tmp_path / "in" / n) for n in ("a.png", "b.png")}


def test_single_routing_map_and_stats(tmp_path: Path, standin: None) -> None:
    src, rmap, stats = _png(tmp_path / "a.png"), tmp_path / "map.png", tmp_path / "s.json"
    assert (
        cli.main([str(src), "-o", str(tmp_path / "b.png"), "--routing-map", str(rmap), "--stats", str(stats)])
        == 0
    )
    drawn = np.asarray(PILImage.open(rmap))
    assert drawn.shape[1:] == (32, 3) and drawn.shape[0] >= 24 + 3 * 16  # the image, then one legend row each
    assert json.loads(stats.read_text())["tiles_per_subnet"] == [2, 1, 1]
    assert cli.main([str(src), "-o", str(tmp_path / "c.png"), "--stats", str(stats)]) == 2  # exists


def test_video_input(tmp_path: Path, standin: None) -> None:
    pytest.importorskip("av")
    make_clip(tmp_path / "clip.mp4")
    make_clip(tmp_path / "audio.mp4", video=False)
    assert cli.main([str(tmp_path / "clip.mp4"), str(tmp_path / "audio.mp4"), "-o", str(tmp_path / "o")]) == 2
    assert probe(tmp_path / "o" / "clip.mp4")["frames"] == 8 and not (tmp_path / "o" / "audio.mp4").exists()


def test_unexpected_exception_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    up = NearestUpscaler(fail_on=(0, ZeroDivisionError("oops")))
    monkeypatch.setattr(cli, "_make_upscaler", lambda args: up)
    assert cli.main([str(_png(tmp_path / "a.png")), "-o", str(tmp_path / "b.png")]) == 2
    err = _stderr_lines(capsys)
    assert len(err) == 2 and "ZeroDivisionError" in err[0] and not (tmp_path / "b.png").exists()


def test_missing_bundle_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    argv = [str(_png(tmp_path / "a.png")), "-o", str(tmp_path / "b.png"), "--bundle", str(tmp_path / "nope")]
    assert cli.main(argv) == 2
    assert len(_stderr_lines(capsys)) == 1 and not (tmp_path / "b.png").exists()


def _script(tmp_path: Path, argv: list[str], delay: float = 0.0) -> list[str]:
    """A python command running cli.main in a fresh process with the stand-in upscaler."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.standin import NearestUpscaler;"
        f"from wbsr_runtime import cli; cli._make_upscaler = lambda a: NearestUpscaler(delay={delay});"
        f"sys.exit(cli.main({argv!r}))"
    )
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_subprocess_bad_inputs_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hi")
    argv = [str(tmp_path / "empty.png"), str(tmp_path / "text.png"), str(_png(tmp_path / "a.png")), "-o"]
    r = subprocess.run(
        _script(tmp_path, [*argv, str(tmp_path / "o")]), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 3 and "2 of 3 inputs failed" in r.stderr
    assert (tmp_path / "o" / "a.png").is_file()


@pytest.mark.slow
def test_real_upscaler_subprocess(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from tests.nearest_bundle import build_nearest_bundle

    bundle = build_nearest_bundle(tmp_path / "bundle")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    argv = [
        sys.executable,
        "-m",
        "wbsr_runtime.cli",
        str(_png(tmp_path / "a.png")),
        str(tmp_path / "bad.png"),
    ]
    argv += ["-o", str(tmp_path / "o"), "--bundle", str(bundle), "--backend", "ort", "--routing-map", "m"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "1 of 2 inputs failed" in r.stderr
    assert np.asarray(PILImage.open(tmp_path / "o" / "a.png")).shape == (24, 32, 3)
    assert (tmp_path / "o" / "a.routing.png").is_file()


@pytest.mark.slow
def test_sigterm_during_video_leaves_nothing(tmp_path: Path) -> None:
    pytest.importorskip("av")
    make_clip(tmp_path / "clip.mp4", frames=40)
    out = tmp_path / "o.mp4"
    p = subprocess.Popen(
        _script(tmp_path, [str(tmp_path / "clip.mp4"), "-o", str(out)], delay=0.1),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_merge_option_reaches_the_upscaler(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnx")
    from tests.nearest_bundle import build_nearest_bundle
    from wbsr_runtime import defaults

    bundle = build_nearest_bundle(tmp_path / "bundle", patch=8, overlap=2)
    src = _png(tmp_path / "a.png", 40, 40)
    base = [str(src), "--bundle", str(bundle), "--backend", "ort", "--mode", "full"]
    windows = {}
    for merge in ("0", "4", None):
        given = [] if merge is None else ["--merge", merge]
        assert cli.main([*base, "-o", str(tmp_path / f"o{merge}.png"), *given,
                         "--stats", str(tmp_path / f"s{merge}.json")]) == 0
        windows[merge] = json.loads((tmp_path / f"s{merge}.json").read_text())["windows"]
    assert defaults.MERGE == 4 and windows == {"0": 25, "4": 4, None: 4}  # 5 x 5 tiles; 4 + 1 columns by 4 + 1 rows
    assert (tmp_path / "o0.png").read_bytes() == (tmp_path / "o4.png").read_bytes()
    capsys.readouterr()
    assert cli.main([*base, "-o", str(tmp_path / "bad.png"), "--merge", "-1"]) == 2
    err = _stderr_lines(capsys)
    assert len(err) == 1 and "merge" in err[0] and not (tmp_path / "bad.png").exists()
