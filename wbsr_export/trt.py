"""TensorRT engines for a bundle: `wbsr-export --bundle DIR --trt` (and `--ckpt ... --trt`).

Built on the device that will run them (a Jetson has the bundle, TensorRT and cuda-python; no torch, no
checkpoint): this module reads `manifest.json` with the runtime's typed reader and imports neither torch nor
the training code.

Per subnet: a strongly typed network from the fp16 ONNX graph (precision "fp16"; fp16 inside, fp32 I/O, the
only way to get fp16 that also works on TensorRT 11, where `BuilderFlag.FP16` is gone) or the fp32 graph,
one optimisation profile (tiles of patch + 2 x overlap, batch 1..max_batch), one timing cache shared by
all builds and kept in `trt/`, a workspace limit and a builder optimisation level. The plan's file name
carries its cache key (`wbsr_runtime.engines`); an engine already recorded under the same key is reused, any
other file is never loaded. Each new engine is checked against ONNX Runtime CPU on fixed inputs before it is
accepted.

The router gets no engine: it takes int64 boxes and accumulates float64 sums (integral images), which
TensorRT handles poorly or not at all, and it is one cheap pass over the frame, so it stays on ONNX Runtime
CPU on every backend.

The code that touches `tensorrt` is `TensorRTToolchain` and `build_plan` (plus the runner in
`wbsr_runtime.backends.trt`); everything else takes a toolchain object and is tested with a fake one.
NOT exercised by CI or by any run of ours: no machine here has TensorRT.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from wbsr_runtime import defaults
from wbsr_runtime.backends.base import cpu_session
from wbsr_runtime.engines import (
    EngineSpec,
    TensorRTUnavailable,
    engine_file,
    normalize_compute_capability,
    profile_shapes,
)
from wbsr_runtime.manifest import Manifest, SubnetInfo, read_manifest
from wbsr_runtime.manifest import file_sha256 as sha256_file

from .compare import compare

log = logging.getLogger(__name__)

__all__ = [
    "EngineBuild",
    "EngineBuildError",
    "EngineValidationError",
    "MAX_ABS_DIFF",
    "TensorRTToolchain",
    "TensorRTUnavailable",
    "build_engines",
    "build_plan",
    "compare_outputs",
]

# Largest |TensorRT - ONNX Runtime CPU (fp32 graph)| accepted on outputs in ~[0, 1]. fp32 catches real
# regressions (TensorRT 11.1 has a known silent FP32 one) while allowing kernel reordering; fp16 (11-bit
# mantissa through a deep network) allows ~8/255 while still rejecting overflow and garbage, which are O(1).
MAX_ABS_DIFF = {"fp32": 1e-3, "fp16": 3e-2}
VALIDATION_SEED = 0


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph, or the bundle lacks what the build needs."""


class EngineValidationError(EngineBuildError):
    """A built engine disagrees with ONNX Runtime (or produced NaN/inf); it is not written."""


class Toolchain(Protocol):
    """What the build needs from TensorRT; `TensorRTToolchain` is the real one, tests pass a fake."""

    version: str
    gpu_name: str
    compute_capability: str

    def build(
        self,
        onnx_path: Path,
        *,
        input_name: str,
        profile: dict[str, list[int]],
        precision: str,
        workspace: int,
        opt_level: int,
        timing_cache: bytes,
    ) -> tuple[bytes, bytes]: ...  # (plan, updated timing cache)

    def run(self, plan: bytes, batch: np.ndarray, input_name: str, output_name: str) -> np.ndarray: ...


@dataclass(frozen=True)
class BuildSettings:
    precision: str
    profile: dict[str, list[int]]
    workspace: int  # bytes
    opt_level: int
    max_abs_diff: float
    tiling: tuple[int, int]  # (patch, overlap) the profile's tiles are made of


@dataclass
class EngineBuild:
    """What a build adds to a bundle, held in memory until `wbsr_export.attach.commit_engines` writes it:
    the engine records, the new files (bundle-relative path -> bytes: plans and the updated timing cache)
    and the files they supersede (the previous timing cache)."""

    records: list[dict[str, Any]]
    files: dict[str, bytes] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)


def build_engines(
    bundle_dir: Path,
    *,
    precision: str = defaults.ENGINE_PRECISION,
    max_batch: int = 16,
    patch: int | None = None,
    overlap: int | None = None,
    workspace_mb: int = 1024,
    opt_level: int = 3,
    max_abs_diff: float | None = None,
    toolchain: Toolchain | None = None,
) -> EngineBuild:
    """Build (or reuse) one TensorRT engine per subnet of the bundle for this machine's GPU.

    Writes nothing: returns the records for the manifest's `engines` list (docs/bundle.md) with the new plan
    files (`trt/subnet_XX.<key>.plan`) and timing cache (`trt/timing.<machine>.<sha>.cache`) in memory, so a
    failed, refused or interrupted build leaves the bundle as it was; `commit_engines` writes them together
    with the manifest. `patch`/`overlap` default to the bundle's tiling. Raises `TensorRTUnavailable`
    without TensorRT.
    """
    if precision not in MAX_ABS_DIFF:
        raise ValueError(f"precision must be one of {sorted(MAX_ABS_DIFF)}, got {precision!r}")
    toolchain = toolchain if toolchain is not None else TensorRTToolchain()
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    patch = int(manifest.tiling.patch if patch is None else patch)
    overlap = int(manifest.tiling.overlap if overlap is None else overlap)
    settings = BuildSettings(
        precision,
        profile_shapes(patch, overlap, max_batch),
        int(workspace_mb) << 20,
        int(opt_level),
        MAX_ABS_DIFF[precision] if max_abs_diff is None else float(max_abs_diff),
        (patch, overlap),
    )
    cache = TimingCache(bundle_dir, manifest, machine_tag(toolchain))
    log.info("router: no TensorRT engine (int64/float64 graph); it runs on ONNX Runtime CPU")
    build = EngineBuild([])
    for subnet in tqdm(manifest.subnets, desc="TensorRT engines", unit="engine", disable=None):
        record, plan = engine_for_subnet(bundle_dir, manifest, subnet, toolchain, cache, settings)
        build.records.append(record)
        if plan is not None:
            build.files[record["file"]] = plan
    cache.add_to(build)
    return build


def engine_for_subnet(
    bundle_dir: Path,
    manifest: Manifest,
    subnet: SubnetInfo,
    toolchain: Toolchain,
    cache: TimingCache,
    settings: BuildSettings,
) -> tuple[dict[str, Any], bytes | None]:
    """This subnet's (engine record, new plan bytes): (reused record, None) when one with the same key is
    intact, else built and validated (nothing is written)."""
    index = subnet.index
    onnx_rel = onnx_for(subnet, settings.precision)
    spec = EngineSpec(
        sha256_file(bundle_dir / onnx_rel),
        toolchain.version,
        toolchain.gpu_name,
        normalize_compute_capability(toolchain.compute_capability),
        settings.profile,
        settings.precision,
        settings.workspace,
        settings.opt_level,
    )
    reused = reusable_record(bundle_dir, manifest, index, spec.key)
    if reused is not None:
        log.info("subnet %d: reusing %s", index, reused["file"])
        return reused, None
    log.info("subnet %d: building %s engine from %s (minutes)", index, settings.precision, onnx_rel)
    input_name, output_name = subnet.input, subnet.output
    plan, updated = toolchain.build(
        bundle_dir / onnx_rel,
        input_name=input_name,
        profile=settings.profile,
        precision=settings.precision,
        workspace=settings.workspace,
        opt_level=settings.opt_level,
        timing_cache=cache.data,
    )
    cache.update(updated)
    diff = validate_plan(
        bundle_dir / subnet.files["onnx"], plan, toolchain, input_name, output_name, settings
    )
    file = engine_file(index, spec.key)
    log.info("subnet %d: %s accepted, max |TensorRT - ORT| = %.2e", index, file, diff)
    return make_record(index, file, spec, diff, settings.tiling), plan


def make_record(
    target: int | str, file: str, spec: EngineSpec, max_abs_diff: float, tiling: tuple[int, int]
) -> dict[str, Any]:
    """A manifest `engines` entry (fields as in docs/bundle.md)."""
    return {
        "target": target,
        "file": file,
        "key": spec.key,
        "tensorrt": spec.trt_version,
        "gpu": spec.gpu_name,
        "compute_capability": spec.compute_capability,
        "precision": spec.precision,
        "profile": spec.profile,
        "onnx_sha256": spec.onnx_sha256,
        "workspace": spec.workspace,
        "opt_level": spec.opt_level,
        "max_abs_diff_vs_ort": float(max_abs_diff),
        "tiling": {"patch": int(tiling[0]), "overlap": int(tiling[1])},
    }


def reusable_record(bundle_dir: Path, manifest: Manifest, index: int, key: str) -> dict[str, Any] | None:
    """An existing record for `index` with this exact key whose plan file is present and, when the manifest
    lists its hash, intact. A file without such a record (a stale or foreign plan) is never trusted."""
    for record in manifest.engines:
        if record.get("key") != key or str(record.get("target")) != str(index):
            continue
        path = bundle_dir / record.get("file", "")
        expected = manifest.files.get(record.get("file"))
        if path.is_file() and (expected is None or sha256_file(path) == expected):
            return dict(record)
        log.warning("subnet %d: %s is missing or altered; rebuilding", index, record.get("file"))
    return None


def onnx_for(subnet: SubnetInfo, precision: str) -> str:
    rel = subnet.files.get("onnx_fp16" if precision == "fp16" else "onnx")
    if not rel:
        raise EngineBuildError(
            f"subnet {subnet.index} has no {precision} ONNX graph in the bundle; "
            + (
                "re-export with --fp16, or build fp32 engines"
                if precision == "fp16"
                else "the bundle is broken"
            )
        )
    return rel


# --- validation against ONNX Runtime CPU --------------------------------------------------------------------
def validation_batches(profile: dict[str, list[int]], seed: int = VALIDATION_SEED) -> list[np.ndarray]:
    """Fixed inputs in [0, 1] at the profile's smallest and largest batch."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(profile["min"]), tuple(profile["max"])]
    return [rng.random(s, dtype=np.float32) for s in dict.fromkeys(shapes)]


def compare_outputs(
    reference: np.ndarray, output: np.ndarray, max_abs_diff: float, what: str = "engine"
) -> float:
    """max |output - reference|; `EngineValidationError` on a shape mismatch, NaN/inf, or a larger diff."""
    try:
        diff = compare(reference, output)["max_abs"]
    except ValueError:
        shapes = f"output shape {output.shape} != ONNX Runtime's {reference.shape}"
        raise EngineValidationError(f"{what}: {shapes}") from None
    if not math.isfinite(diff):
        raise EngineValidationError(f"{what}: output has NaN or inf (fp16 overflow?); engine rejected")
    if diff > max_abs_diff:
        raise EngineValidationError(
            f"{what}: max |TensorRT - ONNX Runtime| = {diff:.3g} exceeds {max_abs_diff:g}; engine rejected"
        )
    return diff


def ort_reference(onnx_path: Path, batch: np.ndarray, input_name: str, output_name: str) -> np.ndarray:
    session = cpu_session(onnx_path, threads=max(1, min(4, os.cpu_count() or 1)))
    return session.run([output_name], {input_name: batch})[0]


def validate_plan(
    fp32_onnx: Path,
    plan: bytes,
    toolchain: Toolchain,
    input_name: str,
    output_name: str,
    settings: BuildSettings,
) -> float:
    """Worst max-abs diff of the plan vs ONNX Runtime CPU on the fp32 graph, over `validation_batches`."""
    diffs = []
    for batch in validation_batches(settings.profile):
        reference = ort_reference(fp32_onnx, batch, input_name, output_name)
        output = np.asarray(toolchain.run(plan, batch, input_name, output_name))
        diffs.append(
            compare_outputs(reference, output, settings.max_abs_diff, f"{fp32_onnx.stem} {batch.shape}")
        )
    return max(diffs)


# --- files --------------------------------------------------------------------------------------------------
def machine_tag(toolchain: Toolchain) -> str:
    """Timing caches are specific to TensorRT version and GPU: one file per machine kind."""
    cc = normalize_compute_capability(toolchain.compute_capability)
    ident = f"{toolchain.version}|{toolchain.gpu_name}|{cc}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


class TimingCache:
    """This machine's TensorRT timing cache, shared by every build of one `build_engines` call (and later
    ones). Its file is named by its content, `trt/timing.<machine>.<sha12>.cache`, so an update is a new file
    that only the manifest's next commit makes current: the cache and the manifest change together."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, tag: str) -> None:
        self.prefix = f"trt/timing.{tag}."
        self.file = next(
            (r for r in sorted(manifest.files) if r.startswith(self.prefix) and r.endswith(".cache")),
            None,
        )
        self.data = (bundle_dir / self.file).read_bytes() if self.file and (bundle_dir / self.file).is_file() else b""
        self._loaded = self.data

    def update(self, data: bytes) -> None:
        if data:  # an empty result (TensorRT gave no cache) keeps what we had
            self.data = data

    def add_to(self, build: EngineBuild) -> None:
        """Put the updated cache into `build` (and the one it supersedes into `build.replaced`)."""
        if not self.data or self.data == self._loaded:
            return
        build.files[f"{self.prefix}{hashlib.sha256(self.data).hexdigest()[:12]}.cache"] = self.data
        if self.file:
            build.replaced.append(self.file)


# --- the only code here that touches tensorrt ---------------------------------------------------------------
class TensorRTToolchain:
    """TensorRT and this machine's GPU (device `device`), imported lazily."""

    def __init__(self, device: int = 0) -> None:
        from wbsr_runtime.backends.trt import cuda_call, gpu_identity, import_cudart, import_tensorrt

        self.trt, self.cudart, self.device = import_tensorrt(), import_cudart(), int(device)
        self.version = str(self.trt.__version__)
        cuda_call(self.cudart.cudaSetDevice, self.device)
        self.gpu_name, self.compute_capability = gpu_identity(self.cudart, self.device)

    def build(self, onnx_path: Path, **kwargs: Any) -> tuple[bytes, bytes]:
        from wbsr_runtime.backends.trt import trt_logger

        return build_plan(self.trt, trt_logger(self.trt), onnx_path, **kwargs)

    def run(self, plan: bytes, batch: np.ndarray, input_name: str, output_name: str) -> np.ndarray:
        from wbsr_runtime.backends.trt import run_plan_once

        return run_plan_once(self.trt, self.cudart, plan, batch, input_name, output_name, self.device)


def build_plan(
    trt: Any,
    logger: Any,
    onnx_path: Path,
    *,
    input_name: str,
    profile: dict[str, list[int]],
    precision: str,
    workspace: int,
    opt_level: int,
    timing_cache: bytes,
) -> tuple[bytes, bytes]:
    """(serialized plan, updated timing cache) of one ONNX graph: strongly typed, one optimisation profile."""
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # required on 10.x, the default on 11.x
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)  # keep alive until the build: it owns the weights
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    config.builder_optimization_level = int(opt_level)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # "fp32" means fp32: TF32 would exceed MAX_ABS_DIFF["fp32"]
    shapes = builder.create_optimization_profile()
    shapes.set_shape(input_name, profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(shapes)
    cache = timing_cache_for(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT could not build {Path(onnx_path).name} (see the TensorRT log above)"
        )
    return bytes(plan), b"" if cache is None else bytes(cache.serialize())


def timing_cache_for(config: Any, data: bytes) -> Any:
    """Seed `config` with a timing cache made from `data` and return it; an unusable cache (another TensorRT
    or GPU, corrupt) is replaced by an empty one. `create_timing_cache` may return None: then the build runs
    without a timing cache and None is returned."""
    for blob in dict.fromkeys([bytes(data), b""]):  # the stored cache first, then an empty one
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        log.warning("TensorRT refused a %s timing cache", "stored" if blob else "new")
    log.warning("building without a timing cache (slower builds)")
    return None
