"""Views of weighted layers as (weight, output-channel axis, input-channel axis, bias).

The repairs rescale channels: cross-layer equalization moves a per-channel factor from one
layer's outputs into the next layer's inputs, SmoothQuant from activations into weights, bias
correction shifts biases. They all need to know which weight axis is which channel; this
module answers that for Conv, Gemm and MatMul with constant weights, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool.graph_utils import add_initializer, attr, const_array


@dataclass
class Layer:
    node: ir.Node
    out_axis: int
    in_axis: int | None  # None: input channels are not one weight axis (grouped conv)
    channel_axis: int  # axis of the layer's *activations* that holds channels

    @property
    def name(self) -> str:
        return self.node.name or self.node.op_type

    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]

    def weight_array(self) -> np.ndarray:
        return const_array(self.weight)

    def set_weight(self, array: np.ndarray) -> None:
        self.weight.const_value = ir.tensor(array.astype(np.float32), name=self.weight.name)


def as_layer(node: ir.Node) -> Layer | None:
    """The weighted-layer view of `node`, or None when it is not one we can rescale."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    array = const_array(weight)
    if array is None or array.dtype != np.float32 or not weight.is_initializer():
        return None
    if node.op_type == "Conv" and array.ndim >= 3:
        groups = attr(node, "group", 1)
        depthwise = groups > 1 and array.shape[1] == 1 and array.shape[0] == groups
        in_axis = 1 if groups == 1 else (0 if depthwise else None)
        return Layer(node, 0, in_axis, 1)
    if node.op_type == "Gemm" and array.ndim == 2 and not attr(node, "transA", 0):
        trans_b = attr(node, "transB", 0)
        return Layer(node, 0 if trans_b else 1, 1 if trans_b else 0, -1)
    if node.op_type == "MatMul" and array.ndim == 2:
        return Layer(node, 1, 0, -1)
    return None


def channel_max(array: np.ndarray, axis: int) -> np.ndarray:
    """max |w| of each slice along `axis`."""
    moved = np.moveaxis(np.abs(array), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def scale_axis(array: np.ndarray, factors: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * array.ndim
    shape[axis] = -1
    return array * factors.reshape(shape).astype(array.dtype)


def bias_of(layer: Layer) -> ir.Value | None:
    """The layer's own per-output-channel bias input (Conv B, Gemm C), if constant and 1-D-like."""
    if layer.node.op_type not in ("Conv", "Gemm") or len(layer.node.inputs) < 3:
        return None
    bias = layer.node.inputs[2]
    array = const_array(bias)
    channels = layer.weight_array().shape[layer.out_axis]
    if array is None or array.size != channels or not bias.is_initializer():
        return None
    if layer.node.op_type == "Gemm" and attr(layer.node, "beta", 1.0) != 1.0:
        return None
    return bias


def following_bias_add(layer: Layer) -> ir.Value | None:
    """For MatMul: the constant of an `Add(matmul_out, bias[N])` right after it."""
    out = layer.node.outputs[0]
    uses = list(out.uses())
    if layer.node.op_type != "MatMul" or len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    array = const_array(other)
    channels = layer.weight_array().shape[layer.out_axis]
    if array is None or not other.is_initializer() or array.size != channels or array.shape[-1] != channels:
        return None
    return other


def ensure_bias(graph: ir.Graph, layer: Layer) -> ir.Value | None:
    """A private, writable bias value for the layer's outputs (created for Conv/Gemm if absent)."""
    if bias_of(layer) is not None:
        return private_input(graph, layer.node, 2)
    added = following_bias_add(layer)
    if added is not None:
        add = next(iter(layer.node.outputs[0].uses())).node
        return private_input(graph, add, list(add.inputs).index(added))
    node = layer.node
    has_slot = len(node.inputs) > 2 and node.inputs[2] is not None
    if node.op_type not in ("Conv", "Gemm") or has_slot:
        return None
    channels = layer.weight_array().shape[layer.out_axis]
    value = add_initializer(graph, np.zeros(channels, dtype=np.float32), f"{layer.name}_bias")
    node.resize_inputs(3)
    node.replace_input_with(2, value)
    return value


def private_input(graph: ir.Graph, node: ir.Node, index: int) -> ir.Value:
    """`node`'s constant input `index`, copied first when another node also reads it."""
    value = node.inputs[index]
    if len(list(value.uses())) <= 1:
        return value
    copy = add_initializer(graph, const_array(value).copy(), f"{value.name}_own")
    node.replace_input_with(index, copy)
    return copy


def set_array(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.asarray(array, dtype=np.float32), name=value.name)
