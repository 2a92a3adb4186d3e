"""Engine cache keys, profiles and the foreign-engine checks (pure, no TensorRT)."""

from __future__ import annotations

import dataclasses

import pytest

from wbsr_runtime.engines import (
    EngineMismatch,
    EngineSpec,
    check_engine_record,
    engine_file,
    engine_key,
    find_engine,
    merge_engine_records,
    normalize_compute_capability,
    profile_shapes,
)

BASE = dict(
    onnx_sha256="ab" * 32,
    trt_version="10.3.0",
    gpu_name="Orin",
    compute_capability="8.7",
    profile={"min": [1, 3, 80, 80], "opt": [16, 3, 80, 80], "max": [16, 3, 80, 80]},
    precision="fp16",
    workspace=1 << 30,
    opt_level=3,
)
CHANGED = dict(
    onnx_sha256="cd" * 32,
    trt_version="10.3.1",
    gpu_name="NVIDIA GeForce RTX 4090",
    compute_capability="8.9",
    profile={"min": [1, 3, 80, 80], "opt": [8, 3, 80, 80], "max": [16, 3, 80, 80]},
    precision="fp32",
    workspace=1 << 29,
    opt_level=5,
)


def record(**over):
    r = {
        "target": 0,
        "file": "trt/subnet_00.k.plan",
        "key": "k",
        "tensorrt": "10.3.0",
        "gpu": "Orin",
        "compute_capability": "8.7",
        "precision": "fp16",
        "profile": profile_shapes(64, 8, 16),
    }
    return {**r, **over}


def test_key_is_short_stable_and_normalised():
    key = engine_key(**BASE)
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == engine_key(**BASE)
    # equivalent spellings of the same identity give the same key
    assert key == engine_key(**{**BASE, "compute_capability": (8, 7), "gpu_name": " Orin "})
    assert key == EngineSpec(**BASE).key


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_key_changes_with_every_field(name):
    assert engine_key(**{**BASE, name: CHANGED[name]}) != engine_key(**BASE)


def test_spec_fields_are_exactly_the_key_fields():
    assert {f.name for f in dataclasses.fields(EngineSpec)} == set(BASE)


def test_bad_precision_and_profile_rejected():
    with pytest.raises(ValueError, match="precision"):
        engine_key(**{**BASE, "precision": "int8"})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        engine_key(**{**BASE, "profile": {"min": [4, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [8, 3, 8, 8]}})


def test_compute_capability_spellings():
    assert {normalize_compute_capability(c) for c in ["8.7", (8, 7), "sm_87", "87", 8.7]} == {"8.7"}
    assert normalize_compute_capability("12.0") == "12.0"


def test_engine_file_names():
    assert engine_file(3, "abc") == "trt/subnet_03.abc.plan"
    assert engine_file("router", "abc") == "trt/router.abc.plan"
    with pytest.raises(ValueError):
        engine_file("subnet", "abc")


def test_profile_shapes():
    p = profile_shapes(64, 8, 16)
    assert p == {"min": [1, 3, 80, 80], "opt": [16, 3, 80, 80], "max": [16, 3, 80, 80]}
    assert profile_shapes(32, 0, 8, opt_batch=4)["opt"] == [4, 3, 32, 32]
    for bad in [(0, 8, 16, None), (64, -1, 16, None), (64, 8, 0, None), (64, 8, 4, 5)]:
        with pytest.raises(ValueError):
            profile_shapes(*bad)


def test_check_accepts_matching_record():
    check_engine_record(record(), "10.3.0", "Orin", (8, 7))


@pytest.mark.parametrize(
    "here, differs",
    [
        (("10.3.0", "NVIDIA GeForce RTX 4090", "8.9"), "GPU and compute capability differ"),
        (("10.7.0", "Orin", "8.7"), "TensorRT version differ"),
    ],
)
def test_check_mismatch_message(here, differs):
    with pytest.raises(EngineMismatch) as info:
        check_engine_record(record(), *here, bundle="engines/x4")
    msg = str(info.value)
    assert "\n" not in msg and differs in msg
    assert "TensorRT 10.3.0 on Orin (compute 8.7)" in msg
    assert msg.endswith("wbsr-export --bundle engines/x4 --trt")
    assert isinstance(info.value, ValueError)


def test_check_without_bundle_says_dir():
    with pytest.raises(EngineMismatch, match=r"wbsr-export --bundle DIR --trt$"):
        check_engine_record(record(), "10.3.0", "Other", "8.7")


def test_find_engine_picks_this_machines_record():
    here = dict(trt_version="10.3.0", gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9")
    jetson = record(file="trt/subnet_00.j.plan")
    desktop = record(file="trt/subnet_00.d.plan", gpu="NVIDIA GeForce RTX 4090", compute_capability="8.9")
    other_subnet = record(
        target=1, file="trt/subnet_01.d.plan", gpu="NVIDIA GeForce RTX 4090", compute_capability="8.9"
    )
    engines = [jetson, other_subnet, desktop]
    assert find_engine(engines, 0, **here)["file"] == desktop["file"]
    assert find_engine(engines, 1, **here)["file"] == other_subnet["file"]
    assert find_engine(engines, 0, tile=80, precision="fp16", **here)["file"] == desktop["file"]


def test_find_engine_refuses_foreign_or_missing():
    here = dict(trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")
    with pytest.raises(EngineMismatch, match="GPU and compute capability differ.*--trt$"):
        find_engine([record(gpu="RTX", compute_capability="8.9")], 0, **here)
    with pytest.raises(EngineMismatch, match="no TensorRT engine for subnet_02.*--trt$"):
        find_engine([record()], 2, **here)
    with pytest.raises(EngineMismatch, match="no TensorRT engine for subnet_00, 96x96 tiles"):
        find_engine([record()], 0, tile=96, **here)
    with pytest.raises(EngineMismatch, match="fp32"):
        find_engine([record()], 0, precision="fp32", **here)


def test_merge_replaces_same_machine_keeps_others():
    old_here, old_other = record(key="old"), record(key="jet", gpu="Thor", compute_capability="11.0")
    new = record(key="new")
    merged = merge_engine_records([old_here, old_other], [new])
    assert [r["key"] for r in merged] == ["jet", "new"]
