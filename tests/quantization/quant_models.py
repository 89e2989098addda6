"""Tiny float models built to show one quantization problem each, with seeded data."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.data import CalibrationData

# The machinery on tiny layers: the size rule (min_layer_macs) would keep them float-compute.
BARE = {
    "activation_type": "uint8",
    "equalize": False,
    "bias_correction": False,
    "smoothquant": False,
    "min_layer_macs": 0,
}


def _model(
    nodes, inputs, outputs, inits, opset: int = 17, domains: dict[str, int] | None = None
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in (domains or {}).items()
    ]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def data(shape: tuple[int, ...], n: int, seed: int, mean: float = 0.0, std: float = 1.0) -> CalibrationData:
    rng = np.random.default_rng(seed)
    x = (mean + std * rng.standard_normal((n, *shape))).astype(np.float32)
    return CalibrationData.from_arrays({"x": x}, source=f"seed {seed}")


def bias_shift_model(seed: int = 0) -> onnx.ModelProto:
    """Inputs near 5 and one outlier weight: per-tensor rounding shifts every output's mean."""
    rng = np.random.default_rng(seed)
    w = 0.05 * rng.standard_normal((16, 32))
    w[0, 0] = 3.0  # sets the per-tensor scale: the small weights round coarsely
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")]
    return _model(
        nodes, [_vi("x", ["N", 16])], [_vi("y", ["N", 32])], [_init("w", w), _init("b", np.zeros(32))]
    )


def unequal_channels_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> ReLU -> Conv whose middle channels span 1e-2..1e2: per-tensor scales crush most."""
    rng = np.random.default_rng(seed)
    spread = np.logspace(2, -2, 8)
    w1 = rng.standard_normal((8, 4, 3, 3)) * 0.2 * spread[:, None, None, None]
    b1 = 0.1 * spread
    w2 = rng.standard_normal((4, 8, 1, 1)) * 0.3 / spread[None, :, None, None]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2)]
    return _model(nodes, [_vi("x", ["N", 4, 8, 8])], [_vi("y", ["N", 4, 8, 8])], inits)


def outlier_channels_model(seed: int = 0) -> onnx.ModelProto:
    """LayerNorm with two outlier channels (gamma 40) feeding a MatMul: activation int8 suffers."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(16)
    gamma[:2] = 40.0
    w = 0.25 * rng.standard_normal((16, 16))
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "be"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w"], ["y"], name="proj"),
    ]
    inits = [_init("g", gamma), _init("be", 0.1 * rng.standard_normal(16)), _init("w", w)]
    return _model(nodes, [_vi("x", ["N", 8, 16])], [_vi("y", ["N", 8, 16])], inits)


def sensitive_layer_model(seed: int = 0) -> onnx.ModelProto:
    """Gemm -> ReLU -> Gemm where the second layer's input has a 1000x outlier channel."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 16)) * 0.3
    w1[:, 0] *= 1000.0
    w2 = rng.standard_normal((16, 10)) * 0.3
    w2[0, :] /= 1000.0
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
    ]
    inits = [_init("w1", w1), _init("b1", np.full(16, 0.1)), _init("w2", w2), _init("b2", np.zeros(10))]
    return _model(nodes, [_vi("x", ["N", 16])], [_vi("y", ["N", 10])], inits)


def boxes_and_scores_model(seed: int = 0) -> onnx.ModelProto:
    """A detector-like head: output = Concat(boxes in 0..320, sigmoid scores in 0..1)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "wb", "bb"], ["box_raw"], name="box_head"),
        helper.make_node("Relu", ["box_raw"], ["boxes"], name="box_relu"),
        helper.make_node("Gemm", ["x", "ws", "bs"], ["logits"], name="score_head"),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="score_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], name="concat", axis=1),
    ]
    inits = [
        _init("wb", 40.0 * rng.standard_normal((8, 4))),
        _init("bb", np.full(4, 160.0)),
        _init("ws", rng.standard_normal((8, 6))),
        _init("bs", np.zeros(6)),
    ]
    return _model(nodes, [_vi("x", ["N", 8])], [_vi("y", ["N", 10])], inits)


def many_class_softmax_model(seed: int = 0) -> onnx.ModelProto:
    """A small CNN classifier with 500 classes ending in Softmax: every probability near 0.002."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w", "b"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1),
    ]
    inits = [
        _init("wc", 0.3 * rng.standard_normal((16, 4, 3, 3))),
        _init("bc", np.zeros(16)),
        _init("w", 0.3 * rng.standard_normal((16, 500))),
        _init("b", np.zeros(500)),
    ]
    return _model(nodes, [_vi("x", ["N", 4, 8, 8])], [_vi("prob", ["N", 500])], inits)


def conv_model(opset: int, seed: int = 0) -> onnx.ModelProto:
    """A plain Conv -> ReLU -> Conv on an old opset (per-channel DequantizeLinear needs 13)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
    ]
    inits = [
        _init("w1", 0.3 * rng.standard_normal((8, 4, 3, 3))),
        _init("b1", 0.1 * rng.standard_normal(8)),
        _init("w2", 0.3 * rng.standard_normal((4, 8, 1, 1))),
        _init("b2", np.zeros(4)),
    ]
    return _model(nodes, [_vi("x", ["N", 4, 8, 8])], [_vi("y", ["N", 4, 8, 8])], inits, opset=opset)


def symbolic_breaker_model(seed: int = 0) -> onnx.ModelProto:
    """MatMul -> com.microsoft.Inverse: onnxruntime runs it, its symbolic shape inference cannot."""
    rng = np.random.default_rng(seed)
    w = np.eye(4) + 0.1 * rng.standard_normal((4, 4))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Inverse", ["h"], ["y"], name="inverse", domain="com.microsoft"),
    ]
    return _model(
        nodes, [_vi("x", [4, 4])], [_vi("y", [4, 4])], [_init("w", w)], domains={"com.microsoft": 1}
    )


def constant_weights_model(seed: int = 0) -> onnx.ModelProto:
    """Weights held in Constant nodes (as Paddle exports them), not initializers."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((0.3 * rng.standard_normal((16, 32))).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(32, np.float32), "b")
    nodes = [
        helper.make_node("Constant", [], ["w"], name="w_const", value=w),
        helper.make_node("Constant", [], ["b"], name="b_const", value=b),
        helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc"),
    ]
    return _model(nodes, [_vi("x", ["N", 16])], [_vi("y", ["N", 32])], [])
