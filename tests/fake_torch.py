"""A fake `torch` with CUDA streams, for testing the torch backend's stream hygiene on a CPU.

It implements only what `wbsr_runtime.backends.torch` uses, computes on numpy, and enforces two rules of real
CUDA + PyTorch, recording each break in `violations`:

- ordering: a kernel on stream S may read a tensor produced on stream P only once S is ordered after that
  work (same stream, or `S.wait_stream(P)` after it); the host may read a device-to-host copy only after
  synchronising its stream. Streams made by `torch.cuda.Stream()` are non-blocking: nothing orders them with
  the default stream.
- allocator: a block allocated on stream A and used on stream B is reused as soon as A is done with it,
  unless `tensor.record_stream(B)` was called (`unrecorded()` lists those tensors).

Modules are what `torch.export.load(...).module()` returns for the bundles of `tests/nearest_bundle.py`:
`gain` x nearest upscaling, with one weight tensor (the gain) that `.half()` and `move_to_device_pass` copy.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np


def program_bundle(root: Path, scale: int, gains: tuple[float, ...]) -> Path:
    """A `tests/nearest_bundle.py` bundle that lists torch programs: placeholder files, which `FakeTorch`
    reads by name (subnet_XX.pt2 -> gains[XX])."""
    from tests.nearest_bundle import build_nearest_bundle
    from wbsr_runtime.manifest import hash_files, read_manifest, write_manifest

    build_nearest_bundle(root, scale=scale, gains=gains)
    manifest = read_manifest(root)
    subnets = tuple(replace(s, files={**s.files, "torch": f"subnet_{s.index:02d}.pt2"}) for s in manifest.subnets)
    for s in subnets:
        (root / s.files["torch"]).write_bytes(b"program")
    write_manifest(root, replace(manifest, subnets=subnets, files=hash_files(root)).to_dict())
    return root


class Device:
    def __init__(self, spec: Any, index: int | None = None) -> None:
        if isinstance(spec, Device):
            spec, index = spec.type, spec.index
        text = str(spec)
        self.type, _, idx = text.partition(":")
        self.index = int(idx) if idx else index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and (self.type, self.index) == (other.type, other.index)

    def __hash__(self) -> int:
        return hash((self.type, self.index))

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


class Stream:
    def __init__(self, fake: FakeTorch, device: Device, name: str) -> None:
        self.fake, self.device, self.name, self.seq = fake, device, name, 0
        self.known: dict[Stream, int] = {}  # stream -> the last of its ops this stream is ordered after
        self.cuda_stream = 1000 + len(fake.streams)
        fake.streams.append(self)

    def wait_stream(self, other: Stream) -> None:
        self.known[other] = max(self.known.get(other, 0), other.seq)
        for s, seq in other.known.items():
            self.known[s] = max(self.known.get(s, 0), seq)

    def synchronize(self) -> None:
        self.fake.host_known[self] = self.seq

    def sees(self, stream: Stream, seq: int) -> bool:
        return stream is self or self.known.get(stream, 0) >= seq


class Tensor:
    def __init__(self, fake: FakeTorch, data: np.ndarray, device: Device, made: tuple[Stream, int] | None) -> None:
        self.fake, self.data, self.device, self.made = fake, data, device, made  # made: (stream, seq) or host
        self.alloc = made[0] if made and device.type == "cuda" else None
        self.used: set[Stream] = set()
        self.recorded: set[Stream] = set()
        fake.tensors.append(self)

    shape = property(lambda self: self.data.shape)

    def record_stream(self, stream: Stream) -> None:
        self.recorded.add(stream)

    def pin_memory(self) -> Tensor:
        return self.fake.op([self], lambda x: x.copy(), Device("cpu"))

    def to(self, device: Any, non_blocking: bool = False) -> Tensor:
        device = Device(device)
        out = self.fake.op([self], lambda x: x.copy(), device)
        if device.type == "cpu" and not non_blocking:
            out.made[0].synchronize()
        return out

    def half(self) -> Tensor:
        return self.fake.op([self], lambda x: x.astype(np.float16), self.device)

    def float(self) -> Tensor:
        return self.fake.op([self], lambda x: x.astype(np.float32), self.device)

    def numpy(self) -> np.ndarray:
        if self.device.type != "cpu":
            raise TypeError("can't convert cuda tensor to numpy")
        if self.made and self.made[0].device.type == "cuda":
            stream, seq = self.made
            if self.fake.host_known.get(stream, 0) < seq:
                self.fake.violations.append("host read a device-to-host copy before synchronising its stream")
        return self.data


class Module:
    def __init__(self, fake: FakeTorch, gain: float, scale: int, weight: Tensor) -> None:
        self.fake, self.gain, self.scale, self.weight = fake, gain, scale, weight

    def half(self) -> Module:
        return Module(self.fake, self.gain, self.scale, self.weight.half())

    def __call__(self, x: Tensor) -> Tensor:
        s = self.scale

        def up(a: np.ndarray, w: np.ndarray) -> np.ndarray:
            return (w * a.repeat(s, 2).repeat(s, 3)).astype(a.dtype)

        return self.fake.op([x, self.weight], up, x.device)


class FakeTorch:
    """The fake module; `install(monkeypatch)` puts it (and torch.export.passes) into sys.modules."""

    __version__ = "0.0-fake"
    float32 = np.float32

    def __init__(self, gains: tuple[float, ...], scale: int, devices: int = 1) -> None:
        self.gains, self.scale, self.devices = gains, scale, devices
        self.streams: list[Stream] = []
        self.tensors: list[Tensor] = []
        self.violations: list[str] = []
        self.host_known: dict[Stream, int] = {}
        self._tls = threading.local()
        self.defaults = {i: Stream(self, Device("cuda", i), f"default:{i}") for i in range(devices)}
        self.device = Device
        self.cuda = SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: devices,
            get_device_name=lambda d=None: "Fake CUDA GPU",
            Stream=lambda device=None: Stream(self, Device(device or "cuda:0"), f"stream{len(self.streams)}"),
            ExternalStream=self._external,
            current_stream=self.current_stream,
            stream=self.stream_context,
        )
        self.export = SimpleNamespace(load=self._load)

    # --- streams ---------------------------------------------------------------------------------------------
    def _external(self, handle: int, device: Any = None) -> Stream:
        for s in self.streams:
            if s.cuda_stream == handle:
                return s
        return Stream(self, Device(device or "cuda:0"), f"external{handle}")

    def current_stream(self, device: Any = None) -> Stream:
        index = Device(device or "cuda:0").index or 0
        return getattr(self._tls, "current", {}).get(index, self.defaults[index])

    @contextlib.contextmanager
    def stream_context(self, stream: Stream):
        current = dict(getattr(self._tls, "current", {}))
        self._tls.current = {**current, stream.device.index: stream}
        try:
            yield
        finally:
            self._tls.current = current

    # --- tensors and ops -------------------------------------------------------------------------------------
    def from_numpy(self, a: np.ndarray) -> Tensor:
        return Tensor(self, a, Device("cpu"), None)

    def tensor_on(self, data: np.ndarray, device: str = "cuda:0") -> Tensor:
        """A device tensor produced by the caller on its current stream (what a pipeline hands over)."""
        return self.op([], lambda: np.asarray(data, np.float32), Device(device))

    def use(self, t: Tensor) -> Tensor:
        """The caller reads `t` on its current stream (e.g. the next stage of its pipeline)."""
        return self.op([t], lambda x: x.copy(), t.device)

    def op(self, reads: list[Tensor], fn: Any, device: Device) -> Tensor:
        cuda = [t.device for t in reads if t.device.type == "cuda"] + ([device] if device.type == "cuda" else [])
        stream = self.current_stream(cuda[0]) if cuda else None
        for t in reads:
            if t.device.type == "cuda":
                t.used.add(stream)
                if t.device != stream.device:
                    self.violations.append(f"{stream.name} read a tensor of {t.device}")
            if t.made and t.made[0].device.type == "cuda" and stream is not None and not stream.sees(*t.made):
                self.violations.append(f"{stream.name} read a tensor before {t.made[0].name} finished it")
        out = fn(*[t.data for t in reads])
        if stream is None:
            return Tensor(self, out, device, None)
        stream.seq += 1
        return Tensor(self, out, device, (stream, stream.seq))

    def unrecorded(self) -> list[str]:
        """Tensors used on a stream other than their allocation stream without record_stream."""
        return [
            f"tensor allocated on {t.alloc.name} used on {s.name} without record_stream"
            for t in self.tensors
            if t.alloc is not None
            for s in t.used - {t.alloc} - t.recorded
        ]

    @contextlib.contextmanager
    def inference_mode(self):
        yield

    def set_num_threads(self, n: int) -> None:
        pass

    # --- torch.export -----------------------------------------------------------------------------------------
    def _load(self, path: str) -> Any:
        index = int(str(path).rsplit("subnet_", 1)[1][:2])
        weight = self.from_numpy(np.array(self.gains[index], np.float32))
        return SimpleNamespace(module=lambda: Module(self, self.gains[index], self.scale, weight), weight=weight)

    def move_to_device_pass(self, program: Any, device: Device) -> Any:
        weight = program.weight.to(device)  # copied on the current stream, as the real pass does
        gain = program.module().gain
        return SimpleNamespace(module=lambda: Module(self, gain, self.scale, weight), weight=weight)

    def install(self, monkeypatch: Any) -> FakeTorch:
        passes = ModuleType("torch.export.passes")
        passes.move_to_device_pass = self.move_to_device_pass
        self.__spec__ = importlib.machinery.ModuleSpec("torch", None)  # importlib.util.find_spec reads it
        monkeypatch.setitem(sys.modules, "torch", self)
        monkeypatch.setitem(sys.modules, "torch.export", self.export)
        monkeypatch.setitem(sys.modules, "torch.export.passes", passes)
        return self
