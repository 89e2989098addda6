"""Models whose weights live inside If branches or recurrent layers (silero VAD's shape)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api, io, runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.passes.quantization import Quantize

HIDDEN, FEATURES, STEPS = 16, 8, 5


def _branch(name: str, seed: int) -> onnx.GraphProto:
    """x (outer scope) -> LSTM -> Y_h; the weights are the branch's own initializers."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (1, 4 * HIDDEN, FEATURES)).astype(np.float32)
    r = rng.normal(0, 0.3, (1, 4 * HIDDEN, HIDDEN)).astype(np.float32)
    lstm = helper.make_node("LSTM", ["x", f"{name}_W", f"{name}_R"], ["", f"{name}_h"], hidden_size=HIDDEN)
    squeeze = helper.make_node("Identity", [f"{name}_h"], [f"{name}_out"])
    return helper.make_graph(
        [lstm, squeeze],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [None, None, None])],
        [numpy_helper.from_array(w, f"{name}_W"), numpy_helper.from_array(r, f"{name}_R")],
    )


def _passthrough_branch() -> onnx.GraphProto:
    """Returns an outer node's output through an Identity: removing it would make onnxruntime
    refuse the model (a subgraph may not return an outer-scope value directly)."""
    return helper.make_graph(
        [helper.make_node("Identity", ["x_relu"], ["same"])],
        "passthrough",
        [],
        [helper.make_tensor_value_info("same", TensorProto.FLOAT, [None, None, None])],
    )


def _if_model(else_branch: onnx.GraphProto) -> onnx.ModelProto:
    node = helper.make_node(
        "If", ["flag"], ["y"], then_branch=_branch("then", seed=1), else_branch=else_branch
    )
    relu = helper.make_node("Relu", ["x"], ["x_relu"])
    graph = helper.make_graph(
        [relu, node],
        "stateful",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [STEPS, "batch", FEATURES]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _data(n: int, flag: bool) -> CalibrationData:
    rng = np.random.default_rng(3)
    # Whole feeds: x has no batch axis in front ([steps, batch, features]).
    x = rng.normal(0, 1, (n, STEPS, 1, FEATURES)).astype(np.float32)
    return CalibrationData.from_arrays({"x": x, "flag": np.full(n, flag)})


def test_cleanup_keeps_an_identity_that_returns_an_outer_value(tmp_path):
    proto = _if_model(_passthrough_branch())
    data = _data(6, flag=False)
    result = api.compress(ir.from_proto(proto), data, passes=[Cleanup()], eval_data=data)
    assert result.steps[0].status in ("applied", "no-op"), result.steps[0].reason
    written = result.save(tmp_path / "out.onnx")
    branch = onnx.load(str(written)).graph.node[-1].attribute
    else_graph = next(a.g for a in branch if a.name == "else_branch")
    assert [n.op_type for n in else_graph.node] == ["Identity"]
    runtime.make_session(io.load(written))  # onnxruntime loads it


@pytest.mark.parametrize("mode", ["int8-weights", "int8-dynamic", "int8"])
def test_int8_weights_reach_recurrent_layers_inside_if_branches(mode, tmp_path):
    proto = _if_model(_branch("else", seed=2))
    source = tmp_path / "model.onnx"
    onnx.save(proto, str(source))
    data = _data(16, flag=True)
    result = api.compress(source, data, passes=[Quantize(mode)], eval_data=data)
    step = result.steps[0]
    assert step.status == "applied", step.reason
    assert {c.op_type for c in step.record.changes} == {"LSTM"}
    written = result.save(tmp_path / "out.onnx")
    # Both branches' W and R (4 tensors, 2 per branch) are int8 in the file; the rest is small.
    stored = [
        t
        for node in onnx.load(str(written)).graph.node
        for attr in node.attribute
        for t in attr.g.initializer
        if t.data_type == TensorProto.INT8
    ]
    assert len(stored) == 4
    assert written.stat().st_size < 0.45 * source.stat().st_size
    for flag in (True, False):
        feeds = list(_data(4, flag).validate(io.load(source)).batches())
        before = runtime.run_model(io.load(source), feeds)
        after = runtime.run_model(io.load(written), feeds)
        np.testing.assert_allclose(after["y"], before["y"], atol=0.05)
