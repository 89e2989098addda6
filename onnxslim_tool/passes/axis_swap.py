"""Reshape -> Transpose -> Reshape that only swaps the last two axes becomes one Transpose.

PyTorch's dynamo exporter writes `k.transpose(-2, -1)` of a 4-D attention tensor as
Reshape(x, [-1, d2, d3]) -> Transpose([0, 2, 1]) -> Reshape(., [d0, d1, d3, d2]), with
both targets computed at run time from Shape(x) (MiniLM: one per layer). The merge of the
batch and head axes in between hides the heads from channel pruning; the single Transpose
(x, perm [0, 1, 3, 2]) computes the same tensor in one op and keeps them visible.

The targets are read symbolically: each entry is a constant or "dim i of x" (Shape, Slice,
Gather and Concat of those). Anything else is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxslim_tool.cost import value_shapes
from onnxslim_tool.graph_utils import attr, bypass, const_array, single_consumer
from onnxslim_tool.passes.base import CompressionPass, PassRecord

SWAPPED = "Reshape, Transpose, Reshape swapping the last two axes: one Transpose"
Dim = int | tuple[str, int]  # a constant, or ("x", i): dim i of the reshaped tensor


class SimplifyAxisSwap(CompressionPass):
    name = "simplify-axis-swap"
    lossless = True

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        shapes: dict[str, tuple] | None = None  # inferred once, when a candidate lacks a shape
        for graph in model.graphs():
            for node in list(graph):
                if not _candidate(node):
                    continue
                x = node.inputs[0]
                dims = tuple(x.shape.dims) if x.shape is not None else None
                if dims is None:
                    shapes = value_shapes(model) if shapes is None else shapes
                    dims = shapes.get(x.name or "")
                match = _match(node, dims)
                if match is None:
                    continue
                first, swap, last = match
                name = f"{last.name or 'reshape'}_swap"
                transpose = ir.node("Transpose", [first.inputs[0]], {"perm": [0, 1, 3, 2]}, name=name)
                transpose.outputs[0].type = last.outputs[0].type
                transpose.outputs[0].shape = last.outputs[0].shape
                graph.insert_before(last, transpose)
                if not bypass(last.outputs[0], transpose.outputs[0]):
                    graph.remove(transpose, safe=True)
                    continue
                for old in (last, swap, first):
                    graph.remove(old, safe=True)
                record.changed(last.name or "?", "Reshape", SWAPPED)


def _candidate(node: ir.Node) -> bool:
    if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    swap = single_consumer(node.outputs[0])
    return swap is not None and swap.op_type == "Transpose" and node.inputs[0] is not None


def _match(first: ir.Node, dims: tuple | None) -> tuple[ir.Node, ir.Node, ir.Node] | None:
    x = first.inputs[0]
    if dims is None or len(dims) != 4:
        return None
    swap = single_consumer(first.outputs[0])
    if swap is None or list(attr(swap, "perm", []) or []) != [0, 2, 1]:
        return None
    last = single_consumer(swap.outputs[0])
    if last is None or last.op_type != "Reshape" or len(last.inputs) < 2:
        return None
    merged = _symbolic(first.inputs[1], x)
    restored = _symbolic(last.inputs[1], x)
    if merged is None or restored is None:
        return None
    static = [d if isinstance(d, int) else None for d in dims]
    if not (
        len(merged) == 3
        and merged[0] == -1
        and _same(merged[1], 2, static)
        and _same(merged[2], 3, static)
        and len(restored) == 4
        and all(_same(entry, i, static) for entry, i in zip(restored, (0, 1, 3, 2), strict=True))
    ):
        return None
    return first, swap, last


def _same(entry: Dim, i: int, dims: list[int | None]) -> bool:
    """Does a target entry equal dim i of x at run time?"""
    if isinstance(entry, tuple):
        return entry == ("x", i)
    return dims[i] is not None and entry == dims[i] and entry > 0


def _symbolic(value: ir.Value | None, x: ir.Value) -> list[Dim] | None:
    """A 1-D int tensor as constants and dims of `x`, or None when it is anything else."""
    if value is None:
        return None
    array = const_array(value)
    if array is not None:
        return [int(v) for v in np.ravel(array)] if array.ndim <= 1 and array.dtype.kind == "i" else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Shape" and node.inputs[0] is x:
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return [("x", i) for i in range(4)[slice(start, end)]]
    if node.op_type == "Concat" and int(attr(node, "axis", 0)) == 0:
        parts = [_symbolic(v, x) for v in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op_type == "Slice":
        return _sliced(node, x)
    if node.op_type == "Gather" and int(attr(node, "axis", 0)) == 0:
        source, index = _symbolic(node.inputs[0], x), const_array(node.inputs[1])
        if source is None or index is None or index.ndim > 1:
            return None
        try:
            return [source[int(i)] for i in np.ravel(index)]
        except IndexError:
            return None
    return None


def _sliced(node: ir.Node, x: ir.Value) -> list[Dim] | None:
    source = _symbolic(node.inputs[0], x)
    bounds = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
    if source is None or len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
        return None
    starts, ends = np.ravel(bounds[0]), np.ravel(bounds[1])
    axes = np.ravel(bounds[2]) if len(bounds) > 2 and bounds[2] is not None else np.array([0])
    steps = np.ravel(bounds[3]) if len(bounds) > 3 and bounds[3] is not None else np.array([1])
    if len(starts) != 1 or len(ends) != 1 or list(axes) not in ([0], [-1]) or list(steps) != [1]:
        return None
    return source[slice(int(starts[0]), int(ends[0]))]
