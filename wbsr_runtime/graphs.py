"""Check that a bundle's ONNX graphs are what its manifest says they are, without the `onnx` package.

The sha256 of every file only proves a file is the one the manifest lists; swapped subnet graphs with their
hashes swapped too (or a hand-edited `scale`, thresholds or class count) pass that check and then run the
wrong network. So at load the runtime reads, from each graph itself:

- subnet graphs (architectures `srresnet`, `rcan` and `lrnet`, the ones wbsr_train builds): the width (the
  input channels of the widest convolution weight), the depth (the number of width x width 3 x 3
  convolutions: 2 per residual block, plus 1 for SRResNet; n_groups x (2 per block + 1) + 1 for RCAN) and the
  scale (the product of the DepthToSpace block sizes);
- the router graph (descriptor "sobel-luma-mean-plus-std/v1"): the K-1 thresholds it compares scores with.

How: the ONNX file is a protobuf message; `protobuf` (a dependency of onnxruntime) parses it against a schema
of the few fields read here (model.graph, graph.node and graph.initializer, a tensor's dims, name and raw
data, a node's inputs, op_type and integer attributes), built at import from field numbers of onnx.proto3;
every other field is skipped by the parser. This costs a few milliseconds per graph. The alternatives were
worse: the `onnx` package is not a runtime dependency (it is 15 MB and the runtime must run on a Jetson
without it), and an onnxruntime session neither lists initializers before its optimiser has folded or renamed
them nor is cheap to build for backends (torch, trt) that never run the ONNX graph.
Not checked: the torch programs (.pt2) and TensorRT engines, which are trusted by their sha256 alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from .manifest import REBUILD, BundleError, Manifest

ROUTER_DESCRIPTOR = "sobel-luma-mean-plus-std/v1"
_DOUBLE = 11  # onnx TensorProto.DOUBLE


def _schema() -> Any:
    """The message class of an ONNX ModelProto reduced to the fields read here (numbers from onnx.proto3)."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="wbsr_onnx_subset.proto", package="wbsr_onnx_subset")
    fields = {
        "Tensor": [("dims", 1, f.TYPE_INT64, ""), ("data_type", 2, f.TYPE_INT32, ""), ("name", 8, f.TYPE_STRING, ""),
                   ("raw_data", 9, f.TYPE_BYTES, "")],
        "Attribute": [("name", 1, f.TYPE_STRING, ""), ("i", 3, f.TYPE_INT64, "")],
        "Node": [("input", 1, f.TYPE_STRING, ""), ("op_type", 4, f.TYPE_STRING, ""),
                 ("attribute", 5, f.TYPE_MESSAGE, "Attribute")],
        "Graph": [("node", 1, f.TYPE_MESSAGE, "Node"), ("initializer", 5, f.TYPE_MESSAGE, "Tensor")],
        "Model": [("graph", 7, f.TYPE_MESSAGE, "Graph")],
    }
    repeated = {"dims", "input", "attribute", "node", "initializer"}
    for message, entries in fields.items():
        m = proto.message_type.add(name=message)
        for name, number, kind, ref in entries:
            label = f.LABEL_REPEATED if name in repeated else f.LABEL_OPTIONAL
            m.field.add(name=name, number=number, type=kind, label=label,
                        type_name=f".wbsr_onnx_subset.{ref}" if ref else None)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("wbsr_onnx_subset.Model"))


_Model = _schema()


@dataclass(frozen=True)
class SubnetGraph:
    """What a subnet graph's weights say: width, depth (as the manifest counts it) and scale."""

    width: int
    depth: int
    scale: int


def _read(path: Path) -> Any:
    try:
        return _Model.FromString(path.read_bytes()).graph
    except (OSError, DecodeError) as e:
        raise ValueError(f"cannot be read as an ONNX graph ({type(e).__name__})") from None


def subnet_graph(path: Path, model: dict[str, Any]) -> SubnetGraph:
    """Width, depth and scale of the subnet graph at `path` for the manifest's `model` (arch, n_groups)."""
    graph = _read(path)
    convs = [tuple(t.dims) for t in graph.initializer if len(t.dims) == 4]
    if not convs:
        raise ValueError("has no convolution weights")
    width = max(c[1] for c in convs)
    square = sum(1 for c in convs if c == (width, width, 3, 3))
    if model.get("arch") == "rcan":
        groups = int(model.get("n_groups", 0)) or 1
        depth = ((square - 1) // groups - 1) // 2
    elif model.get("arch") == "lrnet":
        depth = square // 2
    else:
        depth = (square - 1) // 2
    scale = 1
    for node in graph.node:
        if node.op_type == "DepthToSpace":
            scale *= next((a.i for a in node.attribute if a.name == "blocksize"), 1)
    return SubnetGraph(width, depth, scale)


def router_thresholds(path: Path) -> np.ndarray | None:
    """The float64 thresholds the router graph compares its scores with (GreaterOrEqual), or None."""
    graph = _read(path)
    compared = {name for n in graph.node if n.op_type == "GreaterOrEqual" for name in n.input}
    for t in graph.initializer:
        if t.name in compared and t.data_type == _DOUBLE and t.raw_data:
            return np.frombuffer(t.raw_data, dtype="<f8")
    return None


def _mismatch(m: Manifest, rel: str) -> str | None:
    """What about graph `rel` contradicts the manifest, or None."""
    if rel == m.router.file:
        found = router_thresholds(m.path(rel))
        if found is None or found.tolist() != list(m.router.thresholds):
            return f"does not classify with the manifest's {m.router.num_classes - 1} thresholds"
        return None
    s = next(s for s in m.subnets if rel in s.files.values())
    got, want = subnet_graph(m.path(rel), dict(m.model)), SubnetGraph(s.width, s.depth, m.scale)
    if got == want:
        return None
    return (
        f"holds a subnet of width {got.width}, depth {got.depth}, x{got.scale}, but the manifest says subnet "
        f"{s.index} is width {s.width}, depth {s.depth}, x{m.scale}"
    )


def check_graphs(m: Manifest) -> None:
    """BundleError (one line naming the file) when a graph contradicts the manifest; see the module docs.
    Bundles of other architectures or descriptors (hand-built test bundles) are left to their hashes."""
    graphs = [m.router.file] if m.router.descriptor == ROUTER_DESCRIPTOR else []
    if m.model.get("arch") in ("srresnet", "rcan", "lrnet"):
        graphs += [s.files[k] for s in m.subnets for k in ("onnx", "onnx_fp16") if k in s.files]
    for rel in graphs:
        try:
            problem = _mismatch(m, rel)
        except ValueError as e:
            problem = str(e)
        if problem is not None:
            raise BundleError(f"{m.root}: {rel} {problem}; {REBUILD}")
