"""Dependency groups: which channels of which tensors must be removed together.

Every index of every tracked channel axis gets an integer id. The op rules (op_rules.py)
say which ids are the same channel: a residual Add couples two tensors one to one, a Concat
lays its inputs' ids side by side, a Flatten repeats each id H*W times, a weight's rows and
columns carry the ids of the tensors they produce and read. Connected components of that
relation (scipy) are the smallest removable units. Units that touch exactly the same tensors
form one `DependencyGroup`; in each member, channel c occupies `offset + c*span ...`.

Anything the rules do not understand blocks the units it touches, with the reason.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from graphlib import TopologicalSorter
from typing import Any

import numpy as np
import onnx_ir as ir
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from onnxslim_tool.cost import value_shapes
from onnxslim_tool.graph_utils import attr, const_array
from onnxslim_tool.pruning.groups import ChannelRef, DependencyGroup
from onnxslim_tool.pruning.op_rules import RULES, Unsupported

__all__ = [
    "NodeContext",
    "Slot",
    "constant_value",
    "describe_groups",
    "find_groups",
    "node_labels",
    "static_dims",
]

_ROLE_ORDER = {"out": 0, "in": 1, "param": 2, "shape": 3, "act": 4}
_NOT_BLOCKED = np.iinfo(np.int64).max
# Constant-only chains (DenseNet's Unsqueeze of BN vectors, shape Concats) folded for reading.
_FOLDABLE = frozenset({"Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Concat"})


@dataclass
class Slot:
    """The channel axis of one tensor, and the channel id of each index along it."""

    value: ir.Value
    axis: int
    ids: np.ndarray


@dataclass
class _Member:
    value: ir.Value
    axis: int
    role: str
    node: str
    ids: np.ndarray
    # > 1: the side of a grouped Conv whose `conv_groups` blocks must lose equally many.
    conv_groups: int = 1
    reader: ir.Node | None = None


# --------------------------------------------------------------------------- public API


def find_groups(model: ir.Model) -> list[DependencyGroup]:
    """Every channel space of every Conv/ConvTranspose/Gemm/MatMul-with-constant-weight output,
    as dependency groups in topological order; unprunable ones carry their reason.

    Does not modify the model.
    """
    return _Analysis(model).run()


def describe_groups(groups: list[DependencyGroup]) -> list[dict[str, Any]]:
    """One row per group for `inspect --groups`."""
    return [
        {
            "id": g.id,
            "size": g.size,
            "prunable": g.prunable,
            "reason": g.reason,
            "members": len(g.members),
            "divisor": g.divisor,
            "producers": list(g.producers),
            "consumers": list(g.consumers),
        }
        for g in groups
    ]


def node_labels(graph: ir.Graph) -> dict[ir.Node, str]:
    """The name a node goes by in ChannelRef.node: its name, or `OpType#index` when unnamed."""
    return {node: node.name or f"{node.op_type}#{index}" for index, node in enumerate(graph)}


def static_dims(model: ir.Model) -> dict[str, tuple]:
    """Inferred dims by value name (ints, or str/None where dynamic), from ONNX shape inference."""
    return value_shapes(model)


def constant_value(value: ir.Value | None, cache: dict | None = None) -> np.ndarray | None:
    """The array of an initializer, a Constant output, or a constant-only reshaping chain."""
    if value is None:
        return None
    if cache is not None and value in cache:
        return cache[value]
    array = const_array(value)
    node = value.producer()
    if array is None and node is not None and node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx"):
        inputs = [constant_value(v, cache) if v is not None else None for v in node.inputs]
        if (
            inputs
            and inputs[0] is not None
            and all(a is not None for v, a in zip(node.inputs, inputs, strict=True) if v is not None)
        ):
            array = _fold(node, inputs)
    if cache is not None:
        cache[value] = array
    return array


def _fold(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    """numpy for the few ops that only move constant data around (axes: attribute or input)."""
    x = arrays[0]
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(ir.DataType(attr(node, "to")).numpy())
    if op == "Concat":
        return np.concatenate(arrays, axis=attr(node, "axis"))
    if op == "Flatten":
        axis = attr(node, "axis", 1) % max(x.ndim, 1)
        return x.reshape(math.prod(x.shape[:axis]), -1)
    axes = attr(node, "axes") if len(arrays) < 2 or arrays[1] is None else arrays[1].ravel().tolist()
    if op == "Unsqueeze" and axes is not None:
        rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(sorted(a % rank for a in axes)))
    if op == "Squeeze":
        return np.squeeze(x, axis=None if axes is None else tuple(a % x.ndim for a in axes))
    if op == "Reshape" and len(arrays) > 1 and arrays[1] is not None:
        target = [int(d) for d in arrays[1].ravel()]
        if not attr(node, "allowzero", 0):
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)
    return None


# --------------------------------------------------------------------------- per-node view for rules


class NodeContext:
    """What an op rule may read about one node, and how it records coupling (see op_rules)."""

    def __init__(self, analysis: _Analysis, node: ir.Node, label: str) -> None:
        self._analysis = analysis
        self.node = node
        self.name = label
        self.op = node.op_type
        self.opset = analysis.opset
        self.read: set[int] = set()  # id() of tracked inputs the rule has looked at

    def input(self, index: int) -> ir.Value | None:
        return self.node.inputs[index] if index < len(self.node.inputs) else None

    def attr(self, name: str, default: Any = None) -> Any:
        return attr(self.node, name, default)

    def slot(self, value: ir.Value | None) -> Slot | None:
        slot = self._analysis.slots.get(value) if value is not None else None
        if slot is not None:
            self.read.add(id(value))
        return slot

    def dims(self, value: ir.Value | None) -> tuple | None:
        return self._analysis.dims(value)

    def rank(self, value: ir.Value | None) -> int | None:
        dims = self.dims(value)
        return None if dims is None else len(dims)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        return constant_value(value, self._analysis.consts)

    def untracked_reason(self, value: ir.Value) -> str:
        return self._analysis.untracked_reason(value)

    def new_ids(self, count: int) -> np.ndarray:
        return self._analysis.new_ids(count)

    def fresh(self, value: ir.Value, axis: int, size: int) -> Slot:
        return self.forward(value, axis, self.new_ids(size))

    def forward(self, value: ir.Value | None, axis: int, ids: np.ndarray) -> Slot | None:
        if value is None or not value.name:
            return None
        dims = self.dims(value)
        if dims is not None and isinstance(dims[axis], int) and dims[axis] != len(ids):
            raise Unsupported(f"'{value.name}' has {dims[axis]} channels on axis {axis}, expected {len(ids)}")
        if value in self._analysis.slots:
            raise Unsupported(f"'{value.name}' would carry two channel axes")
        slot = Slot(value, axis, np.asarray(ids, dtype=np.int64))
        self._analysis.slots[value] = slot
        self._analysis.members.append(_Member(value, axis, "act", self.name, slot.ids))
        return slot

    def member(self, value: ir.Value, axis: int, role: str, ids: np.ndarray, conv_groups: int = 1) -> None:
        array = self.const(value)
        if array is None:
            raise Unsupported(f"'{value.name}' is not a constant")
        expected = array.shape[axis] * (conv_groups if role == "in" else 1) if role != "shape" else None
        if expected is not None and expected != len(ids):
            raise Unsupported(
                f"'{value.name}' has {array.shape[axis]} entries on axis {axis}, not {len(ids)}"
            )
        ids = np.asarray(ids, dtype=np.int64)
        self._analysis.members.append(_Member(value, axis, role, self.name, ids, conv_groups, self.node))

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        self._analysis.edges.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def block(self, ids: np.ndarray, reason: str) -> None:
        self._analysis.blocks.append((np.asarray(ids, dtype=np.int64), reason))


# --------------------------------------------------------------------------- the walk


class _Analysis:
    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.inferred = static_dims(model)
        self.labels = node_labels(self.graph)
        self.slots: dict[ir.Value, Slot] = {}
        self.untracked: dict[ir.Value, str] = {}
        self.members: list[_Member] = []
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.consts: dict[ir.Value, np.ndarray | None] = {}
        self.next_id = 0

    def new_ids(self, count: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + count, dtype=np.int64)
        self.next_id += count
        return ids

    def dims(self, value: ir.Value | None) -> tuple | None:
        if value is None:
            return None
        if value.const_value is not None:
            dims = tuple(value.const_value.shape.dims)
        elif value.name in self.inferred:
            dims = tuple(self.inferred[value.name])
        elif value.shape is not None:
            dims = tuple(d if isinstance(d, int) else None for d in value.shape.dims)
        else:
            return None
        slot = self.slots.get(value)
        if slot is not None and slot.axis < len(dims):  # the channel count is known exactly
            dims = dims[: slot.axis] + (len(slot.ids),) + dims[slot.axis + 1 :]
        return dims

    def untracked_reason(self, value: ir.Value) -> str:
        if value in self.untracked:
            return self.untracked[value]
        if value.is_graph_input():
            return f"graph input '{value.name}'"
        return "no channel group"

    def run(self) -> list[DependencyGroup]:
        for node in _topological(self.graph):
            self._visit(node)
        self._block_graph_outputs()
        self._block_subgraph_reads()
        self._couple_shared_constants()
        labels = self._components()
        return _GroupBuilder(self, labels).build()

    def _visit(self, node: ir.Node) -> None:
        label = self.labels[node]
        tracked = [v for v in node.inputs if v is not None and v in self.slots]
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if _has_subgraph(node):
            self._refuse(node, tracked, f"subgraph op '{node.op_type}' at node '{label}'")
            return
        if rule is None:
            domain = f" (domain '{node.domain}')" if node.domain not in ("", "ai.onnx") else ""
            self._refuse(node, tracked, f"unknown op '{node.op_type}'{domain} at node '{label}'")
            return
        ctx = NodeContext(self, node, label)
        checkpoint = (len(self.members), len(self.edges), len(self.blocks))
        try:
            rule(ctx)
        except Unsupported as exc:
            self._rollback(node, checkpoint)
            self._refuse(node, tracked, f"{node.op_type} '{label}': {exc}")
            return
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            # A malformed node (missing attribute, odd shape) must not stop the analysis:
            # what it touches stays untouched, and the reason says why.
            self._rollback(node, checkpoint)
            self._refuse(
                node, tracked, f"{node.op_type} '{label}' could not be analysed ({type(exc).__name__}: {exc})"
            )
            return
        for index, value in enumerate(node.inputs):
            if value is not None and value in self.slots and id(value) not in ctx.read:
                reason = f"{node.op_type} '{label}' reads it as input {index}, which its rule does not cover"
                self.blocks.append((self.slots[value].ids, reason))
        for out in node.outputs:
            if out not in self.slots:
                self.untracked[out] = f"it comes from {node.op_type} '{label}', which has no channel group"

    def _rollback(self, node: ir.Node, checkpoint: tuple[int, int, int]) -> None:
        members, edges, blocks = checkpoint
        del self.members[members:], self.edges[edges:], self.blocks[blocks:]
        for out in node.outputs:
            self.slots.pop(out, None)

    def _refuse(self, node: ir.Node, tracked: list[ir.Value], reason: str) -> None:
        for value in tracked:
            self.blocks.append((self.slots[value].ids, reason))
        for out in node.outputs:
            self.untracked[out] = reason

    def _block_graph_outputs(self) -> None:
        for value in self.graph.outputs:
            if value in self.slots:
                self.blocks.append((self.slots[value].ids, f"reaches graph output '{value.name}'"))

    def _block_subgraph_reads(self) -> None:
        for value, slot in self.slots.items():
            for use in value.uses():
                if use.node.graph is not self.graph:
                    reason = f"read inside a subgraph by {use.node.op_type} '{use.node.name or '?'}'"
                    self.blocks.append((slot.ids, reason))

    def _couple_shared_constants(self) -> None:
        """A weight read by several members is one tensor: its indices couple across readers.
        A weight also read by a node outside every group blocks its channels."""
        by_value: dict[ir.Value, list[_Member]] = defaultdict(list)
        for member in self.members:
            if member.role in ("out", "in", "param"):
                by_value[member.value].append(member)
        for value, members in by_value.items():
            readers = {id(m.reader) for m in members}
            strangers = [u.node for u in value.uses() if id(u.node) not in readers]
            reason = None
            if value.is_graph_input() or value.is_graph_output():
                # IR < 4 lists initializers among the inputs: a caller may override them.
                reason = f"weight '{value.name}' is also a graph input or output"
            elif strangers:
                other = strangers[0]
                label = self.labels.get(other, "?")
                reason = f"weight '{value.name}' is also read by {other.op_type} '{label}'"
            elif len(readers) > 1 and any(m.conv_groups > 1 and m.role == "in" for m in members):
                reason = f"weight '{value.name}' is shared by a grouped Conv and another node"
            if reason is not None:
                for member in members:
                    self.blocks.append((member.ids, reason))
                continue
            first_on_axis: dict[int, _Member] = {}
            for member in members:
                if member.conv_groups > 1 and member.role == "in":
                    continue  # indexed by the conv's input channels, not by the weight's axis
                first = first_on_axis.setdefault(member.axis, member)
                if first is not member:
                    self.edges.append((first.ids, member.ids))

    def _components(self) -> np.ndarray:
        n = self.next_id
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        matrix = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        return connected_components(matrix, directed=False)[1]


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """Nodes in a dependency order that is stable for a given file (graphlib, ties by position)."""
    nodes = list(graph)
    position = {node: i for i, node in enumerate(nodes)}
    sorter: TopologicalSorter[int] = TopologicalSorter()
    for i, node in enumerate(nodes):
        producers = {v.producer() for v in node.inputs if v is not None}
        sorter.add(i, *sorted(position[p] for p in producers if p in position))
    return [nodes[i] for i in sorter.static_order()]


# --------------------------------------------------------------------------- components -> groups


@dataclass
class _Layout:
    """Where one unit's indices sit in one member: rows of `positions` follow the group order."""

    positions: np.ndarray  # [size, per-unit count], ascending per row
    regular: bool  # every unit's indices form the same runs, shifted
    refs: list[tuple[int, int]] = field(default_factory=list)  # (offset, span) per run of unit 0
    span: int = 1
    # Where consecutive units stop being `span` apart, and whether any step goes backwards.
    breaks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    backwards: bool = False

    def __post_init__(self) -> None:
        steps = np.diff(self.positions[:, 0])
        self.breaks = np.flatnonzero(steps != self.span) + 1
        self.backwards = bool((steps < self.span).any())


class _GroupBuilder:
    def __init__(self, analysis: _Analysis, labels: np.ndarray) -> None:
        self.analysis = analysis
        self.members = analysis.members
        self.labels = labels
        self.member_labels = [labels[m.ids] for m in self.members]
        self._sorted: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def build(self) -> list[DependencyGroup]:
        ranked = self._block_ranks()
        drafts = []
        for signature, units in self._signatures().items():
            reference = next(mi for mi in signature if self.members[mi].role == "out")
            for segment, layouts in self._segments(signature, self._ordered(units, reference)):
                first = int(layouts[reference].positions[0, 0])
                drafts.append(((reference, first), signature, segment, layouts))
        drafts.sort(key=lambda d: d[0])
        groups = [
            self._group(gid, signature, units, layouts, ranked)
            for gid, (_, signature, units, layouts) in enumerate(drafts)
        ]
        self._grouped_conv_constraints(groups, drafts)
        return groups

    def _segments(self, signature: tuple[int, ...], units: np.ndarray) -> list[tuple[np.ndarray, dict]]:
        """Units touching the same tensors, cut where some member skips indices (the channels a
        Slice drops sit between two kept runs), so each piece is laid out as offset + c*span."""
        layouts = {mi: self._layout(mi, units) for mi in signature}
        cuts: set[int] = set()
        for layout in layouts.values():
            if not layout.regular:
                continue
            if layout.backwards:  # a permutation, not a gap: keep the group whole and let it be blocked
                return [(units, layouts)]
            cuts.update(layout.breaks.tolist())
        if not cuts:
            return [(units, layouts)]
        pieces = np.split(units, sorted(cuts))
        return [(piece, {mi: self._layout(mi, piece) for mi in signature}) for piece in pieces]

    def _signatures(self) -> dict[tuple[int, ...], np.ndarray]:
        """Units (components) that produce channels, keyed by the exact set of members they touch."""
        producing = np.zeros(int(self.labels.max(initial=-1)) + 1, dtype=bool)
        for member, labs in zip(self.members, self.member_labels, strict=True):
            if member.role == "out":
                producing[labs] = True
        units, readers = [], []
        for mi, labs in enumerate(self.member_labels):
            touched = np.unique(labs[producing[labs]])
            units.append(touched)
            readers.append(np.full(len(touched), mi, dtype=np.int64))
        if not units:  # no channel members at all (a graph without weighted layers)
            return {}
        units_all, readers_all = np.concatenate(units), np.concatenate(readers)
        if units_all.size == 0:
            return {}
        order = np.lexsort((readers_all, units_all))  # by unit, then member index
        units_all, readers_all = units_all[order], readers_all[order]
        starts = np.flatnonzero(np.concatenate(([True], np.diff(units_all) != 0)))
        by_signature: dict[bytes, list[int]] = defaultdict(list)
        signatures: dict[bytes, tuple[int, ...]] = {}
        for unit, mis in zip(units_all[starts].tolist(), np.split(readers_all, starts[1:]), strict=True):
            key = mis.tobytes()
            by_signature[key].append(unit)
            signatures.setdefault(key, tuple(mis.tolist()))
        return {signatures[key]: np.asarray(units, dtype=np.int64) for key, units in by_signature.items()}

    def _block_ranks(self) -> np.ndarray:
        """Per unit, the index of the first blocking reason that reaches it (or _NOT_BLOCKED)."""
        per_id = np.full(self.analysis.next_id, _NOT_BLOCKED, dtype=np.int64)
        for rank, (ids, _) in enumerate(self.analysis.blocks):
            np.minimum.at(per_id, ids, rank)
        per_unit = np.full(int(self.labels.max(initial=-1)) + 1, _NOT_BLOCKED, dtype=np.int64)
        np.minimum.at(per_unit, self.labels, per_id)
        return per_unit

    def _sorted_member(self, mi: int) -> tuple[np.ndarray, np.ndarray]:
        if mi not in self._sorted:
            order = np.argsort(self.member_labels[mi], kind="stable")
            self._sorted[mi] = (order, self.member_labels[mi][order])
        return self._sorted[mi]

    def _ordered(self, units: np.ndarray, reference: int) -> np.ndarray:
        order, sorted_labels = self._sorted_member(reference)
        first = order[np.searchsorted(sorted_labels, units, side="left")]
        return units[np.argsort(first, kind="stable")]

    def _layout(self, mi: int, units: np.ndarray) -> _Layout:
        order, sorted_labels = self._sorted_member(mi)
        lo = np.searchsorted(sorted_labels, units, side="left")
        counts = np.searchsorted(sorted_labels, units, side="right") - lo
        count = int(counts[0])
        if not (counts == count).all():
            starts = order[lo][:, None]
            return _Layout(starts, regular=False, refs=[(int(starts[0, 0]), 1)])
        positions = order[lo[:, None] + np.arange(count)]
        if count == 1:  # the common case: one index per channel
            return _Layout(positions, True, [(int(positions[0, 0]), 1)])
        row = positions[0]
        # Runs of consecutive indices in the first unit; every unit must repeat them shifted.
        bounds = np.flatnonzero(np.concatenate(([True], np.diff(row) != 1, [True])))
        lengths = np.diff(bounds)
        span = int(lengths[0])
        regular = bool((lengths == span).all()) and bool((positions - positions[:, :1] == row - row[0]).all())
        starts = row[bounds[:-1]].tolist() if regular else [int(row[0])]
        return _Layout(positions, regular, [(int(o), span) for o in starts], span)

    def _group(
        self, gid: int, signature: tuple[int, ...], units: np.ndarray, layouts: dict, ranked: np.ndarray
    ) -> DependencyGroup:
        refs = []
        for mi in sorted(signature, key=lambda i: (_ROLE_ORDER[self.members[i].role], i)):
            m = self.members[mi]
            for offset, span in layouts[mi].refs:
                refs.append(ChannelRef(str(m.value.name), m.axis, m.role, m.node, offset, span))
        group = DependencyGroup(
            id=gid,
            size=len(units),
            members=refs,
            producers=_unique(self.members[mi].node for mi in signature if self.members[mi].role == "out"),
            consumers=_unique(self.members[mi].node for mi in signature if self.members[mi].role == "in"),
        )
        first_block = int(ranked[units].min())
        if first_block != _NOT_BLOCKED:
            group.block(self.analysis.blocks[first_block][1])
        irregular = [
            self.members[mi] for mi in signature if not layouts[mi].regular or len(layouts[mi].breaks)
        ]
        if irregular:
            m = irregular[0]
            group.block(f"channels of '{m.value.name}' (axis {m.axis}) are permuted relative to the producer")
        return group

    def _grouped_conv_constraints(self, groups: list[DependencyGroup], drafts: list) -> None:
        """Each block of a grouped Conv must keep as many channels as the others."""
        by_member: dict[int, list[tuple[DependencyGroup, np.ndarray]]] = defaultdict(list)
        for group, (_, signature, _, layouts) in zip(groups, drafts, strict=True):
            for mi in signature:
                if self.members[mi].conv_groups > 1:
                    by_member[mi].append((group, layouts[mi].positions))
        for mi, entries in by_member.items():
            member = self.members[mi]
            length, conv_groups = len(member.ids), member.conv_groups
            for group, positions in entries:
                covers_all = positions.size == length
                blocks = _balanced_blocks(positions, length, conv_groups, covers_all)
                if blocks is None:
                    group.block(
                        f"grouped Conv '{member.node}' (group={conv_groups}) mixes channels of this group "
                        "with others in one block"
                    )
                elif blocks > 1:
                    group.blocks = math.lcm(group.blocks, blocks)
                    group.divisor = group.blocks


def _balanced_blocks(positions: np.ndarray, length: int, conv_groups: int, covers_all: bool) -> int | None:
    """How many equal contiguous runs of the group must lose equally many channels for every
    conv block to keep the same width: 1 (any removal is balanced), B, or None (impossible)."""
    size, per_unit = positions.shape
    block_of = positions // (length // conv_groups)
    counts = np.zeros((conv_groups, size), dtype=np.int64)
    np.add.at(counts, (block_of.ravel(), np.repeat(np.arange(size), per_unit)), 1)
    if (counts == counts[0]).all():
        return 1
    if not covers_all:
        return None  # other groups share these blocks: a cross-group constraint, not expressible
    ranges = []
    for row in np.unique(counts, axis=0):
        nonzero = np.flatnonzero(row)
        if len(nonzero) == 0 or nonzero[-1] - nonzero[0] + 1 != len(nonzero) or len(set(row[nonzero])) != 1:
            return None
        ranges.append((int(nonzero[0]), int(nonzero[-1]) + 1))
    ranges.sort()
    width = ranges[0][1] - ranges[0][0]
    expected = [(i * width, (i + 1) * width) for i in range(len(ranges))]
    return len(ranges) if ranges == expected and width * len(ranges) == size else None


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))
