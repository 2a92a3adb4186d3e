"""Integrity and safety: interrupted runs, outputs never clobbered, tampered or foreign bundles, unsafe
checkpoints, bounded memory and the pixel limit. The bad-input corpus is tests/runtime/test_cli_bad_inputs.py.

Covered elsewhere, not repeated here (`test_items_covered_elsewhere_exist` keeps these names honest):
- training data: an unreadable image is named, `--skip-bad` skips it:
  tests/train/test_train.py::test_unreadable_training_image_is_named; it is counted: tests/train/test_data.py::
  test_trainset_skip_bad.
- one Upscaler shared by threads: tests/runtime/test_upscaler.py::test_threads_share_one_upscaler (here, the same with
  several workers stitching into one output at once).
- engine records for another GPU or TensorRT version, at the function level: tests/runtime/test_engines.py (here,
  through `wbsr-run --backend trt`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage

from tests import ROOT
from tests.nearest_bundle import build_nearest_bundle
from tests.samples import bomb_png, make_clip
from wbsr_runtime import cli
from wbsr_runtime.engines import engine_file, profile_shapes
from wbsr_runtime.manifest import SCHEMA_VERSION, hash_files, write_manifest
from wbsr_runtime.media import read_image

BUNDLE_FILES = ["router.onnx", "subnet_00.onnx", "subnet_01.onnx", "subnet_02.onnx"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return build_nearest_bundle(tmp_path_factory.mktemp("nn") / "b", scale=2, patch=16, overlap=2)


def _png(path: Path, h: int = 12, w: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = cli.main(argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _refused(code: int, err: list[str], *needles: str) -> None:
    """Exit 2 and one error line (plus the count line when inputs were tried) holding every needle."""
    assert code == 2 and 1 <= len(err) <= 2 and err[0].startswith("wbsr-run: error: "), err
    assert all(n in err[0] for n in needles), (needles, err[0])


# --- interrupted runs and outputs ---------------------------------------------------------------------------
def _standin_command(argv: list[str], delay: float) -> list[str]:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.standin import NearestUpscaler;"
        f"from wbsr_runtime import cli; cli._make_upscaler = lambda a: NearestUpscaler(delay={delay});"
        f"sys.exit(cli.main({argv!r}))"
    )
    return [sys.executable, "-c", code]


@pytest.mark.parametrize(
    "sig, code, word",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")],
)
@pytest.mark.slow
def test_interrupted_video_leaves_no_output(tmp_path: Path, sig: int, code: int, word: str) -> None:
    pytest.importorskip("av")
    make_clip(tmp_path / "clip.mp4", frames=40)
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen(
        _standin_command([str(tmp_path / "clip.mp4"), "-o", str(out / "o.mp4")], delay=0.1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell's background job starts with SIGINT ignored, and Python keeps that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 30
    while not list(out.iterdir()) and time.time() < deadline:  # the temporary output exists: mid-run
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == code and err.splitlines() == [f"wbsr-run: error: {word}"]
    assert list(out.iterdir()) == []  # neither the final name nor the temporary file


def test_existing_output_is_kept_without_force(bundle: Path, tmp_path: Path, capsys) -> None:
    src, dst = _png(tmp_path / "a.png"), tmp_path / "b.png"
    dst.write_bytes(b"keep me")
    base = ["--bundle", str(bundle), "--backend", "ort"]
    _refused(*_run([str(src), "-o", str(dst), *base], capsys), str(dst), "--force")
    assert dst.read_bytes() == b"keep me"
    assert _run([str(src), "-o", str(dst), *base, "--force"], capsys)[0] == 0
    assert read_image(dst).rgb.shape == (24, 32, 3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"keep me too")  # a folder output: same rule per file
    _refused(*_run([str(src), "-o", str(tmp_path / "out"), *base], capsys), "--force")
    assert (tmp_path / "out" / "a.png").read_bytes() == b"keep me too"


def test_output_equal_to_an_input_is_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    src = _png(tmp_path / "d" / "a.png")
    (tmp_path / "link.png").symlink_to(src)
    before = src.read_bytes()
    base = ["--bundle", str(bundle), "--backend", "ort", "--force"]
    for out in [src, tmp_path / "link.png", tmp_path / "d" / ".." / "d" / "a.png"]:
        _refused(*_run([str(src), "-o", str(out), *base], capsys), "also an input")
    _refused(*_run([str(src), "-o", str(tmp_path / "b.png"), "--stats", str(src), *base], capsys), "also an input")
    _refused(
        *_run([str(src), "-o", str(tmp_path / "b.png"), "--routing-map", str(src), *base], capsys), "also an input"
    )
    _refused(*_run([str(tmp_path / "d"), "-o", str(tmp_path / "d"), *base], capsys), "also an input")
    assert src.read_bytes() == before and not (tmp_path / "b.png").exists()


def test_video_output_equal_to_input_or_existing_is_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    before = clip.read_bytes()
    base = ["--bundle", str(bundle), "--backend", "ort"]
    _refused(*_run([str(clip), "-o", str(clip), *base, "--force"], capsys), "also an input")
    (tmp_path / "o.mp4").write_bytes(b"keep me")
    _refused(*_run([str(clip), "-o", str(tmp_path / "o.mp4"), *base], capsys), "--force")
    assert clip.read_bytes() == before and (tmp_path / "o.mp4").read_bytes() == b"keep me"


# --- bundles ------------------------------------------------------------------------------------------------
def _bundle_run(b: Path, tmp_path: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    src = _png(tmp_path / "in" / "a.png")
    code, err = _run([str(src), "-o", str(tmp_path / "o.png"), "--bundle", str(b), *extra], capsys)
    assert code == 0 or not (tmp_path / "o.png").exists()
    return code, err


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_changed_byte_in_a_bundle_file_is_refused(bundle: Path, tmp_path: Path, capsys, name: str) -> None:
    b = shutil.copytree(bundle, tmp_path / "b")
    data = bytearray((b / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / name).write_bytes(bytes(data))
    code, err = _bundle_run(b, tmp_path, capsys, "--backend", "ort")
    _refused(code, err, name, "sha256", "wbsr-export")
    assert len(err) == 1  # refused before any input is tried


def test_changed_byte_in_every_file_of_an_exported_bundle(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    b = shutil.copytree(tiny_bundle, tmp_path / "b")
    files = sorted(p for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    listed = json.loads((b / "manifest.json").read_text())["files"]
    assert sorted(p.relative_to(b).as_posix() for p in files) == sorted(listed)  # every file is hashed
    assert any(p.suffix == ".pt2" for p in files) and any("fp16" in p.name for p in files)
    for path in files:
        good = path.read_bytes()
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 0x80]))
        code, err = _bundle_run(b, tmp_path, capsys, "--backend", "ort")
        _refused(code, err, path.relative_to(b).as_posix(), "sha256", "wbsr-export")
        path.write_bytes(good)
    assert _bundle_run(b, tmp_path, capsys, "--backend", "ort")[0] == 0


@pytest.mark.parametrize("at", [0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 0.99])
def test_changed_byte_in_the_manifest(bundle: Path, tmp_path: Path, capsys, at: float) -> None:
    """The manifest is not hashed: a changed byte is refused when it breaks the manifest, else it changed a
    value (a name, a table entry) and the run is still correct; never a traceback or a wrong output."""
    b = shutil.copytree(bundle, tmp_path / "b")
    data = bytearray((b / "manifest.json").read_bytes())
    data[min(int(len(data) * at), len(data) - 1)] ^= 0x01
    (b / "manifest.json").write_bytes(bytes(data))
    code, err = _bundle_run(b, tmp_path, capsys, "--backend", "ort")
    if code == 0:
        src = read_image(tmp_path / "in" / "a.png").rgb
        np.testing.assert_array_equal(read_image(tmp_path / "o.png").rgb, np.repeat(np.repeat(src, 2, 0), 2, 1))
    else:
        _refused(code, err)
        assert "manifest" in err[0] or "wbsr-export" in err[0] or "a.png" in err[0]


@pytest.mark.parametrize(
    "edit, needles",
    [
        ("newer", ["manifest.json", f"schema version {SCHEMA_VERSION + 1} is newer", "wbsr-export"]),
        ("older", ["manifest.json", "schema version 1 is older", "wbsr-export"]),
        ("missing", ["missing file subnet_01.onnx", "wbsr-export"]),
        ("no-manifest", ["not a WBSR bundle", "wbsr-export"]),
        ("digest", ["router.onnx", "sha256", "wbsr-export"]),
        ("unlisted", ["subnet_02.onnx", "no sha256", "wbsr-export"]),
        ("escape", ["leaves the bundle folder", "wbsr-export"]),
    ],
)
def test_bundle_refusals_say_what_and_how_to_rebuild(
    bundle: Path, tmp_path: Path, capsys, edit: str, needles: list[str]
) -> None:
    b = shutil.copytree(bundle, tmp_path / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    if edit in ("newer", "older"):
        manifest["schema_version"] = SCHEMA_VERSION + 1 if edit == "newer" else 1
    elif edit == "digest":
        manifest["files"]["router.onnx"] = "0" * 64
    elif edit == "unlisted":
        del manifest["files"]["subnet_02.onnx"]
    elif edit == "escape":
        manifest["files"]["../outside.onnx"] = "0" * 64
    write_manifest(b, manifest)
    if edit == "missing":
        (b / "subnet_01.onnx").unlink()
    elif edit == "no-manifest":
        (b / "manifest.json").unlink()
    _refused(*_bundle_run(b, tmp_path, capsys, "--backend", "ort"), *needles)


@pytest.mark.parametrize(
    "machine, differs",
    [
        (("10.3.0", "RTX 4090", "8.9"), "GPU and compute capability differ"),
        (("10.8.0", "Orin", "8.7"), "TensorRT version differ"),
    ],
)
def test_engine_for_another_gpu_or_tensorrt_is_refused(
    bundle: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, machine: tuple, differs: str
) -> None:
    """A bundle with engines built by TensorRT 10.3.0 on an Orin, run on another machine (faked: no GPU here)."""
    from wbsr_runtime.backends import trt

    b = shutil.copytree(bundle, tmp_path / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "trt").mkdir()
    for i in range(len(manifest["subnets"])):
        rel = engine_file(i, f"{i:016x}")
        (b / rel).write_bytes(b"plan")
        manifest["engines"].append(
            {"target": i, "file": rel, "tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
            | {"precision": "fp32", "profile": profile_shapes(16, 2, 4)}
        )
    manifest["files"] = hash_files(b)
    write_manifest(b, manifest)
    version, gpu, cc = machine
    monkeypatch.setattr(trt, "import_tensorrt", lambda: SimpleNamespace(__version__=version))
    monkeypatch.setattr(trt, "import_cudart", lambda: SimpleNamespace(cudaSetDevice=lambda d: (0,)))
    monkeypatch.setattr(trt, "cuda_check", lambda result, what: result)
    monkeypatch.setattr(trt, "gpu_identity", lambda cudart, device: (gpu, cc))
    code, err = _bundle_run(b, tmp_path, capsys, "--backend", "trt")
    _refused(code, err, "TensorRT 10.3.0 on Orin", differs, f"wbsr-export --bundle {b} --trt")


# --- checkpoints --------------------------------------------------------------------------------------------
class _Evil:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _evil_checkpoint(path: Path, marker: Path, plain: bool) -> Path:
    torch = pytest.importorskip("torch")
    payload = {"format": "wbsr-checkpoint", "version": 1, "model_config": _Evil(marker)}
    if plain:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


def test_the_evil_checkpoint_really_runs_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    path = _evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned", plain=False)
    torch.load(path, weights_only=False)
    assert (tmp_path / "pwned").exists()  # so the refusals below are not vacuous


@pytest.mark.parametrize("plain", [False, True], ids=["torch-save", "plain-pickle"])
@pytest.mark.parametrize("tool", ["wbsr-export", "wbsr-eval", "wbsr-calibrate"])
def test_code_executing_checkpoint_is_refused(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, tool: str, plain: bool
) -> None:
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # the CLIs call basicConfig
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    path = _evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned", plain)
    before = path.read_bytes()
    (tmp_path / "data").mkdir()
    _png(tmp_path / "data" / "x.png", 32, 32)
    if tool == "wbsr-export":
        from wbsr_export.cli import main

        code = main(["--ckpt", str(path), "--out", str(tmp_path / "bundle")])
    else:
        from wbsr_train.cli import calibrate_main, eval_main

        argv = ["--ckpt", str(path), "--data", str(tmp_path / "data")]
        code = eval_main(argv) if tool == "wbsr-eval" else calibrate_main([*argv, "--out", str(tmp_path / "c.pt")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not (tmp_path / "pwned").exists(), "the pickle ran code"
    assert code == 2 and len(err) == 1 and str(path) in err[0], err
    assert "refused" in err[0] or "unreadable" in err[0]
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["data", "evil.pt"]


def test_checkpoints_are_loaded_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from tests.conftest import tiny_checkpoint_data
    from wbsr_train import checkpoint

    calls = []
    real = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    checkpoint.save_checkpoint(tmp_path / "c.pt", tiny_checkpoint_data(widths=(8,), depths=(1,)))
    checkpoint.load_checkpoint(tmp_path / "c.pt")
    assert calls and all(kw.get("weights_only") is True for kw in calls)


# --- memory, pixel limit, concurrency -----------------------------------------------------------------------
def _extra_peak(up: object, h: int, w: int) -> int:
    """Peak bytes traced while upscaling an (h, w) uint8 frame, beyond the output (the input itself exists
    before tracing starts)."""
    img = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        sr = up.upscale(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sr.shape == (2 * h, 2 * w, 3)
    np.testing.assert_array_equal(sr[::37, ::41], np.repeat(np.repeat(img, 2, 0), 2, 1)[::37, ::41])
    return peak - sr.nbytes


def test_large_frame_is_upscaled_in_bounded_memory(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from wbsr_runtime.upscaler import Upscaler

    b = build_nearest_bundle(tmp_path / "b", scale=2, patch=64, overlap=4)
    with Upscaler(b, backend="ort") as up:
        small = _extra_peak(up, 1000, 1500)
        large = _extra_peak(up, 2000, 3000)  # 4x the pixels: 72 MB of output; a float32 copy would be 72 MB
    mib = 1 << 20
    assert large < 16 * mib and abs(large - small) < 4 * mib, (small / mib, large / mib)


def test_max_pixels_refuses_large_frames_by_name(bundle: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("av")
    base = ["--bundle", str(bundle), "--backend", "ort", "--max-pixels"]
    src = _png(tmp_path / "a.png", 40, 50)
    _refused(*_run([str(src), "-o", str(tmp_path / "o.png"), *base, "1999"], capsys), str(src), "exceeds")
    assert not (tmp_path / "o.png").exists()
    assert _run([str(src), "-o", str(tmp_path / "o.png"), *base, "2000"], capsys)[0] == 0  # the limit is inclusive
    (tmp_path / "header.png").write_bytes(bomb_png(5000, 5000))  # refused from its header, never decoded
    _refused(*_run([str(tmp_path / "header.png"), "-o", str(tmp_path / "h.png"), *base, "10000"], capsys), "exceeds")
    make_clip(tmp_path / "clip.mp4")  # 32 x 24 = 768 pixels per frame
    _refused(*_run([str(tmp_path / "clip.mp4"), "-o", str(tmp_path / "o.mp4"), *base, "500"], capsys), "exceeds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "clip.mp4", "header.png", "o.png"]


def test_workers_and_threads_share_one_upscaler_exactly(bundle: Path) -> None:
    from wbsr_runtime.upscaler import Upscaler

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (37 + 9 * i, 53 - 5 * i, 3), dtype=np.uint8) for i in range(4)]
    images[1] = images[1].astype(np.uint16) * 257
    images[2] = images[2].astype(np.float32) / 255
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(images))}
    with Upscaler(bundle, backend="ort", workers=3, chunk=2) as up:
        threads = [
            threading.Thread(target=lambda i=i: [results[i].append(up.upscale(images[i])) for _ in range(3)])
            for i in range(len(images))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, img in enumerate(images):
        assert len(results[i]) == 3
        for sr in results[i]:
            assert sr.dtype == img.dtype
            np.testing.assert_array_equal(sr, np.repeat(np.repeat(img, 2, 0), 2, 1))


def test_items_covered_elsewhere_exist() -> None:
    for file, name in [
        ("train/test_train.py", "def test_unreadable_training_image_is_named"),
        ("train/test_data.py", "def test_trainset_skip_bad"),
        ("runtime/test_upscaler.py", "def test_threads_share_one_upscaler"),
        ("runtime/test_engines.py", "def test_find_engine_refuses_foreign_or_missing"),
    ]:
        assert name in (ROOT / "tests" / file).read_text(), (file, name)
    assert os.path.exists(ROOT / "tests" / "runtime" / "test_cli_bad_inputs.py")


def test_docs_guarantees_is_the_readme_section() -> None:
    """docs/guarantees.md duplicates the README's Guarantees: they must not drift apart."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Guarantees\n") : readme.index("## Design notes")].rstrip("\n") + "\n"
    assert (ROOT / "docs" / "guarantees.md").read_text() == section
