"""Cleanup passes: each rewrite is checked for structure and for identical outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.passes.normalize import (
    Cleanup,
    DeduplicateInitializers,
    FoldBatchNorm,
    FoldConstants,
    RemoveDeadCode,
    RemoveIdentity,
)
from onnxslim_tool.testing import light_models, random_feed, run_proto, with_random_weights

RNG = np.random.default_rng(0)


def _f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _bn_inits(channels: int, prefix: str = "bn") -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(1 + 0.2 * _f32(channels), f"{prefix}_g"),
        numpy_helper.from_array(_f32(channels), f"{prefix}_b"),
        numpy_helper.from_array(_f32(channels), f"{prefix}_m"),
        numpy_helper.from_array(1 + np.abs(_f32(channels)), f"{prefix}_v"),
    ]


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _apply(pass_, proto: onnx.ModelProto) -> tuple[ir.Model, object]:
    model = ir.from_proto(proto)
    result = pass_(model)
    return model, result


def _assert_same_outputs(
    before: onnx.ModelProto, after: ir.Model, rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    after_proto = ir.to_proto(after)
    onnx.checker.check_model(after_proto, full_check=True)
    feed = random_feed(before, seed=1, batch=2)
    for a, b in zip(run_proto(before, feed), run_proto(after_proto, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batchnorm_into_conv(with_bias):
    inits = [numpy_helper.from_array(_f32(4, 3, 3, 3), "w"), *_bn_inits(4)]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(_f32(4), "cb"))
        conv_inputs.append("cb")
    proto = _model(
        [
            helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node(
                "BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["y"], epsilon=1e-3
            ),
        ],
        [_vi("x", ["N", 3, 8, 8])],
        [_vi("y", ["N", 4, 4, 4])],
        inits,
    )
    model, result = _apply(FoldBatchNorm(), proto)
    assert _ops(model) == ["Conv"]
    assert result.modified and result.record.changes[0].op_type == "BatchNormalization"
    assert model.graph.outputs[0].name == "y"  # the public output keeps its name
    _assert_same_outputs(proto, model)


def test_fold_batchnorm_into_grouped_conv_transpose():
    inits = [numpy_helper.from_array(_f32(4, 3, 3, 3), "w"), *_bn_inits(6)]  # C_in 4, groups 2 -> C_out 6
    proto = _model(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2, strides=[2, 2]),
            helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["y"]),
        ],
        [_vi("x", [1, 4, 5, 5])],
        [_vi("y", [1, 6, 11, 11])],
        inits,
    )
    model, _ = _apply(FoldBatchNorm(), proto)
    assert _ops(model) == ["ConvTranspose"]
    _assert_same_outputs(proto, model)


@pytest.mark.parametrize(("trans_b", "bias_shape"), [(0, [5]), (1, [5]), (1, None), (0, [1, 5])])
def test_fold_batchnorm_into_gemm(trans_b, bias_shape):
    w = _f32(5, 6) if trans_b else _f32(6, 5)
    inits = [numpy_helper.from_array(w, "w"), *_bn_inits(5)]
    gemm_inputs = ["x", "w"]
    if bias_shape:
        inits.append(numpy_helper.from_array(_f32(*bias_shape), "c"))
        gemm_inputs.append("c")
    proto = _model(
        [
            helper.make_node("Gemm", gemm_inputs, ["g"], transB=trans_b, alpha=0.5, beta=2.0),
            helper.make_node("BatchNormalization", ["g", "bn_g", "bn_b", "bn_m", "bn_v"], ["y"]),
        ],
        [_vi("x", [3, 6])],
        [_vi("y", [3, 5])],
        inits,
    )
    model, _ = _apply(FoldBatchNorm(), proto)
    assert _ops(model) == ["Gemm"]
    _assert_same_outputs(proto, model)


def test_batchnorm_not_folded_when_conv_output_is_shared():
    inits = [numpy_helper.from_array(_f32(4, 3, 1, 1), "w"), *_bn_inits(4)]
    proto = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["b"]),
            helper.make_node("Add", ["b", "c"], ["y"]),
        ],
        [_vi("x", [1, 3, 4, 4])],
        [_vi("y", [1, 4, 4, 4])],
        inits,
    )
    model, result = _apply(FoldBatchNorm(), proto)
    assert "BatchNormalization" in _ops(model)
    assert not result.modified
    assert "other consumers" in result.record.skipped[0].reason


def test_remove_identity_and_inference_dropout_keeps_output_names():
    proto = _model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Identity", ["r"], ["i"]),
            helper.make_node("Dropout", ["i"], ["d"]),
            helper.make_node("Identity", ["d"], ["y"]),
        ],
        [_vi("x", [2, 3])],
        [_vi("y", [2, 3])],
        [],
    )
    model, result = _apply(RemoveIdentity(), proto)
    assert _ops(model) == ["Relu"]
    assert model.graph.outputs[0].name == "y"
    assert len(result.record.changes) == 3
    _assert_same_outputs(proto, model, rtol=0, atol=0)


def test_identity_from_graph_input_to_output_is_kept():
    proto = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], [])
    model, result = _apply(RemoveIdentity(), proto)
    assert _ops(model) == ["Identity"] and not result.modified


def test_dead_code_and_unused_initializers_removed():
    inits = [numpy_helper.from_array(_f32(3), "used"), numpy_helper.from_array(_f32(7), "unused")]
    proto = _model(
        [helper.make_node("Add", ["x", "used"], ["y"]), helper.make_node("Relu", ["x"], ["dead"])],
        [_vi("x", [3])],
        [_vi("y", [3])],
        inits,
    )
    model, result = _apply(RemoveDeadCode(), proto)
    assert _ops(model) == ["Add"]
    assert set(model.graph.initializers) == {"used"}
    assert result.modified


def test_duplicate_initializers_merged():
    w = _f32(4, 4)
    inits = [numpy_helper.from_array(w, "a"), numpy_helper.from_array(w.copy(), "b")]
    proto = _model(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])],
        [_vi("x", [2, 4])],
        [_vi("y", [2, 4])],
        inits,
    )
    model, _ = _apply(DeduplicateInitializers(), proto)
    assert len(model.graph.initializers) == 1
    _assert_same_outputs(proto, model, rtol=0, atol=0)


def test_constant_subgraph_folded_but_expanding_ops_kept():
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    proto = _model(
        [
            helper.make_node("Shape", ["x"], ["s"]),  # static input shape: foldable
            helper.make_node("Reshape", ["x", "s"], ["x2"]),
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["ones"],
                value=numpy_helper.from_array(np.array([1.0], np.float32)),
            ),
            helper.make_node("Add", ["x2", "ones"], ["y"]),
        ],
        [_vi("x", [2, 3])],
        [_vi("y", [2, 3])],
        [shape],
    )
    model, result = _apply(FoldConstants(), proto)
    assert "Shape" not in _ops(model)
    assert "ConstantOfShape" in _ops(model)  # a tiny node must not become a big tensor
    assert result.modified
    _assert_same_outputs(proto, model, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "inception_v2", "shufflenet", "squeezenet"])
def test_cleanup_on_light_zoo_keeps_outputs(name):
    proto = with_random_weights(light_models()[name])
    model, result = _apply(Cleanup(), proto)
    ops = _ops(model)
    if name in ("resnet50", "densenet121", "inception_v2"):
        assert "BatchNormalization" not in ops or ops.count("BatchNormalization") < sum(
            n.op_type == "BatchNormalization" for n in proto.graph.node
        )
    _assert_same_outputs(proto, model, rtol=1e-3, atol=1e-4)
    assert result.modified
