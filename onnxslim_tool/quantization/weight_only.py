"""Weight-only int8: weights stored as int8 + DequantizeLinear, compute stays float.

onnxruntime has no pass for this (its quantizers always quantize activations too), so the
graph edit is done here on the IR; the rounding itself is onnxruntime's `quantize_data`
(symmetric int8, scale = max|w| / 127), per output channel where the opset allows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx import TensorProto
from onnxruntime.quantization.quant_utils import quantize_data

from onnxslim_tool.graph_utils import attr, const_array

# How int8 weights are turned back into float (see store_int8).
DEQUANTIZE = "dequantize"
FOLDED = "folded"
# Position of the weight input per operator.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# Below this many elements the scale and node cost more bytes than the rounding saves.
MIN_ELEMENTS = 32
# Remaining float constants are stored in int8 only when the rounding step stays this small
# next to their typical (median) magnitude: an outlier must not wipe out the ordinary entries.
MAX_STEP_OF_MEDIAN = 0.1
# Consumers that read a float constant as a value (not as sizes, scales or indices).
_VALUE_CONSUMERS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Conv", "ConvTranspose", "Gather",
        "LayerNormalization", "BatchNormalization", "InstanceNormalization", "PRelu", "Concat",
        "Einsum", "Where", "SkipLayerNormalization",
    }
)  # fmt: skip
# Ops that pass a float constant's values on unchanged in their data input (input 0): a recurrent
# layer's weights sliced per gate inside a Loop or If body arrive at their MatMul this way.
_DATA_MOVERS = frozenset({"Slice", "Split", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


@dataclass
class StoredWeight:
    """One weight now held in int8."""

    layer: str
    op_type: str
    weight: str
    elements: int
    per_channel: bool


def weight_axis(node: ir.Node, shape: tuple[int, ...]) -> int | None:
    """The output-channel axis of `node`'s weight (one scale per output channel)."""
    if len(shape) < 2:
        return None
    if node.op_type in ("Conv", "Gather"):
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if attr(node, "group", 1) == 1 else 0
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return len(shape) - 1  # MatMul: [..., K, N]


def quantize_layer_weights(
    graph: ir.Graph, nodes: Iterable[ir.Node], *, per_channel: bool, form: str = DEQUANTIZE
) -> tuple[list[StoredWeight], list[tuple[str, str]]]:
    """Replace the constant weights of `nodes` by int8 + DequantizeLinear.

    Returns what was stored and (layer, reason) for every node left alone.
    """
    stored: list[StoredWeight] = []
    skipped: list[tuple[str, str]] = []
    for node in nodes:
        index = WEIGHT_INPUT.get(node.op_type)
        weight = node.inputs[index] if index is not None and len(node.inputs) > index else None
        reason = _unsuitable(weight)
        if reason:
            skipped.append((node.name or node.op_type, reason))
            continue
        array = const_array(weight)
        axis = weight_axis(node, array.shape) if per_channel else None
        store_int8(graph, weight, array, axis, form)
        stored.append(
            StoredWeight(node.name or "", node.op_type, weight.name or "", array.size, axis is not None)
        )
    return stored, skipped


def quantize_recurrent_weights(
    graph: ir.Graph, *, per_channel: bool, excluded: Iterable[str] = ()
) -> list[StoredWeight]:
    """Int8 storage, folded back to float at load, for the W and R inputs of LSTM/GRU/RNN.

    Their weights are [directions, gates * hidden, inputs]: one scale per gate row. onnxruntime
    has no int8 recurrent kernel, so only the file shrinks; the layer runs in float.
    """
    skip = set(excluded)
    stored = []
    for node in list(graph):
        if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx") or node.name in skip:
            continue
        for index in (1, 2):
            weight = node.inputs[index] if len(node.inputs) > index else None
            if _unsuitable(weight) or len(weight.uses()) != 1:
                continue
            array = const_array(weight)
            axis = 1 if per_channel and array.ndim == 3 else None
            store_int8(graph, weight, array, axis, FOLDED)
            stored.append(
                StoredWeight(node.name or "", node.op_type, weight.name or "", array.size, axis is not None)
            )
    return stored


def store_all_remaining_constants(model: ir.Model) -> list[str]:
    """`store_remaining_constants` on the main graph and every subgraph."""
    return [name for graph in model.graphs() for name in store_remaining_constants(graph)]


def store_remaining_constants(graph: ir.Graph) -> list[str]:
    """Float constants nobody quantized (biases, norms, embeddings) stored as int8 when harmless.

    Only tensors read as values by compute operators qualify (not the weights of layers, which
    are either quantized already or deliberately kept float), and only when the int8 step is at
    most MAX_STEP_OF_MEDIAN of the median |value| (per row for matrices); returns the names stored.
    """
    stored = []
    for value in list(graph.initializers.values()):
        if _unsuitable(value) or not _read_as_values(value):
            continue
        array = const_array(value)
        axis = 0 if array.ndim >= 2 else None
        if not _rounds_gently(array, axis):
            continue
        store_int8(graph, value, array, axis, FOLDED)  # folded at load: no run-time cost
        stored.append(value.name or "")
    return stored


def store_int8(
    graph: ir.Graph, weight: ir.Value, array: np.ndarray, axis: int | None, form: str = DEQUANTIZE
) -> ir.Value:
    """Swap initializer `weight` for int8 data + scale, restored by DequantizeLinear or Cast * scale.

    DEQUANTIZE keeps the weight int8 in onnxruntime's memory and is the standard quantized
    form; FOLDED (Cast to float, Mul by the scale) is constant-folded by onnxruntime when the
    session starts, so the model then runs exactly like the float one (the file stays small).
    """
    quantized, scale = _quantize(array, axis)
    base = weight.name or "weight"
    q_value = _initializer(graph, quantized, f"{base}_int8")
    if form == DEQUANTIZE:
        s_value = _initializer(graph, scale, f"{base}_scale")
        attributes = {} if axis is None else {"axis": axis}
        nodes = [ir.node("DequantizeLinear", [q_value, s_value], attributes, name=f"{base}_dq")]
    else:
        # Broadcast the per-channel scale from the right: [C, 1, ..., 1] for channel axis `axis`.
        shape = () if axis is None else (-1,) + (1,) * (array.ndim - 1 - axis)
        s_value = _initializer(graph, scale.reshape(shape), f"{base}_scale")
        cast = ir.node("Cast", [q_value], {"to": ir.DataType.FLOAT}, name=f"{base}_cast")
        nodes = [cast, ir.node("Mul", [cast.outputs[0], s_value], name=f"{base}_rescale")]
    out = nodes[-1].outputs[0]
    out.name = f"{base}_restored"
    out.type = ir.TensorType(ir.DataType.FLOAT)
    out.shape = ir.Shape(array.shape)
    first_user = min((use.node for use in weight.uses()), key=_position(graph), default=None)
    if first_user is None:
        graph.extend(nodes)
    else:
        graph.insert_before(first_user, nodes)
    weight.replace_all_uses_with(out)
    if weight.name in graph.initializers and not weight.uses() and not weight.is_graph_output():
        del graph.initializers[weight.name]
    return out


def _initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    """Like graph_utils.add_initializer, without its full-graph name scan (this runs per weight)."""
    while name in graph.initializers:
        name += "_"
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype))
    )
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value


def _quantize(array: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with onnxruntime's rounding rules; one scale, or one per `axis` slice."""
    if axis is None:
        _zp, scale, q = quantize_data(array.ravel(), TensorProto.INT8, symmetric=True)
        return np.asarray(q, dtype=np.int8).reshape(array.shape), np.asarray(scale, dtype=np.float32)
    # onnxruntime's rule for every slice at once (its per-slice calls took 7 s of every static
    # int8 build on DenseNet121, 69k slices): range widened to hold 0, symmetric, scale =
    # 2 * absmax / 254 in float64 (1 where that is below float32's tiny), round half to even.
    moved = np.moveaxis(array, axis, 0)
    rows = moved.reshape(moved.shape[0], -1).astype(np.float32)
    low, high = np.minimum(rows.min(axis=1), 0), np.maximum(rows.max(axis=1), 0)
    scale = 2 * np.maximum(np.abs(low), np.abs(high)).astype(np.float64) / 254.0
    scale = np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)
    quantized = np.clip(np.round(rows / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(np.moveaxis(quantized.reshape(moved.shape), 0, axis)), scale


def _rounds_gently(array: np.ndarray, axis: int | None) -> bool:
    rows = (
        array.reshape(1, -1) if axis is None else np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    )
    magnitude = np.abs(rows.astype(np.float64))
    step = magnitude.max(axis=1) / 127.0
    median = np.median(magnitude, axis=1)
    return bool(np.all(step <= MAX_STEP_OF_MEDIAN * median) and np.all(median > 0))


def _unsuitable(weight: ir.Value | None) -> str | None:
    if weight is None or not weight.is_initializer():
        return "weight is not a constant initializer"
    if weight.is_graph_input() or weight.is_graph_output():
        return "weight is also a graph input or output"
    array = const_array(weight)
    if array is None:
        return "weight is not a constant initializer"
    if array.dtype != np.float32:
        return f"weight is {array.dtype}, only float32 is stored as int8"
    if array.size < MIN_ELEMENTS:
        return f"weight has {array.size} elements; int8 would save less than its scale costs"
    return None


def _read_as_values(value: ir.Value) -> bool:
    """Read by compute ops as data: not as a layer's weight (layers kept float stay float), and
    not as the scale of int8 storage made here."""
    uses = list(value.uses())
    return bool(uses) and all(
        (use.node.op_type in _VALUE_CONSUMERS or (use.node.op_type in _DATA_MOVERS and use.idx == 0))
        and WEIGHT_INPUT.get(use.node.op_type) != use.idx
        and not _rescales_int8(use.node)
        for use in uses
    )


def _rescales_int8(node: ir.Node) -> bool:
    """The Mul of a Cast * scale pair (FOLDED storage)."""
    source = node.inputs[0].producer() if node.op_type == "Mul" and node.inputs[0] is not None else None
    return source is not None and source.op_type == "Cast" and source.inputs[0].is_initializer()


def _position(graph: ir.Graph):
    order = {id(node): i for i, node in enumerate(graph)}
    return lambda node: order.get(id(node), len(order))
