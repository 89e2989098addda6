"""Bias correction (Nagel et al., ICCV 2019): remove the output shift that weight rounding causes.

A layer with rounded weights W_q = W + dW computes W_q x = W x + dW x, so its expected output
moves by dW E[x], a constant per output channel. E[x] is measured per input channel on the
calibration data (float model, one pass), dW is read from the quantized model itself (its
DequantizeLinear weights), and the shift is subtracted from the layer's bias in the float
model, which is then quantized again with the same activation ranges. Each layer's
correction depends only on its own rounding, so corrections do not compound along the
network (measuring shifts on the quantized model would count upstream shifts again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool import io
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.graph_utils import attr, const_array
from onnxslim_tool.quantization.layers import Layer, as_layer, ensure_bias, set_array
from onnxslim_tool.quantization.stats import channel_means

STATS_BATCH = 8


@dataclass
class Corrected:
    layer: str
    mean_abs_shift: float


def correct_biases(
    float_model: ir.Model, quantized: ir.Model, layer_names: list[str], data: CalibrationData
) -> tuple[ir.Model, list[Corrected], list[tuple[str, str]]]:
    """A copy of `float_model` whose biases cancel the weight-rounding shift of `layer_names`."""
    model = io.load(float_model, lift_constants=False)
    quantized_nodes = {node.name: node for node in quantized.graph}
    wanted = set(layer_names)
    targets: list[tuple[Layer, np.ndarray]] = []
    skipped: list[tuple[str, str]] = []
    for node in model.graph:
        if node.name not in wanted:
            continue
        layer = as_layer(node)
        rounded = _rounded_weight(quantized_nodes.get(node.name))
        if layer is None or rounded is None or rounded.shape != layer.weight_array().shape:
            skipped.append((node.name, "weights not quantized as a constant DequantizeLinear"))
            continue
        targets.append((layer, rounded))
    if not targets:
        return model, [], skipped
    inputs = {layer.node.inputs[0].name: layer.channel_axis for layer, _ in targets}
    means = channel_means(float_model, inputs, data.batches(STATS_BATCH))
    corrected = []
    for layer, rounded in targets:
        shift = _output_shift(layer, rounded - layer.weight_array(), means[layer.node.inputs[0].name])
        bias = ensure_bias(model.graph, layer) if shift is not None else None
        if bias is None:
            skipped.append((layer.name, "no per-channel bias to absorb the shift"))
            continue
        array = bias.const_value.numpy()
        set_array(bias, (array.reshape(-1) - shift).reshape(array.shape))
        corrected.append(Corrected(layer.name, float(np.mean(np.abs(shift)))))
    return model, corrected, skipped


def _rounded_weight(node: ir.Node | None) -> np.ndarray | None:
    """The weight a quantized layer really computes with: its DequantizeLinear, evaluated."""
    if node is None or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = const_array(dq.inputs[0])
    scale = const_array(dq.inputs[1])
    zero = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if q is None or scale is None:
        return None
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[attr(dq, "axis", 1)] = -1
    centered = q.astype(np.float64) - (0 if zero is None else zero.astype(np.float64).reshape(shape))
    return (centered * scale.astype(np.float64).reshape(shape)).astype(np.float32)


def _output_shift(layer: Layer, delta: np.ndarray, input_mean: np.ndarray) -> np.ndarray | None:
    """dW E[x] per output channel (Conv: per group, summed over the kernel window)."""
    delta = delta.astype(np.float64)
    mean = input_mean.astype(np.float64)
    node = layer.node
    if node.op_type == "Conv":
        groups = attr(node, "group", 1)
        out_channels, per_group = delta.shape[0], delta.shape[1]
        if mean.size != per_group * groups:
            return None
        window = delta.reshape(out_channels, per_group, -1).sum(axis=2)  # [O, C/g]
        group_of_output = np.arange(out_channels) // (out_channels // groups)
        group_means = mean.reshape(groups, per_group)[group_of_output]  # [O, C/g]
        return (window * group_means).sum(axis=1)
    if node.op_type == "Gemm":
        alpha = attr(node, "alpha", 1.0)
        product = delta @ mean if attr(node, "transB", 0) else mean @ delta
        return alpha * product
    if node.op_type == "MatMul" and delta.ndim == 2 and mean.size == delta.shape[0]:
        return mean @ delta
    return None
