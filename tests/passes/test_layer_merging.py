"""Exact layer merging: affine constants folded into Conv/Gemm/MatMul, linear pairs merged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api, io, runtime
from onnxslim_tool.passes.layer_merging import LayerMerging
from onnxslim_tool.testing import run_proto

RNG = np.random.default_rng(0)


def _proto(nodes, inits: dict[str, np.ndarray], x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _merged(proto: onnx.ModelProto, x_shape) -> tuple[list[str], object]:
    """Apply the pass; check the checker and outputs equal to 1e-5 relative; op types after."""
    feed = {"x": RNG.standard_normal(x_shape).astype(np.float32)}
    expected = run_proto(proto, feed)[0]
    model = io.load(proto)
    record = LayerMerging().call(model).record
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    got = runtime.run_model(model, [feed])["y"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    return [n.op_type for n in model.graph], record


def test_mul_and_add_after_conv_fold_into_weight_and_bias():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["t", "m"], ["a"], name="add"),
        helper.make_node("Sub", ["a", "u"], ["y"], name="sub"),
    ]
    inits = {
        "w": RNG.standard_normal((6, 3, 3, 3)),
        "b": RNG.standard_normal(6),
        "s": RNG.standard_normal((1, 6, 1, 1)),
        "t": RNG.standard_normal((6, 1, 1)),
        "u": [0.5],
    }
    ops, record = _merged(_proto(nodes, inits, [2, 3, 8, 8], [2, 6, 8, 8]), (2, 3, 8, 8))
    assert ops == ["Conv"]
    assert len(record.changes) == 3


def test_spatial_constant_is_not_a_channel_constant():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "s"], ["y"], name="mul"),
    ]
    inits = {"w": RNG.standard_normal((4, 3, 1, 1)), "s": RNG.standard_normal((1, 4, 5, 5))}
    ops, record = _merged(_proto(nodes, inits, [1, 3, 5, 5], [1, 4, 5, 5]), (1, 3, 5, 5))
    assert ops == ["Conv", "Mul"] and not record.changes


def test_scale_before_padded_conv_folds_but_shift_does_not():
    def model(op: str):
        nodes = [
            helper.make_node(op, ["x", "s"], ["p"], name="pre"),
            helper.make_node("Conv", ["p", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        ]
        inits = {"w": RNG.standard_normal((5, 4, 3, 3)), "b": RNG.standard_normal(5)}
        inits["s"] = RNG.standard_normal((4, 1, 1))
        return _proto(nodes, inits, [1, 4, 6, 6], [1, 5, 6, 6])

    assert _merged(model("Mul"), (1, 4, 6, 6))[0] == ["Conv"]
    assert _merged(model("Add"), (1, 4, 6, 6))[0] == ["Add", "Conv"]  # border pixels would shift


def test_shift_before_unpadded_grouped_conv_folds():
    nodes = [
        helper.make_node("Sub", ["x", "s"], ["p"], name="pre"),
        helper.make_node("Conv", ["p", "w", "b"], ["y"], name="conv", group=2),
    ]
    inits = {
        "w": RNG.standard_normal((6, 2, 3, 3)),
        "b": RNG.standard_normal(6),
        "s": RNG.standard_normal((4, 1, 1)),
    }
    assert _merged(_proto(nodes, inits, [1, 4, 6, 6], [1, 6, 4, 4]), (1, 4, 6, 6))[0] == ["Conv"]


def test_gemm_folds_a_reversed_sub_after_and_a_shift_before():
    nodes = [
        helper.make_node("Add", ["x", "t"], ["p"], name="pre"),
        helper.make_node("Gemm", ["p", "w", "b"], ["g"], name="fc", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Sub", ["u", "g"], ["y"], name="post"),
    ]
    inits = {
        "t": RNG.standard_normal(8),
        "w": RNG.standard_normal((5, 8)),
        "b": RNG.standard_normal(5),
        "u": RNG.standard_normal((1, 5)),
    }
    assert _merged(_proto(nodes, inits, [3, 8], [3, 5]), (3, 8))[0] == ["Gemm"]


def test_matmul_takes_scales_but_has_no_bias_for_a_shift():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Div", ["m", "d"], ["q"], name="div"),
        helper.make_node("Add", ["q", "b"], ["y"], name="bias"),
    ]
    inits = {"w": RNG.standard_normal((8, 4)), "d": [2.0], "b": RNG.standard_normal(4)}
    ops, _ = _merged(_proto(nodes, inits, [2, 3, 8], [2, 3, 4]), (2, 3, 8))
    assert ops == ["MatMul", "Add"]


@pytest.mark.parametrize(("middle", "merged"), [(64, True), (2, False)])
def test_conv_then_pointwise_conv_merge_only_when_smaller(middle, merged):
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="c2"),
    ]
    inits = {
        "w1": RNG.standard_normal((middle, 4, 3, 3)),
        "b1": RNG.standard_normal(middle),
        "w2": RNG.standard_normal((8, middle, 1, 1)),
        "b2": RNG.standard_normal(8),
    }
    ops, _ = _merged(_proto(nodes, inits, [1, 4, 8, 8], [1, 8, 4, 4]), (1, 4, 8, 8))
    assert ops == (["Conv"] if merged else ["Conv", "Conv"])


def test_gemm_pair_and_matmul_pair_merge():
    gemms = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1, alpha=2.0),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2", beta=0.5),
    ]
    inits = {
        "w1": RNG.standard_normal((64, 6)),
        "b1": RNG.standard_normal(64),
        "w2": RNG.standard_normal((64, 5)),
        "b2": RNG.standard_normal(5),
    }
    assert _merged(_proto(gemms, inits, [3, 6], [3, 5]), (3, 6))[0] == ["Gemm"]
    matmuls = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    inits = {"w1": RNG.standard_normal((6, 64)), "w2": RNG.standard_normal((64, 5))}
    assert _merged(_proto(matmuls, inits, [2, 3, 6], [2, 3, 5]), (2, 3, 6))[0] == ["MatMul"]


def test_merged_model_passes_the_pipelines_lossless_gate():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "s"], ["y"], name="mul"),
    ]
    inits = {
        "w": RNG.standard_normal((4, 3, 1, 1)),
        "b": RNG.standard_normal(4),
        "s": RNG.standard_normal((4, 1, 1)),
    }
    result = api.compress(_proto(nodes, inits, [1, 3, 5, 5], [1, 4, 5, 5]), passes=[LayerMerging()])
    assert [s.status for s in result.steps] == ["applied"]
    assert result.after.nodes == 1
