"""How each ONNX op couples channels: a table of small rules keyed by op_type.

A rule receives a `NodeContext` (see depgraph.py) for one node and says, in terms of
per-channel ids, what its outputs carry and which tensors are members of the channels:

- `ctx.fresh(value, axis, size)` starts a new channel space (a Conv/Gemm/MatMul output);
- `ctx.forward(value, axis, ids)` gives an output the channels `ids` along `axis`;
- `ctx.member(value, axis, role, ids)` records a weight/parameter/shape entry to slice;
- `ctx.couple(a, b)` says channel a[i] and b[i] must be removed together;
- `ctx.block(ids, reason)` makes channels unprunable.

A rule raises `Unsupported(reason)` for a pattern it does not handle: every channel group
reaching the node is then blocked with that reason and its outputs carry no channels.
Ops missing from `RULES` are treated the same way (unknown means untouched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from onnxslim_tool.pruning.depgraph import NodeContext, Slot


class Unsupported(Exception):
    """The node's channel semantics are not handled: block what reaches it."""


Rule = Callable[["NodeContext"], None]

# Shape entries bigger than this many elements are not expanded into per-position ids.
_MAX_POSITIONS = 1 << 22


# --------------------------------------------------------------------------- shared helpers


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _need_rank(ctx: NodeContext, value: ir.Value | None) -> int:
    rank = ctx.rank(value)
    if rank is None:
        raise Unsupported(f"the rank of '{value.name if value else '?'}' is unknown")
    return rank


def couple_operand(ctx: NodeContext, value: ir.Value, out_rank: int, position: int, ids: np.ndarray) -> None:
    """Couple one broadcast operand to the channels `ids` found at output axis `position`.

    A tracked operand on the same axis is coupled; a constant with the channel dim becomes a
    "param" member; size 1 or a missing axis broadcasts and is fine; anything else blocks.
    """
    slot = ctx.slot(value)
    rank = _need_rank(ctx, value)
    axis = position - (out_rank - rank)
    if slot is not None:
        if slot.axis != axis:
            raise Unsupported(f"'{value.name}' carries channels on another axis than its partner")
        if len(slot.ids) == len(ids):
            ctx.couple(ids, slot.ids)
        elif len(slot.ids) == 1:
            ctx.block(slot.ids, f"its single channel is broadcast by {ctx.op} '{ctx.name}'")
        else:
            raise Unsupported("its operands have different channel counts")
        return
    if axis < 0:
        return
    size = ctx.dims(value)[axis]
    if size == 1:
        return
    if size != len(ids):
        raise Unsupported(f"'{value.name}' has size {size} on the channel axis (expected {len(ids)})")
    if ctx.const(value) is None:
        raise Unsupported(f"it combines the channels with '{value.name}' ({ctx.untracked_reason(value)})")
    ctx.member(value, axis, "param", ids)


def elementwise(ctx: NodeContext, operands: Sequence[ir.Value | None] | None = None) -> None:
    """Broadcasting ops: every operand's channel axis lines up; residual adds merge groups."""
    values = [v for v in (ctx.node.inputs if operands is None else operands) if v is not None]
    out = ctx.node.outputs[0]
    ranks = [_need_rank(ctx, v) for v in values]
    out_rank = ctx.rank(out) or max(ranks)
    tracked = [(v, s) for v in values if (s := ctx.slot(v)) is not None]
    if not tracked:
        return
    positions = {s.axis + out_rank - ctx.rank(v) for v, s in tracked}
    if len(positions) > 1:
        raise Unsupported("its operands carry channels on different axes")
    position = positions.pop()
    widest = max(tracked, key=lambda t: len(t[1].ids))[1]
    if len(widest.ids) == 1 and (ctx.dims(out) or (None,) * out_rank)[position] != 1:
        # A one-channel tensor scales many channels (spatial attention): it cannot shrink.
        for _, slot in tracked:
            ctx.block(slot.ids, f"its single channel is broadcast by {ctx.op} '{ctx.name}'")
        return
    for value in values:
        if ctx.slot(value) is not widest:
            couple_operand(ctx, value, out_rank, position, widest.ids)
    ctx.forward(out, position, widest.ids)


def pass_through(ctx: NodeContext) -> None:
    """Unary ops: every output carries input 0's channels on the same axis."""
    slot = ctx.slot(ctx.node.inputs[0])
    if slot is None:
        return
    for out in ctx.node.outputs:
        if out is not None and out.name:
            ctx.forward(out, slot.axis, slot.ids)


def _first_output_only(ctx: NodeContext, what: str) -> None:
    if any(out is not None and (out.uses() or out.is_graph_output()) for out in ctx.node.outputs[1:]):
        raise Unsupported(f"its {what} output is used")


def _params(ctx: NodeContext, slot: Slot, indices: Sequence[int]) -> None:
    """Per-channel parameter vectors (BN scale/shift/mean/var, InstanceNorm scale/bias)."""
    for index in indices:
        value = ctx.input(index)
        if value is None:
            continue
        array = ctx.const(value)
        if array is None:
            raise Unsupported(f"its parameter '{value.name}' is not a constant")
        if array.size == 1:
            continue
        if array.ndim != 1 or array.shape[0] != len(slot.ids):
            raise Unsupported(f"its parameter '{value.name}' has shape {list(array.shape)}")
        ctx.member(value, 0, "param", slot.ids)


def _bias(ctx: NodeContext, index: int, ids: np.ndarray) -> None:
    value = ctx.input(index)
    if value is None:
        return
    array = ctx.const(value)
    if array is None or array.ndim != 1 or array.shape[0] != len(ids):
        raise Unsupported(f"its bias '{value.name}' is not a constant vector of {len(ids)}")
    ctx.member(value, 0, "param", ids)


def _axes_input_or_attr(ctx: NodeContext, input_index: int, attr_name: str = "axes") -> list[int] | None:
    """Axes given as an attribute (old opsets) or a constant input (new ones); None if absent."""
    value = ctx.input(input_index)
    if value is not None:
        array = ctx.const(value)
        if array is None:
            raise Unsupported(f"its {attr_name} are computed at run time")
        return [int(a) for a in np.ravel(array)]
    got = ctx.attr(attr_name)
    return None if got is None else [int(a) for a in got]


def _channel_positions(ids: np.ndarray, dims: Sequence[int], axis: int) -> np.ndarray:
    """Channel id of every element of a block of axes `dims` flattened in C order."""
    shape = [1] * len(dims)
    shape[axis] = len(ids)
    return np.broadcast_to(ids.reshape(shape), tuple(dims)).ravel()


# --------------------------------------------------------------------------- weighted layers


def conv(ctx: NodeContext) -> None:
    x, w, out = ctx.input(0), ctx.input(1), ctx.node.outputs[0]
    weight = ctx.const(w)
    slot = ctx.slot(x)
    if weight is None:
        raise Unsupported("its weight is not a constant")
    groups = int(ctx.attr("group", 1))
    c_out, c_in = weight.shape[0], weight.shape[1] * groups
    if slot is not None and (slot.axis != 1 or len(slot.ids) != c_in):
        raise Unsupported("its input channels are not on axis 1")
    if groups > 1 and weight.shape[1] == 1:
        _depthwise(ctx, w, out, slot, c_out // groups)
        return
    if slot is not None:
        ctx.member(w, 1, "in", slot.ids, conv_groups=groups)
    fresh = ctx.fresh(out, 1, c_out)
    ctx.member(w, 0, "out", fresh.ids, conv_groups=groups)
    _bias(ctx, 2, fresh.ids)


def _depthwise(ctx: NodeContext, w: ir.Value, out: ir.Value, slot: Slot | None, multiplier: int) -> None:
    """Depthwise conv: output channel c*m+k is computed from input channel c alone."""
    if slot is None:
        # Nothing upstream to shrink with it: its filters are the channel space, but every
        # input channel must keep as many filters as the others (the conv's group count).
        weight = ctx.const(w)
        fresh = ctx.fresh(out, 1, weight.shape[0])
        ctx.member(w, 0, "out", fresh.ids, conv_groups=weight.shape[0] // multiplier)
        _bias(ctx, 2, fresh.ids)
        if multiplier == 1:
            why = "has one filter per input channel, and its input has no channel group to shrink with it"
            ctx.block(fresh.ids, f"depthwise Conv '{ctx.name}' {why}")
        return
    ids = np.repeat(slot.ids, multiplier)
    ctx.member(w, 0, "param", ids)
    _bias(ctx, 2, ids)
    ctx.forward(out, 1, ids)


def conv_transpose(ctx: NodeContext) -> None:
    x, w, out = ctx.input(0), ctx.input(1), ctx.node.outputs[0]
    weight = ctx.const(w)
    slot = ctx.slot(x)
    if weight is None:
        raise Unsupported("its weight is not a constant")
    groups = int(ctx.attr("group", 1))
    if slot is not None and (slot.axis != 1 or len(slot.ids) != weight.shape[0]):
        raise Unsupported("its input channels are not on axis 1")
    fresh = ctx.fresh(out, 1, weight.shape[1] * groups)
    if groups > 1:  # weight [C_in, C_out/g, ...]: not handled, but its group is still listed
        reason = f"grouped ConvTranspose '{ctx.name}' (group={groups}) is not supported"
        ctx.block(fresh.ids, reason)
        if slot is not None:
            ctx.block(slot.ids, reason)
        return
    if slot is not None:
        ctx.member(w, 0, "in", slot.ids)
    ctx.member(w, 1, "out", fresh.ids)
    _bias(ctx, 2, fresh.ids)


def gemm(ctx: NodeContext) -> None:
    a, b, c, out = ctx.input(0), ctx.input(1), ctx.input(2), ctx.node.outputs[0]
    weight = ctx.const(b)
    slot = ctx.slot(a)
    if weight is None or weight.ndim != 2:
        raise Unsupported("its B operand is not a constant matrix")
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    if slot is not None and slot.axis != (0 if trans_a else 1):
        raise Unsupported("its input carries channels on the M axis, not K")
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    if slot is not None:
        if len(slot.ids) != weight.shape[k_axis]:
            raise Unsupported("its K does not match the input channels")
        ctx.member(b, k_axis, "in", slot.ids)
    fresh = ctx.fresh(out, 1, weight.shape[n_axis])
    ctx.member(b, n_axis, "out", fresh.ids)
    if c is not None:
        couple_operand(ctx, c, 2, 1, fresh.ids)


def matmul(ctx: NodeContext) -> None:
    a, b, out = ctx.input(0), ctx.input(1), ctx.node.outputs[0]
    left, right = ctx.const(a), ctx.const(b)
    if right is not None and right.ndim == 2 and left is None:
        _matmul_weight(ctx, data=a, weight=b, data_axis=-1, k_axis=0, n_axis=1, out_axis=-1)
    elif left is not None and left.ndim == 2 and right is None:
        _matmul_weight(ctx, data=b, weight=a, data_axis=-2, k_axis=1, n_axis=0, out_axis=-2)
    elif left is None and right is None:
        _matmul_activations(ctx, a, b, out)
    elif ctx.slot(a) is not None or ctx.slot(b) is not None:
        raise Unsupported("its constant operand is not a 2-D matrix")


def _matmul_weight(
    ctx: NodeContext,
    data: ir.Value,
    weight: ir.Value,
    data_axis: int,
    k_axis: int,
    n_axis: int,
    out_axis: int,
) -> None:
    """x @ W ([K, N] weight: N out, K in) or W @ x ([N, K] weight, channels on axis -2)."""
    array = ctx.const(weight)
    slot = ctx.slot(data)
    rank = _need_rank(ctx, data)
    if rank < 2:
        raise Unsupported("its activation operand is 1-D")
    if slot is not None:
        if slot.axis != _axis(data_axis, rank) or len(slot.ids) != array.shape[k_axis]:
            raise Unsupported("its input carries channels on a non-contracted axis")
        ctx.member(weight, k_axis, "in", slot.ids)
    out = ctx.node.outputs[0]
    fresh = ctx.fresh(out, _axis(out_axis, _need_rank(ctx, out)), array.shape[n_axis])
    ctx.member(weight, n_axis, "out", fresh.ids)


def _matmul_activations(ctx: NodeContext, a: ir.Value, b: ir.Value, out: ir.Value) -> None:
    """Two activations (attention): contracted channels couple, M/N/batch channels pass."""
    slot_a, slot_b = ctx.slot(a), ctx.slot(b)
    if slot_a is None and slot_b is None:
        return
    ra, rb = _need_rank(ctx, a), _need_rank(ctx, b)
    if ra < 2 or rb < 2:
        raise Unsupported("a 1-D operand")
    r = max(ra, rb)
    # Where each operand's channel axis lands: "k" (contracted), "m"/"n", or an output batch axis.
    kind_a = None if slot_a is None else {ra - 1: "k", ra - 2: "m"}.get(slot_a.axis, slot_a.axis + r - ra)
    kind_b = None if slot_b is None else {rb - 2: "k", rb - 1: "n"}.get(slot_b.axis, slot_b.axis + r - rb)
    if kind_a == "k" and kind_b == "k":
        ctx.couple(slot_a.ids, slot_b.ids)  # both sides of a dot product shrink together
        return
    if kind_a == "k" or kind_b == "k":
        raise Unsupported("only one operand of the contraction carries channels")
    if kind_a is not None and kind_b is not None and kind_a != kind_b:
        raise Unsupported("both operands carry channels on different axes")
    if kind_a == "m":
        ctx.forward(out, r - 2, slot_a.ids)
    elif kind_b == "n":
        ctx.forward(out, r - 1, slot_b.ids)
    else:  # a batch axis: broadcast like an elementwise op over the leading dims
        position = kind_a if kind_a is not None else kind_b
        ids = (slot_a or slot_b).ids
        for value, rank in ((a, ra), (b, rb)):
            if ctx.slot(value) is None:
                size = (ctx.dims(value) or ())[position - (r - rank)] if position - (r - rank) >= 0 else 1
                if size != 1:
                    raise Unsupported(f"'{value.name}' has no channels but a batch axis of {size}")
            elif ctx.slot(value).ids is not ids:
                ctx.couple(ids, ctx.slot(value).ids)
        ctx.forward(out, position, ids)


# --------------------------------------------------------------------------- normalisation


def batch_norm(ctx: NodeContext) -> None:
    slot = ctx.slot(ctx.input(0))
    if slot is None:
        return
    _first_output_only(ctx, "training statistics")
    if slot.axis != 1:
        raise Unsupported("its input channels are not on axis 1")
    _params(ctx, slot, (1, 2, 3, 4))
    ctx.forward(ctx.node.outputs[0], 1, slot.ids)


def instance_norm(ctx: NodeContext) -> None:
    slot = ctx.slot(ctx.input(0))
    if slot is None:
        return
    if slot.axis != 1:
        raise Unsupported("its input channels are not on axis 1")
    _params(ctx, slot, (1, 2))
    ctx.forward(ctx.node.outputs[0], 1, slot.ids)


def layer_norm(ctx: NodeContext) -> None:
    """Statistics over axes [axis, rank): harmless unless the channel axis is among them."""
    slot = ctx.slot(ctx.input(0))
    if slot is None:
        return
    rank = _need_rank(ctx, ctx.input(0))
    if slot.axis >= _axis(int(ctx.attr("axis", -1)), rank):
        # Mean and variance are taken over the channels: dropping any channel, even an
        # all-zero one, rescales every other channel's output. Blocked rather than guessed.
        raise Unsupported("normalizes over the channel axis, so removing channels changes every output")
    pass_through(ctx)


def mean_variance_norm(ctx: NodeContext) -> None:
    slot = ctx.slot(ctx.input(0))
    if slot is None:
        return
    rank = _need_rank(ctx, ctx.input(0))
    if slot.axis in {_axis(int(a), rank) for a in ctx.attr("axes", [0, 2, 3])}:
        raise Unsupported("normalizes over the channel axis")
    pass_through(ctx)


def channel_mixing(what: str) -> Rule:
    """Ops whose output for one channel depends on other channels (LRN, GroupNormalization)."""

    def rule(ctx: NodeContext) -> None:
        if ctx.slot(ctx.input(0)) is not None:
            raise Unsupported(what)

    return rule


# --------------------------------------------------------------------------- layout ops


def transpose(ctx: NodeContext) -> None:
    slot = ctx.slot(ctx.input(0))
    if slot is None:
        return
    rank = _need_rank(ctx, ctx.input(0))
    perm = list(ctx.attr("perm", list(reversed(range(rank)))))
    ctx.forward(ctx.node.outputs[0], perm.index(slot.axis), slot.ids)


def flatten(ctx: NodeContext) -> None:
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    dims = ctx.dims(x)
    rank = _need_rank(ctx, x)
    split = _axis(int(ctx.attr("axis", 1)), rank)
    lo, hi, out_axis = (0, split, 0) if slot.axis < split else (split, rank, 1)
    block = dims[lo:hi]
    if any(not isinstance(d, int) for d in block):
        raise Unsupported("it merges the channel axis with axes of unknown size")
    ids = _merged_ids(slot.ids, block, slot.axis - lo)
    ctx.forward(ctx.node.outputs[0], out_axis, ids)


def _merged_ids(ids: np.ndarray, block: Sequence[int], channel_axis: int) -> np.ndarray:
    if math.prod(block) > _MAX_POSITIONS:
        raise Unsupported(f"it merges {math.prod(block)} positions into one axis")
    return _channel_positions(ids, block, channel_axis)


def reshape(ctx: NodeContext) -> None:
    x, shape_value, out = ctx.input(0), ctx.input(1), ctx.node.outputs[0]
    slot = ctx.slot(x)
    if slot is None:
        return
    target = ctx.const(shape_value)
    computed = target is None
    if computed:
        target = _partial_target(ctx, shape_value)
    in_dims, out_dims = ctx.dims(x), ctx.dims(out)
    if in_dims is None or out_dims is None:
        raise Unsupported("its shapes are unknown")
    if len(target) != len(out_dims):
        raise Unsupported(f"its target has {len(target)} entries for a rank-{len(out_dims)} output")
    in_axes, out_axes = _cluster_of(in_dims, out_dims, slot.axis)
    big_out = [a for a in out_axes if out_dims[a] != 1]
    big_in = [a for a in in_axes if in_dims[a] != 1]
    if len(big_out) <= 1:
        block = [in_dims[a] for a in in_axes]
        ids = _merged_ids(slot.ids, block, slot.axis - in_axes[0])
        axis = big_out[0] if big_out else out_axes[0]
    elif big_in == [slot.axis] and len(big_out) == 2:
        axis, ids = _split_channels(ctx, slot, big_out, out_dims)
    else:
        raise Unsupported("it spreads the channel axis over several axes")
    entries = [target[a] for a in out_axes]
    if any(e is None for e in entries):
        raise Unsupported("its target shape is computed at run time")
    entry = int(target[axis])
    names_count = entry > 0 or (entry == 0 and int(ctx.attr("allowzero", 0)) == 1)
    if names_count and computed:
        raise Unsupported(f"its target shape is computed at run time and names the channel count {entry}")
    ctx.forward(out, axis, ids)
    if names_count:
        ctx.member(shape_value, axis, "shape", ids)


def _partial_target(ctx: NodeContext, value: ir.Value) -> list[int | None]:
    """A Reshape target built at run time as Concat(pieces): constants where pieces are
    constant, None elsewhere (batch and sequence sizes read with Shape). Exporters write head
    splits this way, e.g. [batch, sequence, -1, 32]: the channel entries are constants."""
    node = value.producer()
    if node is None or node.op_type != "Concat":
        raise Unsupported("its target shape is computed at run time")
    entries: list[int | None] = []
    for piece in node.inputs:
        array = ctx.const(piece)
        if array is not None:
            entries += [int(v) for v in np.ravel(array)]
            continue
        dims = ctx.dims(piece)
        if dims is None or len(dims) != 1 or not isinstance(dims[0], int):
            raise Unsupported("its target shape is computed at run time")
        entries += [None] * dims[0]
    return entries


def _split_channels(
    ctx: NodeContext, slot: Slot, out_axes: Sequence[int], out_dims: Sequence[int]
) -> tuple[int, np.ndarray]:
    """C -> (a, b). A channel shuffle (split, swap, merge) keeps the inner axis b: channel j
    of every one of the a blocks goes together. Otherwise (attention heads) the outer axis a
    is kept: a whole block of b channels (one head) is the unit."""
    outer, inner = out_axes
    a, b = out_dims[outer], out_dims[inner]
    grid = slot.ids.reshape(a, b)
    if _is_channel_shuffle(ctx.node.outputs[0], outer, inner):
        ctx.couple(grid[1:].ravel(), np.tile(grid[0], a - 1))
        return inner, grid[0]
    ctx.couple(grid[:, 1:].ravel(), np.repeat(grid[:, 0], b - 1))
    return outer, grid[:, 0]


def _is_channel_shuffle(value: ir.Value, outer: int, inner: int) -> bool:
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Transpose":
        return False
    swap = uses[0].node
    perm_attr = swap.attributes.get("perm")
    if perm_attr is None:
        return False
    perm = list(perm_attr.value)
    if perm.index(inner) > perm.index(outer):
        return False
    merged = list(swap.outputs[0].uses())
    return len(merged) == 1 and merged[0].node.op_type == "Reshape"


def _cluster_of(in_dims: Sequence, out_dims: Sequence, axis: int) -> tuple[list[int], list[int]]:
    """The input and output axes of a reshape whose elements map onto each other as one block
    (matching running products), for the block holding input `axis`."""
    i = j = 0
    clusters: list[tuple[list[int], list[int]]] = []
    while i < len(in_dims) and j < len(out_dims):
        di, dj = in_dims[i], out_dims[j]
        if not isinstance(di, int) or not isinstance(dj, int):
            if isinstance(di, int) or isinstance(dj, int):
                raise Unsupported("its dynamic dims do not line up")
            clusters.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ins, outs = [i], [j]
        pi, pj = di, dj
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(in_dims) and isinstance(in_dims[i], int):
                pi *= in_dims[i]
                ins.append(i)
                i += 1
            elif pj < pi and j < len(out_dims) and isinstance(out_dims[j], int):
                pj *= out_dims[j]
                outs.append(j)
                j += 1
            else:
                raise Unsupported("its dims cannot be matched")
        clusters.append((ins, outs))
    if not clusters:
        raise Unsupported("it reshapes a scalar")
    # Trailing size-1 axes belong to the last block.
    clusters[-1][0].extend(range(i, len(in_dims)))
    clusters[-1][1].extend(range(j, len(out_dims)))
    return next(c for c in clusters if axis in c[0])


def squeeze(ctx: NodeContext) -> None:
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    axes = _axes_input_or_attr(ctx, 1)
    if axes is None:
        dims = ctx.dims(x)
        if any(not isinstance(d, int) for d in dims):
            raise Unsupported("it squeezes axes of unknown size")
        axes = [a for a, d in enumerate(dims) if d == 1]
    axes = {_axis(a, rank) for a in axes}
    if slot.axis in axes:
        raise Unsupported("it removes the channel axis")
    ctx.forward(ctx.node.outputs[0], slot.axis - sum(a < slot.axis for a in axes), slot.ids)


def unsqueeze(ctx: NodeContext) -> None:
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    axes = _axes_input_or_attr(ctx, 1)
    if axes is None:
        raise Unsupported("it has no axes")
    out_rank = _need_rank(ctx, x) + len(axes)
    axis = slot.axis
    for a in sorted(_axis(a, out_rank) for a in axes):
        if a <= axis:
            axis += 1
    ctx.forward(ctx.node.outputs[0], axis, slot.ids)


def concat(ctx: NodeContext) -> None:
    out = ctx.node.outputs[0]
    values = [v for v in ctx.node.inputs if v is not None]
    if all(ctx.slot(v) is None for v in values):
        return
    rank = _need_rank(ctx, out)
    axis = _axis(int(ctx.attr("axis", 1)), rank)
    on_axis = [v for v in values if ctx.slot(v) is not None and ctx.slot(v).axis == axis]
    if not on_axis:
        elementwise(ctx, values)  # concatenated along another axis: channels line up
        return
    if len(on_axis) != sum(ctx.slot(v) is not None for v in values):
        raise Unsupported("its inputs carry channels on different axes")
    pieces = []
    for value in values:
        slot = ctx.slot(value)
        if slot is not None:
            pieces.append(slot.ids)
            continue
        size = (ctx.dims(value) or [None] * rank)[axis]
        if not isinstance(size, int):
            raise Unsupported(f"input '{value.name}' has an unknown channel count")
        # Channels from outside any group: they stay, and their own producer decides nothing.
        orphan = ctx.new_ids(size)
        ctx.block(orphan, f"'{value.name}' enters {ctx.op} '{ctx.name}' without a channel group")
        pieces.append(orphan)
    ctx.forward(out, axis, np.concatenate(pieces))


def split(ctx: NodeContext) -> None:
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    if _axis(int(ctx.attr("axis", 0)), rank) != slot.axis:
        for out in ctx.node.outputs:
            ctx.forward(out, slot.axis, slot.ids)
        return
    sizes = _split_sizes(ctx, len(slot.ids))
    start = 0
    for out, size in zip(ctx.node.outputs, sizes, strict=True):
        ctx.forward(out, slot.axis, slot.ids[start : start + size])
        start += size


def _split_sizes(ctx: NodeContext, total: int) -> list[int]:
    sizes = _axes_input_or_attr(ctx, 1, "split")
    if sizes is not None:
        return sizes
    count = len(ctx.node.outputs)
    if total % count:
        chunk = -(-total // count)  # opset 18 num_outputs: the last chunk is smaller
        return [chunk] * (count - 1) + [total - chunk * (count - 1)]
    return [total // count] * count


def slice_(ctx: NodeContext) -> None:
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    window = slice_window(ctx, slot.axis, rank, len(slot.ids))
    ids = slot.ids if window is None else slot.ids[window[0] : window[1]]
    ctx.forward(ctx.node.outputs[0], slot.axis, ids)


def slice_window(ctx: NodeContext, axis: int, rank: int, size: int) -> tuple[int, int] | None:
    """[start, end) a Slice keeps on `axis`, or None when it does not slice that axis."""
    if ctx.opset < 10:
        starts, ends, axes, steps = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes"), None
    else:
        values = [ctx.input(i) for i in range(1, 5)]
        arrays = [None if v is None else ctx.const(v) for v in values]
        if any(v is not None and a is None for v, a in zip(values, arrays, strict=True)):
            raise Unsupported("its starts/ends/axes/steps are computed at run time")
        starts, ends, axes, steps = (None if a is None else np.ravel(a).tolist() for a in arrays)
    axes = list(range(len(starts))) if axes is None else [_axis(int(a), rank) for a in axes]
    if axis not in axes:
        return None
    k = axes.index(axis)
    if steps is not None and int(steps[k]) != 1:
        raise Unsupported("it slices the channel axis with a step")
    start, end, _ = slice(int(starts[k]), int(ends[k])).indices(size)
    return start, max(start, end)


def gather(ctx: NodeContext) -> None:
    x, indices = ctx.input(0), ctx.input(1)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    axis = _axis(int(ctx.attr("axis", 0)), rank)
    if axis == slot.axis:
        raise Unsupported("it gathers along the channel axis")
    index_rank = _need_rank(ctx, indices)
    out_axis = slot.axis if slot.axis < axis else slot.axis - 1 + index_rank
    ctx.forward(ctx.node.outputs[0], out_axis, slot.ids)


def pad(ctx: NodeContext) -> None:
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    if ctx.opset < 11:
        pads = ctx.attr("pads")
    else:
        pads = ctx.const(ctx.input(1))
        if pads is None:
            raise Unsupported("its pads are computed at run time")
    pads = [int(p) for p in np.ravel(pads)]
    axes = _axes_input_or_attr(ctx, 3) if ctx.opset >= 18 else None
    axes = list(range(rank)) if axes is None else [_axis(a, rank) for a in axes]
    if slot.axis in axes:
        k = axes.index(slot.axis)
        if pads[k] or pads[k + len(axes)]:
            raise Unsupported("it pads the channel axis")
    ctx.forward(ctx.node.outputs[0], slot.axis, slot.ids)


def resize(ctx: NodeContext) -> None:
    """Resize/Upsample: fine while the channel axis keeps its size."""
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    axes = ctx.attr("axes")
    axes = list(range(rank)) if axes is None else [_axis(int(a), rank) for a in axes]
    scales, sizes = _resize_scales_and_sizes(ctx)
    if sizes is not None:
        array = ctx.const(sizes)
        if array is None:
            raise Unsupported("its sizes are computed at run time")
        if slot.axis in axes:
            if int(np.ravel(array)[axes.index(slot.axis)]) != len(slot.ids):
                raise Unsupported("it resizes the channel axis")
            ctx.member(sizes, axes.index(slot.axis), "shape", slot.ids)
    elif scales is not None and slot.axis in axes:
        array = scales if isinstance(scales, list) else ctx.const(scales)
        if array is None:
            raise Unsupported("its scales are computed at run time")
        if float(np.ravel(array)[axes.index(slot.axis)]) != 1.0:
            raise Unsupported("it scales the channel axis")
    ctx.forward(ctx.node.outputs[0], slot.axis, slot.ids)


def _resize_scales_and_sizes(ctx: NodeContext) -> tuple[ir.Value | list | None, ir.Value | None]:
    if ctx.op == "Upsample" and ctx.attr("scales") is not None:
        return list(ctx.attr("scales")), None
    if ctx.op == "Upsample" or ctx.opset < 11:
        return ctx.input(1), None
    scales, sizes = ctx.input(2), ctx.input(3)
    empty = scales is not None and ctx.dims(scales) == (0,)
    return (None if empty else scales), sizes


# --------------------------------------------------------------------------- reductions


def reduce(ctx: NodeContext) -> None:
    """Reductions over non-channel axes keep the channels (shifted when dims are dropped)."""
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    if ctx.op in ("ArgMax", "ArgMin"):
        axes = [int(ctx.attr("axis", 0))]
    else:
        axes = _axes_input_or_attr(ctx, 1) if ctx.input(1) is not None else ctx.attr("axes")
    if not axes:
        if int(ctx.attr("noop_with_empty_axes", 0)):
            pass_through(ctx)
            return
        raise Unsupported("it reduces over all axes, the channel axis included")
    axes = {_axis(int(a), rank) for a in axes}
    if slot.axis in axes:
        raise Unsupported("it reduces over the channel axis")
    keep = int(ctx.attr("keepdims", 1))
    axis = slot.axis if keep else slot.axis - sum(a < slot.axis for a in axes)
    ctx.forward(ctx.node.outputs[0], axis, slot.ids)


def softmax(ctx: NodeContext) -> None:
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    default = -1 if ctx.opset >= 13 else 1
    axis = _axis(int(ctx.attr("axis", default)), rank)
    # Before opset 13 the input is coerced to 2-D: every axis from `axis` on is normalized.
    over_channels = slot.axis == axis if ctx.opset >= 13 else slot.axis >= axis
    if over_channels:
        raise Unsupported("it normalizes over the channel axis")
    pass_through(ctx)


def shape(ctx: NodeContext) -> None:
    """Reading a tensor's shape is harmless unless the channel count is among the dims read."""
    x = ctx.input(0)
    slot = ctx.slot(x)
    if slot is None:
        return
    rank = _need_rank(ctx, x)
    start, end, _ = slice(int(ctx.attr("start", 0)), ctx.attr("end")).indices(rank)
    if start <= slot.axis < end:
        raise Unsupported("it reads the channel count, which pruning changes")


def max_pool(ctx: NodeContext) -> None:
    _first_output_only(ctx, "indices")
    slot = ctx.slot(ctx.input(0))
    if slot is not None:
        ctx.forward(ctx.node.outputs[0], slot.axis, slot.ids)


UNARY_OPS = (
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Softplus", "Softsign",
    "Elu", "Selu", "Celu", "Gelu", "Erf", "Mish", "ThresholdedRelu", "Dropout", "Identity",
    "Cast", "CastLike", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
)  # fmt: skip
ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Greater", "Less")
REDUCE_OPS = (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
)  # fmt: skip

RULES: dict[str, Rule] = {
    **dict.fromkeys(UNARY_OPS, pass_through),
    **dict.fromkeys(ELEMENTWISE_OPS, elementwise),
    **dict.fromkeys(REDUCE_OPS, reduce),
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": matmul,
    "BatchNormalization": batch_norm,
    "InstanceNormalization": instance_norm,
    "LayerNormalization": layer_norm,
    "MeanVarianceNormalization": mean_variance_norm,
    "LRN": channel_mixing("mixes neighbouring channels: removing one changes the others' outputs"),
    "GroupNormalization": channel_mixing("normalizes over groups of channels"),
    # PRelu's slope, Clip's bounds and Where's operands broadcast like elementwise operands.
    "PRelu": elementwise,
    "Clip": elementwise,
    "Where": elementwise,
    "MaxPool": max_pool,
    "Transpose": transpose,
    "Flatten": flatten,
    "Reshape": reshape,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    "Pad": pad,
    "Resize": resize,
    "Upsample": resize,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "Hardmax": softmax,
    "Shape": shape,
}
