"""Gemm / MatMul with a constant 2-D weight: two thinner products through r channels (SVD).

Either operand may be the weight; Gemm's transA/transB/alpha/beta are honoured and a batched
MatMul sharing one 2-D weight is included. The bias stays on the second product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool import linalg
from onnxslim_tool.conv_geometry import sample_positions
from onnxslim_tool.graph_utils import attr, const_array
from onnxslim_tool.lowrank.graph import (
    Shapes,
    add_to_const,
    const,
    drop_if_unused,
    layer_name,
    new_node,
    opset,
    replace,
    weight_array,
    weight_problem,
    working_copy,
)
from onnxslim_tool.lowrank.plan import Factors, Plan, identity
from onnxslim_tool.lowrank.rank import choose_rank
from onnxslim_tool.lowrank.vbmf import vbmf_rank


@dataclass
class MatrixLayer:
    """A Gemm or MatMul seen as rows x [d] times a constant W [d, m] (rows are the vectors the
    weight multiplies: an activation's last axis, or its columns when the weight is on the left)."""

    node: ir.Node
    kind: str  # matmul | matmul-left | gemm | gemm-left
    weight: ir.Value
    matrix: np.ndarray  # W as [d, m], alpha folded in
    activation: ir.Value
    rows: int
    bias_holder: ir.Value | None  # a constant the refit's offset may be added to

    @property
    def name(self) -> str:
        return layer_name(self.node)

    @property
    def weight_params(self) -> int:
        return self.matrix.size

    @property
    def input_value(self) -> ir.Value:
        """The activation the refit samples rows from."""
        return self.activation

    @property
    def bias_adjustable(self) -> bool:
        return self.bias_holder is not None or self._gemm_without_c()

    def _gemm_without_c(self) -> bool:
        return self.kind.startswith("gemm") and (len(self.node.inputs) < 3 or self.node.inputs[2] is None)

    def _bias_params(self) -> int:
        if self.kind.startswith("gemm") and len(self.node.inputs) > 2 and self.node.inputs[2] is not None:
            c = const_array(self.node.inputs[2])
            return 0 if c is None else c.size
        return 0

    def plan(
        self, method: str, ratio: float | None, energy: float | None, seed: int, rule: str = "ratio"
    ) -> Plan | str:
        d, m = self.matrix.shape
        before = (d * m, self.rows * d * m)

        def cost(r: int) -> tuple[int, int]:
            return r * (d + m), self.rows * r * (d + m)

        rank = None
        if rule == "vbmf":
            rank = max(1, vbmf_rank(self.matrix))
        elif ratio is None:
            rank = linalg.rank_for_energy(linalg.singular_values(self.matrix), energy)
        rank, problem = choose_rank(
            cost, before, min(d, m), None if ratio is None else int(ratio * d * m), rank
        )
        if problem:
            return problem
        bias = self._bias_params()
        params = (before[0] + bias, cost(rank)[0] + bias)
        return Plan(self, "svd", (rank,), params, (before[1], cost(rank)[1]))

    def factorize(self, method: str, ranks: tuple[int, ...], seed: int) -> list[Factors]:
        left, right = linalg.low_rank(self.matrix, ranks[0])
        return [Factors([], identity, self.matrix, ranks[0], left, right)]

    # ---- one part (the refit treats every layer as independent parts, like a grouped conv's)

    groups = 1

    def part_matrix(self, part: int) -> np.ndarray:
        return self.matrix

    def part_inputs(self, rows: np.ndarray, part: int) -> np.ndarray:
        return rows

    def part_outputs(self, part: int) -> slice:
        return slice(None)

    def sample(self, x: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """Indices of `count` of a batch's rows (all when it has fewer)."""
        return sample_positions((self._all_rows(x).shape[0],), count, rng)[0]

    def input_rows(self, x: np.ndarray, pick: np.ndarray) -> np.ndarray:
        return self._all_rows(x)[pick]

    def _all_rows(self, x: np.ndarray) -> np.ndarray:
        """The vectors the weight multiplies, one per row, from a batch of the activation."""
        if x.ndim == 1:
            return x.reshape(1, -1)
        if self.kind == "matmul":
            return x.reshape(-1, x.shape[-1])
        if self.kind == "matmul-left":
            return np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
        transposed = attr(self.node, "transA" if self.kind == "gemm" else "transB", 0)
        if self.kind == "gemm":
            return x.T if transposed else x
        return x if transposed else x.T

    def emit(self, graph: ir.Graph, plan: Plan, parts: list[Factors]) -> list[ir.Node]:
        """Two products through `rank` channels; left-constant kinds multiply from the left."""
        (factors,) = parts
        dtype = self.weight.dtype.numpy()
        # W = left right; a weight on the left of the product is W^T = right^T left^T.
        left, right = (
            (factors.left.T, factors.right.T) if self.kind.endswith("left") else (factors.left, factors.right)
        )
        a = const(graph, left, dtype, self.name + "_lr_a")
        b = const(graph, right, dtype, self.name + "_lr_b")
        if self.kind.startswith("matmul"):
            first_inputs = [a, self.activation] if self.kind.endswith("left") else [self.activation, a]
            first = new_node(graph, "MatMul", first_inputs, {}, self.name, 0)
            second_inputs = [b, first.outputs[0]] if self.kind.endswith("left") else [first.outputs[0], b]
            second = new_node(graph, "MatMul", second_inputs, {}, self.name, 1)
            nodes = [first, second]
        else:
            nodes = self._gemms(graph, a, b, factors.offset)
        replace(graph, self.node, nodes)
        if factors.offset is not None and self.bias_holder is not None:
            shaped = factors.offset.reshape(-1, 1) if self.kind == "gemm-left" else factors.offset
            beta = 1.0 if self.kind == "matmul" else float(attr(self.node, "beta", 1.0))
            add_to_const(self.bias_holder, shaped / beta)
        drop_if_unused(graph, self.weight)
        return nodes

    def _gemms(self, graph: ir.Graph, a: ir.Value, b: ir.Value, offset: np.ndarray | None) -> list[ir.Node]:
        """Gemm(op(A), a) then Gemm(., b, C) (or a, op(B) then b, .): transposes, alpha folded
        into the factors, beta and C kept on the second."""
        node, dtype = self.node, self.weight.dtype.numpy()
        # Gemm before opset 11 requires C: a zero scalar stands in where the layer has none.
        needs_c = opset(graph) < 11
        zero = [const(graph, np.zeros(1), dtype, self.name + "_lr_zero")] if needs_c else []
        if self.kind == "gemm":
            trans = {"transA": 1} if attr(node, "transA", 0) else {}
            first = new_node(graph, "Gemm", [self.activation, a, *zero], trans, self.name, 0)
            operands = [first.outputs[0], b]
        else:
            trans = {"transB": 1} if attr(node, "transB", 0) else {}
            first = new_node(graph, "Gemm", [a, self.activation, *zero], trans, self.name, 0)
            operands = [b, first.outputs[0]]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        attrs = _beta(node)
        if c is None and offset is not None:
            shaped = offset.reshape(-1, 1) if self.kind == "gemm-left" else offset
            c, attrs = const(graph, shaped, dtype, self.name + "_lr_bias"), {}
        elif c is None:
            c = zero[0] if zero else None
        second = new_node(graph, "Gemm", [*operands, *([c] if c is not None else [])], attrs, self.name, 1)
        return [first, second]


def _beta(node: ir.Node) -> dict:
    beta = attr(node, "beta", 1.0)
    return {} if beta == 1.0 else {"beta": float(beta)}


def matrix_layer(node: ir.Node, shapes: Shapes) -> MatrixLayer | str:
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
        return "missing operand"
    constants = [weight_array(v) for v in inputs[:2]]
    if constants[0] is not None and constants[1] is not None:
        return "both operands are constant (constant folding's job)"
    if constants[0] is None and constants[1] is None:
        return "no constant operand (activation x activation)"
    side = 1 if constants[1] is not None else 0
    weight, array, activation = inputs[side], constants[side], inputs[1 - side]
    problem = weight_problem(weight, array)
    if problem:
        return problem
    if array.ndim != 2:
        return f"constant operand is {array.ndim}-D (only a shared 2-D weight is factorized)"
    act_shape = shapes.get(activation.name)
    if node.op_type == "MatMul":
        kind = "matmul" if side == 1 else "matmul-left"
        matrix = array if side == 1 else array.T
        rows = _matmul_rows(act_shape, kind)
        holder = _bias_holder(node, matrix.shape[1]) if kind == "matmul" else None
        return MatrixLayer(node, kind, weight, working_copy(matrix), activation, rows, holder)
    alpha = float(attr(node, "alpha", 1.0))
    trans = attr(node, "transB" if side == 1 else "transA", 0)
    op = array.T if trans else array
    kind = "gemm" if side == 1 else "gemm-left"
    matrix = working_copy(op if side == 1 else op.T) * alpha
    rows = _gemm_rows(act_shape, kind, attr(node, "transA" if side == 1 else "transB", 0))
    # C, when it is not a constant this layer owns, stays as is and the fit has no offset.
    holder = _gemm_bias(node, kind, matrix.shape[1])
    return MatrixLayer(node, kind, weight, matrix, activation, rows, holder)


def _matmul_rows(shape: tuple | None, kind: str) -> int:
    if shape is None or len(shape) < 2:
        return 1
    dims = shape[:-1] if kind == "matmul" else (*shape[:-2], shape[-1])
    return math.prod(d if isinstance(d, int) else 1 for d in dims)


def _gemm_rows(shape: tuple | None, kind: str, transposed: int) -> int:
    if shape is None or len(shape) != 2:
        return 1
    # Rows are op(A)'s rows (gemm) or op(B)'s columns (gemm-left).
    dim = shape[int(bool(transposed))] if kind == "gemm" else shape[1 - int(bool(transposed))]
    return dim if isinstance(dim, int) else 1


def _bias_holder(node: ir.Node, width: int) -> ir.Value | None:
    """The constant vector of an Add that alone reads a MatMul's output (a Linear layer's bias)."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    other = uses[0].node.inputs[1 - uses[0].idx]
    value = weight_array(other)
    if value is None or value.size != width or value.shape[-1] != width:
        return None
    if len(list(other.uses())) != 1 or other.is_graph_input() or other.is_graph_output():
        return None
    return other


def _gemm_bias(node: ir.Node, kind: str, width: int) -> ir.Value | None:
    """Gemm's C when the refit may shift it: a constant only this node reads, broadcastable
    along the outputs (a per-output vector)."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = node.inputs[2]
    array = weight_array(c)
    if array is None or float(attr(node, "beta", 1.0)) == 0.0 or len(list(c.uses())) != 1:
        return None
    if c.is_graph_input() or c.is_graph_output():
        return None
    wanted = (width,) if kind == "gemm" else (width, 1)
    try:
        if np.broadcast_shapes(array.shape, wanted) != array.shape and array.size != 1:
            return None
    except ValueError:
        return None
    return c
