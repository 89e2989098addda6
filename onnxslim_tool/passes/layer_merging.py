"""Exact layer merging (DeepRebirth-style, without the retraining): fewer layers, same outputs.

Three rewrites, each exact up to float rounding, repeated until none applies:

* a per-channel constant `Mul`/`Div`/`Add`/`Sub` right after a Conv, Gemm or MatMul is
  folded into its weight and bias (MatMul has no bias, so only scales fold into it);
* the same ops right before one, per input channel, are folded into its weight (a shift
  before a Conv only without padding: padded zeros would not be shifted);
* two back-to-back linear layers (a Conv then a 1x1 Conv, Gemm then Gemm, MatMul then
  MatMul, constant weights, nothing in between) become one, only when that lowers both
  MACs and parameters: W2·W1 is smaller only when the middle is wide.

BatchNorm folding lives in `normalize.py`; this pass covers the other constant affine ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from onnxslim_tool.cost import value_shapes
from onnxslim_tool.graph_utils import add_initializer, attr, bypass, const_array, single_consumer
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.passes.normalize import RemoveDeadCode

_AFFINE_OPS = frozenset({"Mul", "Div", "Add", "Sub"})
_WEIGHTED_OPS = frozenset({"Conv", "Gemm", "MatMul"})
# Each round merges pairs; chains of merges settle in a few rounds.
_MAX_ROUNDS = 8

Affine = tuple[np.ndarray, np.ndarray]  # (scale, shift) per channel: y -> y * scale + shift
Shapes = dict[str, tuple]  # inferred dims by value name


class LayerMerging(CompressionPass):
    """Fold constant affine ops into adjacent weight layers; merge linear pairs when smaller.

    `pairs`: also merge back-to-back linear layers (when that lowers MACs and params).
    """

    name = "layer-merging"
    lossless = True

    def __init__(
        self, *, pairs: bool = True, include: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        self.pairs = bool(pairs)

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        graph = model.graph
        rules: list[Callable[[ir.Graph, ir.Node, Shapes], str | None]] = [_fold_after, _fold_before]
        if self.pairs:
            rules.append(_merge_pair)
        for _ in range(_MAX_ROUNDS):
            graph.sort()
            # Stored shapes are often missing on intermediates; rank checks need them.
            shapes = value_shapes(model)
            changed = False
            for node in list(graph):
                # node.graph is None once a merge into an earlier layer removed it.
                if (
                    node.graph is None
                    or node.op_type not in _WEIGHTED_OPS
                    or node.domain not in ("", "ai.onnx")
                ):
                    continue
                if not self.selects(node)[0]:
                    continue
                before = _params(node)
                for rule in rules:
                    detail = rule(graph, node, shapes)
                    if detail:
                        record.changed(_label(node), node.op_type, detail, before, _params(node))
                        changed = True
                        break
            if not changed:
                break
        RemoveDeadCode().call(model)
        TopologicalSortPass()(model)


# ----- the rules -------------------------------------------------------------------------------------


def _fold_after(graph: ir.Graph, layer: ir.Node, shapes: Shapes) -> str | None:
    """Layer -> Mul/Div/Add/Sub by a per-output-channel constant: into weight and bias."""
    y = layer.outputs[0]
    op = single_consumer(y)
    if op is None or op.op_type not in _AFFINE_OPS or op.domain not in ("", "ai.onnx") or len(op.inputs) != 2:
        return None
    if op.inputs[0] is op.inputs[1]:
        return None
    position = 0 if op.inputs[0] is y else 1
    weight = _weight(layer)
    constant = const_array(op.inputs[1 - position])
    if weight is None or constant is None or constant.dtype != weight.dtype:
        return None
    rank, axis, size = _output_layout(layer, weight, constant, shapes)
    vector = _channel_vector(constant, rank, axis, size)
    affine = None if vector is None else _affine(op.op_type, vector, data_first=position == 0)
    if affine is None:
        return None
    scale, shift = affine
    if layer.op_type == "MatMul" and np.any(shift != 0):
        return None  # no bias slot to take the shift
    _scale_output_channels(graph, layer, weight, scale, shift)
    if not bypass(op.outputs[0], y):
        return None  # unreachable: y has one consumer and is not a graph output
    graph.remove(op, safe=True)
    return f"folded the following {op.op_type} '{_label(op)}' into weight/bias"


def _fold_before(graph: ir.Graph, layer: ir.Node, shapes: Shapes) -> str | None:
    """Mul/Div/Add/Sub by a per-input-channel constant -> layer: into weight (and bias)."""
    x = layer.inputs[0]
    op = x.producer() if x is not None else None
    if op is None or op.op_type not in _AFFINE_OPS or op.domain not in ("", "ai.onnx") or len(op.inputs) != 2:
        return None
    if single_consumer(x) is not layer or layer.inputs[1] is x:
        return None
    consts = [const_array(v) for v in op.inputs]
    if (consts[0] is None) == (consts[1] is None):
        return None
    position = 0 if consts[1] is not None else 1  # where the data input sits
    data, constant = op.inputs[position], consts[1 - position]
    weight = _weight(layer)
    if weight is None or constant is None or constant.dtype != weight.dtype or data is None:
        return None
    layout = _input_layout(layer, weight, constant, x, shapes)
    if layout is None:
        return None
    rank, axis, size = layout
    vector = _channel_vector(constant, rank, axis, size)
    # The data must already have the full channel count: a broadcast here would widen it.
    if vector is None or not _dim_is(shapes.get(data.name or ""), rank, axis, size):
        return None
    affine = _affine(op.op_type, vector, data_first=position == 0)
    if affine is None:
        return None
    scale, shift = affine
    if np.any(shift != 0) and not _can_shift_input(layer):
        return None
    _scale_input_channels(graph, layer, weight, scale, shift)
    layer.replace_input_with(0, data)
    graph.remove(op, safe=True)
    return f"folded the preceding {op.op_type} '{_label(op)}' into weight/bias"


def _merge_pair(graph: ir.Graph, first: ir.Node, shapes: Shapes) -> str | None:
    """Linear layer -> linear layer with nothing between: one layer, when that is smaller."""
    y = first.outputs[0]
    second = single_consumer(y)
    if second is None or second.op_type != first.op_type or second.inputs[0] is not y:
        return None
    merge = {"Conv": _merge_convs, "Gemm": _merge_gemms, "MatMul": _merge_matmuls}[first.op_type]
    new = merge(first, second)
    if new is None:
        return None
    weight, bias, attributes = new
    base = _label(first)
    first.replace_input_with(1, add_initializer(graph, weight, f"{base}_merged_weight"))
    if bias is not None:
        _set_bias(graph, first, bias.astype(weight.dtype), f"{base}_merged_bias")
    for name, value in attributes.items():
        make = ir.AttrFloat32 if isinstance(value, float) else ir.AttrInt64
        first.attributes[name] = make(name, value)
    out = second.outputs[0]
    shape, dtype = out.shape, out.type
    if not bypass(out, y):
        return None  # unreachable: y is not a graph output (single consumer)
    y.shape, y.type = shape, dtype or y.type  # the merged layer now has the second's channels
    graph.remove(second, safe=True)
    return f"merged with the next {second.op_type} '{_label(second)}'"


# ----- merges of two layers ----------------------------------------------------------------------------


def _merge_convs(first: ir.Node, second: ir.Node):
    w1, w2 = _weight(first), _weight(second)
    if w1 is None or w2 is None or w1.dtype != w2.dtype or attr(first, "group", 1) != 1:
        return None
    if not _is_pointwise(second, w2) or w2.shape[1] != w1.shape[0]:
        return None
    c3, c2, per_output = w2.shape[0], w2.shape[1], int(np.prod(w1.shape[1:]))
    if c3 * per_output >= c2 * per_output + c3 * c2:
        return None  # merged weight would not be smaller
    b1, b2 = _bias(first, c2), _bias(second, c3)
    if b1 is None or b2 is None:
        return None
    m = w2.reshape(c3, c2).astype(np.float64)
    weight = np.tensordot(m, w1.astype(np.float64), axes=(1, 0)).astype(w1.dtype)
    return weight, m @ b1 + b2, {}


def _merge_gemms(first: ir.Node, second: ir.Node):
    if attr(first, "transA", 0) or attr(second, "transA", 0):
        return None
    b1, b2 = _gemm_matrix(first), _gemm_matrix(second)
    if b1 is None or b2 is None or b1.shape[1] != b2.shape[0]:
        return None
    k, n1, n2 = b1.shape[0], b1.shape[1], b2.shape[1]
    if k * n2 >= k * n1 + n1 * n2:
        return None
    c1, c2 = _gemm_offset(first, n1), _gemm_offset(second, n2)
    if c1 is None or c2 is None:
        return None
    a1, a2 = attr(first, "alpha", 1.0), attr(second, "alpha", 1.0)
    weight = (a1 * a2) * (b1 @ b2)
    bias = a2 * (c1 @ b2) + c2
    dtype = _weight(first).dtype
    return weight.astype(dtype), bias, {"alpha": 1.0, "beta": 1.0, "transB": 0}


def _merge_matmuls(first: ir.Node, second: ir.Node):
    w1, w2 = _weight(first), _weight(second)
    if w1 is None or w2 is None or w1.shape[1] != w2.shape[0] or w1.dtype != w2.dtype:
        return None
    k, n1, n2 = w1.shape[0], w1.shape[1], w2.shape[1]
    if k * n2 >= k * n1 + n1 * n2:
        return None
    return (w1.astype(np.float64) @ w2).astype(w1.dtype), None, {}


# ----- folding an affine op into a layer -----------------------------------------------------------------


def _scale_output_channels(
    graph: ir.Graph, layer: ir.Node, weight: np.ndarray, scale: np.ndarray, shift: np.ndarray
) -> None:
    w = weight.astype(np.float64)
    base = _label(layer)
    if layer.op_type == "Conv":
        new_w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        bias = _bias(layer, w.shape[0])
        new_b = bias * scale + shift
    elif layer.op_type == "Gemm":
        new_w = w * (scale[:, None] if attr(layer, "transB", 0) else scale[None, :])
        offset = _gemm_offset(layer, scale.shape[0])
        new_b = offset * scale + shift
        layer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    else:
        new_w, new_b = w * scale[None, :], None
    layer.replace_input_with(1, add_initializer(graph, new_w.astype(weight.dtype), f"{base}_merged_weight"))
    if new_b is not None:
        _set_bias(graph, layer, new_b.astype(weight.dtype), f"{base}_merged_bias")


def _scale_input_channels(
    graph: ir.Graph, layer: ir.Node, weight: np.ndarray, scale: np.ndarray, shift: np.ndarray
) -> None:
    """W·(x*scale + shift) = (W*scale)·x + W·shift, per input channel."""
    w = weight.astype(np.float64)
    base = _label(layer)
    new_b = None
    if layer.op_type == "Conv":
        groups = attr(layer, "group", 1)
        per_group, c_out = w.shape[1], w.shape[0]
        rows = np.arange(c_out) // (c_out // groups)  # group of each output channel
        channels = rows[:, None] * per_group + np.arange(per_group)[None, :]  # [c_out, per_group]
        spatial = [1] * (w.ndim - 2)
        new_w = w * scale[channels].reshape(c_out, per_group, *spatial)
        if np.any(shift != 0):
            new_b = _bias(layer, c_out) + np.sum(
                w * shift[channels].reshape(c_out, per_group, *spatial), axis=tuple(range(1, w.ndim))
            )
    elif layer.op_type == "Gemm":
        trans_b = attr(layer, "transB", 0)
        new_w = w * (scale[None, :] if trans_b else scale[:, None])
        if np.any(shift != 0):
            matrix = w.T if trans_b else w
            n = matrix.shape[1]
            new_b = _gemm_offset(layer, n) + attr(layer, "alpha", 1.0) * (shift @ matrix)
            layer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    else:
        new_w = w * scale[:, None]
    layer.replace_input_with(1, add_initializer(graph, new_w.astype(weight.dtype), f"{base}_merged_weight"))
    if new_b is not None:
        _set_bias(graph, layer, new_b.astype(weight.dtype), f"{base}_merged_bias")


def _affine(op_type: str, vector: np.ndarray, *, data_first: bool) -> Affine | None:
    """The op as y -> y*scale + shift on the data operand; None when not affine in it."""
    v = vector.astype(np.float64)
    ones, zeros = np.ones_like(v), np.zeros_like(v)
    if op_type == "Mul":
        return v, zeros
    if op_type == "Add":
        return ones, v
    if op_type == "Sub":
        return (ones, -v) if data_first else (-ones, v)
    if op_type == "Div" and data_first and np.all(v != 0):
        return 1.0 / v, zeros
    return None


# ----- layouts -------------------------------------------------------------------------------------------


def _output_layout(
    layer: ir.Node, weight: np.ndarray, constant: np.ndarray, shapes: Shapes
) -> tuple[int, int, int]:
    """(output rank, channel axis, channel count) a constant after `layer` must respect."""
    if layer.op_type == "Conv":
        return weight.ndim, 1, weight.shape[0]
    if layer.op_type == "Gemm":
        return 2, 1, weight.shape[0] if attr(layer, "transB", 0) else weight.shape[1]
    rank = _rank(layer.outputs[0], shapes) or max(constant.ndim, 1)
    return rank, rank - 1, weight.shape[1]


def _input_layout(
    layer: ir.Node, weight: np.ndarray, constant: np.ndarray, x: ir.Value, shapes: Shapes
) -> tuple[int, int, int] | None:
    if layer.op_type == "Conv":
        return weight.ndim, 1, weight.shape[1] * attr(layer, "group", 1)
    if layer.op_type == "Gemm":
        if attr(layer, "transA", 0):
            return None
        return 2, 1, weight.shape[1] if attr(layer, "transB", 0) else weight.shape[0]
    rank = _rank(x, shapes) or max(constant.ndim, 1)
    return rank, rank - 1, weight.shape[0]


def _channel_vector(constant: np.ndarray, rank: int, axis: int, size: int) -> np.ndarray | None:
    """The constant as one value per channel, when it broadcasts along `axis` only (no rank
    growth, no other axis expanded); else None."""
    if constant.ndim > rank:
        return None
    shape = (1,) * (rank - constant.ndim) + tuple(constant.shape)
    if any(d != 1 and not (i == axis and d == size) for i, d in enumerate(shape)):
        return None
    flat = constant.reshape(-1)
    return np.full(size, flat[0]) if flat.size == 1 else flat.copy()


def _dim_is(shape: tuple | None, rank: int, axis: int, size: int) -> bool:
    """True when a value of `shape` is known to have `size` along `axis` (or size is 1)."""
    if size == 1:
        return True
    if shape is None or len(shape) != rank:
        return False
    dim = shape[axis]
    return isinstance(dim, int) and dim == size


def _rank(value: ir.Value, shapes: Shapes) -> int | None:
    shape = shapes.get(value.name or "")
    if shape is None and value.shape is not None:
        shape = tuple(value.shape)
    return None if shape is None else len(shape)


def _can_shift_input(layer: ir.Node) -> bool:
    """A per-channel shift before the layer folds into its bias only where padding is absent."""
    if layer.op_type == "MatMul":
        return False
    if layer.op_type == "Gemm":
        return True
    pads = attr(layer, "pads", None) or []
    return attr(layer, "auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(pads)


def _is_pointwise(conv: ir.Node, weight: np.ndarray) -> bool:
    """1x1, stride 1, no padding, one group: a per-position matrix product."""
    if any(d != 1 for d in weight.shape[2:]) or attr(conv, "group", 1) != 1:
        return False
    if any(s != 1 for s in attr(conv, "strides", None) or []) or any(attr(conv, "pads", None) or []):
        return False
    return attr(conv, "auto_pad", "NOTSET") in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


# ----- weights and biases ----------------------------------------------------------------------------------


def _weight(layer: ir.Node) -> np.ndarray | None:
    if len(layer.inputs) < 2 or layer.inputs[0] is None or const_array(layer.inputs[0]) is not None:
        return None
    w = const_array(layer.inputs[1])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return None
    if layer.op_type == "Conv" and w.ndim < 3:
        return None
    if layer.op_type in ("Gemm", "MatMul") and w.ndim != 2:
        return None
    if len(layer.inputs) > 2 and layer.inputs[2] is not None and const_array(layer.inputs[2]) is None:
        return None  # a runtime bias cannot absorb anything
    return w


def _bias(conv: ir.Node, channels: int) -> np.ndarray | None:
    if len(conv.inputs) < 3 or conv.inputs[2] is None:
        return np.zeros(channels)
    b = const_array(conv.inputs[2])
    return None if b is None or b.size != channels else b.astype(np.float64).reshape(channels)


def _gemm_matrix(gemm: ir.Node) -> np.ndarray | None:
    """B as a [K, N] float64 matrix (transB undone)."""
    w = _weight(gemm)
    if w is None:
        return None
    return (w.T if attr(gemm, "transB", 0) else w).astype(np.float64)


def _gemm_offset(gemm: ir.Node, n: int) -> np.ndarray | None:
    """beta * C broadcast to at least [N] (kept [M, N] when C is a full matrix)."""
    if len(gemm.inputs) < 3 or gemm.inputs[2] is None:
        return np.zeros(n)
    c = const_array(gemm.inputs[2])
    if c is None:
        return None
    c = attr(gemm, "beta", 1.0) * c.astype(np.float64)
    return np.broadcast_to(c, np.broadcast_shapes(c.shape, (n,))).copy()


def _set_bias(graph: ir.Graph, layer: ir.Node, bias: np.ndarray, name: str) -> None:
    value = add_initializer(graph, bias, name)
    if len(layer.inputs) < 3:
        layer.resize_inputs(3)
    layer.replace_input_with(2, value)


def _params(layer: ir.Node) -> int:
    return sum(
        int(a.size) for a in (const_array(v) for v in layer.inputs[1:] if v is not None) if a is not None
    )


def _label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else None) or node.op_type
