"""Channel coupling rules, one by one, on tiny graphs built in code."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.pruning.depgraph import describe_groups, find_groups
from onnxslim_tool.pruning.groups import ChannelRef, DependencyGroup

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- tiny-graph kit


class Net:
    """Builds a small ONNX graph node by node; weights are seeded random initializers."""

    def __init__(self, input_shape=(1, 3, 6, 6), opset: int = 17) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.input_shape = list(input_shape)
        self.opset = opset
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        outs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"n_{outs[0]}", domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        w = self.init(RNG.standard_normal((c_out, c_in // group, k, k)).astype(np.float32) * 0.3)
        b = self.init(RNG.standard_normal(c_out).astype(np.float32) * 0.1, "b")
        inputs = [x, w, b] if bias else [x, w]
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        params = [
            1 + 0.1 * RNG.standard_normal(c),
            0.1 * RNG.standard_normal(c),
            0.1 * RNG.standard_normal(c),
            1 + 0.1 * np.abs(RNG.standard_normal(c)),
        ]
        return self.node("BatchNormalization", [x] + [self.init(p.astype(np.float32), "bn") for p in params])

    def gemm(self, x: str, k: int, n: int, trans_b: int = 1) -> str:
        shape = (n, k) if trans_b else (k, n)
        w = self.init(RNG.standard_normal(shape).astype(np.float32) * 0.3)
        b = self.init(RNG.standard_normal(n).astype(np.float32) * 0.1, "b")
        return self.node("Gemm", [x, w, b], transB=trans_b)

    def inputs_of(self, output: str) -> list[str]:
        return list(next(n.input for n in self.nodes if n.output[0] == output))

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def model(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "net",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.input_shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        domains = {n.domain for n in self.nodes if n.domain}
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
        return onnx.shape_inference.infer_shapes(model) if not domains else model


def groups_of(proto: onnx.ModelProto) -> list[DependencyGroup]:
    return find_groups(ir.from_proto(proto))


def producing(groups: list[DependencyGroup], output: str) -> DependencyGroup:
    """The group whose first producer is the node that writes `output` (nodes are `n_<output>`)."""
    node = output if output.startswith("/") else f"n_{output}"
    return next(g for g in groups if g.producers and g.producers[0] == node)


def refs(group: DependencyGroup, role: str) -> list[ChannelRef]:
    return [m for m in group.members if m.role == role]


def by_tensor(group: DependencyGroup, tensor: str) -> list[ChannelRef]:
    return [m for m in group.members if m.tensor == tensor]


# --------------------------------------------------------------------------- convolutions


def test_conv_relu_conv_chain_couples_rows_bias_and_next_columns():
    net = Net()
    c1 = net.conv("x", 3, 8)
    h = net.relu(c1)
    y = net.conv(h, 8, 4)
    groups = groups_of(net.model(y))
    first = producing(groups, c1)
    w1, b1 = net.inputs_of(c1)[1:]
    assert first.prunable and first.size == 8
    assert [(r.tensor, r.axis) for r in refs(first, "out")] == [(w1, 0)]
    assert [(r.tensor, r.axis) for r in refs(first, "param")] == [(b1, 0)]
    assert [(r.tensor, r.axis) for r in refs(first, "in")] == [(net.inputs_of(y)[1], 1)]
    assert {r.tensor for r in refs(first, "act")} == {c1, h}
    assert first.consumers == [f"n_{y}"]
    last = producing(groups, y)
    assert not last.prunable and last.reason == f"reaches graph output '{y}'"


def test_residual_add_merges_both_producers_into_one_group():
    net = Net()
    stem = net.conv("x", 3, 8)
    a = net.relu(stem)
    inner = net.conv(a, 8, 5)
    b = net.conv(net.relu(inner), 5, 8)
    y = net.conv(net.relu(net.node("Add", [a, b])), 8, 2)
    groups = groups_of(net.model(y))
    residual = producing(groups, stem)
    assert residual.prunable and residual.size == 8
    assert residual.producers == [f"n_{stem}", f"n_{b}"]
    assert residual.consumers == [f"n_{inner}", f"n_{y}"]
    assert producing(groups, inner).prunable


def test_concat_gives_each_input_group_its_offset_in_the_consumer():
    net = Net()
    a = net.conv("x", 3, 4)
    b = net.conv("x", 3, 6)
    cat = net.node("Concat", [a, b], axis=1)
    y = net.conv(net.relu(cat), 10, 2)
    groups = groups_of(net.model(y))
    first, second = producing(groups, a), producing(groups, b)
    consumer_weight = net.inputs_of(y)[1]
    assert [(r.tensor, r.offset) for r in refs(first, "in")] == [(consumer_weight, 0)]
    assert [(r.tensor, r.offset) for r in refs(second, "in")] == [(consumer_weight, 4)]
    assert [r.offset for r in by_tensor(second, cat)] == [4]
    assert first.prunable and second.prunable and (first.size, second.size) == (4, 6)


def test_concat_with_a_graph_input_keeps_the_conv_part_prunable():
    net = Net()
    a = net.conv("x", 3, 4)
    y = net.conv(net.node("Concat", ["x", a], axis=1), 7, 2)
    group = producing(groups_of(net.model(y)), a)
    assert group.prunable
    assert [r.offset for r in refs(group, "in")] == [3]


def test_depthwise_conv_passes_the_group_through_with_its_filters_as_params():
    net = Net()
    pw1 = net.conv("x", 3, 8, k=1)
    dw = net.conv(net.relu(pw1), 8, 8, k=3, group=8)
    y = net.conv(net.relu(dw), 8, 4, k=1)
    groups = groups_of(net.model(y))
    group = producing(groups, pw1)
    dw_weight, dw_bias = net.inputs_of(dw)[1:]
    assert [(r.role, r.span) for r in by_tensor(group, dw_weight)] == [("param", 1)]
    assert [r.role for r in by_tensor(group, dw_bias)] == ["param"]
    assert group.consumers == [f"n_{y}"]
    assert all(f"n_{dw}" not in g.producers for g in groups)  # a depthwise conv starts no group


def test_depthwise_multiplier_spreads_each_channel_over_its_outputs():
    net = Net()
    pw1 = net.conv("x", 3, 4, k=1)
    dw = net.conv(pw1, 4, 8, k=3, group=4)  # two filters per input channel
    y = net.conv(dw, 8, 2, k=1)
    group = producing(groups_of(net.model(y)), pw1)
    assert [(r.role, r.span) for r in by_tensor(group, net.inputs_of(dw)[1])] == [("param", 2)]
    assert [(r.axis, r.span) for r in refs(group, "in")] == [(1, 2)]


def test_grouped_conv_requires_balanced_blocks():
    net = Net()
    a = net.conv("x", 3, 8, k=1)
    b = net.conv(net.relu(a), 8, 8, k=1, group=2)
    y = net.conv(net.relu(b), 8, 2, k=1)
    groups = groups_of(net.model(y))
    feeding = producing(groups, a)
    assert feeding.prunable and feeding.blocks == 2 and feeding.divisor == 2
    grouped = producing(groups, b)
    assert grouped.prunable and grouped.blocks == 2


def test_grouped_conv_reading_two_groups_in_one_block_is_blocked():
    net = Net()
    a = net.conv("x", 3, 6, k=1)
    b = net.conv("x", 3, 2, k=1)
    y = net.conv(net.node("Concat", [a, b], axis=1), 8, 4, k=1, group=2)  # block 1 = a[4:6] + b
    groups = groups_of(net.model(y))
    for out in (a, b):
        group = producing(groups, out)
        assert not group.prunable and f"grouped Conv 'n_{y}' (group=2)" in group.reason


def test_conv_transpose_weight_axes_are_swapped():
    net = Net()
    a = net.conv("x", 3, 4)
    w = net.init(RNG.standard_normal((4, 5, 2, 2)).astype(np.float32))
    up = net.node("ConvTranspose", [net.relu(a), w], strides=[2, 2], kernel_shape=[2, 2])
    y = net.conv(net.relu(up), 5, 2)
    groups = groups_of(net.model(y))
    assert [(r.tensor, r.axis) for r in refs(producing(groups, a), "in")] == [(w, 0)]
    assert [(r.tensor, r.axis) for r in refs(producing(groups, up), "out")] == [(w, 1)]


# --------------------------------------------------------------------------- dense layers


def test_flatten_into_gemm_gives_each_channel_hw_features():
    net = Net()
    c = net.conv("x", 3, 4)
    y = net.gemm(net.node("Flatten", [net.relu(c)], axis=1), 4 * 36, 5)
    group = producing(groups_of(net.model(y)), c)
    assert group.prunable
    gemm_weight = net.inputs_of(y)[1]
    assert [(r.tensor, r.axis, r.offset, r.span) for r in refs(group, "in")] == [(gemm_weight, 1, 0, 36)]


def test_reshape_into_gemm_rewrites_an_explicit_target_entry():
    net = Net()
    c = net.conv("x", 3, 4)
    target = net.init(np.array([1, 4 * 36], dtype=np.int64), "shape")
    y = net.gemm(net.node("Reshape", [net.relu(c), target]), 4 * 36, 5)
    group = producing(groups_of(net.model(y)), c)
    assert [(r.tensor, r.axis, r.span) for r in refs(group, "shape")] == [(target, 1, 36)]
    assert [r.span for r in refs(group, "in")] == [36]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_axes_follow_trans_b(trans_b):
    net = Net(input_shape=(2, 6))
    h = net.gemm("x", 6, 8, trans_b=trans_b)
    y = net.gemm(net.relu(h), 8, 3, trans_b=trans_b)
    group = producing(groups_of(net.model(y)), h)
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    assert [(r.tensor, r.axis) for r in refs(group, "out")] == [(net.inputs_of(h)[1], out_axis)]
    assert [(r.tensor, r.axis) for r in refs(group, "in")] == [(net.inputs_of(y)[1], in_axis)]
    assert [(r.tensor, r.axis) for r in refs(group, "param")] == [(net.inputs_of(h)[2], 0)]


def test_gemm_trans_a_reads_channels_on_axis_0():
    net = Net(input_shape=(2, 6))
    h = net.gemm("x", 6, 8)
    w = net.init(RNG.standard_normal((8, 3)).astype(np.float32))
    y = net.node("Gemm", [net.node("Transpose", [h], perm=[1, 0]), w], transA=1)
    group = producing(groups_of(net.model(y)), h)
    assert group.prunable and [(r.tensor, r.axis) for r in refs(group, "in")] == [(w, 0)]


def test_matmul_with_a_constant_right_operand():
    net = Net(input_shape=(2, 5, 6))
    w1 = net.init(RNG.standard_normal((6, 8)).astype(np.float32))
    w2 = net.init(RNG.standard_normal((8, 3)).astype(np.float32))
    h = net.node("MatMul", ["x", w1])
    y = net.node("MatMul", [net.relu(h), w2])
    group = producing(groups_of(net.model(y)), h)
    assert group.prunable
    assert [(r.tensor, r.axis) for r in refs(group, "out")] == [(w1, 1)]
    assert [(r.tensor, r.axis) for r in refs(group, "in")] == [(w2, 0)]
    assert [r.axis for r in refs(group, "act")] == [2, 2]


def test_matmul_with_a_constant_left_operand():
    net = Net(input_shape=(6, 5))
    w1 = net.init(RNG.standard_normal((8, 6)).astype(np.float32))
    w2 = net.init(RNG.standard_normal((3, 8)).astype(np.float32))
    h = net.node("MatMul", [w1, "x"])
    y = net.node("MatMul", [w2, net.relu(h)])
    group = producing(groups_of(net.model(y)), h)
    assert [(r.tensor, r.axis) for r in refs(group, "out")] == [(w1, 0)]
    assert [(r.tensor, r.axis) for r in refs(group, "in")] == [(w2, 1)]
    assert [r.axis for r in refs(group, "act")] == [0, 0]


# --------------------------------------------------------------------------- normalisation and gates


def test_batchnorm_and_instancenorm_parameters_are_members():
    net = Net()
    c = net.conv("x", 3, 8)
    normed = net.bn(c, 8)
    scale = net.init(np.ones(8, dtype=np.float32), "s")
    shift = net.init(np.zeros(8, dtype=np.float32), "t")
    b = net.node("InstanceNormalization", [net.relu(normed), scale, shift])
    y = net.conv(b, 8, 2)
    group = producing(groups_of(net.model(y)), c)
    params = [r.tensor for r in refs(group, "param")]
    assert params == [net.inputs_of(c)[2], *net.inputs_of(normed)[1:], scale, shift]


def test_layernorm_over_the_channel_axis_is_blocked():
    net = Net(input_shape=(2, 5, 6))
    h = net.node("MatMul", ["x", net.init(RNG.standard_normal((6, 8)).astype(np.float32))])
    n = net.node("LayerNormalization", [h, net.init(np.ones(8, dtype=np.float32))], axis=-1)
    y = net.node("MatMul", [n, net.init(RNG.standard_normal((8, 3)).astype(np.float32))])
    group = producing(groups_of(net.model(y)), h)
    assert not group.prunable
    assert group.reason.startswith(f"LayerNormalization 'n_{n}': normalizes over the channel axis")


def test_lrn_is_blocked_with_its_reason():
    net = Net()
    c = net.conv("x", 3, 8)
    lrn = net.node("LRN", [net.relu(c)], size=3)
    group = producing(groups_of(net.model(net.conv(lrn, 8, 2))), c)
    assert not group.prunable and group.reason.startswith(f"LRN 'n_{lrn}': mixes neighbouring channels")


def test_squeeze_excitation_gate_couples_the_gate_with_the_gated_tensor():
    net = Net()
    c = net.conv("x", 3, 8)
    feat = net.relu(c)
    squeeze = net.conv(net.node("GlobalAveragePool", [feat]), 8, 2, k=1)
    excite = net.conv(net.relu(squeeze), 2, 8, k=1)
    y = net.conv(net.node("Mul", [feat, net.node("Sigmoid", [excite])]), 8, 2)
    groups = groups_of(net.model(y))
    gated = producing(groups, c)
    assert gated.prunable
    assert gated.producers == [f"n_{c}", f"n_{excite}"]
    assert gated.consumers == [f"n_{squeeze}", f"n_{y}"]
    assert producing(groups, squeeze).prunable


def test_constant_operand_with_a_channel_dim_is_a_param_scalars_are_not():
    net = Net()
    c = net.conv("x", 3, 8)
    scale = net.init(np.full((8, 1, 1), 2.0, dtype=np.float32), "scale")
    half = net.init(np.array(0.5, dtype=np.float32), "half")
    a = net.node("Mul", [net.node("Mul", [c, scale]), half])
    group = producing(groups_of(net.model(net.conv(a, 8, 2))), c)
    assert [(r.tensor, r.axis, r.role) for r in by_tensor(group, scale)] == [(scale, 0, "param")]
    assert not by_tensor(group, half)


def test_single_channel_spatial_gate_does_not_block_the_gated_channels():
    net = Net()
    feat = net.conv("x", 3, 8)
    one = net.conv(feat, 8, 1)
    y = net.conv(net.node("Mul", [feat, net.node("Sigmoid", [one])]), 8, 2)
    groups = groups_of(net.model(y))
    assert producing(groups, feat).prunable
    assert not producing(groups, one).prunable and "broadcast" in producing(groups, one).reason


# --------------------------------------------------------------------------- layout ops


@pytest.mark.parametrize("opset", [11, 13])
def test_split_on_the_channel_axis_splits_the_group_at_offsets(opset):
    net = Net(opset=opset)
    c = net.conv("x", 3, 8)
    if opset >= 13:
        parts = net.node("Split", [c, net.init(np.array([3, 5], dtype=np.int64), "split")], n_out=2, axis=1)
    else:
        parts = net.node("Split", [c], n_out=2, axis=1, split=[3, 5])
    ya, yb = net.conv(parts[0], 3, 2), net.conv(parts[1], 5, 2)
    groups = [g for g in groups_of(net.model(ya, yb)) if g.producers == [f"n_{c}"]]
    assert sorted((g.size, refs(g, "out")[0].offset) for g in groups) == [(3, 0), (5, 3)]
    assert all(g.prunable for g in groups)


def test_slice_on_the_channel_axis_keeps_the_sliced_away_channels_separate():
    net = Net()
    c = net.conv("x", 3, 8)
    starts, ends, axes = (net.init(np.array([v], dtype=np.int64), "s") for v in (2, 6, 1))
    y = net.conv(net.node("Slice", [c, starts, ends, axes]), 4, 2)
    groups = [g for g in groups_of(net.model(y)) if g.producers == [f"n_{c}"]]
    assert sorted((refs(g, "out")[0].offset, g.size, bool(g.consumers)) for g in groups) == [
        (0, 2, False), (2, 4, True), (6, 2, False)
    ]  # fmt: skip


def test_transpose_moves_the_channel_axis():
    net = Net()
    c = net.conv("x", 3, 8)
    nhwc = net.node("Transpose", [net.relu(c)], perm=[0, 2, 3, 1])
    y = net.node("MatMul", [nhwc, net.init(RNG.standard_normal((8, 3)).astype(np.float32))])
    group = producing(groups_of(net.model(y)), c)
    assert [(r.tensor, r.axis) for r in by_tensor(group, nhwc)] == [(nhwc, 3)]
    assert group.prunable and [r.axis for r in refs(group, "in")] == [0]


def test_channel_shuffle_keeps_row_j_of_every_block_together():
    net = Net(input_shape=(1, 8, 4, 4))
    g1 = net.conv("x", 8, 8, k=1, group=2)
    split = net.node("Reshape", [net.relu(g1), net.init(np.array([1, 2, 4, 4, 4], dtype=np.int64), "shape")])
    swap = net.node("Transpose", [split], perm=[0, 2, 1, 3, 4])
    merged = net.node("Reshape", [swap, net.init(np.array([1, 8, 4, 4], dtype=np.int64), "shape")])
    y = net.conv(net.conv(merged, 8, 8, k=3, group=8), 8, 4, k=1, group=2)
    group = producing(groups_of(net.model(y)), g1)
    assert group.prunable and group.size == 4
    assert [(r.offset, r.span) for r in refs(group, "out")] == [(0, 1), (4, 1)]  # both conv blocks
    assert [(r.offset, r.span) for r in refs(group, "in")] == [(0, 2)]  # after the shuffle
    assert group.blocks == 2  # the last grouped conv's two blocks must stay equal


def test_reshape_splitting_channels_into_heads_prunes_whole_heads():
    net = Net(input_shape=(1, 5, 6))
    q = net.node("MatMul", ["x", net.init(RNG.standard_normal((6, 8)).astype(np.float32))])
    heads = net.node("Reshape", [q, net.init(np.array([1, 5, 2, 4], dtype=np.int64), "shape")])
    merged = net.node("Reshape", [net.relu(heads), net.init(np.array([1, 5, 8], dtype=np.int64), "shape")])
    y = net.node("MatMul", [merged, net.init(RNG.standard_normal((8, 3)).astype(np.float32))])
    group = producing(groups_of(net.model(y)), q)
    assert group.prunable and group.size == 2
    assert [r.span for r in refs(group, "out")] == [4]
    assert sorted((r.axis, r.span) for r in refs(group, "shape")) == [(2, 1), (2, 4)]


def test_reduce_and_softmax_over_other_axes_pass_channels_through():
    net = Net()
    c = net.conv("x", 3, 8)
    pooled = net.node("ReduceMean", [net.relu(c)], axes=[2, 3], keepdims=0)
    expanded = net.node("Unsqueeze", [pooled, net.init(np.array([0], dtype=np.int64))])
    soft = net.node("Softmax", [expanded], axis=1)
    y = net.node("MatMul", [soft, net.init(RNG.random((8, 3)).astype(np.float32))])
    group = producing(groups_of(net.model(y)), c)
    assert group.prunable and [r.axis for r in by_tensor(group, pooled)] == [1]


def test_softmax_over_the_channel_axis_is_blocked():
    net = Net(input_shape=(2, 6))
    h = net.gemm("x", 6, 8)
    y = net.gemm(net.node("Softmax", [h], axis=1), 8, 2)
    group = producing(groups_of(net.model(y)), h)
    assert not group.prunable and group.reason.startswith("Softmax")


# --------------------------------------------------------------------------- blockers


def test_graph_output_is_never_pruned():
    net = Net()
    c = net.conv("x", 3, 8)
    group = producing(groups_of(net.model(c)), c)
    assert not group.prunable and group.reason == f"reaches graph output '{c}'"


def test_unknown_op_blocks_every_group_it_touches_and_names_itself():
    net = Net()
    a = net.conv("x", 3, 8)
    b = net.conv("x", 3, 8)
    odd = net.node("Foo", [net.relu(a), b], domain="custom.ops")
    y = net.conv(odd, 8, 2)
    groups = groups_of(net.model(y))
    for producer in (a, b):
        group = producing(groups, producer)
        assert not group.prunable
        assert group.reason == f"unknown op 'Foo' (domain 'custom.ops') at node 'n_{odd}'"


def test_weight_shared_with_a_node_outside_the_group_blocks_it():
    net = Net()
    c = net.conv("x", 3, 8)
    weight = net.inputs_of(c)[1]
    norm = net.node("ReduceSum", [weight], keepdims=0)
    y = net.conv(net.relu(c), 8, 2)
    group = producing(groups_of(net.model(y, norm)), c)
    assert not group.prunable
    assert group.reason == f"weight '{weight}' is also read by ReduceSum 'n_{norm}'"


def test_subgraph_op_reading_channels_is_blocked():
    net = Net()
    c = net.conv("x", 3, 8)
    h = net.relu(c)
    inner = helper.make_node("Identity", [h], ["inner"])
    inner_out = helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)
    branch = helper.make_graph([inner], "b", [], [inner_out])
    out = net.node("If", [net.init(np.array(True))], then_branch=branch, else_branch=branch)
    y = net.conv(h, 8, 2)
    group = producing(groups_of(net.model(y, out)), c)
    assert not group.prunable and "subgraph" in group.reason


# --------------------------------------------------------------------------- whole models


def _sample(name: str) -> ir.Model:
    return ir.load(f"sample_models/digits_{name}.onnx")


def test_sample_cnn_groups_cover_residual_concat_depthwise_and_flatten():
    groups = find_groups(_sample("cnn"))
    prunable = [g for g in groups if g.prunable]
    assert len(groups) == 6 and len(prunable) == 5
    stem = producing(groups, "/stem/stem.0/Conv")
    assert stem.producers == ["/stem/stem.0/Conv", "/res_b/res_b.0/Conv"]  # the residual add
    branch = producing(groups, "/branch_3x3/Conv")
    assert {r.offset for r in branch.members if r.tensor == "depthwise.0.weight"} == {16}
    head = producing(groups, "/pointwise/pointwise.0/Conv")
    assert [r.span for r in refs(head, "in")] == [16]


def test_sample_transformer_attention_heads_form_groups():
    groups = find_groups(_sample("transformer"))
    heads = [g for g in groups if len(g.producers) == 3]
    assert len(heads) == 2 and all(g.prunable and g.size == 4 for g in heads)
    mlp = [g for g in groups if g.size == 64]
    assert len(mlp) == 2 and all(g.prunable for g in mlp)
    stream = producing(groups, "/embed/MatMul")
    assert not stream.prunable and "LayerNormalization" in stream.reason


def test_analysis_is_deterministic_ordered_and_leaves_the_model_alone():
    model = _sample("cnn")
    before = ir.to_proto(model).SerializeToString()
    first, second = describe_groups(find_groups(model)), describe_groups(find_groups(model))
    assert first == second
    assert ir.to_proto(model).SerializeToString() == before
    assert [row["id"] for row in first] == list(range(len(first)))
    order = [n.name for n in model.graph]
    assert [order.index(row["producers"][0]) for row in first] == sorted(
        order.index(row["producers"][0]) for row in first
    )
    columns = {"id", "size", "prunable", "reason", "members", "divisor", "producers", "consumers"}
    assert set(first[0]) == columns


def test_depthwise_conv_on_a_graph_input_cannot_drop_its_only_filters():
    net = Net(input_shape=(1, 4, 6, 6))
    single = net.conv("x", 4, 4, k=3, group=4)
    double = net.conv("x", 4, 8, k=3, group=4)
    groups = groups_of(net.model(net.conv(single, 4, 2), net.conv(double, 8, 2)))
    assert (
        not producing(groups, single).prunable
        and "one filter per input channel" in producing(groups, single).reason
    )
    two_each = producing(groups, double)
    assert two_each.prunable and two_each.blocks == 4  # each input channel keeps as many filters


def test_a_malformed_node_blocks_what_it_touches_instead_of_failing():
    net = Net(opset=11)
    c = net.conv("x", 3, 8)
    parts = net.node("Split", [c], n_out=3, axis=1, split=[4, 4])  # three outputs, two sizes
    y = net.node("Concat", parts, axis=1)
    group = producing(groups_of(net.model(net.conv(y, 8, 2))), c)
    assert not group.prunable and "could not be analysed" in group.reason
