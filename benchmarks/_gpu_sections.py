"""The sections of `gpu_check.py`. Each takes a `Platform` (a CUDA GPU, or the CPU for `--dry-run`) and
returns a JSON-ready dict; `rows` lists are rendered as tables in the markdown report."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GAINS = (1.0, 2.0, 0.5)


@dataclass
class Platform:
    """Where the check runs: `device` "cuda:0" (a GPU) or "cpu" (--dry-run, same code paths, tiny frames)."""

    dry: bool
    device: str
    work: Path  # scratch folder (bundles built here)
    deadline: float  # time.monotonic() after which sections stop early

    @property
    def frame(self) -> tuple[int, int]:
        """LR (height, width) of the throughput frames: 1280 x 720 on a GPU."""
        return (36, 64) if self.dry else (720, 1280)

    def stack(self) -> tuple[Any, Any]:
        """(stand-in tensorrt, cudart): FakeCudart + numpy engines on the CPU, cuda-python + CuPy on a GPU."""
        from tests.trt_standin import CupyKernel, FakeCudart, StandinTensorRT

        if self.dry:
            cudart = FakeCudart()
            return StandinTensorRT(cudart), cudart
        from wbsr_runtime.backends.trt import import_cudart

        cudart = import_cudart()
        return StandinTensorRT(cudart, CupyKernel()), cudart

    def late(self) -> bool:
        return time.monotonic() > self.deadline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def sample(h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 in [0, 1]: the shipped sample image, tiled (real texture, deterministic)."""
    from PIL import Image

    rgb = np.asarray(Image.open(ROOT / "wbsr_runtime" / "samples" / "butterfly.png").convert("RGB"))
    reps = (-(-h // rgb.shape[0]), -(-w // rgb.shape[1]), 1)
    return np.ascontiguousarray(np.tile(rgb, reps)[:h, :w], dtype=np.float32) / 255.0


# --- environment and pytest -----------------------------------------------------------------------------------
def environment(p: Platform) -> dict[str, Any]:
    import importlib.metadata as md

    import onnxruntime

    env: dict[str, Any] = {"python": sys.version.split()[0], "numpy": np.__version__}
    env["onnxruntime"] = f"{onnxruntime.__version__} {onnxruntime.get_available_providers()}"
    for dist in ("torch", "cuda-python", "cuda-bindings", "cupy-cuda12x", "cupy-cuda13x", "tensorrt"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    try:
        import torch

        if torch.cuda.is_available():
            cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
            env["gpu"] = f"{torch.cuda.get_device_name(0)} (compute {cc})"
            env["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    if not p.dry and not env.get("gpu"):
        raise RuntimeError("no CUDA GPU visible to PyTorch")
    return env


def pytest_gpu(p: Platform, log: Path) -> dict[str, Any]:
    """`pytest -m gpu` (dry run: only collected, since CI runs the suite itself)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    cmd += ["--collect-only"] if p.dry else ["-rs"]
    budget = max(30, min(240, int(p.deadline - time.monotonic() - 200)))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    log.write_text(done.stdout + done.stderr)
    summary = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    ok = done.returncode == 0 and ("passed" in summary[0] or p.dry) and "failed" not in summary[0]
    return {"status": "ok" if ok else "failed", "command": " ".join(cmd[2:]), "summary": summary[0], "log": log.name}


# --- torch on the GPU against ONNX Runtime on the CPU ---------------------------------------------------------
@functools.cache
def torch_bundle(scale: int, work: Path) -> tuple[Path, str]:
    """The shipped bundle, or a copy whose .pt2 programs are re-exported when this torch can't load them."""
    import torch

    from wbsr_runtime.upscaler import MODELS_DIR, default_bundle

    shipped = default_bundle(scale)
    try:
        torch.export.load(str(shipped / "subnet_00.pt2"))
        return shipped, "shipped torch programs"
    except Exception as err:  # a .pt2 saved by a newer torch: rebuild the programs from the checkpoint
        from wbsr_export.program import export_subnet_program
        from wbsr_export.slice import extract_subnet
        from wbsr_runtime.manifest import hash_files, read_manifest, write_manifest
        from wbsr_train.checkpoint import load_checkpoint, supernet_from_checkpoint

        copy = Path(shutil.copytree(shipped, work / f"x{scale}", dirs_exist_ok=True))
        ckpt = load_checkpoint(MODELS_DIR / f"x{scale}.pt")
        net = supernet_from_checkpoint(ckpt)
        for i, spec in enumerate(ckpt.specs):
            export_subnet_program(extract_subnet(net, spec), copy / f"subnet_{i:02d}.pt2")
        write_manifest(copy, replace(read_manifest(copy), files=hash_files(copy)).to_dict())
        return copy, f"programs re-exported with torch {torch.__version__} ({type(err).__name__})"


def parity(p: Platform) -> dict[str, Any]:
    """The torch backend (fp32 / fp16, 1 / 2 / 4 workers) against ONNX Runtime CPU on the shipped bundles."""
    from wbsr_runtime.upscaler import Upscaler

    rows, notes = [], {}
    img = sample(40, 44) if p.dry else sample(256, 256)
    for scale in (2, 4):
        bundle, notes[f"x{scale}"] = torch_bundle(scale, p.work)
        with Upscaler(bundle, backend="ort", device="cpu") as ref:
            expected = ref.upscale(img)
        for fp16 in (False, True):
            for workers in (1, 2, 4):
                with Upscaler(bundle, backend="torch", device=p.device, fp16=fp16, workers=workers) as up:
                    up.upscale(img)  # warm-up (loads the programs)
                    t0 = time.perf_counter()
                    out = up.upscale(img)
                    dt = time.perf_counter() - t0
                diff = float(np.abs(out - expected).max())
                precision = "fp16" if fp16 else "fp32"
                rows.append([f"x{scale}", precision, workers, f"{diff:.2e}", f"{psnr(out, expected):.1f}", f"{dt:.3f}"])
    limit = {"fp32": 1e-3, "fp16": 3e-2}  # as wbsr_export.trt.MAX_ABS_DIFF for engines
    ok = all(float(r[3]) <= limit[r[1]] for r in rows)
    header = ["scale", "precision", "workers", "max abs diff vs ORT CPU", "PSNR vs ORT CPU (dB)", "s per image"]
    status = "ok" if ok else "failed"
    return {"status": status, "image": list(img.shape), "bundles": notes, "header": header, "rows": rows}


# --- the device entry points ----------------------------------------------------------------------------------
def standin_bundle(p: Platform, name: str, scale: int, max_batch: int) -> tuple[Path, Any, Any]:
    """A nearest bundle (gains 1, 2, 0.5; patch 8, overlap 2) with stand-in engines built on this platform."""
    from tests.nearest_bundle import build_nearest_bundle
    from tests.trt_standin import add_standin_engines

    trt, cudart = p.stack()
    root = build_nearest_bundle(p.work / name, scale=scale, gains=GAINS, patch=8, overlap=2)
    add_standin_engines(root, trt, cudart, max_batch=max_batch)
    return root, trt, cudart


def entry_points(p: Platform) -> dict[str, Any]:
    """TorchRunner on an external stream with device tensors; TrtRunner.run_subnet_device on device pointers."""
    return {"status": "ok", "torch_run_tensor": _torch_tensors(p), "trt_run_subnet_device": _trt_pointers(p)}


def _torch_tensors(p: Platform) -> dict[str, Any]:
    import torch

    from wbsr_runtime.backends import TorchOptions
    from wbsr_runtime.backends.torch import TorchRunner
    from wbsr_runtime.manifest import load_manifest

    manifest = load_manifest(torch_bundle(2, p.work)[0])
    x = torch.rand(3, 3, 40, 36)
    results = {}
    for kind in ("own stream", "int handle", "torch stream"):
        if p.dry and kind != "own stream":
            continue  # no CUDA streams on the CPU
        ext = torch.cuda.Stream() if not p.dry else None
        stream = {"own stream": None, "int handle": ext and ext.cuda_stream, "torch stream": ext}[kind]
        with TorchRunner(manifest, device=p.device, options=TorchOptions(stream=stream)) as runner:
            lr = x.to(p.device)
            sr = runner.run_tensor(8, lr)
            del lr  # freed while the runner's stream may still read it: record_stream keeps the block
            got = sr.float().cpu().numpy()  # on the caller's stream, which the runner made wait
            want = runner.run_subnet(8, x.numpy())
        results[kind] = float(np.abs(got - want).max())
    if max(results.values()) > 1e-5:
        raise AssertionError(f"run_tensor differs from run_subnet: {results}")
    return results


def _trt_pointers(p: Platform) -> dict[str, Any]:
    from tests.nearest_bundle import nearest
    from tests.trt_standin import installed
    from wbsr_runtime.backends.trt import TrtRunner
    from wbsr_runtime.manifest import load_manifest

    root, trt, cudart = standin_bundle(p, "pointers", scale=4, max_batch=4)
    x = np.random.default_rng(0).random((3, 3, 12, 12), dtype=np.float32)
    with installed(trt, cudart), TrtRunner(load_manifest(root), device=0) as runner:
        if p.dry:
            src, dst = cudart.cudaMalloc(x.nbytes)[1], cudart.cudaMalloc(16 * x.nbytes)[1]
            cudart.cudaMemcpyAsync(src, x.ctypes.data, x.nbytes, 1, runner._stream)
            runner.run_subnet_device(1, src, dst, x.shape)
            runner.synchronize()
            y = np.empty((3, 3, 48, 48), np.float32)
            cudart.cudaMemcpyAsync(y.ctypes.data, dst, y.nbytes, 2, runner._stream)
        else:
            import cupy as cp

            stream = cp.cuda.Stream(non_blocking=True)
            with stream:
                src, dst = cp.asarray(x), cp.empty((3, 3, 48, 48), cp.float32)
            stream.synchronize()
            runner.run_subnet_device(1, src.data.ptr, dst.data.ptr, x.shape, stream=stream.ptr)
            stream.synchronize()
            y = cp.asnumpy(dst)
    diff = float(np.abs(y - 2.0 * nearest(x, 4)).max())
    if diff != 0:
        raise AssertionError(f"run_subnet_device differs from 2 x nearest: {diff}")
    return {"max_abs_diff": diff, "shapes": sorted({s for e in trt.engines for s in e.shapes})}


# --- the trt runner's cuda-python plumbing, stand-in engines ------------------------------------------------
def trt_plumbing(p: Platform) -> dict[str, Any]:
    """Upscaler(backend="trt") on stand-in engines: pinned buffers, async copies, one stream per worker,
    partial batches; compared bit for bit with ONNX Runtime CPU on the same equal tiles."""
    from tests.trt_standin import installed
    from wbsr_runtime.upscaler import Upscaler

    root, trt, cudart = standin_bundle(p, "plumbing", scale=2, max_batch=8)
    img = sample(45, 37) if p.dry else sample(181, 322)  # tile counts that leave partial batches
    with Upscaler(root, backend="ort", device="cpu", merge=0) as ref:
        expected = ref.upscale(img)
    rows = []
    with installed(trt, cudart):
        for workers in (1, 2, 4):
            for chunk in (3, 8):
                with Upscaler(root, backend="trt", device="cuda:0", workers=workers, chunk=chunk) as up:
                    t0 = time.perf_counter()
                    out = up.upscale(img)
                    dt = time.perf_counter() - t0
                rows.append([workers, chunk, up.last_stats.windows, float(np.abs(out - expected).max()), f"{dt:.3f}"])
    shapes = sorted({s for e in trt.engines for s in e.shapes})
    batches = sorted({s[0] for s in shapes})
    clean = not getattr(cudart, "violations", []) and not any(e.refused for e in trt.engines)
    ok = clean and all(r[3] == 0 for r in rows)
    header = ["workers (streams)", "batch", "tiles", "max abs diff vs ORT CPU", "s"]
    return {"status": "ok" if ok else "failed", "batch_sizes_run": batches, "header": header, "rows": rows}


# --- throughput ---------------------------------------------------------------------------------------------
def throughput(p: Platform) -> dict[str, Any]:
    """Frames/s at 1280 x 720 LR -> x2 and x4 on the torch backend (fp16 on a GPU): whole frame, full tiled
    and dynamic (merged windows; and equal tiles), 1 / 2 / 4 streams x batch sizes."""
    from wbsr_runtime.upscaler import Upscaler

    h, w = p.frame
    frame = (sample(h, w) * 255).astype(np.uint8)
    repeats = 1 if p.dry else 3
    configs = [("whole", 1, None, 4)] + [
        (mode, workers, chunk, merge)
        for mode, merge in (("full", 4), ("dynamic", 4), ("dynamic", 0))
        for workers in (1, 2, 4)
        for chunk in ((16,) if p.dry else (4, 16, 64))
        if merge == 4 or chunk == 16
    ]
    rows, skipped = [], 0
    for scale in (2,) if p.dry else (2, 4):
        bundle = torch_bundle(scale, p.work)[0]
        for mode, workers, chunk, merge in configs:
            if p.late():
                skipped += 1
                continue
            opts = {"fp16": not p.dry, "workers": workers, "chunk": chunk, "merge": merge, "mode": mode}
            with Upscaler(bundle, backend="torch", device=p.device, **opts) as up:
                up.upscale(frame)  # warm-up: programs loaded, kernels chosen
                t0 = time.perf_counter()
                for _ in range(repeats):
                    up.upscale(frame)
                dt = (time.perf_counter() - t0) / repeats
                st = up.last_stats
            parts = (st.router_s, st.subnets_s / workers, st.tiling_s / workers)
            split = "/".join(f"{100 * v / max(st.total_s, 1e-9):.0f}" for v in parts)
            label = {"whole": "whole frame", "full": "full, tiled"}.get(mode, "dynamic")
            label += ", equal tiles" if mode == "dynamic" and merge == 0 else ""
            rows.append([f"x{scale}", label, workers, chunk or "-", f"{1 / dt:.2f}", f"{dt:.3f}", st.windows, split])
    header = ["scale", "method", "streams", "batch", "frames/s", "s/frame", "windows", "router/subnets/tiling %"]
    status = "ok" if not skipped else f"partial: {skipped} configurations skipped (time budget)"
    precision = "fp32" if p.dry else "fp16"
    return {"status": status, "frame_lr": [h, w], "precision": precision, "header": header, "rows": rows}
