"""Runtime helpers: a session whose weights can be swapped per run."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import runtime

RNG = np.random.default_rng(0)


def _mlp() -> ir.Model:
    w1, w2 = RNG.standard_normal((6, 5)).astype(np.float32), RNG.standard_normal((5, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_swapped_weights_give_what_a_model_holding_them_gives():
    model = _mlp()
    feeds = [{"x": RNG.standard_normal((4, 6)).astype(np.float32)} for _ in range(2)]
    assert runtime.WeightSwapSession.supports(model, ["w1"])
    assert not runtime.WeightSwapSession.supports(model, ["x"])  # not a weight
    session = runtime.WeightSwapSession(model, ["w1"])
    np.testing.assert_allclose(session.run(feeds)["y"], runtime.run_model(model, feeds)["y"], rtol=1e-5)

    halved = model.graph.initializers["w1"].const_value.numpy() * 0.5
    swapped = session.run(feeds, {"w1": halved})["y"]
    model.graph.initializers["w1"].const_value = ir.tensor(halved, name="w1")
    np.testing.assert_allclose(swapped, runtime.run_model(model, feeds)["y"], rtol=1e-5)
    assert not np.allclose(swapped, session.run(feeds)["y"])  # the swap does not stick
