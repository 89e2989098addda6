"""Cost analysis: MAC and parameter counts checked against hand formulas and published figures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.cost import LayerCost, ModelCost, _conv_macs, _NodeView, _ShapeTable, analyze_cost
from onnxslim_tool.errors import OnnxSlimError

LIGHT_ZOO = Path(onnx.__file__).parent / "backend/test/data/light"
FLOAT = TensorProto.FLOAT


def _init(name: str, shape: list[int], dtype: type = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int | str] | None],
    outputs: list[str],
    initializers: Sequence[TensorProto] = (),
    elem_type: int = FLOAT,
    extra_opsets: dict[str, int] | None = None,
) -> ir.Model:
    """A one-graph model; outputs are declared without shapes so shape inference must supply them."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, elem_type, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in outputs],
        list(initializers),
    )
    opsets = [helper.make_opsetid("", 17)]
    opsets += [helper.make_opsetid(domain, v) for domain, v in (extra_opsets or {}).items()]
    return ir.from_proto(helper.make_model(graph, opset_imports=opsets))


def _conv_model(x: list[int | str], w: list[int], op: str = "Conv", **attrs: object) -> ir.Model:
    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    return _model([node], {"x": x}, ["y"], [_init("w", w)])


def _only_layer(cost: ModelCost) -> LayerCost:
    assert len(cost.layers) == 1
    return cost.layers[0]


# --------------------------------------------------------------------------- Conv family


@pytest.mark.parametrize(
    ("x", "w", "attrs", "expected"),
    [
        # N x C_out x H_out x W_out x (C_in / groups) x kH x kW
        ([1, 3, 32, 32], [8, 3, 3, 3], {"strides": [2, 2], "pads": [1, 1, 1, 1]}, 1 * 8 * 16 * 16 * 3 * 9),
        ([2, 8, 10, 10], [8, 2, 3, 3], {"group": 4}, 2 * 8 * 8 * 8 * 2 * 9),
        ([1, 16, 14, 14], [16, 1, 3, 3], {"group": 16, "pads": [1, 1, 1, 1]}, 16 * 14 * 14 * 9),
        ([1, 4, 20, 20], [6, 4, 3, 3], {"dilations": [2, 2]}, 6 * 16 * 16 * 4 * 9),
        ([1, 3, 15, 15], [4, 3, 4, 4], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 4 * 8 * 8 * 3 * 16),
        ([1, 3, 15, 15], [4, 3, 3, 3], {"auto_pad": "VALID", "strides": [2, 2]}, 4 * 7 * 7 * 3 * 9),
        ([1, 2, 5, 6, 7], [3, 2, 2, 2, 2], {}, 3 * 4 * 5 * 6 * 2 * 8),
        ([1, 2, 9], [5, 2, 3], {"pads": [2, 0]}, 5 * 9 * 2 * 3),
    ],
    ids=["stride-pads", "groups", "depthwise", "dilation", "same-upper", "valid", "conv3d", "conv1d-asym"],
)
def test_conv_macs(x: list[int], w: list[int], attrs: dict, expected: int) -> None:
    layer = _only_layer(analyze_cost(_conv_model(x, w, **attrs)))
    assert layer.macs == expected
    assert layer.weight_shape == tuple(w)
    assert layer.params == int(np.prod(w))
    assert layer.kind == "weight" and layer.note is None


@pytest.mark.parametrize(
    ("x", "w", "attrs", "expected"),
    [
        ([1, 3, 32, 32], [8, 3, 3, 3], {"strides": [2, 2], "pads": [1, 1, 1, 1]}, 1 * 8 * 16 * 16 * 3 * 9),
        ([1, 4, 20, 20], [6, 4, 3, 3], {"dilations": [2, 2]}, 6 * 16 * 16 * 4 * 9),
        ([1, 3, 15, 15], [4, 3, 4, 4], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 4 * 8 * 8 * 3 * 16),
        ([1, 3, 15, 15], [4, 3, 3, 3], {"auto_pad": "VALID", "strides": [2, 2]}, 4 * 7 * 7 * 3 * 9),
    ],
)
def test_conv_output_fallback_without_inferred_shapes(
    x: list[int], w: list[int], attrs: dict, expected: int
) -> None:
    # No inferred output shape: the rule must derive output dims from strides/pads/dilations itself.
    values = [
        ir.Value(name=n, shape=ir.Shape(s), type=ir.TensorType(ir.DataType.FLOAT))
        for n, s in (("x", x), ("w", w))
    ]
    node = ir.node("Conv", values, attributes=attrs)
    assert node.outputs[0].shape is None
    assert _conv_macs(_NodeView(node, _ShapeTable({}), set())) == expected


@pytest.mark.parametrize(
    ("w", "attrs", "expected"),
    [
        # N x C_in x H_in x W_in x (C_out / groups) x kH x kW
        ([4, 3, 3, 3], {"strides": [2, 2]}, 4 * 5 * 5 * 3 * 9),
        ([4, 2, 3, 3], {"strides": [2, 2], "group": 2}, 4 * 5 * 5 * 2 * 9),
    ],
)
def test_conv_transpose_macs(w: list[int], attrs: dict, expected: int) -> None:
    cost = analyze_cost(_conv_model([1, 4, 5, 5], w, op="ConvTranspose", **attrs))
    layer = _only_layer(cost)
    assert layer.macs == expected
    assert layer.output_shape == (1, w[1] * attrs.get("group", 1), 11, 11)


# --------------------------------------------------------------------------- Gemm / MatMul


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_macs_honour_transposes(trans_a: int, trans_b: int) -> None:
    m, k, n = 3, 5, 7
    a_shape = [k, m] if trans_a else [m, k]
    b_shape = [n, k] if trans_b else [k, n]
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=trans_a, transB=trans_b)
    layer = _only_layer(
        analyze_cost(_model([node], {"a": a_shape}, ["y"], [_init("b", b_shape), _init("c", [n])]))
    )
    assert layer.macs == m * k * n
    assert layer.weight_shape == tuple(b_shape)
    assert layer.params == k * n + n
    assert layer.output_shape == (m, n)


def _matmul(a: list[int], b: list[int], const: str | None) -> LayerCost:
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    inputs = {name: shape for name, shape in (("a", a), ("b", b)) if name != const}
    inits = [_init(const, a if const == "a" else b)] if const else []
    return _only_layer(analyze_cost(_model([node], inputs, ["y"], inits)))


def test_matmul_batched_with_constant_right() -> None:
    layer = _matmul([2, 3, 4, 5], [5, 6], const="b")
    assert layer.macs == 2 * 3 * 4 * 5 * 6
    assert (layer.weight_shape, layer.params, layer.kind) == ((5, 6), 30, "weight")
    assert layer.output_shape == (2, 3, 4, 6)


def test_matmul_constant_on_left() -> None:
    layer = _matmul([4, 5], [2, 5, 6], const="a")
    assert layer.macs == 2 * 4 * 5 * 6
    assert (layer.weight_shape, layer.params, layer.kind) == ((4, 5), 20, "weight")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([5], [5, 6], 30), ([3, 5], [5], 15), ([5], [5], 5), ([2, 1, 3, 4], [5, 4, 2], 2 * 5 * 3 * 4 * 2)],
    ids=["vec-mat", "mat-vec", "dot", "broadcast"],
)
def test_matmul_numpy_semantics(a: list[int], b: list[int], expected: int) -> None:
    assert _matmul(a, b, const="b").macs == expected


def test_attention_matmul_of_two_activations() -> None:
    layer = _matmul([2, 8, 16, 32], [2, 8, 32, 16], const=None)
    assert layer.macs == 2 * 8 * 16 * 32 * 16
    assert layer.kind == "activation" and "activation x activation" in (layer.note or "")
    assert layer.params == 0 and layer.weight_shape is None


# --------------------------------------------------------------------------- quantized ops


def test_qdq_weight_counts_as_constant() -> None:
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    inits = [_init("wq", [5, 6], np.int8), _init("s", [], np.float32), _init("zp", [], np.int8)]
    layer = _only_layer(analyze_cost(_model(nodes, {"x": [2, 5]}, ["y"], inits)))
    assert (layer.op_type, layer.macs, layer.params, layer.kind) == ("MatMul", 2 * 5 * 6, 30, "weight")


def test_qlinear_conv_and_matmul_integer() -> None:
    scalars = [_init(n, [], np.float32) for n in ("xs", "ws", "ys")]
    scalars += [_init(n, [], np.uint8) for n in ("xz", "yz")] + [_init("wz", [], np.int8)]
    conv = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    model = _model(
        [conv], {"x": [1, 2, 5, 5]}, ["y"], [_init("w", [3, 2, 3, 3], np.int8), *scalars], TensorProto.UINT8
    )
    layer = _only_layer(analyze_cost(model))
    assert (layer.macs, layer.params, layer.weight_shape) == (3 * 3 * 3 * 2 * 9, 54, (3, 2, 3, 3))

    mmi = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    model = _model([mmi], {"a": [4, 5]}, ["y"], [_init("b", [5, 6], np.uint8)], TensorProto.UINT8)
    assert _only_layer(analyze_cost(model)).macs == 4 * 5 * 6


def test_matmul_nbits_counts_logical_weights() -> None:
    node = helper.make_node(
        "MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=16, N=8, bits=4, block_size=16
    )
    inits = [_init("b", [8, 1, 8], np.uint8), _init("s", [8])]
    cost = analyze_cost(_model([node], {"a": [2, 3, 16]}, ["y"], inits, extra_opsets={"com.microsoft": 1}))
    layer = _only_layer(cost)
    assert (layer.macs, layer.weight_shape, layer.params) == (2 * 3 * 16 * 8, (8, 16), 16 * 8 + 8)
    assert cost.total_params == 16 * 8 + 8


def test_layers_after_matmul_nbits_keep_their_macs() -> None:
    """onnx cannot infer through the contrib op, and quantizers store its output with symbolic
    dims: the MatMul reading it must still be counted, at the resolved batch."""
    nbits = helper.make_node(
        "MatMulNBits", ["a", "b", "s"], ["h"], domain="com.microsoft", K=16, N=8, bits=4, block_size=16
    )
    after = helper.make_node("MatMul", ["h", "w"], ["y"])
    inits = [_init("b", [8, 1, 8], np.uint8), _init("s", [8]), _init("w", [8, 4])]
    proto = ir.to_proto(
        _model([nbits, after], {"a": ["N", 16]}, ["y"], inits, extra_opsets={"com.microsoft": 1})
    )
    proto.graph.value_info.append(helper.make_tensor_value_info("h", FLOAT, ["unk__0", 8]))
    cost = analyze_cost(ir.from_proto(proto), input_shapes={"a": [3, 16]})
    assert [layer.macs for layer in cost.layers] == [3 * 16 * 8, 3 * 8 * 4]


# --------------------------------------------------------------------------- inputs and dims


def _dynamic_conv() -> ir.Model:
    return _conv_model(["N", 3, 8, 8], [4, 3, 3, 3])


def test_dynamic_batch_from_input_shapes_or_default_dim() -> None:
    per_image = 4 * 6 * 6 * 3 * 9
    model = _dynamic_conv()
    given = analyze_cost(model, input_shapes={"x": [4, 3, 8, 8]})
    assert given.total_macs == 4 * per_image and given.assumed_dims == {}
    default = analyze_cost(model)
    assert default.total_macs == per_image and default.assumed_dims == {"x": [1, 3, 8, 8]}
    assert analyze_cost(model, default_dim=3).total_macs == 3 * per_image
    # The signature keeps the symbolic dim, and the model itself is untouched.
    assert default.inputs == [("x", ("N", 3, 8, 8), "FLOAT")]
    assert model.graph.inputs[0].shape.dims[0] == ir.SymbolicDim("N")


def test_model_is_not_mutated() -> None:
    model = _dynamic_conv()
    before = ir.to_proto(model).SerializeToString()
    analyze_cost(model, input_shapes={"x": [2, 3, 8, 8]})
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize(
    ("shapes", "fragment"),
    [
        ({"images": [1, 3, 8, 8]}, "'images'"),
        ({"x": [1, 3, 8]}, "rank 3"),
        ({"x": [1, 4, 8, 8]}, "fixes it to 3"),
        ({"x": [0, 3, 8, 8]}, "positive"),
    ],
)
def test_bad_input_shapes_raise(shapes: dict, fragment: str) -> None:
    with pytest.raises(OnnxSlimError, match=fragment) as info:
        analyze_cost(_dynamic_conv(), input_shapes=shapes)
    assert "\n" not in str(info.value)
    if "images" in shapes:
        assert "inputs are: x" in str(info.value)


def test_unknown_input_shape_gives_note_not_crash() -> None:
    cost = analyze_cost(_conv_model(None, [4, 3, 3, 3]))  # input declared without any shape
    layer = _only_layer(cost)
    assert layer.macs == 0 and "MACs not counted" in (layer.note or "")
    assert any("no shape" in note for note in cost.notes)


# --------------------------------------------------------------------------- totals and report


def test_params_bytes_histogram_and_to_dict() -> None:
    nodes = [
        helper.make_node("Constant", [], ["bias"], value=numpy_helper.from_array(np.ones(4, np.float32))),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["h"]),
        helper.make_node("Add", ["h", "bias"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("Relu", ["h3"], ["y"]),
    ]
    inits = [_init("w", [12, 4]), numpy_helper.from_array(np.array([2, 12], np.int64), "shape")]
    cost = analyze_cost(_model(nodes, {"x": [2, 3, 4]}, ["y"], inits))
    # Weights: w (48) + Constant bias (4); the int64 shape tensor is metadata, not parameters.
    assert cost.total_params == 48 + 4
    assert cost.weight_bytes == 48 * 4 + 2 * 8 + 4 * 4
    assert [(layer.op_type, layer.params) for layer in cost.layers] == [("MatMul", 48), ("Add", 4)]
    assert cost.total_macs == 2 * 12 * 4
    assert list(cost.op_histogram.items())[0] == ("Relu", 2) and cost.node_count == 6
    report = json.loads(json.dumps(cost.to_dict()))
    for key in ("total_macs", "total_params", "layers", "op_histogram", "inputs", "outputs", "node_count"):
        assert key in report
    assert report["assumed_dims"] == {} and report["outputs"][0]["name"] == "y"
    assert report["layers"][0]["share"] == 1.0 and report["layers"][1]["share"] == 0.0


# --------------------------------------------------------------------------- light model zoo


@pytest.mark.parametrize(("name", "reference"), [("light_resnet50", 4.089e9), ("light_vgg19", 19.632e9)])
def test_published_totals(name: str, reference: float) -> None:
    cost = analyze_cost(ir.load(LIGHT_ZOO / f"{name}.onnx"))
    assert cost.total_macs == pytest.approx(reference, rel=0.02)
    assert cost.total_macs == pytest.approx(reference, rel=1e-3)  # exact formulas land far inside 2 %


def test_vgg19_placeholder_weights_come_from_constant_of_shape() -> None:
    cost = analyze_cost(ir.load(LIGHT_ZOO / "light_vgg19.onnx"))
    first = cost.layers[0]
    assert (first.op_type, first.weight_shape, first.params) == ("Conv", (64, 3, 3, 3), 64 * 27 + 64)
    assert cost.total_params == pytest.approx(143.67e6, rel=1e-3)  # VGG19's published 143.7 M


@pytest.mark.parametrize("path", sorted(LIGHT_ZOO.glob("light_*.onnx")), ids=lambda p: p.stem)
def test_every_light_model_analyses(path: Path) -> None:
    cost = analyze_cost(ir.load(path))
    assert cost.total_macs > 0 and cost.total_params > 0
    assert all(layer.note is None for layer in cost.layers if layer.op_type in ("Conv", "Gemm"))
    json.dumps(cost.to_dict())


def test_light_zoo_has_nine_models() -> None:
    assert len(list(LIGHT_ZOO.glob("light_*.onnx"))) == 9


def test_shapes_inference_cannot_fold_are_read_from_a_run():
    """A sequence length through Shape -> Squeeze -> Range (as torch exports position ids) stops
    ONNX shape inference; the MatMul after it must still be counted at the fixed input dims."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
        helper.make_node("Squeeze", ["s"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=FLOAT),
        helper.make_node("Unsqueeze", ["rf", "axis"], ["column"]),
        helper.make_node("MatMul", ["column", "w"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        _init("w", [1, 8]),
    ]
    model = _model(nodes, {"x": ["batch", "sequence"]}, ["y"], inits)
    cost = analyze_cost(model, {"x": [1, 5]})
    assert cost.total_macs == 5 * 1 * 8
    assert any("read from a run" in note for note in cost.notes)
