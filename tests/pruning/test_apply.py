"""Physical slicing: pruned models validate, keep their output shapes, and removing channels
whose producing weights are all zero changes no output."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.errors import PassError
from onnxslim_tool.pruning.apply import apply_plan
from onnxslim_tool.pruning.depgraph import constant_value, find_groups, node_labels
from onnxslim_tool.pruning.groups import DependencyGroup, PruningPlan
from onnxslim_tool.testing import light_models, random_feed, run_proto, with_random_weights

RNG = np.random.default_rng(1)


# --------------------------------------------------------------------------- tiny-graph kit


class Net:
    """A small ONNX graph built node by node; node `n_<out>` writes `<out>`."""

    def __init__(self, input_shape=(2, 3, 6, 6), opset: int = 17) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.input_shape = list(input_shape)
        self.opset = opset
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, array, prefix: str = "w") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def rand(self, *shape: int, scale: float = 0.3) -> str:
        return self.init((RNG.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"n_{outs[0]}", **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1) -> str:
        w, b = self.rand(c_out, c_in // group, k, k), self.rand(c_out, scale=0.1)
        return self.node("Conv", [x, w, b], kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        params = [1 + 0.1 * RNG.standard_normal(c), 0.1 * RNG.standard_normal(c)]
        params += [0.1 * RNG.standard_normal(c), 1 + 0.1 * np.abs(RNG.standard_normal(c))]
        return self.node("BatchNormalization", [x] + [self.init(p.astype(np.float32), "bn") for p in params])

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
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)
        return onnx.shape_inference.infer_shapes(model)


def chain() -> onnx.ModelProto:
    net = Net()
    return net.model(net.conv(net.relu(net.bn(net.conv("x", 3, 8), 8)), 8, 4))


def residual() -> onnx.ModelProto:
    net = Net()
    a = net.relu(net.conv("x", 3, 8))
    b = net.bn(net.conv(net.relu(net.conv(a, 8, 6)), 6, 8), 8)
    return net.model(net.conv(net.relu(net.node("Add", [a, b])), 8, 2))


def concat() -> onnx.ModelProto:
    net = Net()
    cat = net.node("Concat", [net.conv("x", 3, 6), net.conv("x", 3, 5), "x"], axis=1)
    return net.model(net.conv(net.relu(net.bn(cat, 14)), 14, 2))


def depthwise() -> onnx.ModelProto:
    net = Net()
    pw = net.relu(net.conv("x", 3, 8, k=1))
    dw = net.relu(net.bn(net.conv(pw, 8, 16, k=3, group=8), 16))  # multiplier 2
    return net.model(net.conv(dw, 16, 4, k=1))


def grouped() -> onnx.ModelProto:
    net = Net()
    a = net.relu(net.conv("x", 3, 8, k=1))
    b = net.relu(net.conv(a, 8, 12, k=3, group=4))
    return net.model(net.conv(b, 12, 2, k=1))


def shuffle() -> onnx.ModelProto:
    net = Net(input_shape=(1, 8, 4, 4))
    g1 = net.relu(net.conv("x", 8, 8, k=1, group=2))
    split = net.node("Reshape", [g1, net.init(np.array([1, 2, 4, 4, 4], dtype=np.int64), "shape")])
    swap = net.node("Transpose", [split], perm=[0, 2, 1, 3, 4])
    merged = net.node("Reshape", [swap, net.init(np.array([1, 8, 4, 4], dtype=np.int64), "shape")])
    return net.model(net.conv(net.conv(merged, 8, 8, k=3, group=8), 8, 4, k=1, group=2))


def flatten_gemm() -> onnx.ModelProto:
    net = Net()
    pooled = net.node("MaxPool", [net.relu(net.conv("x", 3, 6))], kernel_shape=[2, 2], strides=[2, 2])
    flat = net.node("Flatten", [pooled], axis=1)
    hidden = net.relu(net.node("Gemm", [flat, net.rand(54, 10), net.rand(10)]))  # transB = 0
    return net.model(net.node("Gemm", [hidden, net.rand(3, 10), net.rand(3)], transB=1))


def reshape_gemm() -> onnx.ModelProto:
    net = Net(input_shape=(1, 3, 6, 6))
    c = net.relu(net.conv("x", 3, 6))
    flat = net.node("Reshape", [c, net.init(np.array([1, 6 * 36], dtype=np.int64), "shape")])
    return net.model(net.node("Gemm", [flat, net.rand(4, 6 * 36)], transB=1))


def split(opset: int) -> onnx.ModelProto:
    net = Net(opset=opset)
    c = net.relu(net.conv("x", 3, 8))
    if opset >= 13:
        parts = net.node("Split", [c, net.init(np.array([3, 5], dtype=np.int64), "split")], n_out=2, axis=1)
    else:
        parts = net.node("Split", [c], n_out=2, axis=1, split=[3, 5])
    return net.model(net.node("Add", [net.conv(parts[0], 3, 2), net.conv(parts[1], 5, 2)]))


def sliced() -> onnx.ModelProto:
    net = Net()
    c = net.relu(net.conv("x", 3, 8))
    starts, ends, axes = (net.init(np.array([v], dtype=np.int64), "s") for v in (2, 6, 1))
    return net.model(net.conv(net.node("Slice", [c, starts, ends, axes]), 4, 2))


def squeeze_excite() -> onnx.ModelProto:
    net = Net()
    feat = net.relu(net.conv("x", 3, 8))
    squeeze = net.relu(net.conv(net.node("GlobalAveragePool", [feat]), 8, 4, k=1))
    gate = net.node("Sigmoid", [net.conv(squeeze, 4, 8, k=1)])
    return net.model(net.conv(net.node("Mul", [feat, gate]), 8, 2))


def attention_heads() -> onnx.ModelProto:
    net = Net(input_shape=(1, 5, 6))
    q = net.node("Add", [net.node("MatMul", ["x", net.rand(6, 8)]), net.rand(8)])
    heads = net.node("Reshape", [q, net.init(np.array([1, 5, 2, 4], dtype=np.int64), "shape")])
    swapped = net.node("Transpose", [net.relu(heads)], perm=[0, 2, 1, 3])
    back = net.node("Transpose", [swapped], perm=[0, 2, 1, 3])
    merged = net.node("Reshape", [back, net.init(np.array([1, 5, 8], dtype=np.int64), "shape")])
    return net.model(net.node("MatMul", [merged, net.rand(8, 3)]))


def conv_transpose() -> onnx.ModelProto:
    net = Net()
    a = net.relu(net.conv("x", 3, 4))
    up = net.relu(net.node("ConvTranspose", [a, net.rand(4, 5, 2, 2), net.rand(5)], strides=[2, 2]))
    return net.model(net.conv(up, 5, 2))


TINY = {
    "chain": chain,
    "residual": residual,
    "concat": concat,
    "depthwise": depthwise,
    "grouped": grouped,
    "shuffle": shuffle,
    "flatten_gemm": flatten_gemm,
    "reshape_gemm": reshape_gemm,
    "split11": lambda: split(11),
    "split13": lambda: split(13),
    "slice": sliced,
    "squeeze_excite": squeeze_excite,
    "attention_heads": attention_heads,
    "conv_transpose": conv_transpose,
}


# --------------------------------------------------------------------------- helpers


def choose_removals(groups: list[DependencyGroup], fraction: float, seed: int = 0) -> dict[int, list[int]]:
    """About `fraction` of each prunable group, the same count from every block."""
    rng = np.random.default_rng(seed)
    removals = {}
    for group in groups:
        width = group.size // group.blocks
        count = min(width - 1, max(1, round(width * fraction)))
        if not group.prunable or count < 1:
            continue
        picks = [b * width + rng.choice(width, count, replace=False) for b in range(group.blocks)]
        removals[group.id] = sorted(np.concatenate(picks).tolist())
    return removals


def plan_for(groups: list[DependencyGroup], removals: dict[int, list[int]]) -> PruningPlan:
    size = {g.id: g.size for g in groups}
    return PruningPlan(keep={gid: sorted(set(range(size[gid])) - set(r)) for gid, r in removals.items()})


def zero_channels(model: ir.Model, groups: list[DependencyGroup], removals: dict[int, list[int]]) -> None:
    """Zero the weights that produce the given channels (rows, biases, BN scale and shift, ...)."""
    graph = model.graph
    nodes = {label: node for node, label in node_labels(graph).items()}
    writable: dict[str, ir.Value] = {}
    for group in groups:
        for ref in group.members:
            node = nodes.get(ref.node)
            if ref.role not in ("out", "param") or not _zero_keeps_zero(node, ref.tensor):
                continue
            value = _writable(graph, node, ref.tensor, writable)
            array = value.const_value.numpy().copy()
            for c in removals.get(group.id, []):
                index = [slice(None)] * array.ndim
                index[ref.axis] = slice(ref.offset + c * ref.span, ref.offset + (c + 1) * ref.span)
                array[tuple(index)] = 0
            value.const_value = ir.tensor(array, name=value.name)


def _zero_keeps_zero(node: ir.Node, tensor: str) -> bool:
    # Zero BN mean/var or a zero divisor would not produce a zero channel.
    index = next((i for i, v in enumerate(node.inputs) if v is not None and v.name == tensor), None)
    statistics = node.op_type == "BatchNormalization" and index in (3, 4)
    return not statistics and node.op_type not in ("Div", "Pow")


def _writable(graph: ir.Graph, node: ir.Node, tensor: str, done: dict) -> ir.Value:
    if tensor not in done:
        value = next(v for v in node.inputs if v is not None and v.name == tensor)
        if not value.is_initializer():  # a folded constant chain: materialise it once
            array = constant_value(value).copy()
            fresh = ir.Value(name=f"{tensor}_zeroed", shape=ir.Shape(array.shape), type=value.type)
            fresh.const_value = ir.tensor(array, name=fresh.name)
            graph.register_initializer(fresh)
            for use in list(value.uses()):
                use.node.replace_input_with(use.idx, fresh)
            value = fresh
        done[tensor] = value
    return done[tensor]


def prune_matches_zeroing(proto: onnx.ModelProto, fraction: float, seed: int = 0, batch: int = 2):
    """Prune `fraction` of every prunable group; compare with the model whose pruned channels
    were zeroed instead. Returns (groups, removals, pruned proto, records)."""
    feed = random_feed(proto, seed=seed, batch=batch)
    model = ir.from_proto(proto)
    groups = find_groups(model)
    removals = choose_removals(groups, fraction, seed)
    reference = ir.from_proto(proto)
    zero_channels(reference, groups, removals)
    expected = run_proto(ir.to_proto(reference), feed)
    records = apply_plan(model, groups, plan_for(groups, removals))
    pruned = ir.to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    got = run_proto(pruned, feed)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(e).max())))
    return groups, removals, pruned, records


# --------------------------------------------------------------------------- tiny graphs


@pytest.mark.parametrize("name", sorted(TINY))
def test_pruning_zero_channels_changes_no_output(name):
    groups, removals, _, records = prune_matches_zeroing(TINY[name](), fraction=0.4)
    assert removals and records  # something was actually removed


@pytest.mark.parametrize("name", sorted(TINY))
def test_pruning_nothing_is_the_identity(name):
    proto = TINY[name]()
    model = ir.from_proto(proto)
    groups = find_groups(model)
    plan = PruningPlan(keep={g.id: list(range(g.size)) for g in groups})
    before = ir.to_proto(model).SerializeToString()
    assert apply_plan(model, groups, plan) == []
    assert ir.to_proto(model).SerializeToString() == before
    feed = random_feed(proto)
    for got, want in zip(run_proto(ir.to_proto(model), feed), run_proto(proto, feed), strict=True):
        np.testing.assert_array_equal(got, want)


def test_records_name_every_rewritten_tensor_and_attribute():
    proto = depthwise()
    model = ir.from_proto(proto)
    groups = find_groups(model)
    pw = groups[0]
    records = apply_plan(model, groups, plan_for(groups, {pw.id: [0, 5]}))
    by_tensor = {r.get("tensor", r.get("attribute")): r for r in records}
    first_weight = by_tensor[proto.graph.node[0].input[1]]
    assert (first_weight["before"], first_weight["after"]) == ([8, 3, 1, 1], [6, 3, 1, 1])
    dw_weight = proto.graph.node[2].input[1]
    assert by_tensor[dw_weight]["after"] == [12, 1, 3, 3]  # two filters per removed channel
    group_attr = by_tensor["group"]
    assert (group_attr["node"], group_attr["before"], group_attr["after"]) == (proto.graph.node[2].name, 8, 6)
    last = proto.graph.node[-1].input[1]
    assert by_tensor[last]["after"] == [4, 12, 1, 1]


@pytest.mark.parametrize("opset", [11, 13])
def test_split_sizes_follow_the_removed_channels(opset):
    _, removals, pruned, _ = prune_matches_zeroing(split(opset), fraction=0.4)
    node = next(n for n in pruned.graph.node if n.op_type == "Split")
    if opset >= 13:
        sizes = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == node.input[1]))
    else:
        sizes = next(a.ints for a in node.attribute if a.name == "split")
    assert list(sizes) == [3 - 1, 5 - 2]  # round(0.4 * 3) and round(0.4 * 5) channels gone


def test_slice_bounds_and_reshape_targets_are_rewritten():
    _, _, pruned, records = prune_matches_zeroing(sliced(), fraction=0.5)
    assert any(r["op"] == "Slice" for r in records)
    _, _, pruned, records = prune_matches_zeroing(reshape_gemm(), fraction=0.5)
    target = next(r for r in records if r["op"] == "Reshape")
    assert target["before"] == [1, 216] and target["after"] == [1, 216 - 3 * 36]


def test_folded_constant_chains_are_sliced_into_new_initializers():
    net = Net()
    c = net.conv("x", 3, 8)
    scale = net.node("Unsqueeze", [net.rand(8), net.init(np.array([1, 2], dtype=np.int64))])
    proto = net.model(net.conv(net.relu(net.node("Mul", [c, scale])), 8, 2))
    _, _, pruned, _ = prune_matches_zeroing(proto, fraction=0.5)
    assert "Unsqueeze" not in {n.op_type for n in pruned.graph.node}  # the dead chain is gone


def test_shared_shape_constant_is_copied_not_mutated_for_one_reader():
    net = Net(input_shape=(1, 3, 6, 6))
    target = net.init(np.array([1, 6 * 36], dtype=np.int64), "shape")
    flat = net.node("Reshape", [net.relu(net.conv("x", 3, 6)), target])
    other = net.node("Reshape", ["x", net.init(np.array([1, 3, 36], dtype=np.int64))])
    kept = net.node("Reshape", [net.node("Concat", [other, other], axis=1), target])  # [1, 216]
    proto = net.model(net.node("Gemm", [flat, net.rand(4, 216)], transB=1), kept)
    _, _, pruned, _ = prune_matches_zeroing(proto, fraction=0.5, batch=1)
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer}
    assert inits[target] == [1, 216]  # the untouched Reshape still reads the original


# --------------------------------------------------------------------------- refusals


def _refused(proto: onnx.ModelProto, make_plan, match: str) -> None:
    model = ir.from_proto(proto)
    groups = find_groups(model)
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(PassError, match=match):
        apply_plan(model, groups, make_plan(groups))
    assert ir.to_proto(model).SerializeToString() == before  # refused plans change nothing


def test_plan_on_an_unprunable_group_is_refused():
    _refused(chain(), lambda gs: PruningPlan(keep={gs[-1].id: [0]}), "not prunable: reaches graph output")


def test_plan_removing_every_channel_is_refused():
    _refused(chain(), lambda gs: PruningPlan(keep={gs[0].id: []}), "removes all 8 channels")


def test_unbalanced_plan_for_a_grouped_conv_is_refused():
    _refused(grouped(), lambda gs: PruningPlan(keep={gs[1].id: list(range(8))}), "must keep as many")


def test_plan_naming_unknown_groups_or_channels_is_refused():
    _refused(chain(), lambda gs: PruningPlan(keep={99: [0]}), "group")
    _refused(chain(), lambda gs: PruningPlan(keep={gs[0].id: [0, 8]}), "has only 8")


# --------------------------------------------------------------------------- real models


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_sample_models_prune_zero_channels_exactly(name):
    proto = onnx.load(f"sample_models/digits_{name}.onnx")
    groups, removals, _, _ = prune_matches_zeroing(proto, fraction=0.3, batch=3)
    assert len(removals) == sum(g.prunable for g in groups)


# VGG19, AlexNet and ZFNet carry 60-140M weights: too slow for the suite (checked by hand).
FAST_ZOO = ["densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet"]


@pytest.mark.parametrize("name", FAST_ZOO)
def test_light_zoo_prunes_30_percent_and_validates(name):
    proto = with_random_weights(light_models()[name], seed=0)
    groups, removals, pruned, _ = prune_matches_zeroing(proto, fraction=0.3, batch=1)
    assert removals and len(removals) == sum(g.prunable and g.size // g.blocks > 1 for g in groups)
    macs_before = analyze_cost(ir.from_proto(proto)).total_macs
    macs_after = analyze_cost(ir.from_proto(pruned)).total_macs
    assert macs_after < 0.85 * macs_before
