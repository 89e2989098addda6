"""Cross-layer equalization (Nagel et al., ICCV 2019), applied to the float model.

For a pair L1 -> [ReLU | MaxPool]* -> L2, ReLU and max-pooling commute with a positive
per-channel scale, so dividing L1's output channel i (weights and bias) by s_i and multiplying
L2's input channel i by s_i leaves the model's function unchanged. With
s_i = sqrt(r1_i / r2_i) (r = per-channel max |w|) both layers end with channel ranges
sqrt(r1_i * r2_i): no channel of either is crushed by a per-tensor scale set by another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool.quantization.layers import (
    Layer,
    as_layer,
    bias_of,
    channel_max,
    following_bias_add,
    private_input,
    scale_axis,
    set_array,
)

SWEEPS = 4
# Channels whose weights are all (near) zero keep scale 1.
_TINY = 1e-12
# ReLU and MaxPool commute with positive per-channel scales; nothing else on the path does.
_HOMOGENEOUS_OPS = frozenset({"Relu", "MaxPool"})


@dataclass
class Pair:
    first: Layer
    second: Layer
    bias_add: ir.Value | None  # MatMul's bias in a following Add

    @property
    def name(self) -> str:
        return f"{self.first.name} -> {self.second.name}"


@dataclass
class Equalized:
    pair: str
    spread_before: float  # max/min channel range of the first layer, before
    spread_after: float


def find_pairs(graph: ir.Graph) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Equalizable pairs, and (layer, reason) for weighted layers that start none."""
    pairs, skipped = [], []
    for node in graph:
        first = as_layer(node)
        if first is None:
            continue
        pair, reason = _pair_from(first)
        if pair is None:
            skipped.append((first.name, reason))
        else:
            pairs.append(pair)
    return pairs, skipped


def equalize(graph: ir.Graph) -> tuple[list[Equalized], list[tuple[str, str]]]:
    """Equalize every pair in place (a few sweeps, since a layer can sit in two pairs)."""
    pairs, skipped = find_pairs(graph)
    if not pairs:
        return [], skipped
    for pair in pairs:
        _own_weights(graph, pair)
    before = {pair.name: _spread(pair.first) for pair in pairs}
    for _ in range(SWEEPS):
        for pair in pairs:
            _equalize_pair(pair)
    return [Equalized(p.name, before[p.name], _spread(p.first)) for p in pairs], skipped


def _pair_from(first: Layer) -> tuple[Pair | None, str]:
    value = first.node.outputs[0]
    bias_add = following_bias_add(first)
    if bias_add is not None:
        value = next(iter(value.uses())).node.outputs[0]
    while True:
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1:
            return None, "output has several consumers (or is a graph output)"
        node, index = uses[0].node, uses[0].idx
        if node.op_type in _HOMOGENEOUS_OPS and index == 0:
            if node.op_type == "MaxPool" and (first.node.op_type != "Conv" or len(node.outputs) > 1):
                return None, "MaxPool on a non-conv path"
            value = node.outputs[0]
            continue
        second = as_layer(node)
        if second is None or index != 0:
            return None, f"next op {node.op_type} is not a weighted layer reached through ReLU/MaxPool"
        if second.in_axis is None:
            return None, f"{second.name} is a grouped conv: input channels are not one weight axis"
        if first.node.op_type == "Conv" and first.in_axis is None and first.node is second.node:
            return None, "layer feeds itself"
        return Pair(first, second, bias_add), ""


def _own_weights(graph: ir.Graph, pair: Pair) -> None:
    """Scaling must not reach other layers that share a weight or bias tensor."""
    private_input(graph, pair.first.node, 1)
    private_input(graph, pair.second.node, 1)
    if bias_of(pair.first) is not None:
        private_input(graph, pair.first.node, 2)
    if pair.bias_add is not None:
        add = next(iter(pair.first.node.outputs[0].uses())).node
        pair.bias_add = private_input(graph, add, list(add.inputs).index(pair.bias_add))


def _equalize_pair(pair: Pair) -> None:
    first, second = pair.first, pair.second
    w1, w2 = first.weight_array(), second.weight_array()
    r1, r2 = channel_max(w1, first.out_axis), channel_max(w2, second.in_axis)
    if r1.shape != r2.shape:
        return
    usable = (r1 > _TINY) & (r2 > _TINY)
    scale = np.ones_like(r1, dtype=np.float64)
    scale[usable] = np.sqrt(r1[usable] / r2[usable])
    first.set_weight(scale_axis(w1, 1.0 / scale, first.out_axis))
    second.set_weight(scale_axis(w2, scale, second.in_axis))
    for bias in (bias_of(first), pair.bias_add):
        if bias is not None:
            array = bias.const_value.numpy()
            set_array(bias, (array.reshape(-1) / scale).reshape(array.shape))


def _spread(layer: Layer) -> float:
    ranges = channel_max(layer.weight_array(), layer.out_axis)
    positive = ranges[ranges > _TINY]
    return float(positive.max() / positive.min()) if positive.size else 1.0
