"""One conformance test over every backend available here (ort always; torch, trt when importable)."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.nearest_bundle import build_nearest_bundle, nearest, router_classes
from wbsr_runtime.backends import BackendError, OrtOptions, Runner, backend_options, open_runners
from wbsr_runtime.backends.base import LazySubnets
from wbsr_runtime.manifest import load_manifest
from wbsr_runtime.router import Router
from wbsr_runtime.routing import classify


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _ort_has(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


GPU = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")]
CASES = [
    pytest.param("ort", {}, id="ort-cpu"),
    pytest.param("torch", {}, id="torch-cpu", marks=pytest.mark.skipif(not _has("torch"), reason="no torch")),
    pytest.param("torch", {"device": "cuda"}, id="torch-cuda", marks=GPU),
    pytest.param(
        "ort",
        {"device": "cuda"},
        id="ort-cuda",
        marks=[*GPU, pytest.mark.skipif(not _ort_has("CUDAExecutionProvider"), reason="no onnxruntime-gpu")],
    ),
    pytest.param(
        "ort",
        {"device": "cuda", "options": OrtOptions(tensorrt=True)},
        id="ort-tensorrt",
        marks=[*GPU, pytest.mark.skipif(not _ort_has("TensorrtExecutionProvider"), reason="no ORT TensorRT EP")],
    ),
    pytest.param("trt", {"stack": "fake"}, id="trt-standin-cpu"),
    pytest.param(
        "trt",
        {"stack": "cupy"},
        id="trt-standin-cupy",
        marks=[*GPU, pytest.mark.skipif(not (_has("cupy") and _has("cuda.bindings")), reason="no CuPy/cuda-python")],
    ),
    pytest.param(
        "trt",
        {},
        id="trt",
        marks=[*GPU, pytest.mark.trt, pytest.mark.skipif(not _has("tensorrt"), reason="no TensorRT")],
    ),
]


@pytest.fixture(scope="module")
def gain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_nearest_bundle(
        tmp_path_factory.mktemp("conf") / "b", scale=3, gains=(1.0, 2.0, 0.5), torch=_has("torch")
    )


@contextlib.contextmanager
def backend_stack(backend: str, opts: dict, bundle: Path, tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    """(bundle, runner options) for one case: TensorRT cases get engines in a copy of the bundle, built by
    wbsr-export's code with real TensorRT, or with the stand-in on FakeCudart (CPU) or cuda-python + CuPy."""
    opts = dict(opts)
    stack = opts.pop("stack", None)
    if backend != "trt":
        yield bundle, opts
        return
    copy = Path(shutil.copytree(bundle, tmp_path / "engines"))
    if stack is None:
        from wbsr_export.attach import add_engines

        add_engines(copy, precision="fp32", max_batch=4)
        yield copy, opts
        return
    from tests.trt_standin import CupyKernel, FakeCudart, StandinTensorRT, add_standin_engines, installed

    if stack == "fake":
        cudart = FakeCudart()
        trt = StandinTensorRT(cudart)
    else:
        from cuda.bindings import runtime as cudart

        trt = StandinTensorRT(cudart, CupyKernel())
    add_standin_engines(copy, trt, cudart, max_batch=4)
    with installed(trt, cudart):
        yield copy, opts
    assert getattr(cudart, "violations", []) == [] and trt.violations == []


def numpy_scores(frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """docs/bundle.md descriptor: mean + std of the Sobel magnitude of BT.601 luma over each box interior."""
    y = (np.array([65.481, 128.553, 24.966]) @ frame[0].reshape(3, -1).astype(np.float64) + 16) / 255
    y = y.reshape(frame.shape[2:])
    k = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    win = np.lib.stride_tricks.sliding_window_view(y, (3, 3))
    g = np.hypot(np.einsum("ijab,ab->ij", win, k), np.einsum("ijab,ab->ij", win, k.T))
    return np.array(
        [g[y0 : y1 - 2, x0 : x1 - 2].mean() + g[y0 : y1 - 2, x0 : x1 - 2].std() for y0, x0, y1, x1 in boxes]
    )


@pytest.mark.parametrize("backend,opts", CASES)
def test_backend_conformance(
    backend: str, opts: dict, gain_bundle: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with backend_stack(backend, opts, gain_bundle, tmp_path) as (bundle, opts):
        check_backend(backend, opts, load_manifest(bundle), request)


def check_backend(backend: str, opts: dict, manifest, request: pytest.FixtureRequest) -> None:
    rng = np.random.default_rng(0)
    runners = open_runners(manifest, backend, workers=2, **opts)
    assert len(runners) == 2
    for runner in runners:
        with runner:
            assert isinstance(runner, Runner) and runner.name == backend and runner.device
            shapes = [(1, 3, 5, 7), (3, 3, 12, 12)]
            if runner.fixed_tiles is not None:  # bound to one tile: only (n, 3, T, T), 1 <= n <= max_batch
                tile = runner.fixed_tiles[0] + 2 * runner.fixed_tiles[1]
                shapes = [(1, 3, tile, tile), (min(3, runner.max_batch), 3, tile, tile)]
            for m, gain in enumerate((1.0, 2.0, 0.5)):
                for shape in shapes:
                    batch = rng.random(shape, dtype=np.float32)
                    out = runner.run_subnet(m, batch)
                    assert out.dtype == np.float32 and out.shape == (*shape[:2], shape[2] * 3, shape[3] * 3)
                    np.testing.assert_allclose(
                        out, nearest(batch, 3) * np.float32(gain), rtol=1e-6, atol=1e-6
                    )

    # The real exported bundle (needs torch to build): subnets against ORT CPU, router against the spec.
    if not _has("torch") or runners[0].fixed_tiles is not None:  # engines are built for the gain bundle only
        return
    tiny = load_manifest(request.getfixturevalue("tiny_bundle"))
    import onnxruntime as ort

    batch = rng.random((2, 3, 16, 16), dtype=np.float32)
    with open_runners(tiny, backend, workers=1, **opts)[0] as runner:
        for m, s in enumerate(tiny.subnets):
            ref = ort.InferenceSession(str(tiny.path(s.files["onnx"])), providers=["CPUExecutionProvider"])
            np.testing.assert_allclose(
                runner.run_subnet(m, batch), ref.run(None, {"lr": batch})[0], atol=1e-4
            )


def test_router_classifies_by_the_bundle_graph(gain_bundle: Path, request: pytest.FixtureRequest) -> None:
    """The router runs on ONNX Runtime's CPU provider whatever the backend: the stand-in router's classes, and
    the exported router against the numpy descriptor (docs/bundle.md), also for an integer frame."""
    rng = np.random.default_rng(0)
    manifest = load_manifest(gain_bundle)
    frame = rng.random((1, 3, 20, 30), dtype=np.float32)
    boxes = np.array([[0, 0, 8, 8], [3, 5, 20, 30], [10, 1, 13, 4]], dtype=np.int64)
    with Router(manifest) as router:
        scores, classes = router.route(frame, boxes)
    assert scores.dtype == np.float32 and classes.dtype == np.int64
    np.testing.assert_array_equal(classes, router_classes(boxes, 4))
    np.testing.assert_array_equal(classes, classify(scores, manifest.router.thresholds))
    if not _has("torch"):  # the real exported bundle needs torch to build
        return
    tiny = load_manifest(request.getfixturevalue("tiny_bundle"))
    frame = rng.random((1, 3, 40, 36), dtype=np.float32)
    boxes = np.array([[0, 0, 16, 16], [8, 4, 40, 36], [20, 20, 23, 23]], dtype=np.int64)
    with Router(tiny) as router:
        scores, classes = router.route(frame, boxes)
        np.testing.assert_allclose(scores, numpy_scores(frame, boxes), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(classes, classify(scores, tiny.router.thresholds))
        as_uint8 = (frame * 255).round().astype(np.uint8)  # converted band by band
        np.testing.assert_allclose(router.route(as_uint8, boxes)[0], numpy_scores(as_uint8 / 255.0, boxes),
                                   rtol=1e-4, atol=1e-5)


def test_unknown_or_unavailable_backends_fail_in_one_line(gain_bundle: Path) -> None:
    manifest = load_manifest(gain_bundle)
    with pytest.raises(BackendError, match="unknown backend"):
        open_runners(manifest, "tensorflow")
    if not _has("tensorrt"):
        with pytest.raises(BackendError, match="pip install tensorrt"):
            open_runners(manifest, "trt")
    if not _ort_has("CUDAExecutionProvider"):  # a GPU machine with onnxruntime-gpu runs it
        with pytest.raises(BackendError, match="onnxruntime-gpu"):
            open_runners(manifest, "ort", device="cuda")


def test_options_are_the_chosen_backends(gain_bundle: Path) -> None:
    """Each backend takes its own options dataclass; the Upscaler's keywords are refused, in one line, by a
    backend that does not take them."""
    assert backend_options("ort", {"threads": 2, "fp16": None}) == OrtOptions(threads=2)
    with pytest.raises(ValueError, match=r"^the ort backend takes no stream option \(it takes threads, fp16"):
        backend_options("ort", {"stream": 5, "threads": None})
    with pytest.raises(ValueError, match="the trt backend takes no threads, tensorrt option"):
        backend_options("trt", {"threads": 2, "tensorrt": False})
    from wbsr_runtime.backends import TorchOptions

    with pytest.raises(ValueError, match="the ort backend takes OrtOptions, got TorchOptions"):
        open_runners(load_manifest(gain_bundle), "ort", options=TorchOptions())


def test_lazy_subnets_load_each_once_and_check_every_call(gain_bundle: Path) -> None:
    """The loading every backend shares: one load per subnet however many threads ask at once; batches and
    outputs checked around the backend's own call."""
    manifest, loads = load_manifest(gain_bundle), []

    def load(index: int) -> float:
        loads.append(index)
        time.sleep(0.05)  # a slow load: the other threads arrive meanwhile
        return (1.0, 2.0, 0.5)[index]

    subnets = LazySubnets(manifest, load)
    threads = [threading.Thread(target=subnets.get, args=(1,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [1] and subnets.loaded() == [(1, 2.0)]
    batch = np.random.default_rng(0).random((2, 3, 4, 5), dtype=np.float32)
    out = subnets.run(2, batch, 2, lambda gain, x: nearest(x, 3) * np.float32(gain))
    np.testing.assert_array_equal(out, nearest(batch, 3) * np.float32(0.5))
    with pytest.raises(IndexError, match="subnet 3 out of range 0..2"):
        subnets.get(3)
    with pytest.raises(ValueError, match="exceeds max_batch 1"):
        subnets.run(0, batch, 1, lambda gain, x: x)
    with pytest.raises(ValueError, match=r"expected an \(n, 3, h, w\) batch"):
        subnets.run(0, batch[0], None, lambda gain, x: x)
    from wbsr_runtime.manifest import BundleError

    with pytest.raises(BundleError, match="turns 2x3x4x5 into 2x3x8x10, not the manifest's x3"):
        subnets.run(0, batch, None, lambda gain, x: nearest(x, 2))
    assert loads == [1, 2, 0]
    subnets.clear()
    assert subnets.loaded() == []


def test_ort_feeds_the_tensors_the_manifest_names(gain_bundle: Path, tmp_path: Path) -> None:
    """ONNX Runtime, like TensorRT, feeds and reads the tensors the manifest names; a graph without them is
    a one-line BundleError."""
    import json

    from wbsr_runtime.manifest import BundleError

    copy = Path(shutil.copytree(gain_bundle, tmp_path / "b"))
    data = json.loads((copy / "manifest.json").read_text())
    data["subnets"][1]["input"] = "x"  # manifest.json itself is not hashed
    (copy / "manifest.json").write_text(json.dumps(data))
    batch = np.random.default_rng(0).random((1, 3, 4, 4), dtype=np.float32)
    with open_runners(load_manifest(copy), "ort")[0] as runner:
        np.testing.assert_array_equal(runner.run_subnet(0, batch), nearest(batch, 3))
        with pytest.raises(BundleError, match=r"subnet_01.onnx takes \['lr'\] and gives \['sr'\], the manifest "
                           r"says 'x' -> 'sr'; re-export"):
            runner.run_subnet(1, batch)
