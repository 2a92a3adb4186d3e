"""A hand-built bundle whose "subnets" are nearest-neighbour Resize graphs (optionally times a gain), built
with onnx.helper only, so runtime tests can check exact results without torch or a trained model.

Its router ignores the frame: class = 1 + (7 * y0 + 3 * x0) mod K of each box, score = class - 1, with
thresholds 0.5, 1.5, ... so the manifest's thresholds classify the scores consistently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from wbsr_runtime.manifest import (
    SCHEMA_VERSION,
    Manifest,
    RouterInfo,
    Routing,
    SubnetInfo,
    Tiling,
    hash_files,
    write_manifest,
)


def nearest(x: np.ndarray, s: int) -> np.ndarray:
    """Nearest-neighbour upscaling of the last two axes."""
    return np.repeat(np.repeat(x, s, axis=-2), s, axis=-1)


def router_classes(boxes: np.ndarray, k: int) -> np.ndarray:
    """What the stand-in router returns for `boxes` (n, 4): classes in 1..K, from x0 alone (the runtime
    routes band by band, so a box's row offset is not absolute)."""
    x0 = boxes[:, 1]
    return 1 + (x0 + x0 // 5) % k


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def subnet_graph(scale: int, gain: float, path: Path, fp16: bool = False) -> None:
    """lr (N, 3, h, w) -> sr = gain * nearest(lr) (N, 3, h*s, w*s); with `fp16`, computed in float16 between
    casts (fp32 inputs and outputs, as the export's fp16 graphs)."""
    inits = [
        numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales"),
        numpy_helper.from_array(np.array(gain, np.float16 if fp16 else np.float32), "gain"),
    ]
    x, y = ("x", "y") if fp16 else ("lr", "sr")
    nodes = [
        helper.make_node(
            "Resize",
            [x, "", "scales"],
            ["up"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        helper.make_node("Mul", ["up", "gain"], [y]),
    ]
    if fp16:
        nodes = [helper.make_node("Cast", ["lr"], [x], to=TensorProto.FLOAT16), *nodes,
                 helper.make_node("Cast", [y], ["sr"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes,
        "nearest",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        inits,
    )
    _save(graph, path)


def router_graph(k: int, path: Path) -> None:
    inits = [
        numpy_helper.from_array(np.array(v, np.int64), n)
        for v, n in [(1, "c1"), (5, "five"), (k, "k"), (1, "one")]
    ]
    nodes = [
        helper.make_node("Gather", ["boxes", "c1"], ["x0"], axis=1),
        helper.make_node("Div", ["x0", "five"], ["b"]),
        helper.make_node("Add", ["x0", "b"], ["ab"]),
        helper.make_node("Mod", ["ab", "k"], ["m"]),
        helper.make_node("Add", ["m", "one"], ["classes"]),
        helper.make_node("Cast", ["m"], ["scores"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "router",
        [
            helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 3, "H", "W"]),
            helper.make_tensor_value_info("boxes", TensorProto.INT64, ["n", 4]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("classes", TensorProto.INT64, ["n"]),
        ],
        inits,
    )
    _save(graph, path)


def torch_program(scale: int, gain: float, path: Path) -> None:
    """The same subnet as a torch.export program (needs torch; for the torch backend)."""
    import torch

    class Nearest(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            y = x[:, :, :, None, :, None].expand(n, c, h, scale, w, scale).reshape(n, c, h * scale, w * scale)
            return y * gain

    dims = {
        0: torch.export.Dim("N", max=4096),
        2: torch.export.Dim("h", max=8192),
        3: torch.export.Dim("w", max=8192),
    }
    program = torch.export.export(Nearest(), (torch.rand(2, 3, 8, 8),), dynamic_shapes=(dims,))
    torch.export.save(program, str(path))


def build_nearest_bundle(
    out: Path,
    *,
    scale: int = 2,
    gains: tuple[float, ...] = (1.0, 1.0, 1.0),
    k: int = 4,
    patch: int = 8,
    overlap: int = 2,
    torch: bool = False,
    calibrated: bool = True,
    fp16: bool = False,
) -> Path:
    """Write the bundle to `out` (created) and return it; `torch` adds .pt2 programs, `fp16` fp16 graphs."""
    out.mkdir(parents=True, exist_ok=True)
    router_graph(k, out / "router.onnx")
    subnets = []
    for m, gain in enumerate(gains):
        files = {"onnx": f"subnet_{m:02d}.onnx"}
        subnet_graph(scale, gain, out / files["onnx"])
        if fp16:
            files["onnx_fp16"] = f"subnet_{m:02d}.fp16.onnx"
            subnet_graph(scale, gain, out / files["onnx_fp16"], fp16=True)
        if torch:
            files["torch"] = f"subnet_{m:02d}.pt2"
            torch_program(scale, gain, out / files["torch"])
        subnets.append(SubnetInfo(index=m, width=8 * (m + 1), depth=1, flops_per_patch=1024 * (m + 1) ** 2,
                                  flops_patch=32, files=files, input="lr", output="sr"))
    n = len(gains)
    # An MSE table made from PSNRs that rise with cost for every class but the first (flat) one.
    psnr = [[30.0 - 0.5 * c + 0.1 * c * j for j in range(n)] for c in range(k)]
    table = tuple(tuple(255.0**2 / 10 ** (v / 10) for v in row) for row in psnr) if calibrated else None
    manifest = Manifest(
        root=out,
        schema_version=SCHEMA_VERSION,
        name="nearest",
        scale=scale,
        model={},
        input={"layout": "NCHW", "dtype": "float32", "range": [0, 1], "color": "RGB"},
        tiling=Tiling(patch=patch, overlap=overlap),
        router=RouterInfo(
            file="router.onnx",
            inputs={"frame": "frame", "boxes": "boxes"},
            outputs={"scores": "scores", "classes": "classes"},
            num_classes=k,
            thresholds=tuple(c + 0.5 for c in range(k - 1)),
            class_patch=32,
            descriptor="test-stand-in",
        ),
        subnets=tuple(subnets),
        routing=Routing(
            mse_table=table,
            class_freq=(1.0 / k,) * k if calibrated else None,
            tolerance_db=None,
            budget=None,
            class_to_subnet=tuple(min(c, n - 1) for c in range(k)),
        ),
        engines=(),
        files=hash_files(out),
        provenance={},
    )
    write_manifest(out, manifest.to_dict())
    return out
