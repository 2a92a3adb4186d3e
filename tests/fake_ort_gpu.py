"""onnxruntime-gpu as the runtime sees it, on a CPU: the real (CPU) onnxruntime plus CUDA and TensorRT
providers whose sessions compute on the CPU.

The TensorRT provider keeps ORT's convention that matters here: a session builds one engine per explicit
profile (`trt_profile_min/opt/max_shapes`, parsed in ORT's "name:d1xd2x...,name2:..." format; a malformed
string is an error at session creation) and one more engine for every input shape outside it, at run time.
`engine_builds` counts them per session. `fallback=True`: sessions silently get the CPU provider only, as
onnxruntime-gpu does when CUDA libraries are missing.
"""

from __future__ import annotations

from typing import Any


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in text.split(","):
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not all(d.isdigit() for d in dims.split("x")):
            raise ValueError(f"invalid TensorRT profile shape string {text!r}")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


class _Session:
    def __init__(self, fake: FakeGpuOrt, path: str, sess_options: Any, providers: list[Any]) -> None:
        self.fake, self.path = fake, path
        names = [p if isinstance(p, str) else p[0] for p in providers]
        self.providers = ["CPUExecutionProvider"] if fake.fallback else names
        self.profile: tuple[dict, dict] | None = None
        trt = [p[1] for p in providers if not isinstance(p, str) and p[0] == "TensorrtExecutionProvider"]
        if trt and "trt_profile_min_shapes" in trt[0]:
            lo, opt, hi = (parse_shapes(trt[0][f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
            self.profile = (lo, hi)
        self.trt = bool(trt) and not fake.fallback
        self.inner = fake.real.InferenceSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        self.engines: set[Any] = set()
        fake.sessions.append(self)

    def get_providers(self) -> list[str]:
        return self.providers

    def get_inputs(self):
        return self.inner.get_inputs()

    def get_outputs(self):
        return self.inner.get_outputs()

    def run(self, outputs, feeds):
        if self.trt:
            for name, value in feeds.items():
                lo, hi = self.profile or ({}, {})
                inside = name in lo and all(
                    a <= d <= b for a, d, b in zip(lo[name], value.shape, hi[name], strict=True)
                )
                self.engines.add("profile" if inside else (name, value.shape))  # a new engine for a new shape
        return self.inner.run(outputs, feeds)


class FakeGpuOrt:
    """Stands in for the `onnxruntime` module (install into sys.modules["onnxruntime"])."""

    def __init__(self, real: Any, fallback: bool = False) -> None:
        self.real, self.fallback = real, fallback
        self.sessions: list[_Session] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def get_available_providers(self) -> list[str]:
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, path, sess_options=None, providers=None):  # noqa: N802 (ORT's spelling)
        return _Session(self, str(path), sess_options, providers or ["CPUExecutionProvider"])

    def engine_builds(self) -> list[int]:
        """TensorRT engines built, per TensorRT-provider session."""
        return [len(s.engines) for s in self.sessions if s.trt]
