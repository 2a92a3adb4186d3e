"""`wbsr-export --bundle D --trt` as a transaction: a failed, refused or interrupted build leaves the bundle
byte for byte as it was (and loadable); a successful one changes engines, timing cache and manifest
together. Runs the exporter's real code (TensorRTToolchain, build_plan, validation, commit) on the stand-in
TensorRT of tests/trt_standin.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.nearest_bundle import build_nearest_bundle
from tests.trt_standin import FakeCudart, StandinTensorRT, add_standin_engines
from wbsr_export import cli
from wbsr_export.trt import EngineBuildError, EngineValidationError
from wbsr_runtime.manifest import load_manifest


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, StandinTensorRT, FakeCudart]:
    """A nearest bundle with stand-in engines and a timing cache already committed."""
    root = build_nearest_bundle(tmp_path / "b", scale=2, gains=(1.0, 2.0, 0.5), patch=8, overlap=2)
    cudart = FakeCudart()
    trt = StandinTensorRT(cudart)
    add_standin_engines(root, trt, cudart, max_batch=2)
    return root, trt, cudart


class Interrupt:
    """A kernel that does its work, except on call `at` where it raises `error` (or corrupts the output)."""

    def __init__(self, kernel, at: int, error: BaseException | None) -> None:
        self.kernel, self.at, self.error, self.calls = kernel, at, error, 0

    def run(self, io, stream, device):
        self.calls += 1
        ok = self.kernel.run(io, stream, device)
        if self.calls == self.at:
            if self.error is None:
                io["gain"] += 0.25
                return self.kernel.run(io, stream, device)  # a wrong engine: validation refuses it
            raise self.error
        return ok


@pytest.mark.parametrize(
    "error, expected",
    [
        (KeyboardInterrupt(), KeyboardInterrupt),  # Ctrl-C during the second engine's validation
        (None, EngineValidationError),  # the second engine disagrees with ONNX Runtime
        ("build", EngineBuildError),  # TensorRT fails to build the third engine
    ],
    ids=["interrupted", "refused", "failed"],
)
def test_a_build_that_does_not_finish_changes_nothing(built, error, expected) -> None:
    root, trt, cudart = built
    before = snapshot(root)
    if error == "build":
        trt.Builder = lambda logger, n=[0]: _FailingBuilder(trt, n, at=3)
    else:
        trt.kernel = Interrupt(trt.kernel, at=3, error=error)  # 2 validation runs per engine: 3 = 2nd engine
    with pytest.raises(expected):
        add_standin_engines(root, trt, cudart, max_batch=4)  # new settings: new keys, every engine rebuilt
    assert snapshot(root) == before
    load_manifest(root)  # hashes verified: the bundle still loads for every backend


class _FailingBuilder:
    def __init__(self, trt, count, at):
        from tests.trt_standin import _Builder

        self.inner, self.count, self.at = _Builder(trt, None), count, at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def build_serialized_network(self, network, config):
        self.count[0] += 1
        return None if self.count[0] == self.at else self.inner.build_serialized_network(network, config)


def test_a_finished_build_updates_engines_cache_and_manifest_together(built) -> None:
    root, trt, cudart = built
    manifest = json.loads((root / "manifest.json").read_text())
    old_caches = [f for f in manifest["files"] if f.startswith("trt/timing.")]
    assert len(old_caches) == 1
    add_standin_engines(root, trt, cudart, max_batch=4)
    manifest = json.loads((root / "manifest.json").read_text())
    caches = [f for f in manifest["files"] if f.startswith("trt/timing.")]
    assert len(caches) == 1 and caches != old_caches and not (root / old_caches[0]).exists()
    assert sorted(p.name for p in (root / "trt").glob("timing.*")) == [Path(caches[0]).name]
    assert {r["profile"]["max"][0] for r in manifest["engines"]} == {4}  # replaced, same machine
    assert load_manifest(root).to_dict() == manifest  # written from the typed records


def test_attaching_changes_only_engines_and_files(tmp_path: Path) -> None:
    root = build_nearest_bundle(tmp_path / "b", scale=2, patch=8, overlap=2)
    before = json.loads((root / "manifest.json").read_text())
    cudart = FakeCudart()
    add_standin_engines(root, StandinTensorRT(cudart), cudart, max_batch=2)
    after = json.loads((root / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k not in ("engines", "files")} == {
        k: v for k, v in before.items() if k not in ("engines", "files")
    }
    assert len(after["engines"]) == 3 and before["files"].items() <= after["files"].items()


def test_tensorrt_giving_no_timing_cache(tmp_path: Path) -> None:
    """`create_timing_cache` may return None: the build goes on without a cache (and records none)."""
    root = build_nearest_bundle(tmp_path / "b", scale=2, patch=8, overlap=2)
    cudart = FakeCudart()
    records = add_standin_engines(root, StandinTensorRT(cudart, timing_cache_none=True), cudart, max_batch=2)
    assert len(records) == 3 and not list((root / "trt").glob("timing.*"))
    load_manifest(root)


def test_export_cli_without_a_driver_is_one_line(built, capsys: pytest.CaptureFixture) -> None:
    root, _, _ = built
    from tests.trt_standin import installed

    cudart = FakeCudart(driver=False)
    with installed(StandinTensorRT(cudart), cudart):
        assert cli.main(["--bundle", str(root), "--trt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable NVIDIA driver" in err[0]
