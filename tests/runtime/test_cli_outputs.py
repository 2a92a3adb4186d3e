"""wbsr-run's outputs and options: colliding outputs, publishing without clobbering (even against
another process), output folders and extensions checked before any work, knobs refused in one line, symlink
loops, progress and help. The file corpus is tests/runtime/test_cli_bad_inputs.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from tests import ROOT
from tests.standin import NearestUpscaler
from wbsr_runtime import cli, fileio
from wbsr_runtime.defaults import MAX_PIXELS
from wbsr_runtime.media import read_image

NO_BUNDLE = ["--bundle", "/nonexistent/bundle"]  # a refusal that comes before the model loads never sees this


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> list[NearestUpscaler]:
    made: list[NearestUpscaler] = []
    monkeypatch.setattr(cli, "_make_upscaler", lambda args: made.append(NearestUpscaler(scale=2)) or made[-1])
    return made


def _png(path: Path, h: int = 12, w: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], list[str]]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, [line for line in out.splitlines() if line], [line for line in err.splitlines() if line]


def _refused_before_work(code: int, err: list[str], *needles: str) -> None:
    assert code == 2 and len(err) == 1 and err[0].startswith("wbsr-run: error: "), err
    assert all(n in err[0] for n in needles), (needles, err[0])


def _unwritable(tmp_path: Path) -> Path:
    """A folder nobody can create files in: mode 0555, or for root (who ignores modes) sysfs."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no unwritable folder to test with")
    return Path("/sys/kernel")


# --- outputs that collide -----------------------------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_two_outputs_of_one_run_that_are_one_file_are_refused(tmp_path: Path, standin, capsys, force: bool) -> None:
    src = _png(tmp_path / "a.png")
    x = tmp_path / "x.png"
    extra = ["--force"] if force else []
    for argv in (["-o", x, "--routing-map", x], ["-o", x, "--stats", x], ["-o", tmp_path / "b.png",
                 "--routing-map", x, "--stats", tmp_path / "." / "x.png"]):
        _refused_before_work(*_run([src, *argv, *extra], capsys)[::2], str(x), "same file")
    (tmp_path / "d1").mkdir(), (tmp_path / "d2").mkdir()
    dup = [_png(tmp_path / "d1" / "same.png"), _png(tmp_path / "d2" / "same.png")]
    _refused_before_work(*_run([*dup, "-o", tmp_path / "out", *extra], capsys)[::2], "same.png", "same file")
    pair = [_png(tmp_path / "m" / "a.png"), _png(tmp_path / "m" / "a.jpg")]  # outputs differ, maps do not
    _refused_before_work(*_run([*pair, "-o", tmp_path / "out", "--routing-map", "m", *extra], capsys)[::2],
                         "a.routing.png", "same file")
    assert not x.exists() and not (tmp_path / "out").exists() and standin == []  # no work was done


def test_publishing_never_replaces_a_file_another_process_wrote_meanwhile(tmp_path: Path, monkeypatch, capsys) -> None:
    """The destination appears while the image is being upscaled (as a second wbsr-run would make it): without
    --force it is kept and this input fails by name; with --force it is replaced."""
    src, dst = _png(tmp_path / "a.png"), tmp_path / "b.png"

    class Racing(NearestUpscaler):
        def upscale(self, image: np.ndarray) -> np.ndarray:
            dst.write_bytes(b"the other process's output")
            return super().upscale(image)

    monkeypatch.setattr(cli, "_make_upscaler", lambda args: Racing(scale=2))
    code, _, err = _run([src, "-o", dst], capsys)
    assert code == 2 and str(dst) in err[0] and "exists" in err[0] and len(err) == 2
    assert dst.read_bytes() == b"the other process's output" and sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]
    assert _run([src, "-o", dst, "--force"], capsys)[0] == 0 and read_image(dst).rgb.shape == (24, 32, 3)


@pytest.mark.slow
def test_two_processes_writing_one_output_never_both_win(tmp_path: Path) -> None:
    src, dst = _png(tmp_path / "a.png"), tmp_path / "b.png"
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.standin import NearestUpscaler;"
        "from wbsr_runtime import cli; cli._make_upscaler = lambda a: NearestUpscaler(delay=1.5);"
        f"sys.exit(cli.main([{str(src)!r}, '-o', {str(dst)!r}]))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert sorted(c for c, _ in results) == [0, 2], results  # one wrote it, the other refused to replace it
    assert all("Traceback" not in e for _, e in results) and "exists" in next(e for c, e in results if c == 2)
    assert read_image(dst).rgb.shape == (24, 32, 3) and sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]


# --- where outputs go and what they are, checked before any work --------------------------------------------
def test_output_extensions_are_checked_before_any_work(tmp_path: Path, capsys) -> None:
    src = _png(tmp_path / "a.png")
    (tmp_path / "clip.mp4").write_bytes(b"not looked at")
    for argv, needles in [
        ([src, "-o", tmp_path / "out"], ["no extension", ".png"]),
        ([src, "-o", tmp_path / "x.gif"], ["'.gif'", ".png"]),
        ([tmp_path / "clip.mp4", "-o", tmp_path / "x.png"], ["a video", ".mp4"]),
        ([src, "-o", tmp_path / "b.png", "--routing-map", tmp_path / "map.txt"], ["routing map", ".png"]),
    ]:
        _refused_before_work(*_run([*argv, *NO_BUNDLE], capsys)[::2], *needles)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "clip.mp4"]


def test_missing_or_unwritable_output_folders_are_refused_before_any_work(tmp_path: Path, capsys) -> None:
    src, other = _png(tmp_path / "a.png"), _png(tmp_path / "c.png")
    ro = _unwritable(tmp_path)
    for argv, needles in [
        ([src, "-o", tmp_path / "missing" / "b.png"], ["missing", "no such folder"]),
        ([src, "-o", tmp_path / "b.png", "--stats", tmp_path / "missing" / "s.json"], ["no such folder"]),
        ([src, "-o", tmp_path / "b.png", "--stats", ro / "s.json"], [str(ro), "cannot write"]),
        ([src, "-o", ro / "b.png"], [str(ro), "cannot write"]),
        ([src, other, "-o", ro / "new" / "out"], [str(ro), "cannot write"]),  # an OUT that cannot be created
        ([src, other, "-o", src], [str(src), "not a folder"]),
    ]:
        _refused_before_work(*_run([*argv, *NO_BUNDLE], capsys)[::2], *needles)
    assert sorted(p.name for p in tmp_path.iterdir() if p != ro) == ["a.png", "c.png"]


def test_stats_on_a_full_disk_is_one_line(tmp_path: Path, standin, monkeypatch, capsys) -> None:
    src = _png(tmp_path / "a.png")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.json, "dumps", full)  # what writing the stats hits when the disk is full
    code, out, err = _run([src, "-o", tmp_path / "b.png", "--stats", tmp_path / "s.json"], capsys)
    assert code == 2 and err == [f"wbsr-run: error: {tmp_path / 's.json'}: cannot write stats: {os.strerror(28)}"]
    assert (tmp_path / "b.png").is_file() and not (tmp_path / "s.json").exists()
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_symlink_loops_as_input_or_stats_are_one_line(tmp_path: Path, standin, capsys) -> None:
    good = _png(tmp_path / "good.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    code, out, err = _run([tmp_path / "loop.png", good, "-o", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 2 and "loop.png: symlink loop" in err[0] and "1 of 2" in err[1]
    assert (tmp_path / "out" / "good.png").is_file()  # the other input is still processed
    (tmp_path / "s.json").symlink_to("s.json")
    _refused_before_work(*_run([good, "-o", tmp_path / "b.png", "--stats", tmp_path / "s.json"], capsys)[::2],
                         "s.json", "--force")
    assert not (tmp_path / "b.png").exists()


# --- knobs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value",
    [("--tolerance", "nan"), ("--tolerance", "inf"), ("--tolerance", "-1"), ("--budget", "nan"), ("--budget", "0"),
     ("--budget", "1.01"), ("--patch", "2"), ("--patch", "5000"), ("--overlap", "-3"), ("--overlap", "5000"),
     ("--merge", "-1"), ("--workers", "0"), ("--max-pixels", "0")],
)
def test_bad_knobs_are_refused_in_one_line_before_loading(tmp_path: Path, capsys, option: str, value: str) -> None:
    src = _png(tmp_path / "a.png", 64, 80)
    code, _, err = _run([src, "-o", tmp_path / "b.png", option, value, *NO_BUNDLE], capsys)
    _refused_before_work(code, err, option.lstrip("-").replace("-", "_"))
    assert not (tmp_path / "b.png").exists()


# --- progress and help ----------------------------------------------------------------------------------------
def test_a_folder_shows_n_of_m_and_a_bar_on_a_terminal(tmp_path: Path, standin, monkeypatch, capsys) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "in" / name)
    code, out, err = _run([tmp_path / "in", "-o", tmp_path / "out"], capsys)
    assert code == 0 and [line.split()[0] for line in out] == ["(1/3)", "(2/3)", "(3/3)"] and err == []
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = _run([tmp_path / "in", "-o", tmp_path / "out2"], capsys)
    assert code == 0 and "/3 [" in "".join(err) and "file/s" in "".join(err)  # tqdm's bar (cleared at the end)


def test_help_states_workers_torch_install_and_the_one_pixel_limit(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--workers N runners working on one frame's tiles in parallel" in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert f"(default {MAX_PIXELS:,}, Pillow's own default limit; this is the only limit)" in text
    assert MAX_PIXELS == PILImage.MAX_IMAGE_PIXELS  # Pillow's default, untouched outside a run


def _gray_png_header(width: int, height: int) -> bytes:
    """An 8-bit gray PNG that claims width x height pixels and holds almost none (fails to decode)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_max_pixels_is_the_one_limit_pillow_included(tmp_path: Path, capsys) -> None:
    """9500 x 9500 = 90.25 MP: above Pillow's default limit (89.5 MP), within --max-pixels 91000000. Pillow
    used to refuse it first, whatever --max-pixels said; now only --max-pixels decides (the file then fails to
    decode: it holds no pixels, which proves the limit let it through)."""
    pytest.importorskip("onnx")
    from tests.nearest_bundle import build_nearest_bundle

    bundle = ["--bundle", build_nearest_bundle(tmp_path / "nn"), "--backend", "ort"]
    big = tmp_path / "big.png"
    big.write_bytes(_gray_png_header(9500, 9500))
    code, _, err = _run([big, "-o", tmp_path / "o.png", "--max-pixels", "91000000", *bundle], capsys)
    assert code == 2 and "cannot read image" in err[0] and "exceeds" not in err[0], err
    code, _, err = _run([big, "-o", tmp_path / "o.png", *bundle], capsys)  # the default limit is Pillow's
    assert code == 2 and "exceeds" in err[0] and f"{MAX_PIXELS}" in err[0], err
    assert PILImage.MAX_IMAGE_PIXELS == MAX_PIXELS  # restored after the run


def test_stats_of_a_folder_run_name_every_input(tmp_path: Path, standin, capsys) -> None:
    for name in ("a.png", "b.png"):
        _png(tmp_path / "in" / name)
    code, out, _ = _run([tmp_path / "in", "-o", tmp_path / "out", "--stats", tmp_path / "s.json"], capsys)
    assert code == 0 and out[-1] == f"{tmp_path / 's.json'} (stats)"
    keys = sorted(json.loads((tmp_path / "s.json").read_text()))
    assert keys == [str(tmp_path / "in" / n) for n in ("a.png", "b.png")]
