"""Attributes equal to the operator's default are dropped; the model computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.quantization.default_attributes import drop_default_attributes


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    fc = numpy_helper.from_array(rng.standard_normal((5, 4 * 4 * 4)).astype(np.float32), "fc")
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w"],
            ["c"],
            strides=[1, 1],
            dilations=[1, 1],
            pads=[0, 0, 0, 0],
            group=1,
            kernel_shape=[3, 3],
        ),
        # not defaults: must stay
        helper.make_node("Conv", ["c", "w2"], ["d"], strides=[2, 2], dilations=[1, 1], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["d"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc"], ["y"], alpha=1.0, beta=1.0, transB=1, transA=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [w, w2, fc],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_defaults_dropped_and_outputs_unchanged():
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    removed = drop_default_attributes(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    attrs = {
        n.output[0]: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in out.graph.node
    }
    assert attrs["c"] == {"kernel_shape": [3, 3]}
    assert attrs["d"] == {"strides": [2, 2], "pads": [1, 1, 1, 1]}
    assert attrs["f"] == {}
    assert attrs["y"] == {"transB": 1}
    assert removed == 4 + 1 + 1 + 3
    x = np.random.default_rng(1).standard_normal((1, 3, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(_run(proto, x), _run(out, x))
    assert out.ByteSize() < proto.ByteSize()


def test_custom_domain_untouched():
    node = helper.make_node("Foo", ["x"], ["y"], domain="my.domain", strides=[1, 1], alpha=1.0)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)]
    )
    model = ir.serde.deserialize_model(proto)
    assert drop_default_attributes(model) == 0
