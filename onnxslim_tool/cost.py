"""Cost analysis: multiply-accumulates (MACs) and parameter counts of an ONNX model.

``analyze_cost(model)`` never touches the model it is given: it serialises a copy, fixes the dynamic
input dims on that copy, runs ONNX shape inference on it, and reads shapes back by value name.

Rules (documented here because reports quote these numbers):

* Constants. A value is *constant* when it is an initializer, a ``Constant`` output, or the output of a
  node whose inputs are all constant (``ConstantOfShape`` fed by a shape initializer, as in the light
  model zoo, or ``DequantizeLinear`` of a quantized weight). Such weight-preprocessing nodes are not
  layers; their outputs are counted as weights of the layers that consume them.
* Weights. A constant tensor counts as parameters unless it is a scalar / one-element tensor
  (epsilons, scales, zero points), a string tensor, or an int32/int64 tensor of rank <= 1 (shapes, axes,
  indices, pads). ``MatMulNBits`` packed weights count as their logical ``N x K`` elements.
* ``total_params`` sums each *source* tensor once: initializers, ``Constant`` outputs and
  ``ConstantOfShape`` outputs whose shape input is constant. ``LayerCost.params`` sums the weight inputs
  of one node, so a tensor shared by two layers appears in both.
* ``weight_bytes`` is the bytes of tensor data stored in the model: initializers plus ``Constant``
  tensors (``ConstantOfShape`` placeholders store no data).
* MACs are counted for Conv, ConvInteger, QLinearConv, ConvTranspose, Gemm, MatMul, MatMulInteger,
  QLinearMatMul and MatMulNBits of the top-level graph. Nodes inside subgraphs (If/Loop/Scan bodies)
  and functions are not analysed; ``node_count`` and ``op_histogram`` also cover the top-level graph.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxslim_tool import runtime
from onnxslim_tool.errors import OnnxSlimError

__all__ = ["LayerCost", "ModelCost", "analyze_cost"]

Dim = int | str | None
Shape = tuple[Dim, ...]
StaticShape = tuple[int, ...]

# Larger initializers reach shape inference as typed graph inputs, not data: shape inference only
# needs the values of small tensors (shapes, axes), and this keeps the copy far below protobuf's 2 GB.
_BIG_INITIALIZER_ELEMENTS = 1024
_STANDARD_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
_INDEX_DTYPES = frozenset({ir.DataType.INT32, ir.DataType.INT64})
# Nodes that produce fresh values on every run even from constant inputs.
_NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


@dataclass
class LayerCost:
    """Cost of one compute node of the top-level graph."""

    name: str
    op_type: str
    weight_shape: tuple[int, ...] | None
    params: int
    macs: int
    output_shape: Shape | None
    note: str | None = None
    # "weight": multiplies by a constant weight; "activation": all operands are runtime tensors.
    kind: str = "weight"

    def to_dict(self, total_macs: int) -> dict[str, Any]:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "kind": self.kind,
            "weight_shape": _jsonable_shape(self.weight_shape),
            "params": self.params,
            "macs": self.macs,
            "share": self.macs / total_macs if total_macs else 0.0,
            "output_shape": _jsonable_shape(self.output_shape),
            "note": self.note,
        }


@dataclass
class ModelCost:
    """Whole-model cost summary; see the module docstring for the counting rules."""

    layers: list[LayerCost]
    total_macs: int
    total_params: int
    weight_bytes: int
    inputs: list[tuple[str, Shape | None, str | None]]
    outputs: list[tuple[str, Shape | None, str | None]]
    op_histogram: dict[str, int]
    node_count: int
    assumed_dims: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "weight_bytes": self.weight_bytes,
            "node_count": self.node_count,
            "op_histogram": dict(self.op_histogram),
            "inputs": [_io_dict(entry) for entry in self.inputs],
            "outputs": [_io_dict(entry) for entry in self.outputs],
            "assumed_dims": {name: list(dims) for name, dims in self.assumed_dims.items()},
            "notes": list(self.notes),
            "layers": [layer.to_dict(self.total_macs) for layer in self.layers],
        }


def _jsonable_shape(shape: Sequence[Dim] | None) -> list[Dim] | None:
    return None if shape is None else list(shape)


def _io_dict(entry: tuple[str, Shape | None, str | None]) -> dict[str, Any]:
    name, shape, dtype = entry
    return {"name": name, "shape": _jsonable_shape(shape), "dtype": dtype}


class _ShapeUnknown(Exception):
    """A MAC rule lacks a shape it needs; the message becomes the layer's note."""


# --------------------------------------------------------------------------- input dims


def _ir_dims(shape: ir.Shape | None) -> Shape | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value for d in shape.dims)


def _real_inputs(graph: ir.Graph) -> list[ir.Value]:
    # IR v3 models list their initializers among the inputs; those are weights, not feeds.
    return [v for v in graph.inputs if not v.is_initializer()]


def _check_dims(name: str, dims: Sequence[int]) -> StaticShape:
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise OnnxSlimError(f"input_shapes[{name!r}] = {list(dims)} must contain positive integers only")
    return tuple(dims)


def _resolve_inputs(
    inputs: list[ir.Value], input_shapes: Mapping[str, Sequence[int]], default_dim: int, notes: list[str]
) -> tuple[dict[str, StaticShape], dict[str, list[int]]]:
    """Concrete dims for every input: given ones from ``input_shapes``, else ``default_dim`` per unknown."""
    by_name = {v.name: v for v in inputs}
    for name in input_shapes:
        if name not in by_name:
            known = ", ".join(str(n) for n in by_name) or "(none)"
            raise OnnxSlimError(
                f"input_shapes names {name!r}, which is not a model input; inputs are: {known}"
            )
    fixed: dict[str, StaticShape] = {}
    assumed: dict[str, list[int]] = {}
    for value in inputs:
        name = str(value.name)
        dims = _ir_dims(value.shape)
        if name in input_shapes:
            fixed[name] = _given_shape(name, dims, input_shapes[name])
        elif dims is None:
            notes.append(
                f"input {name!r} has no shape; pass input_shapes to analyse layers that depend on it"
            )
        elif all(isinstance(d, int) for d in dims):
            fixed[name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
        else:
            fixed[name] = tuple(d if isinstance(d, int) else default_dim for d in dims)
            assumed[name] = list(fixed[name])
    return fixed, assumed


def _given_shape(name: str, dims: Shape | None, given: Sequence[int]) -> StaticShape:
    shape = _check_dims(name, list(given))
    if dims is None:
        return shape
    if len(dims) != len(shape):
        raise OnnxSlimError(
            f"input_shapes[{name!r}] has rank {len(shape)} but model input {name!r} has rank {len(dims)} "
            f"(shape {list(dims)})"
        )
    for axis, (declared, wanted) in enumerate(zip(dims, shape, strict=True)):
        if isinstance(declared, int) and declared != wanted:
            raise OnnxSlimError(
                f"input_shapes[{name!r}] sets dim {axis} to {wanted} but the model fixes it to {declared}"
            )
    return shape


# --------------------------------------------------------------------------- shape inference


_ValueInfo = tuple[Shape | None, ir.DataType | None]


def _set_dims(value_info: onnx.ValueInfoProto, dims: StaticShape) -> None:
    shape = value_info.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        shape.dim.add().dim_value = d


def _strip_big_initializers(graph: onnx.GraphProto) -> None:
    input_names = {vi.name for vi in graph.input}
    for index in reversed(range(len(graph.initializer))):
        tensor = graph.initializer[index]
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if math.prod(tensor.dims) <= _BIG_INITIALIZER_ELEMENTS and not external:
            continue
        if tensor.name not in input_names:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
        del graph.initializer[index]


def _proto_value_infos(graph: onnx.GraphProto) -> dict[str, _ValueInfo]:
    table: dict[str, _ValueInfo] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if not vi.type.HasField("tensor_type"):
            continue  # sequences / optionals carry no tensor shape
        tensor_type = vi.type.tensor_type
        dtype = ir.DataType(tensor_type.elem_type) if tensor_type.elem_type else None
        shape: Shape | None = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor_type.shape.dim
            )
        table[vi.name] = (shape, dtype)
    return table


def value_shapes(model: ir.Model, notes: list[str] | None = None) -> dict[str, tuple]:
    """Inferred dims by value name (ints, or str/None where dynamic); the model is not changed."""
    inferred = _infer_shapes(model, {}, notes if notes is not None else [])
    return {name: shape for name, (shape, _) in inferred.items() if shape is not None}


def _infer_shapes(model: ir.Model, fixed: dict[str, StaticShape], notes: list[str]) -> dict[str, _ValueInfo]:
    """Shapes and dtypes by value name, inferred on a serialised copy with ``fixed`` input dims."""
    proto = ir.to_proto(model)
    for value_info in proto.graph.input:
        if value_info.name in fixed and value_info.type.HasField("tensor_type"):
            _set_dims(value_info, fixed[value_info.name])
    _strip_big_initializers(proto.graph)
    # onnx cannot infer through contrib ops (MatMulNBits): their outputs get a shape from our
    # rule and inference runs again from there, once per contrib op on a chain at most.
    for _ in range(1 + sum(n.op_type in _CONTRIB_SHAPES for n in proto.graph.node)):
        try:
            proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - inference is best effort; the stored shapes still help
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notes.append(f"ONNX shape inference failed ({reason}); using the shapes stored in the model")
            break
        if not _add_contrib_shapes(proto.graph):
            break
    return _proto_value_infos(proto.graph)


def _unresolved(graph: ir.Graph, inferred: dict[str, _ValueInfo], consts: set[ir.Value]) -> list[ir.Value]:
    """Values the MAC rules read whose shape neither inference nor the stored shapes fix."""
    table, wanted = _ShapeTable(inferred), {}
    for node in graph:
        if node.op_type not in _MAC_RULES or node.domain not in _STANDARD_DOMAINS:
            continue
        for value in [*node.inputs, *node.outputs]:
            if value is None or value in consts or table.static(value) is not None:
                continue
            # A value declared with an undefined type cannot be asked of onnxruntime (one that
            # declares nothing can); its neighbours usually tell.
            if value.dtype != ir.DataType.UNDEFINED:
                wanted[value.name] = value
    return list(wanted.values())


def _measured_shapes(
    model: ir.Model, fixed: dict[str, StaticShape], values: Sequence[ir.Value], notes: list[str]
) -> dict[str, _ValueInfo]:
    """Shapes of `values` read from one onnxruntime run on zero inputs of the fixed dims.

    ONNX shape inference stops at shapes computed from data it cannot fold (a Slice whose end
    is Shape(x)[1], a Range over a sequence length), which leaves every MatMul of a
    transformer after it uncounted. One run at the dims the report assumes settles them.
    """
    inputs = _real_inputs(model.graph)
    if not values or any(v.name not in fixed or v.dtype is None for v in inputs):
        return {}
    try:
        feed = {v.name: np.zeros(fixed[v.name], dtype=v.dtype.numpy()) for v in inputs}
        (outputs,) = runtime.stream_tensors(model, [v.name for v in values], [feed], prune=True)
    except Exception as exc:  # noqa: BLE001 - best effort: without it the values stay unknown
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        notes.append(f"{len(values)} shape(s) left unknown: a run to measure them failed ({reason})")
        return {}
    notes.append(f"{len(values)} shape(s) ONNX inference could not fix were read from a run on zero inputs")
    return {
        name: (tuple(int(d) for d in array.shape), ir.DataType.from_numpy(array.dtype))
        for name, array in outputs.items()
    }


def _matmul_nbits_shape(node: onnx.NodeProto, inputs: list[Shape | None]) -> Shape | None:
    """[..., K] x packed [N, K] -> [..., N]."""
    n = next((a.i for a in node.attribute if a.name == "N"), None)
    return None if not inputs or inputs[0] is None or n is None else (*inputs[0][:-1], n)


_CONTRIB_SHAPES = {"MatMulNBits": _matmul_nbits_shape}


def _more_static(new: Shape, old: Shape | None) -> bool:
    def fixed(shape: Shape) -> int:
        return sum(isinstance(d, int) for d in shape)

    return old is None or fixed(new) > fixed(old)


def _add_contrib_shapes(graph: onnx.GraphProto) -> bool:
    """Give contrib ops' outputs the shape their rule derives (replacing a stored shape with
    symbolic dims, as quantizers write them); True when any shape changed."""
    known = _proto_value_infos(graph)
    stored = {vi.name: vi for vi in graph.value_info}
    added = False
    for node in graph.node:
        rule = _CONTRIB_SHAPES.get(node.op_type)
        if rule is None or not node.output:
            continue
        first = known.get(node.input[0]) if node.input else None
        shape = rule(node, [first[0] if first else None])
        current = known.get(node.output[0], (None, None))[0]
        if shape is None or current == shape or not _more_static(shape, current):
            continue
        dtype = first[1] if first and first[1] is not None else ir.DataType.FLOAT
        info = onnx.helper.make_tensor_value_info(node.output[0], int(dtype), list(shape))
        if node.output[0] in stored:
            stored[node.output[0]].CopyFrom(info)
        else:
            graph.value_info.append(info)
        added = True
    return added


class _ShapeTable:
    """Shape/dtype look-ups: constant data first, then inferred shapes, then what the IR stores."""

    def __init__(self, inferred: dict[str, _ValueInfo]) -> None:
        self._inferred = inferred

    def shape(self, value: ir.Value | None) -> Shape | None:
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(value.const_value.shape.dims)
        hit = self._inferred.get(str(value.name))
        if hit is not None and hit[0] is not None:
            return hit[0]
        return _ir_dims(value.shape)

    def static(self, value: ir.Value | None) -> StaticShape | None:
        shape = self.shape(value)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        if value.const_value is not None:
            return value.const_value.dtype
        hit = self._inferred.get(str(value.name))
        if hit is not None and hit[1] is not None:
            return hit[1]
        return value.dtype


# --------------------------------------------------------------------------- constants and weights


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()
    )


def _constant_values(graph: ir.Graph) -> set[ir.Value]:
    """Values whose content is fixed before the model runs (one forward pass in topological order)."""
    consts: set[ir.Value] = set(graph.initializers.values())
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            consts.update(node.outputs)
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or node.op_type in _NONDETERMINISTIC_OPS or _has_subgraph(node):
            continue
        if all(v in consts for v in inputs):
            consts.update(node.outputs)
    return consts


def _is_weight(shape: StaticShape, dtype: ir.DataType | None) -> bool:
    if math.prod(shape) <= 1 or dtype == ir.DataType.STRING:
        return False  # scalars are hyper-parameters (eps, scale, zero point), not learned tensors
    return not (dtype in _INDEX_DTYPES and len(shape) <= 1)  # shapes, axes, indices, pads


def _nbits_logical_sizes(graph: ir.Graph) -> dict[ir.Value, int]:
    # MatMulNBits packs several weights per byte; report the logical N x K elements instead.
    sizes: dict[ir.Value, int] = {}
    for node in graph:
        if node.op_type == "MatMulNBits" and len(node.inputs) > 1 and node.inputs[1] is not None:
            k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
            if k and n:
                sizes[node.inputs[1]] = k * n
    return sizes


def _source_constants(graph: ir.Graph, consts: set[ir.Value]) -> list[ir.Value]:
    sources = list(graph.initializers.values())
    for node in graph:
        if node.op_type == "Constant" or (node.op_type == "ConstantOfShape" and node.outputs[0] in consts):
            sources.extend(node.outputs)
    return sources


def _total_params(
    sources: list[ir.Value], shapes: _ShapeTable, logical: dict[ir.Value, int], notes: list[str]
) -> int:
    total = 0
    unknown = []
    for value in sources:
        shape = shapes.static(value)
        if shape is None:
            unknown.append(str(value.name))
        elif _is_weight(shape, shapes.dtype(value)):
            total += logical.get(value, math.prod(shape))
    if unknown:
        notes.append(f"{len(unknown)} constant tensor(s) of unknown shape not counted in total_params")
    return total


def _constant_tensor_bytes(node: ir.Node) -> int:
    attr = node.attributes.get("value")
    if attr is not None and attr.type == ir.AttributeType.TENSOR:
        return int(attr.value.nbytes)
    floats, ints = node.attributes.get("value_floats"), node.attributes.get("value_ints")
    return 4 * len(floats.value) if floats is not None else 8 * len(ints.value) if ints is not None else 0


def _weight_bytes(graph: ir.Graph) -> int:
    stored = sum(int(v.const_value.nbytes) for v in graph.initializers.values() if v.const_value is not None)
    return stored + sum(_constant_tensor_bytes(n) for n in graph if n.op_type == "Constant")


# --------------------------------------------------------------------------- MAC rules


@dataclass(frozen=True)
class _NodeView:
    """What a MAC rule may read about one node."""

    node: ir.Node
    shapes: _ShapeTable
    consts: set[ir.Value]

    def value(self, index: int) -> ir.Value | None:
        return self.node.inputs[index] if index < len(self.node.inputs) else None

    def in_shape(self, index: int) -> StaticShape | None:
        return self.shapes.static(self.value(index))

    def need_in(self, index: int, what: str) -> StaticShape:
        shape = self.in_shape(index)
        if shape is None:
            raise _ShapeUnknown(f"{what} shape unknown")
        return shape

    def out_shape(self) -> StaticShape | None:
        return self.shapes.static(self.node.outputs[0]) if self.node.outputs else None

    def is_const(self, index: int) -> bool:
        value = self.value(index)
        return value is not None and value in self.consts

    def ints(self, name: str, default: Sequence[int]) -> list[int]:
        got = self.node.attributes.get_ints(name)
        return list(got) if got is not None else list(default)


def _conv_out_spatial(view: _NodeView, in_spatial: StaticShape, kernel: Sequence[int]) -> list[int]:
    """Output spatial dims per the ONNX Conv spec, for when shape inference gave none."""
    rank = len(in_spatial)
    strides = view.ints("strides", [1] * rank)
    dilations = view.ints("dilations", [1] * rank)
    pads = view.ints("pads", [0] * 2 * rank)
    auto_pad = view.node.attributes.get_string("auto_pad", "NOTSET")
    out = []
    for axis in range(rank):
        span = (kernel[axis] - 1) * dilations[axis] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-in_spatial[axis] // strides[axis]))
        else:
            padded = in_spatial[axis] + (pads[axis] + pads[axis + rank] if auto_pad == "NOTSET" else 0)
            out.append((padded - span) // strides[axis] + 1)
    return out


def _conv_macs(view: _NodeView, x: int = 0, w: int = 1) -> int:
    """N x C_out x prod(out spatial) x (C_in / groups) x prod(kernel); W is [C_out, C_in/groups, k...]."""
    weight = view.in_shape(w)
    if weight is not None:
        c_out, per_output, kernel = weight[0], math.prod(weight[1:]), weight[2:]
    else:
        data = view.need_in(x, "input and weight")
        kernel = tuple(view.ints("kernel_shape", []))
        output = view.out_shape()
        if not kernel or output is None:
            raise _ShapeUnknown("weight shape unknown")
        c_out = output[1]
        per_output = data[1] // view.node.attributes.get_int("group", 1) * math.prod(kernel)
    output = view.out_shape()
    if output is None:
        data = view.need_in(x, "input and output")
        output = (data[0], c_out, *_conv_out_spatial(view, data[2:], kernel))
    return math.prod(output) * per_output


def _conv_transpose_macs(view: _NodeView) -> int:
    """N x C_in x prod(in spatial) x (C_out / groups) x prod(kernel); W is [C_in, C_out/groups, k...]."""
    data = view.need_in(0, "input")
    weight = view.in_shape(1)
    if weight is not None:
        return math.prod(data) * math.prod(weight[1:])
    kernel = view.ints("kernel_shape", [])
    output = view.out_shape()
    if not kernel or output is None:
        raise _ShapeUnknown("weight shape unknown")
    return math.prod(data) * output[1] // view.node.attributes.get_int("group", 1) * math.prod(kernel)


def _gemm_macs(view: _NodeView) -> int:
    """M x K x N with A: [M, K] (or [K, M] when transA) and B: [K, N] (or [N, K] when transB)."""
    a, b, y = view.in_shape(0), view.in_shape(1), view.out_shape()
    m = k = n = None
    if a is not None:
        m, k = (a[1], a[0]) if view.node.attributes.get_int("transA", 0) else (a[0], a[1])
    if b is not None:
        k_b, n = (b[1], b[0]) if view.node.attributes.get_int("transB", 0) else (b[0], b[1])
        k = k if k is not None else k_b
    if y is not None:
        m = m if m is not None else y[0]
        n = n if n is not None else y[1]
    if m is None or k is None or n is None:
        raise _ShapeUnknown("operand shapes unknown")
    return m * k * n


def _broadcast(left: StaticShape, right: StaticShape) -> StaticShape:
    rank = max(len(left), len(right))
    left, right = (1,) * (rank - len(left)) + left, (1,) * (rank - len(right)) + right
    out = []
    for p, q in zip(left, right, strict=True):
        if p != q and 1 not in (p, q):
            raise _ShapeUnknown(f"batch dims {left} and {right} do not broadcast")
        out.append(max(p, q))
    return tuple(out)


def _matmul_macs(view: _NodeView, a: int = 0, b: int = 1) -> int:
    """numpy.matmul semantics: broadcast batch x M x K x N, with 1-D operands promoted then squeezed."""
    left, right = view.in_shape(a), view.in_shape(b)
    if left is not None and right is not None:
        if not left or not right:
            raise _ShapeUnknown("MatMul of a scalar")
        left = (1, *left) if len(left) == 1 else left
        right = (*right, 1) if len(right) == 1 else right
        return math.prod(_broadcast(left[:-2], right[:-2])) * left[-2] * left[-1] * right[-1]
    # Every output element is a K-long dot product, so the output shape plus K suffices.
    output = view.out_shape()
    k = left[-1] if left else (right[0] if right and len(right) == 1 else (right[-2] if right else None))
    if output is None or k is None:
        raise _ShapeUnknown("operand shapes unknown")
    return math.prod(output) * k


def _matmul_nbits_macs(view: _NodeView) -> int:
    """A: [..., K] times the packed [N, K] weight described by the K and N attributes."""
    data = view.need_in(0, "input")
    k, n = view.node.attributes.get_int("K", 0), view.node.attributes.get_int("N", 0)
    return math.prod(data[:-1]) * k * n


_MacRule = Callable[[_NodeView], int]

_MAC_RULES: dict[str, _MacRule] = {
    "Conv": _conv_macs,
    "ConvInteger": _conv_macs,
    "QLinearConv": partial(_conv_macs, w=3),
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
    "MatMulInteger": _matmul_macs,
    "QLinearMatMul": partial(_matmul_macs, b=3),
    "MatMulNBits": _matmul_nbits_macs,
}

# Input positions that hold the weight, in order of preference (MatMul may carry it on either side).
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvInteger": (1,),
    "QLinearConv": (3,),
    "ConvTranspose": (1,),
    "Gemm": (1, 0),
    "MatMul": (1, 0),
    "MatMulInteger": (1, 0),
    "QLinearMatMul": (3, 0),
    "MatMulNBits": (1,),
}
_MATMUL_LIKE = frozenset({"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"})


# --------------------------------------------------------------------------- layers


def _weight_shape(view: _NodeView) -> tuple[int, ...] | None:
    node = view.node
    if node.op_type == "MatMulNBits":
        return (node.attributes.get_int("N", 0), node.attributes.get_int("K", 0))
    for index in _WEIGHT_INPUTS.get(node.op_type, ()):
        if view.is_const(index):
            return view.in_shape(index)
    if node.op_type in _WEIGHT_INPUTS:
        return None
    # Other ops (BatchNormalization, Gather, ...): the largest constant input is the weight.
    shapes = [s for i in range(len(node.inputs)) if view.is_const(i) and (s := view.in_shape(i)) is not None]
    return max(shapes, key=math.prod, default=None)


def _layer_params(view: _NodeView, logical: dict[ir.Value, int]) -> tuple[int, bool]:
    """Weight elements among the node's constant inputs, and whether some constant had no known shape."""
    total, unknown, seen = 0, False, set()
    for value in view.node.inputs:
        if value is None or value in seen or value not in view.consts:
            continue
        seen.add(value)
        shape = view.shapes.static(value)
        if shape is None:
            unknown = True
        elif _is_weight(shape, view.shapes.dtype(value)):
            total += logical.get(value, math.prod(shape))
    return total, unknown


def _layer_macs(view: _NodeView) -> tuple[int, str | None]:
    node = view.node
    rule = _MAC_RULES.get(node.op_type) if node.domain in _STANDARD_DOMAINS else None
    if rule is None:
        return 0, None
    try:
        return rule(view), None
    except _ShapeUnknown as exc:
        return 0, f"MACs not counted: {exc}"
    except (ValueError, IndexError, ZeroDivisionError) as exc:
        return 0, f"MACs not counted: malformed node ({exc})"


def _analyze_node(view: _NodeView, index: int, logical: dict[ir.Value, int]) -> LayerCost | None:
    node = view.node
    macs, note = _layer_macs(view)
    params, params_unknown = _layer_params(view, logical)
    is_mac_op = node.op_type in _MAC_RULES and node.domain in _STANDARD_DOMAINS
    if not is_mac_op and macs == 0 and params == 0:
        return None
    notes = [note] if note else []
    kind = "weight"
    weights = _WEIGHT_INPUTS.get(node.op_type, ())
    if is_mac_op and not any(view.is_const(i) for i in weights):
        kind = "activation"
        notes.append("activation x activation" if node.op_type in _MATMUL_LIKE else "weight is not constant")
    if params_unknown:
        notes.append("a constant input has unknown shape; params undercounted")
    return LayerCost(
        name=node.name or f"{node.op_type}_{index}",
        op_type=node.op_type,
        weight_shape=_weight_shape(view),
        params=params,
        macs=macs,
        output_shape=view.shapes.shape(node.outputs[0]) if node.outputs else None,
        note="; ".join(notes) or None,
        kind=kind,
    )


def _signature(values: Sequence[ir.Value], shapes: _ShapeTable) -> list[tuple[str, Shape | None, str | None]]:
    rows = []
    for value in values:
        # Declared dims, symbolic ones as their names ("?" when unnamed); inferred when none declared.
        dims = _ir_dims(value.shape)
        dims = dims if dims is not None else shapes.shape(value)
        shape = None if dims is None else tuple("?" if d is None else d for d in dims)
        rows.append((str(value.name), shape, value.dtype.name if value.dtype is not None else None))
    return rows


def _histogram(graph: ir.Graph) -> dict[str, int]:
    counts = Counter(node.op_type for node in graph)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def data_shapes(model: ir.Model, calibration) -> dict[str, list[int]] | None:
    """Shapes of the model's inputs whose dims are symbolic, as one calibration batch has them
    (dims the model fixes stay as declared); None without data or symbolic dims."""
    if calibration is None:
        return None
    batch = next(iter(calibration.batches(1)), None)
    shapes = {}
    for value in model.graph.inputs:
        dims = list(value.shape) if value.shape is not None else None
        array = None if batch is None else batch.get(value.name)
        if dims is None or array is None or all(isinstance(d, int) for d in dims) or array.ndim != len(dims):
            continue
        pairs = zip(dims, array.shape, strict=True)
        shapes[value.name] = [d if isinstance(d, int) else int(n) for d, n in pairs]
    return shapes or None


def analyze_cost(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None, default_dim: int = 1
) -> ModelCost:
    """Per-layer and total MACs / parameters of ``model``, which is left unchanged.

    Dynamic input dims come from ``input_shapes`` (full shape per input name); any other unknown dim
    becomes ``default_dim`` and is reported in ``ModelCost.assumed_dims``. Raises ``OnnxSlimError`` for an
    ``input_shapes`` entry that names no model input, has the wrong rank, or contradicts a fixed dim.
    """
    if isinstance(default_dim, bool) or not isinstance(default_dim, int) or default_dim < 1:
        raise OnnxSlimError(f"default_dim must be a positive integer, got {default_dim!r}")
    graph = model.graph
    notes: list[str] = []
    fixed, assumed = _resolve_inputs(_real_inputs(graph), input_shapes or {}, default_dim, notes)
    inferred = _infer_shapes(model, fixed, notes)
    consts = _constant_values(graph)
    inferred.update(_measured_shapes(model, fixed, _unresolved(graph, inferred, consts), notes))
    shapes = _ShapeTable(inferred)
    logical = _nbits_logical_sizes(graph)
    layers = []
    for index, node in enumerate(graph):
        if node.outputs and all(out in consts for out in node.outputs):
            continue  # weight preprocessing (Constant, ConstantOfShape, DequantizeLinear of a weight)
        layer = _analyze_node(_NodeView(node, shapes, consts), index, logical)
        if layer is not None:
            layers.append(layer)
    if any(_has_subgraph(node) for node in graph):
        notes.append("nodes inside subgraphs (If/Loop/Scan bodies) are not analysed")
    return ModelCost(
        layers=layers,
        total_macs=sum(layer.macs for layer in layers),
        total_params=_total_params(_source_constants(graph, consts), shapes, logical, notes),
        weight_bytes=_weight_bytes(graph),
        inputs=_signature(_real_inputs(graph), shapes),
        outputs=_signature(list(graph.outputs), shapes),
        op_histogram=_histogram(graph),
        node_count=len(graph),
        assumed_dims=assumed,
        notes=notes,
    )
