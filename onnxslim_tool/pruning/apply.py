"""Physically remove pruned channels: slice every member of every group, fix what depends on
channel counts (Reshape targets, Split sizes, Slice bounds, depthwise `group`), update shapes.

The plan is checked against the groups before anything changes, so a refused plan leaves
the model untouched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxslim_tool.errors import PassError
from onnxslim_tool.graph_utils import attr
from onnxslim_tool.pruning.depgraph import constant_value, node_labels, static_dims
from onnxslim_tool.pruning.groups import DependencyGroup, PruningPlan

__all__ = ["apply_plan"]


def _positions() -> defaultdict[int, set[int]]:
    return defaultdict(set)


def _counts() -> defaultdict[int, int]:
    return defaultdict(int)


@dataclass
class _Cuts:
    """Indices to delete, in the model's current (unpruned) coordinates."""

    # tensor -> axis -> positions: weights, biases, BN parameters ("out"/"in"/"param" refs) ...
    weights: dict[str, dict[int, set[int]]] = field(default_factory=lambda: defaultdict(_positions))
    # ... and activations ("act" refs), whose stored shapes shrink
    acts: dict[str, dict[int, set[int]]] = field(default_factory=lambda: defaultdict(_positions))
    # (node label, shape tensor) -> entry -> elements removed from that entry
    shapes: dict[tuple[str, str], dict[int, int]] = field(default_factory=lambda: defaultdict(_counts))

    def removed_on(self, value: ir.Value | None, axis: int) -> set[int]:
        if value is None or value.name not in self.acts:
            return set()
        return self.acts[value.name].get(axis, set())

    def touches(self, value: ir.Value | None) -> bool:
        return value is not None and value.name in self.acts


def apply_plan(model: ir.Model, groups: list[DependencyGroup], plan: PruningPlan) -> list[dict[str, Any]]:
    """Remove `plan.removed(g)` channels from every member of every group, in place.

    Returns one record per rewritten tensor or attribute: node, op, tensor (or attribute),
    before and after shape. Raises PassError, changing nothing, when the plan breaks a group.
    """
    removals = _checked_removals(groups, plan)
    if not removals:
        return []
    cuts = _cuts(groups, removals)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    editor = _Editor(model, opset)
    editor.snapshot_dims(cuts)
    records = _slice_weights(editor, cuts)
    records += _rewrite_shape_entries(editor, cuts)
    records += _fix_channel_counts(editor, cuts)
    _update_value_shapes(editor, cuts)
    editor.drop_dead()
    return records


# --------------------------------------------------------------------------- plan checks


def _checked_removals(groups: list[DependencyGroup], plan: PruningPlan) -> dict[int, list[int]]:
    by_id = {g.id: g for g in groups}
    unknown = sorted(set(plan.keep) - set(by_id))
    if unknown:
        raise PassError(f"the pruning plan names group(s) {unknown}, which the model does not have")
    removals = {}
    for group in groups:
        keep = plan.keep.get(group.id)
        if keep is None:
            continue
        kept = sorted({int(c) for c in keep})
        if kept and (kept[0] < 0 or kept[-1] >= group.size):
            raise PassError(f"group {group.id} keeps channel {kept[-1]} but has only {group.size}")
        removed = plan.removed(group)
        if not removed:
            continue
        _check_group(group, kept)
        removals[group.id] = removed
    return removals


def _check_group(group: DependencyGroup, kept: list[int]) -> None:
    if not group.prunable:
        raise PassError(f"group {group.id} is not prunable: {group.reason}")
    if not kept:
        raise PassError(f"the plan removes all {group.size} channels of group {group.id}")
    if len(kept) % group.divisor:
        raise PassError(f"group {group.id} keeps {len(kept)} channels, not a multiple of {group.divisor}")
    if group.blocks > 1:
        width = group.size // group.blocks
        per_block = np.bincount(np.asarray(kept) // width, minlength=group.blocks)
        if len(set(per_block.tolist())) != 1:
            raise PassError(
                f"group {group.id} feeds a grouped Conv: each of its {group.blocks} blocks of {width} "
                f"channels must keep as many as the others (kept {per_block.tolist()})"
            )


def _cuts(groups: list[DependencyGroup], removals: dict[int, list[int]]) -> _Cuts:
    cuts = _Cuts()
    for group in groups:
        removed = removals.get(group.id)
        if not removed:
            continue
        channels = np.asarray(removed)
        for ref in group.members:
            if ref.role == "shape":
                cuts.shapes[(ref.node, ref.tensor)][ref.axis] += len(channels) * ref.span
                continue
            starts = ref.offset + channels * ref.span
            positions = (starts[:, None] + np.arange(ref.span)).ravel().tolist()
            target = cuts.acts if ref.role == "act" else cuts.weights
            target[ref.tensor][ref.axis].update(positions)
    return cuts


# --------------------------------------------------------------------------- graph edits


class _Editor:
    """Look-ups and constant replacement on one graph, remembering what became dead."""

    def __init__(self, model: ir.Model, opset: int) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = opset
        self.labels = node_labels(self.graph)
        self.nodes = {label: node for node, label in self.labels.items()}
        self.values = values_by_name(self.graph)
        self._taken = set(self.values)
        self._dims: dict[str, tuple] = {}
        self._maybe_dead: list[ir.Value] = []
        # Decided before slicing: a grouped conv may end with one input channel per block too.
        self.depthwise = {node for node in self.graph if _is_depthwise(node)}

    def snapshot_dims(self, cuts: _Cuts) -> None:
        """Infer shapes before any edit when a Split/Slice on pruned channels will need them."""
        readers = (n for n in self.graph if n.op_type in ("Split", "Slice") and n.inputs)
        needs = any(cuts.touches(n.inputs[0]) for n in readers)
        self._dims = static_dims(self.model) if needs else {}

    def dims(self, value: ir.Value) -> tuple | None:
        """Dims of `value` before any edit."""
        if value.shape is not None and all(isinstance(d, int) for d in value.shape.dims):
            return tuple(value.shape.dims)
        return self._dims.get(value.name)

    def need_dims(self, value: ir.Value) -> tuple:
        dims = self.dims(value)
        if dims is None:
            raise PassError(f"the shape of '{value.name}' is unknown, so its Split/Slice cannot be adjusted")
        return dims

    def const(self, value: ir.Value) -> np.ndarray:
        array = constant_value(value)
        if array is None:
            raise PassError(f"'{value.name}' is no longer a constant; re-run the dependency analysis")
        return array

    def label(self, node: ir.Node) -> str:
        return self.labels.get(node, node.name or node.op_type)

    def new_initializer(self, array: np.ndarray, hint: str) -> ir.Value:
        name, i = hint, 0
        while name in self._taken:  # names are tracked here: graph-wide scans per call are slow
            i += 1
            name = f"{hint}_{i}"
        self._taken.add(name)
        dtype = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=dtype)
        value.const_value = ir.tensor(array, name=name)
        self.graph.register_initializer(value)
        return value

    def replace_constant(self, value: ir.Value, array: np.ndarray) -> None:
        """Give every reader of `value` the new array (in place when `value` is an initializer)."""
        if value.is_initializer():
            value.const_value = ir.tensor(array, name=value.name)
            value.shape = ir.Shape(array.shape)
            return
        fresh = self.new_initializer(array, f"{value.name}_pruned")
        for use in list(value.uses()):
            use.node.replace_input_with(use.idx, fresh)
        self._maybe_dead.append(value)

    def replace_input(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Give one node's input a new constant, leaving other readers of the old one alone."""
        value = node.inputs[index]
        if value is not None and value.is_initializer() and len(list(value.uses())) == 1:
            self.replace_constant(value, array)
            return
        hint = value.name if value is not None else f"{self.label(node)}_input{index}"
        fresh = self.new_initializer(array, f"{hint}_pruned")
        if index < len(node.inputs):
            node.replace_input_with(index, fresh)
        else:
            node.resize_inputs(index + 1)
            node.replace_input_with(index, fresh)
        if value is not None:
            self._maybe_dead.append(value)

    def drop_dead(self) -> None:
        """Remove Constant nodes, constant chains and initializers the edits left unread."""
        while self._maybe_dead:
            value = self._maybe_dead.pop()
            if value.uses() or value.is_graph_output() or value.is_graph_input():
                continue
            node = value.producer()
            if node is None:
                if value.is_initializer():
                    self.graph.initializers.pop(value.name)
                continue
            if node.graph is self.graph and not any(o.uses() or o.is_graph_output() for o in node.outputs):
                inputs = [v for v in node.inputs if v is not None]
                self.graph.remove(node, safe=True)
                self._maybe_dead.extend(inputs)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the graph: inputs, initializers and node outputs."""
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update({o.name: o for o in node.outputs if o.name})
    return values


# --------------------------------------------------------------------------- weights


def _slice_weights(editor: _Editor, cuts: _Cuts) -> list[dict[str, Any]]:
    records = []
    for name, by_axis in cuts.weights.items():
        value = editor.values[name]
        array = editor.const(value)
        conv = _grouped_conv_reader(value, array)
        if conv is not None:
            groups = int(attr(conv, "group", 1))
            sliced = _slice_grouped_conv(array, groups, by_axis.get(0, set()), by_axis.get(1, set()))
        else:
            sliced = array
            for axis, positions in sorted(by_axis.items()):
                sliced = np.delete(sliced, sorted(positions), axis=axis)
        readers = [use.node for use in value.uses()]
        editor.replace_constant(value, sliced)
        for node in dict.fromkeys(readers):
            records.append(_record(editor.label(node), node.op_type, name, array.shape, sliced.shape))
    return records


def _grouped_conv_reader(value: ir.Value, array: np.ndarray) -> ir.Node | None:
    """The Conv reading `value` as a grouped (not depthwise) weight, if any."""
    for use in value.uses():
        node = use.node
        if node.op_type == "Conv" and use.idx == 1 and int(attr(node, "group", 1)) > 1 and array.shape[1] > 1:
            return node
    return None


def _slice_grouped_conv(weight: np.ndarray, groups: int, out_cut: set[int], in_cut: set[int]) -> np.ndarray:
    """Weight [C_out, C_in/g, ...]: rows of block b read input channels b*C_in/g ... .

    `in_cut` holds the conv's *input channel* indices; each block loses its own, so every
    block must lose as many as the others (the group's `blocks` constraint)."""
    per_out, per_in = weight.shape[0] // groups, weight.shape[1]
    pieces, widths = [], set()
    for b in range(groups):
        rows = [r for r in range(b * per_out, (b + 1) * per_out) if r not in out_cut]
        cols = [c for c in range(per_in) if b * per_in + c not in in_cut]
        widths.add((len(rows), len(cols)))
        pieces.append(weight[rows][:, cols])
    if len(widths) != 1:
        raise PassError(
            f"pruning leaves a grouped Conv's {groups} blocks with different widths {sorted(widths)}"
        )
    return np.concatenate(pieces, axis=0)


def _record(node: str, op: str, tensor: str, before, after) -> dict[str, Any]:
    return {"node": node, "op": op, "tensor": tensor, "before": list(before), "after": list(after)}


def _attribute_record(node: str, op: str, attribute: str, before, after) -> dict[str, Any]:
    return {"node": node, "op": op, "attribute": attribute, "before": before, "after": after}


# --------------------------------------------------------------------------- shapes and counts


def _rewrite_shape_entries(editor: _Editor, cuts: _Cuts) -> list[dict[str, Any]]:
    """Reshape targets and Resize sizes: entry -= removed channels * span."""
    records = []
    for (label, tensor), entries in cuts.shapes.items():
        node = editor.nodes[label]
        index = next(i for i, v in enumerate(node.inputs) if v is not None and v.name == tensor)
        before = editor.const(node.inputs[index])
        after = before.copy()
        for entry, removed in entries.items():
            after.reshape(-1)[entry] -= removed
        editor.replace_input(node, index, after)
        records.append(_record(label, node.op_type, tensor, before.tolist(), after.tolist()))
    return records


def _fix_channel_counts(editor: _Editor, cuts: _Cuts) -> list[dict[str, Any]]:
    records = []
    for node in list(editor.graph):
        fix = _COUNT_FIXES.get(node.op_type)
        if fix is not None and node.inputs and cuts.touches(node.inputs[0]):
            records.extend(fix(editor, cuts, node))
    return records


def _is_depthwise(node: ir.Node) -> bool:
    if node.op_type != "Conv" or int(attr(node, "group", 1)) <= 1 or len(node.inputs) < 2:
        return False
    weight = constant_value(node.inputs[1])
    return weight is not None and weight.shape[1] == 1


def _fix_depthwise_group(editor: _Editor, cuts: _Cuts, node: ir.Node) -> list[dict[str, Any]]:
    """A depthwise conv has one group per input channel: the count follows the channels."""
    if node not in editor.depthwise:
        return []
    groups = int(attr(node, "group", 1))
    new_groups = groups - len(cuts.removed_on(node.inputs[0], 1))
    if new_groups == groups:  # its own filters were pruned, not its input channels
        return []
    node.attributes["group"] = ir.AttrInt64("group", new_groups)
    return [_attribute_record(editor.label(node), "Conv", "group", groups, new_groups)]


def _fix_split(editor: _Editor, cuts: _Cuts, node: ir.Node) -> list[dict[str, Any]]:
    x = node.inputs[0]
    axis = int(attr(node, "axis", 0)) % len(editor.need_dims(x))
    if not cuts.removed_on(x, axis):
        return []
    old = _split_sizes_before(editor, node, axis)
    new = [size - len(cuts.removed_on(out, axis)) for size, out in zip(old, node.outputs, strict=True)]
    if editor.opset >= 13:
        node.attributes.pop("num_outputs", None)  # opset 18: explicit sizes replace the count
        editor.replace_input(node, 1, np.asarray(new, dtype=np.int64))
    else:
        node.attributes["split"] = ir.AttrInt64s("split", new)
    return [_attribute_record(editor.label(node), "Split", "split", old, new)]


def _split_sizes_before(editor: _Editor, node: ir.Node, axis: int) -> list[int]:
    given = node.inputs[1] if editor.opset >= 13 and len(node.inputs) > 1 else None
    if given is not None:
        return [int(s) for s in editor.const(given).ravel()]
    if attr(node, "split") is not None:
        return [int(s) for s in attr(node, "split")]
    return [int(editor.need_dims(out)[axis]) for out in node.outputs]


def _fix_slice(editor: _Editor, cuts: _Cuts, node: ir.Node) -> list[dict[str, Any]]:
    x = node.inputs[0]
    dims = editor.need_dims(x)
    if editor.opset < 10:
        starts, ends, axes = list(attr(node, "starts")), list(attr(node, "ends")), attr(node, "axes")
        dtype = np.int64
    else:
        starts = editor.const(node.inputs[1]).ravel().tolist()
        ends = editor.const(node.inputs[2]).ravel().tolist()
        has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
        axes = editor.const(node.inputs[3]).ravel().tolist() if has_axes else None
        dtype = editor.const(node.inputs[1]).dtype
    axes = list(range(len(starts))) if axes is None else [int(a) % len(dims) for a in axes]
    records = []
    for k, axis in enumerate(axes):
        cut = cuts.removed_on(x, axis)
        if not cut:
            continue
        start, end, _ = slice(int(starts[k]), int(ends[k])).indices(int(dims[axis]))
        starts[k] = start - sum(c < start for c in cut)
        ends[k] = end - sum(c < end for c in cut)
        label = editor.label(node)
        records.append(_attribute_record(label, "Slice", f"axis {axis}", [start, end], [starts[k], ends[k]]))
    if not records:
        return []
    if editor.opset < 10:
        node.attributes["starts"] = ir.AttrInt64s("starts", [int(s) for s in starts])
        node.attributes["ends"] = ir.AttrInt64s("ends", [int(e) for e in ends])
    else:
        editor.replace_input(node, 1, np.asarray(starts, dtype=dtype))
        editor.replace_input(node, 2, np.asarray(ends, dtype=dtype))
    return records


_COUNT_FIXES = {"Conv": _fix_depthwise_group, "Split": _fix_split, "Slice": _fix_slice}


def _update_value_shapes(editor: _Editor, cuts: _Cuts) -> None:
    """Activations lose their channels in the stored shapes too (stale value_info fails checks)."""
    for name, by_axis in cuts.acts.items():
        value = editor.values[name]
        if value.shape is None:
            continue
        dims = list(value.shape.dims)
        for axis, positions in by_axis.items():
            if isinstance(dims[axis], int):
                dims[axis] -= len(positions)
            else:
                dims[axis] = None  # symbolic before: stays unknown rather than wrong
        value.shape = ir.Shape(dims)
