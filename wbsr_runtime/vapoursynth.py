"""VapourSynth filter: `upscale(clip)` runs the WBSR runtime on every frame of a clip.

    import vapoursynth as vs
    import wbsr_runtime.vapoursynth as wbsr

    clip = vs.core.bs.VideoSource("in.mp4")
    clip = wbsr.upscale(clip, scale=4, workers=2)
    clip.set_output()

Needs VapourSynth (`pip install "wbsr-deploy[cpu,vapoursynth]"`; its wheels need Python >= 3.12); the rest of the
runtime neither imports nor needs it. Each frame goes through `Upscaler.upscale` (tiling, routing, stitching as
everywhere else); frames are served concurrently, up to `workers` at once, each by its own `Upscaler`.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    import vapoursynth as vs
except ImportError as err:  # the runtime works without it; only this module needs it
    raise ImportError(
        "wbsr_runtime.vapoursynth needs VapourSynth: pip install 'wbsr-deploy[cpu,vapoursynth]' (Python >= 3.12)"
    ) from err

from .fileio import one_line
from .upscaler import Upscaler

# The RGB formats the Upscaler takes as they are: uint8, uint16 (full 16 bits), float16 and float32 samples.
NATIVE = {vs.RGB24.value, vs.RGB48.value, vs.RGBH.value, vs.RGBS.value}
STATS_PROPS = ("WbsrSubnetShare", "WbsrFlops", "WbsrFlopsRatio")


def _error(message: str) -> vs.Error:
    return vs.Error(f"wbsr.upscale: {message}")


def upscale(
    clip: vs.VideoNode,
    bundle: str | Path | None = None,
    scale: int = 4,
    mode: str = "dynamic",
    tolerance: float | None = None,
    budget: float | None = None,
    backend: str = "auto",
    device: str | None = None,
    workers: int | None = None,
    *,
    threads: int | None = None,
    stats: bool = False,
) -> vs.VideoNode:
    """Upscale `clip` by the bundle's scale; returns a clip of the same format family at scale x the size.

    clip: RGB24 / RGB48 / RGBH / RGBS go to the Upscaler as they are; other RGB depths through RGBS; YUV and
    GRAY through RGBS with `core.resize.Bicubic`, using the first frame's `_Matrix` and (integer formats)
    `_Range` for the whole clip, and back to the input's format with the same values (and `_ChromaLocation`).
    Transfer and primaries do not change, so they are not needed. Frame properties are kept (durations,
    scene-change flags, `_SARNum`/`_SARDen`, ...), except an attached `_Alpha`, which is not upscaled.
    bundle / scale / mode / tolerance / budget / backend / device: as for `Upscaler` (`device` is passed only
    when given). workers: frames upscaled at once (like vs-mlrt's `num_streams`; default 1), each by its own
    Upscaler; VapourSynth's `core.num_threads` bounds it too. threads: intra-op threads per Upscaler (default:
    the runtime's; with ONNX Runtime and several workers the CPUs are shared among them). stats: add per-frame
    routing stats as frame properties: `WbsrSubnetShare` (share of the tiles each subnet ran, cheapest first),
    `WbsrFlops` (executed FLOPs) and `WbsrFlopsRatio` (against the full subnet on the whole frame).

    Raises vs.Error with a one-line message for a clip or setting the filter cannot take. An error while a frame
    is rendered reaches the caller as VapourSynth reports errors of Python callbacks: the one-line
    `wbsr.upscale: frame N: ...` message after the callback's traceback.
    """
    if not isinstance(clip, vs.VideoNode):
        raise _error(f"expected a vs.VideoNode, got {type(clip).__name__}")
    if clip.format is None or clip.width == 0 or clip.height == 0:
        raise _error("clips of variable format or size are not supported; give the clip one format and size")
    if workers is not None and workers < 1:
        raise _error(f"workers must be >= 1, got {workers}")
    rgb, back = _to_rgb(clip)
    options: dict[str, Any] = {"scale": scale, "mode": mode, "tolerance": tolerance, "budget": budget}
    options |= {"backend": backend} | ({"device": device} if device is not None else {})
    options |= {"threads": threads} if threads is not None else {}
    ups = _open_upscalers(bundle, options, workers or 1)
    if rgb.width * rgb.height > ups[0].max_pixels:
        raise _error(f"frames of {rgb.width}x{rgb.height} exceed the Upscaler's max_pixels={ups[0].max_pixels}")
    pool: queue.SimpleQueue = queue.SimpleQueue()  # a frame takes an Upscaler and puts it back
    for up in ups:
        pool.put(up)
    s = ups[0].scale
    template = vs.core.std.BlankClip(rgb, width=rgb.width * s, height=rgb.height * s, keep=True)
    select = _frame_function(pool, template.format, template.width, template.height, stats)
    # FrameEval makes a new ModifyFrame per frame: one ModifyFrame instance runs its callback for one frame at
    # a time (fmParallelRequests), so separate instances are what lets VapourSynth's threads render frames
    # concurrently; the pool of Upscalers caps them at `workers`.
    out = template.std.FrameEval(lambda n: template.std.ModifyFrame(rgb, select), clip_src=rgb)
    return back(out)


def _open_upscalers(bundle: str | Path | None, options: dict[str, Any], workers: int) -> list[Upscaler]:
    """`workers` Upscalers. With ONNX Runtime and several workers each gets 1/workers of the CPUs (unless
    `threads` was given), as `open_runners` shares them among an Upscaler's runners."""
    ups: list[Upscaler] = []
    try:
        ups.append(Upscaler(bundle, **options))  # the first also tells which backend "auto" chose
        if workers > 1 and "threads" not in options and ups[0].backend == "ort":
            ups.pop().close()
            options = options | {"threads": max(1, (os.cpu_count() or 1) // workers)}
        while len(ups) < workers:
            ups.append(Upscaler(bundle, **options))
    except Exception as err:  # bundle, backend and knob errors: one line, as everywhere in the runtime
        for up in ups:
            up.close()
        raise _error(one_line(err, 200)) from None
    return ups


def _frame_function(
    pool: queue.SimpleQueue, fmt: vs.VideoFormat, width: int, height: int, stats: bool
) -> Callable[[int, vs.VideoFrame], vs.VideoFrame]:
    """The ModifyFrame callback: RGB frame in -> upscaled frame of `fmt`, `width` x `height`, same props."""

    def select(n: int, f: vs.VideoFrame) -> vs.VideoFrame:
        up = pool.get()  # blocks while `workers` frames are in flight
        try:
            sr = up.upscale(np.stack([np.asarray(f[p]) for p in range(3)], axis=-1))
            st = up.last_stats
        except Exception as err:
            raise _error(f"frame {n}: {type(err).__name__}: {one_line(err, 200)}") from None
        finally:
            pool.put(up)
        out = vs.core.create_video_frame(fmt, width, height)
        for p in range(3):
            np.copyto(np.asarray(out[p]), sr[..., p])
        out.props.update({k: v for k, v in f.props.items() if k != "_Alpha"})
        if stats:
            tiles = sum(st.tiles_per_subnet)
            out.props["WbsrSubnetShare"] = [c / tiles for c in st.tiles_per_subnet]
            out.props["WbsrFlops"] = float(st.flops)
            out.props["WbsrFlopsRatio"] = float(st.flops_ratio)
        return out

    return select


def _frame_props(clip: vs.VideoNode) -> dict[str, int]:
    """resize arguments for converting `clip` (YUV or GRAY) to RGB and back, from its first frame's props."""
    props = clip.get_frame(0).props
    matrix = props.get("_Matrix")
    if matrix is None or matrix == 2:
        state = "missing" if matrix is None else "2 (unspecified)"
        raise _error(
            f"{clip.format.name} clip: frame property _Matrix is {state}, needed to convert to RGB and back; tag "
            "the clip first, e.g. core.std.SetFrameProps(clip, _Matrix=1) for BT.709"
        )
    args = {"matrix": int(matrix)}
    if clip.format.sample_type == vs.INTEGER:
        if "_Range" not in props:
            raise _error(
                f"{clip.format.name} clip: frame property _Range (_ColorRange before R78) is missing, needed to "
                "convert to RGB and back; tag the clip first, e.g. core.std.SetFrameProps(clip, _Range=0) "
                "for limited range"
            )
        args["range"] = int(props["_Range"])
    if "_ChromaLocation" in props:
        args["chromaloc"] = int(props["_ChromaLocation"])
    return args


def _to_rgb(clip: vs.VideoNode) -> tuple[vs.VideoNode, Callable[[vs.VideoNode], vs.VideoNode]]:
    """The RGB clip to upscale, and the function that turns the upscaled clip back into `clip`'s format."""
    fmt = clip.format
    if fmt.id in NATIVE:
        return clip, lambda out: out
    if fmt.color_family == vs.RGB:  # other bit depths: through float, exactly
        rgbs = clip.resize.Point(format=vs.RGBS)
        return rgbs, lambda out: out.resize.Point(format=fmt.id)
    if fmt.color_family not in (vs.YUV, vs.GRAY):
        raise _error(f"unsupported format {fmt.name}; give an RGB, YUV or GRAY clip")
    args = _frame_props(clip)
    inward = {f"{k}_in": v for k, v in args.items() if k != "chromaloc"}  # chroma siting: per frame, from props
    rgbs = clip.resize.Bicubic(format=vs.RGBS, **inward)
    return rgbs, lambda out: out.resize.Bicubic(format=fmt.id, **args)
