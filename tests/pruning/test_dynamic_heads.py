"""Attention heads in exports whose reshape targets are computed at run time (PyTorch dynamo)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import io, runtime
from onnxslim_tool.passes import ChannelPruning
from onnxslim_tool.passes.axis_swap import SWAPPED, SimplifyAxisSwap
from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.pruning.depgraph import find_groups

WIDTH, HEAD_DIM = 8, 4  # two heads


def _const(name: str, values) -> onnx.NodeProto:
    array = np.asarray(values, dtype=np.int64)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def attention(heads_entry: int = -1, seed: int = 0) -> onnx.ModelProto:
    """x [batch, seq, 8] -> self-attention with 2 heads, written the way dynamo exports it:
    head split to Concat(batch, seq, heads_entry, 4), K transposed through a merged batch axis."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((0.4 * rng.standard_normal((WIDTH, WIDTH))).astype(np.float32), name)
        for name in ("wq", "wk", "wv", "wo")
    ]
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["batch"], start=0, end=1),
        n("Shape", ["x"], ["seq"], start=1, end=2),
        _const("heads", [heads_entry]),
        _const("head_dim", [HEAD_DIM]),
        _const("minus_one", [-1]),
        n("Concat", ["batch", "seq", "heads", "head_dim"], ["split_to"], axis=0),
        n("Concat", ["batch", "seq", "minus_one"], ["merge_to"], axis=0),
    ]
    for name in ("q", "k", "v"):
        nodes += [
            n("MatMul", ["x", f"w{name}"], [f"{name}_flat"], name=f"{name}_proj"),
            n("Reshape", [f"{name}_flat", "split_to"], [f"{name}_split"]),
            n("Transpose", [f"{name}_split"], [f"{name}_heads"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        # k.transpose(-2, -1) through [-1, d2, d3] and back, targets read from Shape(k_heads).
        n("Shape", ["k_heads"], ["k_shape"]),
        _const("last", [-1]),
        _const("end", [2**63 - 1]),
        _const("minus_two", [-2]),
        _const("begin", [-(2**63)]),
        n("Slice", ["k_shape", "last", "end"], ["d3"]),
        n("Slice", ["k_shape", "minus_two", "last"], ["d2"]),
        n("Slice", ["k_shape", "begin", "minus_two"], ["d01"]),
        n("Concat", ["minus_one", "d2", "d3"], ["merged_to"], axis=0),
        n("Reshape", ["k_heads", "merged_to"], ["k_merged"]),
        n("Transpose", ["k_merged"], ["k_swapped"], perm=[0, 2, 1]),
        n("Concat", ["d01", "d3", "d2"], ["restored_to"], axis=0),
        n("Reshape", ["k_swapped", "restored_to"], ["k_t"]),
        n("MatMul", ["q_heads", "k_t"], ["scores"]),
        n("Softmax", ["scores"], ["weights"], axis=-1),
        n("MatMul", ["weights", "v_heads"], ["context"]),
        n("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["context_t", "merge_to"], ["context_flat"]),
        n("MatMul", ["context_flat", "wo"], ["y"], name="out_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", WIDTH])],
        inits,
        # The exporter writes these shapes; ONNX inference cannot divide symbolic dims for the -1.
        value_info=[
            helper.make_tensor_value_info(f"{name}_split", TensorProto.FLOAT, ["batch", "seq", 2, HEAD_DIM])
            for name in ("q", "k", "v")
        ]
        + [helper.make_tensor_value_info("context_flat", TensorProto.FLOAT, ["batch", "seq", WIDTH])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return runtime.run_model(model, [{"x": x}])["y"]


def _inputs(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in ((1, 5, WIDTH), (3, 7, WIDTH))]


def test_the_axis_swap_through_a_merged_batch_axis_becomes_one_transpose():
    model = io.load(attention())
    reference = [_run(io.load(attention()), x) for x in _inputs()]
    record = SimplifyAxisSwap().call(model).record
    assert [c.detail for c in record.changes] == [SWAPPED]
    swaps = [node for node in model.graph if node.op_type == "Transpose" and node.inputs[0].name == "k_heads"]
    assert len(swaps) == 1 and list(swaps[0].attributes["perm"].value) == [0, 1, 3, 2]
    for x, expected in zip(_inputs(), reference, strict=True):
        np.testing.assert_array_equal(_run(model, x), expected)


def test_a_restore_that_does_not_swap_is_left_alone():
    proto = attention()
    concat = next(node for node in proto.graph.node if list(node.output) == ["restored_to"])
    concat.input[:] = ["d01", "d2", "d3"]  # back to the original order: not a transpose
    model = io.load(proto)
    assert not SimplifyAxisSwap().call(model).record.changes


def test_heads_split_by_a_computed_target_form_one_group_per_attention():
    model = io.load(attention())
    Cleanup().call(model)
    groups = find_groups(model)
    heads = [g for g in groups if set(g.producers) == {"q_proj", "k_proj", "v_proj"}]
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == 2
    assert list(heads[0].consumers) == ["out_proj"]


def test_pruning_a_head_shrinks_q_k_v_and_the_output_projection():
    model = io.load(attention())
    Cleanup().call(model)
    result = ChannelPruning(ratio=0.5, criterion="l1", protect_ends=False)(model)
    weights = {n.name: n.inputs[1].const_value.shape for n in model.graph if n.op_type == "MatMul" and n.name}
    assert weights == {
        "q_proj": ir.Shape([WIDTH, HEAD_DIM]),
        "k_proj": ir.Shape([WIDTH, HEAD_DIM]),
        "v_proj": ir.Shape([WIDTH, HEAD_DIM]),
        "out_proj": ir.Shape([HEAD_DIM, WIDTH]),
    }
    assert result.record.changes
    for x in _inputs():
        assert _run(model, x).shape == x.shape  # any batch and sequence length still runs


def test_a_computed_target_that_names_the_head_count_is_refused_with_the_reason():
    model = io.load(attention(heads_entry=2))
    Cleanup().call(model)
    groups = [g for g in find_groups(model) if "q_proj" in g.producers]
    assert groups and not any(g.prunable for g in groups)
    assert any("computed at run time and names the channel count 2" in (g.reason or "") for g in groups)


@pytest.mark.parametrize("entry", [-1, 2])
def test_cleanup_keeps_the_attention_exact(entry):
    reference = [_run(io.load(attention(entry)), x) for x in _inputs()]
    model = io.load(attention(entry))
    Cleanup().call(model)
    for x, expected in zip(_inputs(), reference, strict=True):
        np.testing.assert_allclose(_run(model, x), expected, rtol=1e-6, atol=1e-6)
