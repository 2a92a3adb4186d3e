"""The torch backend's CUDA stream hygiene, on a CPU, through a fake torch that enforces stream ordering and
the caching allocator's `record_stream` rule (tests/fake_torch.py). The same paths run on a real GPU in
`test_backends.py` (torch-cuda) and `test_gpu_entry_points.py`, marked `gpu`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import fake_torch
from tests.fake_torch import FakeTorch
from tests.nearest_bundle import nearest
from wbsr_runtime.backends import BackendError, TorchOptions, open_runners
from wbsr_runtime.manifest import load_manifest

GAINS = (1.0, 2.0, 0.5)


@pytest.fixture(scope="module")
def program_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_torch.program_bundle(tmp_path_factory.mktemp("tb") / "b", scale=3, gains=GAINS)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTorch:
    return FakeTorch(GAINS, scale=3, devices=2).install(monkeypatch)


@pytest.mark.parametrize("fp16", [False, True])
def test_numpy_path_orders_weights_before_forwards(program_bundle: Path, fake: FakeTorch, fp16: bool) -> None:
    """Weights are moved (and cast to half) on the runner's own stream, so its forwards see them."""
    runners = open_runners(
        load_manifest(program_bundle), "torch", workers=2, device="cuda:1", options=TorchOptions(fp16=fp16)
    )
    batch = np.random.default_rng(0).random((2, 3, 5, 4), dtype=np.float32)
    for runner in runners:
        with runner:
            assert runner.stream.device.index == 1 and runner.device.startswith("cuda:1")
            for m, gain in enumerate(GAINS):
                np.testing.assert_allclose(runner.run_subnet(m, batch), gain * nearest(batch, 3), rtol=1e-3)
    assert fake.violations == [] and fake.unrecorded() == []


def test_run_tensor_on_a_caller_stream(program_bundle: Path, fake: FakeTorch) -> None:
    """The device-tensor entry point: the runner waits for the caller's stream, marks the caller's input as
    used on its own stream, and hands the output back ready (and marked) on the caller's stream."""
    caller = fake.cuda.Stream(device="cuda:0")
    own_stream = TorchOptions(stream=caller.cuda_stream)
    runner = open_runners(load_manifest(program_bundle), "torch", device="cuda:0", options=own_stream)[0]
    own = open_runners(load_manifest(program_bundle), "torch", device="cuda:0")[0]
    x = np.random.default_rng(1).random((1, 3, 4, 6), dtype=np.float32)
    with runner, own, fake.stream_context(fake.current_stream("cuda:0")):  # the caller on the default stream
        for r in (runner, own):
            lr = fake.tensor_on(x)
            sr = r.run_tensor(2, lr)
            fake.use(sr)  # the caller's next stage reads sr on its own stream
            np.testing.assert_allclose(sr.data, 0.5 * nearest(x, 3))
    assert fake.violations == [] and fake.unrecorded() == []


def test_run_tensor_refuses_other_devices_and_default_streams(program_bundle: Path, fake: FakeTorch) -> None:
    manifest = load_manifest(program_bundle)
    with open_runners(manifest, "torch", device="cuda:1")[0] as runner:
        with pytest.raises(ValueError, match="lr is on cuda:0, the runner on cuda:1"):
            runner.run_tensor(0, fake.tensor_on(np.zeros((1, 3, 4, 4)), "cuda:0"))
    with pytest.raises(BackendError, match="default stream"):
        open_runners(manifest, "torch", device="cuda:0", options=TorchOptions(stream=0))


@pytest.mark.gpu
def test_run_tensor_on_a_real_gpu(tiny_bundle: Path) -> None:
    """The same entry point with real CUDA: an external stream (int handle), device tensors, the input freed
    right after the call and its block reused by the caller while the runner may still read it."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from wbsr_runtime.backends.torch import TorchRunner

    ext = torch.cuda.Stream()
    x = torch.rand(4, 3, 48, 40)
    with TorchRunner(load_manifest(tiny_bundle), device="cuda", options=TorchOptions(stream=ext.cuda_stream)) as runner:
        want = runner.run_subnet(3, x.numpy())
        outs = []
        for _ in range(3):
            lr = x.cuda()
            outs.append(runner.run_tensor(3, lr))
            del lr
            torch.rand(4, 3, 48, 40, device="cuda").mul_(7)  # may take the freed block at once
        for sr in outs:
            np.testing.assert_allclose(sr.cpu().numpy(), want, atol=1e-5)
