"""Low-rank factorization: replace a dense layer by a chain of thinner ones.

What each layer becomes (r, R, r1, r2: ranks):

- Gemm / MatMul with a constant 2-D weight W (either operand; Gemm's transA/transB/alpha/
  beta honoured; a batched MatMul sharing one 2-D weight included): two products through
  r channels (truncated SVD); the bias stays on the second.
- Conv, method "svd" (channel SVD, Zhang et al. 2016): a k x k conv with r filters, then a
  1 x 1 conv back to C_out.
- Conv, "spatial-svd" (Jaderberg et al. 2014): a k_h x 1 conv with r filters, then 1 x k_w.
- Conv, "cp" (Lebedev et al. 2015): 1 x 1 (C_in -> R), depthwise k_h x 1, depthwise 1 x k_w,
  1 x 1 (R -> C_out), from a rank-R CP decomposition of the kernel (alternating least squares).
- Conv, "tucker" (Kim et al. 2015): 1 x 1 (C_in -> r1), k x k core (r1 -> r2), 1 x 1
  (r2 -> C_out), from a Tucker-2 decomposition (sequentially truncated HOSVD).

Strides, padding (auto_pad included) and dilation go on the factors that carry the kernel,
so the output has exactly the original shape; the bias goes on the last factor.

Ranks come from `ratio` (the largest rank keeping at most that fraction of the layer's
weights), or, when `energy` is given, from the fraction of squared singular values kept (of
each unfolding for Tucker; CP searches the smallest rank whose reconstruction keeps that
energy); `per_layer` maps node-name globs to ratios. A factorization is applied only where
it lowers both the layer's parameters and its MACs, computed with the real shapes.

With calibration data and `refit`, the last stage of every factorization is refit by least
squares so that the layer's *output* on real inputs is approximated, not its weight
(asymmetric reconstruction, Zhang et al. 2016): inputs come from the already-factorized
model, targets from the original one. For SVD and Tucker this is a reduced-rank regression
that also chooses the rank-r subspace from the data; for spatial SVD and CP the last factor
is refit with the earlier ones fixed. Where the full refit would be too costly (see
MAX_FIT_*), only the last factor is refit. The gain (relative output error on the
calibration rows, weight-only vs refit) is reported per layer in the record's notes.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnxslim_tool import linalg, runtime
from onnxslim_tool.cost import value_shapes
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.graph_utils import add_initializer, attr, bypass, const_array, unique_name
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.pruning.reconstruct import ConvGeometry, conv_patches, sample_positions

METHODS = ("svd", "spatial-svd", "cp", "tucker")
# Calibration samples per onnxruntime run while collecting layer inputs.
BATCH = 32
# A refit keeps X^T X of its input features in memory (8192 features: 512 MB).
MAX_FIT_FEATURES = 8192
# A rank-constrained refit solves an eigenproblem as large as the layer's outputs, and
# accumulating X^T X costs rows x features^2: above these bounds (VGG's 4096-wide classifier,
# its 512-channel 3x3 convs) only the last factor is refit, which costs rows x rank^2.
MAX_FIT_OUTPUTS = 2048
MAX_FIT_WORK = 2e10
# CP-ALS sweeps are bounded by this many flops per layer (~10 s on one core).
MAX_CP_WORK = 3e11
# milder() stops once it would keep more than this fraction (or energy).
MAX_MILD_RATIO = 0.95
MAX_MILD_ENERGY = 0.9999
# Tucker keeps every input channel of a conv with this few (RGB or grey images).
SMALL_INPUT = 4
# Output grid assumed for MACs when shape inference cannot tell a conv's spatial size.
ASSUMED_SPATIAL = 32
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})
_STANDARD_DOMAINS = ("", "ai.onnx")
_SAME = ("SAME_UPPER", "SAME_LOWER")


class LowRank(CompressionPass):
    """Factorize Gemm/MatMul (SVD) and Conv (channel SVD, spatial SVD, CP or Tucker-2) layers."""

    name = "lowrank"
    lossless = False
    uses_data = True

    def __init__(
        self,
        ratio: float | None = 0.5,
        energy: float | None = None,
        method: str = "svd",
        refit: bool = True,
        per_layer: dict[str, float] | None = None,
        min_params: int = 1024,
        seed: int = 0,
        max_rows: int = 20000,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        if method not in METHODS:
            raise OnnxSlimError(f"unknown low-rank method '{method}'; use one of: {', '.join(METHODS)}")
        if ratio is None and energy is None:
            raise OnnxSlimError("low-rank needs a ratio (fraction of params kept) or an energy fraction")
        if ratio is not None:
            _check_fraction("ratio", ratio)
        if energy is not None:
            _check_fraction("energy", energy)
        for pattern, value in (per_layer or {}).items():
            _check_fraction(f"per-layer ratio for '{pattern}'", value)
        if int(min_params) < 0 or int(max_rows) < 1:
            raise OnnxSlimError("min_params must be >= 0 and max_rows >= 1")
        self.ratio = None if ratio is None else float(ratio)
        self.energy = None if energy is None else float(energy)
        self.method = method
        self.refit = bool(refit)
        self.per_layer = dict(per_layer or {})
        self.min_params = int(min_params)
        self.seed = int(seed)
        self.max_rows = int(max_rows)

    def milder(self) -> LowRank | None:
        """Half of what was removed is kept back: ratio 0.5 -> 0.75, energy 0.9 -> 0.95."""
        changes: dict = {}
        if self.energy is not None:  # energy decides the ranks; ratio is not used then
            changes["energy"] = 1.0 - (1.0 - self.energy) / 2
            if changes["energy"] > MAX_MILD_ENERGY:
                return None
        else:
            changes["ratio"] = 1.0 - (1.0 - self.ratio) / 2
            if changes["ratio"] > MAX_MILD_RATIO:
                return None
        changes["per_layer"] = {k: 1.0 - (1.0 - v) / 2 for k, v in self.per_layer.items()}
        params = {
            k: getattr(self, k)
            for k in ("ratio", "energy", "method", "refit", "per_layer", "min_params", "seed", "max_rows")
        }
        mild = LowRank(**{**params, **changes}, include=self.include, exclude=self.exclude)
        mild.calibration = self.calibration
        return mild

    # ----- the rewrite --------------------------------------------------------------------------

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        # One BLAS thread: on a busy 2-core machine LAPACK's threaded SVD/eigensolvers ran 16-28x
        # slower than single-threaded (a 1024 eigensolve: 11.2 s vs 0.4 s), while the large
        # matrix products lost nothing (9.6 s vs 9.4 s).
        with threadpool_limits(1):
            self._rewrite(model, record)

    def _rewrite(self, model: ir.Model, record: PassRecord) -> None:
        graph = model.graph
        graph.sort()
        shapes = _value_shapes(model, record)
        plans = [plan for node in list(graph) if (plan := self._plan(node, shapes, record)) is not None]
        if not plans:
            record.notes.append("no layer could be factorized with these settings")
            return
        refitter = self._refitter(model, plans, record)
        waves = _waves(graph, plans) if refitter is not None else [plans]
        order = {id(plan): index for index, plan in enumerate(plans)}
        for wave in waves:
            factorized = [(plan, plan.factorize(self.seed + order[id(plan)])) for plan in wave]
            if refitter is not None:
                refitter.refit(model, factorized, record)
            for plan, factors in factorized:
                nodes = plan.layer.emit(graph, plan, factors)
                after = _params_of(nodes)  # counted on the graph: a refit may have added a bias
                record.changed(plan.layer.name, plan.layer.node.op_type, plan.detail(), plan.params[0], after)

    def _refitter(self, model: ir.Model, plans: list[_Plan], record: PassRecord) -> _Refitter | None:
        if not self.refit:
            record.notes.append("refit disabled: weight-only factorization")
            return None
        if self.calibration is None:
            record.notes.append("no calibration data: weight-only factorization (no refit)")
            return None
        if self.calibration.synthetic:
            record.notes.append("calibration data is synthetic: the refit fits random inputs")
        return _Refitter(model, self.calibration, plans, self.max_rows, self.seed)

    def _plan(self, node: ir.Node, shapes: _Shapes, record: PassRecord) -> _Plan | None:
        if node.op_type not in ("Gemm", "MatMul", "Conv"):
            return None
        name = _layer_name(node)
        ok, reason = self.selects(node)
        layer = _layer_of(node, shapes) if ok else reason
        if isinstance(layer, str):
            record.skip(name, layer)
            return None
        if layer.weight_params < self.min_params:
            record.skip(name, f"{layer.weight_params} weights < min_params {self.min_params}")
            return None
        plan = layer.plan(self.method, self._ratio_for(name), self.energy, self.seed)
        if isinstance(plan, str):
            record.skip(name, plan)
            return None
        return plan

    def _ratio_for(self, name: str) -> float | None:
        for pattern, value in self.per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return value
        return None if self.energy is not None else self.ratio


def factorize_node(model: ir.Model, node: ir.Node, method: str, ranks: Sequence[int], seed: int = 0) -> None:
    """Factorize one layer at explicit ranks (weight-only), whether or not that pays.

    For tests and studies such as full-rank exactness; the pass chooses its own ranks.
    Gemm/MatMul always use SVD. Raises OnnxSlimError with the reason for a layer it cannot do.
    """
    layer = _layer_of(node, _value_shapes(model, PassRecord(LowRank.name)))
    if isinstance(layer, str):
        raise OnnxSlimError(f"{_layer_name(node)}: {layer}")
    plan = _Plan(layer, "svd" if isinstance(layer, _MatrixLayer) else method, tuple(ranks), (0, 0), (0, 0))
    layer.emit(model.graph, plan, plan.factorize(seed))


def _check_fraction(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise OnnxSlimError(f"{what} must be in (0, 1], got {value!r}")


def _layer_name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type) or node.op_type


# ----- shapes ----------------------------------------------------------------------------------------

_Shapes = dict[str, tuple]


def _value_shapes(model: ir.Model, record: PassRecord) -> _Shapes:
    notes: list[str] = []
    table = value_shapes(model, notes)
    record.notes.extend(notes)
    return table


def _spatial(shape: tuple | None, nd: int) -> tuple[int, ...] | None:
    """The trailing `nd` dims of an NC... shape when they are all known."""
    if shape is None or len(shape) != nd + 2 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return tuple(shape[2:])


# ----- plans and factors ---------------------------------------------------------------------------


@dataclass
class _Factors:
    """One layer's factorization, split where the refit can reach it.

    `front` are the fixed leading factors (method specific); `project` maps the layer's
    input rows (matrix rows, or conv patches [rows, C_in, taps]) to the features the last
    stage reads. The last stage is `left @ right` (rank-constrained, `rank` set) or `left`
    alone, approximating `prior` [features, outputs]; `offset` is added to the bias.
    """

    front: list[np.ndarray]
    project: Callable[[np.ndarray], np.ndarray]
    prior: np.ndarray
    rank: int | None
    left: np.ndarray
    right: np.ndarray | None = None
    offset: np.ndarray | None = None

    @property
    def stage(self) -> np.ndarray:
        """The last stage as one [features, outputs] matrix."""
        return self.left if self.right is None else self.left @ self.right

    def last_factor(self) -> _Factors:
        """A view whose fitted stage is `right` alone, reading features through `left`."""
        left, project = self.left, self.project

        def through_left(rows: np.ndarray) -> np.ndarray:
            features = project(rows)
            return features @ left.astype(features.dtype)

        return _Factors(self.front, through_left, self.right, None, self.right)


@dataclass
class _Plan:
    """What the pass decided for one layer: method, ranks and the resulting cost."""

    layer: _MatrixLayer | _ConvLayer
    method: str
    ranks: tuple[int, ...]
    params: tuple[int, int]
    macs: tuple[int, int]
    note: str = ""

    def factorize(self, seed: int) -> _Factors:
        return self.layer.factorize(self.method, self.ranks, seed)

    def detail(self) -> str:
        ranks = "x".join(str(r) for r in self.ranks)
        text = f"{self.method} rank {ranks}; MACs {self.macs[0]:,} -> {self.macs[1]:,}"
        return f"{text} ({self.note})" if self.note else text


def _identity(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(rows.shape[0], -1)


def _choose_rank(
    cost: Callable[[int], tuple[int, int]],
    full: tuple[int, int],
    max_rank: int,
    budget: int | None,
    rank: int | None,
) -> tuple[int, str | None]:
    """The rank to use (from a params budget, or given) and, when it does not pay, why."""
    if rank is None:
        fits = [r for r in range(1, max_rank + 1) if cost(r)[0] <= budget]
        if not fits:
            return 0, f"even rank 1 keeps {cost(1)[0]:,} of {full[0]:,} weights (over the ratio)"
        rank = fits[-1]
    return rank, _no_gain(cost(rank), full, f"rank {rank}")


def _no_gain(after: tuple[int, int], before: tuple[int, int], what: str) -> str | None:
    if after[0] >= before[0]:
        return f"{what} would not lower params ({after[0]:,} >= {before[0]:,})"
    if after[1] >= before[1]:
        return f"{what} would not lower MACs ({after[1]:,} >= {before[1]:,})"
    return None


# ----- Gemm / MatMul -------------------------------------------------------------------------------


@dataclass
class _MatrixLayer:
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
        return _layer_name(self.node)

    @property
    def weight_params(self) -> int:
        return self.matrix.size

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

    def plan(self, method: str, ratio: float | None, energy: float | None, seed: int) -> _Plan | str:
        d, m = self.matrix.shape
        before = (d * m, self.rows * d * m)

        def cost(r: int) -> tuple[int, int]:
            return r * (d + m), self.rows * r * (d + m)

        rank = None
        if ratio is None:
            rank = linalg.rank_for_energy(linalg.singular_values(self.matrix), energy)
        rank, problem = _choose_rank(
            cost, before, min(d, m), None if ratio is None else int(ratio * d * m), rank
        )
        if problem:
            return problem
        bias = self._bias_params()
        params = (before[0] + bias, cost(rank)[0] + bias)
        return _Plan(self, "svd", (rank,), params, (before[1], cost(rank)[1]))

    def factorize(self, method: str, ranks: tuple[int, ...], seed: int) -> _Factors:
        left, right = linalg.low_rank(self.matrix, ranks[0])
        return _Factors([], _identity, self.matrix, ranks[0], left, right)

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

    def full_matrix(self) -> np.ndarray:
        return self.matrix

    def rows_per_sample(self) -> int:
        return self.rows

    def emit(self, graph: ir.Graph, plan: _Plan, factors: _Factors) -> list[ir.Node]:
        """Two products through `rank` channels; left-constant kinds multiply from the left."""
        dtype = self.weight.dtype.numpy()
        # W = left right; a weight on the left of the product is W^T = right^T left^T.
        left, right = (
            (factors.left.T, factors.right.T) if self.kind.endswith("left") else (factors.left, factors.right)
        )
        a = _const(graph, left, dtype, self.name + "_lr_a")
        b = _const(graph, right, dtype, self.name + "_lr_b")
        if self.kind.startswith("matmul"):
            first_inputs = [a, self.activation] if self.kind.endswith("left") else [self.activation, a]
            first = _new_node(graph, "MatMul", first_inputs, {}, self.name, 0)
            second_inputs = [b, first.outputs[0]] if self.kind.endswith("left") else [first.outputs[0], b]
            second = _new_node(graph, "MatMul", second_inputs, {}, self.name, 1)
            nodes = [first, second]
        else:
            nodes = self._gemms(graph, a, b, factors.offset)
        _replace(graph, self.node, nodes)
        if factors.offset is not None and self.bias_holder is not None:
            shaped = factors.offset.reshape(-1, 1) if self.kind == "gemm-left" else factors.offset
            beta = 1.0 if self.kind == "matmul" else float(attr(self.node, "beta", 1.0))
            _add_to_const(self.bias_holder, shaped / beta)
        _drop_if_unused(graph, self.weight)
        return nodes

    def _gemms(self, graph: ir.Graph, a: ir.Value, b: ir.Value, offset: np.ndarray | None) -> list[ir.Node]:
        """Gemm(op(A), a) then Gemm(., b, C) (or a, op(B) then b, .): transposes, alpha folded
        into the factors, beta and C kept on the second."""
        node, dtype = self.node, self.weight.dtype.numpy()
        # Gemm before opset 11 requires C: a zero scalar stands in where the layer has none.
        needs_c = _opset(graph) < 11
        zero = [_const(graph, np.zeros(1), dtype, self.name + "_lr_zero")] if needs_c else []
        if self.kind == "gemm":
            trans = {"transA": 1} if attr(node, "transA", 0) else {}
            first = _new_node(graph, "Gemm", [self.activation, a, *zero], trans, self.name, 0)
            operands = [first.outputs[0], b]
        else:
            trans = {"transB": 1} if attr(node, "transB", 0) else {}
            first = _new_node(graph, "Gemm", [a, self.activation, *zero], trans, self.name, 0)
            operands = [b, first.outputs[0]]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        attrs = _beta(node)
        if c is None and offset is not None:
            shaped = offset.reshape(-1, 1) if self.kind == "gemm-left" else offset
            c, attrs = _const(graph, shaped, dtype, self.name + "_lr_bias"), {}
        elif c is None:
            c = zero[0] if zero else None
        second = _new_node(graph, "Gemm", [*operands, *([c] if c is not None else [])], attrs, self.name, 1)
        return [first, second]


def _opset(graph: ir.Graph) -> int:
    imports = graph.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 1)))


def _beta(node: ir.Node) -> dict:
    beta = attr(node, "beta", 1.0)
    return {} if beta == 1.0 else {"beta": float(beta)}


def _matrix_layer(node: ir.Node, shapes: _Shapes) -> _MatrixLayer | str:
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
        return "missing operand"
    constants = [_weight_array(v) for v in inputs[:2]]
    if constants[0] is not None and constants[1] is not None:
        return "both operands are constant (constant folding's job)"
    if constants[0] is None and constants[1] is None:
        return "no constant operand (activation x activation)"
    side = 1 if constants[1] is not None else 0
    weight, array, activation = inputs[side], constants[side], inputs[1 - side]
    problem = _weight_problem(weight, array)
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
        return _MatrixLayer(node, kind, weight, _working_copy(matrix), activation, rows, holder)
    alpha = float(attr(node, "alpha", 1.0))
    trans = attr(node, "transB" if side == 1 else "transA", 0)
    op = array.T if trans else array
    kind = "gemm" if side == 1 else "gemm-left"
    matrix = _working_copy(op if side == 1 else op.T) * alpha
    rows = _gemm_rows(act_shape, kind, attr(node, "transA" if side == 1 else "transB", 0))
    # C, when it is not a constant this layer owns, stays as is and the fit has no offset.
    holder = _gemm_bias(node, kind, matrix.shape[1])
    return _MatrixLayer(node, kind, weight, matrix, activation, rows, holder)


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
    value = _weight_array(other)
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
    array = _weight_array(c)
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


# ----- Conv ------------------------------------------------------------------------------------------


@dataclass
class _ConvLayer:
    """A plain (group 1) Conv with a constant kernel [C_out, C_in, *k]."""

    node: ir.Node
    weight: ir.Value
    kernel: np.ndarray
    bias: ir.Value | None
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    assumed_spatial: bool = False
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def name(self) -> str:
        return _layer_name(self.node)

    @property
    def weight_params(self) -> int:
        return self.kernel.size

    @property
    def nd(self) -> int:
        return self.kernel.ndim - 2

    @property
    def bias_adjustable(self) -> bool:
        return self.bias is None or _weight_array(self.bias) is not None

    def plan(self, method: str, ratio: float | None, energy: float | None, seed: int) -> _Plan | str:
        c_out, c_in, *k = self.kernel.shape
        taps = math.prod(k)
        if method in ("spatial-svd", "cp"):
            if self.nd != 2:
                return f"{method} needs a 2-D kernel, this conv is {self.nd}-D"
            if taps == 1:
                return f"1x1 conv: nothing for {method} to factorize spatially"
            if 1 in k:
                return f"{k[0]}x{k[1]} kernel is already separable"
        note = ""
        if method == "tucker" and taps == 1:
            method, note = "svd", "1x1 conv: channel SVD (Tucker-2 of a 1x1 kernel adds a factor for nothing)"
        if self.assumed_spatial:
            note = "; ".join(
                filter(None, [note, f"spatial size unknown: MACs on an assumed {ASSUMED_SPATIAL} grid"])
            )
        before = (self.kernel.size, self._macs_full())
        budget = None if ratio is None else int(ratio * self.kernel.size)
        chosen = _CONV_PLANNERS[method](self, budget, energy, seed)
        if isinstance(chosen, str):
            return chosen
        if chosen[0] != method:  # Tucker keeping every input channel is a channel SVD
            note = "; ".join(filter(None, [note, "input mode kept whole: Tucker-1 = channel SVD"]))
        method, ranks = chosen
        after = self.cost(method, ranks)
        problem = _no_gain(after, before, f"rank {'x'.join(map(str, ranks))}")
        if problem:
            return problem
        bias = 0 if self.bias is None or _weight_array(self.bias) is None else _weight_array(self.bias).size
        return _Plan(self, method, ranks, (before[0] + bias, after[0] + bias), (before[1], after[1]), note)

    # ---- costs (MACs per sample, from the real spatial sizes)

    def _areas(self) -> tuple[int, int, int]:
        """Input area, output area, and the k_h x 1 stage's area (output rows x input columns)."""
        in_area, out_area = math.prod(self.in_spatial), math.prod(self.out_spatial)
        mid = self.out_spatial[0] * self.in_spatial[1] if self.nd == 2 else out_area
        return in_area, out_area, mid

    def _macs_full(self) -> int:
        return self.kernel.size * self._areas()[1]

    def cost(self, method: str, ranks: tuple[int, ...]) -> tuple[int, int]:
        c_out, c_in, *k = self.kernel.shape
        taps = math.prod(k)
        in_area, out_area, mid = self._areas()
        if method == "svd":
            (r,) = ranks
            return r * (c_in * taps + c_out), out_area * r * (c_in * taps + c_out)
        if method == "spatial-svd":
            (r,) = ranks
            kh, kw = k
            return r * (c_in * kh + c_out * kw), r * c_in * kh * mid + c_out * r * kw * out_area
        if method == "cp":
            (r,) = ranks
            kh, kw = k
            params = r * (c_in + kh + kw + c_out)
            return params, r * c_in * in_area + r * kh * mid + r * kw * out_area + c_out * r * out_area
        r1, r2 = ranks
        params = c_in * r1 + r1 * r2 * taps + c_out * r2
        return params, c_in * r1 * in_area + r1 * r2 * taps * out_area + c_out * r2 * out_area

    # ---- factorizations

    def factorize(self, method: str, ranks: tuple[int, ...], seed: int) -> _Factors:
        c_out, c_in, *k = self.kernel.shape
        kernel = self.kernel.astype(np.float64)
        if method == "svd":
            matrix = kernel.reshape(c_out, -1).T
            left, right = linalg.low_rank(matrix, ranks[0])
            return _Factors([], _identity, matrix, ranks[0], left, right)
        if method == "tucker":
            r1, r2 = ranks
            basis = linalg.leading_subspace(linalg.unfold(kernel, 1), r1)  # [C_in, r1]
            projected = np.einsum("oi...,ir->or...", kernel, basis).reshape(c_out, -1).T
            left, right = linalg.low_rank(projected, r2)
            return _Factors([basis], _tucker_features(basis), projected, r2, left, right)
        kh, kw = k
        if method == "spatial-svd":
            (r,) = ranks
            separable = kernel.transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)
            left, right = linalg.low_rank(separable, r)
            vertical = left.T.reshape(r, c_in, kh)
            last = right.reshape(r, c_out, kw).transpose(0, 2, 1).reshape(r * kw, c_out)
            return _Factors([vertical], _spatial_features(vertical, k), last, None, last)
        (r,) = ranks
        out_f, in_f, y_f, x_f = linalg.cp_als(
            kernel, r, iterations=_cp_iterations(kernel.shape, r), seed=seed
        )
        last = out_f.T  # [R, C_out]
        return _Factors([in_f, y_f, x_f], _cp_features(in_f, y_f, x_f, k), last, None, last)

    def input_rows(self, x: np.ndarray, positions) -> np.ndarray:
        """Im2col patches [rows, C_in, taps] of a batch at sampled output positions."""
        geometry = ConvGeometry.of(self.node, self.kernel.shape, x.shape[2:])
        return conv_patches(x, geometry, *positions)

    def sample(self, x: np.ndarray, count: int, rng: np.random.Generator):
        """`count` output positions of a batch: (sample indices, spatial coordinates)."""
        geometry = ConvGeometry.of(self.node, self.kernel.shape, x.shape[2:])
        return sample_positions((x.shape[0], *geometry.output_spatial(x.shape[2:])), count, rng)

    def full_matrix(self) -> np.ndarray:
        return self.kernel.reshape(self.kernel.shape[0], -1).T

    def rows_per_sample(self) -> int:
        return math.prod(self.out_spatial)

    # ---- the graph

    def emit(self, graph: ir.Graph, plan: _Plan, factors: _Factors) -> list[ir.Node]:
        c_out = self.kernel.shape[0]
        k = tuple(self.kernel.shape[2:])
        ones = (1,) * self.nd
        stages: list[tuple[np.ndarray, dict]] = []
        if plan.method == "svd":
            r = factors.left.shape[1]
            stages += [(factors.left.T.reshape(r, -1, *k), self._attrs(range(self.nd), k))]
            stages += [(factors.right.T.reshape(c_out, r, *ones), self._attrs((), ones))]
        elif plan.method == "tucker":
            (basis,) = factors.front
            r1, r2 = basis.shape[1], factors.left.shape[1]
            stages += [(basis.T.reshape(r1, -1, *ones), self._attrs((), ones))]
            stages += [(factors.left.T.reshape(r2, r1, *k), self._attrs(range(self.nd), k))]
            stages += [(factors.right.T.reshape(c_out, r2, *ones), self._attrs((), ones))]
        elif plan.method == "spatial-svd":
            (vertical,) = factors.front
            r, kh, kw = vertical.shape[0], k[0], k[1]
            horizontal = factors.left.reshape(r, kw, c_out).transpose(2, 0, 1)
            stages += [(vertical[..., None], self._attrs((0,), (kh, 1)))]
            stages += [(horizontal[:, :, None, :], self._attrs((1,), (1, kw)))]
        else:  # cp
            in_f, y_f, x_f = factors.front
            r = in_f.shape[1]
            stages += [(in_f.T[:, :, None, None], self._attrs((), ones))]
            stages += [(y_f.T[:, None, :, None], self._attrs((0,), (k[0], 1), group=r))]
            stages += [(x_f.T[:, None, None, :], self._attrs((1,), (1, k[1]), group=r))]
            stages += [(factors.left.T[:, :, None, None], self._attrs((), ones))]
        return self._emit_stages(graph, stages, factors.offset)

    def _attrs(self, axes: Sequence[int], kernel: tuple[int, ...], group: int = 1) -> dict:
        """Attributes of a factor conv applying the original's geometry along `axes` only."""
        axes = set(axes)
        attrs: dict = {"kernel_shape": list(kernel)}
        strides = [s if i in axes else 1 for i, s in enumerate(self.strides)]
        dilations = [d if i in axes else 1 for i, d in enumerate(self.dilations)]
        if any(s != 1 for s in strides):
            attrs["strides"] = strides
        if any(d != 1 for d in dilations):
            attrs["dilations"] = dilations
        if axes and self.auto_pad in (*_SAME, "VALID"):
            attrs["auto_pad"] = self.auto_pad
        elif axes:
            begin = [p if i in axes else 0 for i, p in enumerate(self.pads[: self.nd])]
            end = [p if i in axes else 0 for i, p in enumerate(self.pads[self.nd :])]
            if any(begin + end):
                attrs["pads"] = begin + end
        if group != 1:
            attrs["group"] = group
        return attrs

    def _emit_stages(self, graph: ir.Graph, stages: list[tuple[np.ndarray, dict]], offset) -> list[ir.Node]:
        dtype = self.weight.dtype.numpy()
        x = self.node.inputs[0]
        nodes = []
        for index, (weight, attrs) in enumerate(stages):
            value = _const(graph, weight, dtype, f"{self.name}_lr{index}_w")
            inputs = [x, value]
            if index == len(stages) - 1 and self.bias is not None:
                inputs.append(self.bias)
            node = _new_node(graph, "Conv", inputs, attrs, self.name, index)
            nodes.append(node)
            x = node.outputs[0]
        _replace(graph, self.node, nodes)
        if offset is not None:
            last = nodes[-1]
            if self.bias is None:
                value = add_initializer(graph, offset.astype(dtype), f"{self.name}_lr_bias")
                last.resize_inputs(3)
                last.replace_input_with(2, value)
            else:
                _add_to_const(self.bias, offset)
        _drop_if_unused(graph, self.weight)
        return nodes


def _conv_layer(node: ir.Node, shapes: _Shapes) -> _ConvLayer | str:
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
        return "missing operand"
    kernel = _weight_array(inputs[1])
    if kernel is None:
        return "kernel is not a constant"
    problem = _weight_problem(inputs[1], kernel)
    if problem:
        return problem
    group = int(attr(node, "group", 1))
    if group != 1:
        return f"grouped conv (group={group}) is not factorized"
    if kernel.ndim < 3:
        return f"kernel is {kernel.ndim}-D"
    nd = kernel.ndim - 2
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    bias = inputs[2] if len(inputs) > 2 else None
    strides = tuple(int(s) for s in attr(node, "strides", [1] * nd))
    dilations = tuple(int(d) for d in attr(node, "dilations", [1] * nd))
    pads = tuple(int(p) for p in attr(node, "pads", [0] * 2 * nd))
    in_sp, out_sp = _spatial(shapes.get(inputs[0].name), nd), _spatial(shapes.get(node.outputs[0].name), nd)
    assumed = in_sp is None or out_sp is None
    if assumed:
        out_sp = (ASSUMED_SPATIAL,) * nd
        in_sp = tuple(o * s for o, s in zip(out_sp, strides, strict=True))
    return _ConvLayer(
        node, inputs[1], kernel, bias, in_sp, out_sp, assumed, strides, dilations, pads, auto_pad
    )


def _tucker_features(basis: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def project(patches: np.ndarray) -> np.ndarray:
        projected = np.einsum("nit,ir->nrt", patches, basis.astype(patches.dtype), optimize=True)
        return projected.reshape(patches.shape[0], -1)

    return project


def _spatial_features(vertical: np.ndarray, kernel: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    def project(patches: np.ndarray) -> np.ndarray:
        grid = patches.reshape(patches.shape[0], patches.shape[1], *kernel)
        features = np.einsum("niyx,riy->nrx", grid, vertical.astype(patches.dtype), optimize=True)
        return features.reshape(patches.shape[0], -1)

    return project


def _cp_features(
    in_f: np.ndarray, y_f: np.ndarray, x_f: np.ndarray, kernel: Sequence[int]
) -> Callable[[np.ndarray], np.ndarray]:
    def project(patches: np.ndarray) -> np.ndarray:
        grid = patches.reshape(patches.shape[0], patches.shape[1], *kernel)
        dt = patches.dtype
        return np.einsum(
            "niyx,ir,yr,xr->nr", grid, in_f.astype(dt), y_f.astype(dt), x_f.astype(dt), optimize=True
        )

    return project


# ---- rank choice per conv method: (method, ranks) or a skip reason


def _plan_single_rank(method: str, max_rank: Callable[[_ConvLayer], int], spectrum):
    def plan(conv: _ConvLayer, budget: int | None, energy: float | None, seed: int):
        rank = None if budget is not None else linalg.rank_for_energy(spectrum(conv), energy)
        full = (conv.kernel.size, conv._macs_full())
        rank, problem = _choose_rank(lambda r: conv.cost(method, (r,)), full, max_rank(conv), budget, rank)
        return problem or (method, (rank,))

    return plan


def _channel_matrix(conv: _ConvLayer) -> np.ndarray:
    return conv.kernel.reshape(conv.kernel.shape[0], -1)


def _separable_matrix(conv: _ConvLayer) -> np.ndarray:
    c_out, c_in, kh, kw = conv.kernel.shape
    return conv.kernel.transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def _plan_cp(conv: _ConvLayer, budget: int | None, energy: float | None, seed: int):
    full = (conv.kernel.size, conv._macs_full())

    def cost(r: int) -> tuple[int, int]:
        return conv.cost("cp", (r,))

    max_rank = linalg.cp_full_rank(conv.kernel.shape)
    if budget is not None:
        rank, problem = _choose_rank(cost, full, max_rank, budget, None)
        return problem or ("cp", (rank,))
    worth = [r for r in range(1, max_rank + 1) if _no_gain(cost(r), full, "") is None]
    if not worth:
        return "no CP rank lowers both params and MACs"
    rank = _cp_rank_for_energy(conv.kernel.astype(np.float64), energy, worth[-1], seed)
    if rank is None:
        return f"energy {energy} needs a CP rank above {worth[-1]}, the largest that still saves"
    return "cp", (rank,)


def _cp_iterations(shape: Sequence[int], rank: int) -> int:
    """ALS sweeps within MAX_CP_WORK: 100 for small kernels, about 12 for a 512x512x3x3 one
    at rank 1145 (each sweep costs ~4 products of the kernel with a rank-wide factor)."""
    per_sweep = len(shape) * (2 * math.prod(shape) * rank + rank**3)
    return int(min(100, max(10, MAX_CP_WORK // per_sweep)))


def _cp_rank_for_energy(kernel: np.ndarray, energy: float, max_rank: int, seed: int) -> int | None:
    """The smallest CP rank whose reconstruction keeps `energy` of ||K||^2 (bisection)."""
    norm_sq = float(np.sum(kernel * kernel))

    def kept(rank: int) -> float:
        error = kernel - linalg.cp_reconstruct(linalg.cp_als(kernel, rank, iterations=50, seed=seed))
        return 1.0 - float(np.sum(error * error)) / norm_sq if norm_sq > 0 else 1.0

    if kept(max_rank) < energy:
        return None
    low, high = 1, max_rank
    while low < high:
        middle = (low + high) // 2
        if kept(middle) >= energy:
            high = middle
        else:
            low = middle + 1
    return low


def _plan_tucker(conv: _ConvLayer, budget: int | None, energy: float | None, seed: int):
    """Ranks (r1 inputs, r2 outputs) by energy of the two unfoldings, or the largest pair
    within the params budget that keeps the same fraction of both modes. An input with at
    most SMALL_INPUT channels (RGB) keeps them all: Tucker-1 on the output mode, which is the
    channel SVD (Kim et al. 2015 leave the first layer's input mode alone the same way)."""
    c_out, c_in = conv.kernel.shape[:2]
    full = (conv.kernel.size, conv._macs_full())
    if budget is None:
        r1 = linalg.rank_for_energy(linalg.singular_values(linalg.unfold(conv.kernel, 1)), energy)
        r2 = linalg.rank_for_energy(linalg.singular_values(linalg.unfold(conv.kernel, 0)), energy)
        return ("svd", (r2,)) if r1 >= c_in or c_in <= SMALL_INPUT else ("tucker", (r1, r2))
    if c_in > SMALL_INPUT:
        for r2 in range(c_out, 0, -1):
            r1 = min(c_in - 1, max(1, round(r2 * c_in / c_out)))
            params, macs = conv.cost("tucker", (r1, r2))
            if params <= budget and macs < full[1]:
                return "tucker", (r1, r2)
    max_rank = min(_channel_matrix(conv).shape)
    rank, problem = _choose_rank(lambda r: conv.cost("svd", (r,)), full, max_rank, budget, None)
    return problem or ("svd", (rank,))


_CONV_PLANNERS = {
    "svd": _plan_single_rank(
        "svd",
        lambda c: min(_channel_matrix(c).shape),
        lambda c: linalg.singular_values(_channel_matrix(c)),
    ),
    "spatial-svd": _plan_single_rank(
        "spatial-svd",
        lambda c: min(_separable_matrix(c).shape),
        lambda c: linalg.singular_values(_separable_matrix(c)),
    ),
    "cp": _plan_cp,
    "tucker": _plan_tucker,
}


# ----- which layers, and why not ----------------------------------------------------------------


def _layer_of(node: ir.Node, shapes: _Shapes) -> _MatrixLayer | _ConvLayer | str:
    if node.domain not in _STANDARD_DOMAINS:
        return f"{node.op_type} in domain '{node.domain}'"
    if node.op_type == "Conv":
        return _conv_layer(node, shapes)
    return _matrix_layer(node, shapes)


def _weight_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a constant (initializer or Constant node), else None."""
    if value is None or value.is_graph_input():
        return None
    try:
        return const_array(value)
    except Exception:  # noqa: BLE001 - unreadable tensors (bad external data) are not constants
        return None


def _working_copy(array: np.ndarray) -> np.ndarray:
    """A float32 (float64 for double weights) copy: a VGG classifier in float64 alone is 0.8 GB,
    and the decompositions move to float64 where precision matters."""
    return array.astype(np.float64 if array.dtype == np.float64 else np.float32)


def _weight_problem(weight: ir.Value, array: np.ndarray) -> str | None:
    if weight.dtype not in _FLOAT_TYPES:
        return f"weight type {weight.dtype} is not a float type"
    if not np.all(np.isfinite(array)):
        return "weight has NaN/Inf values"
    users = {id(use.node) for use in weight.uses()}
    if len(users) > 1:
        return f"weight shared by {len(users)} nodes (factorizing one would add params)"
    if weight.is_graph_output():
        return "weight is a graph output"
    return None


# ----- graph editing ---------------------------------------------------------------------------------


def _const(graph: ir.Graph, array: np.ndarray, dtype: np.dtype, hint: str) -> ir.Value:
    return add_initializer(graph, np.ascontiguousarray(array.astype(dtype)), hint)


def _new_node(graph: ir.Graph, op: str, inputs: list, attrs: dict, base: str, index: int) -> ir.Node:
    out = ir.Value(name=unique_name(graph, f"{base}_lr{index}"))
    return ir.node(op, inputs, attrs, outputs=[out], name=f"{base}/lowrank_{index}")


def _replace(graph: ir.Graph, old: ir.Node, chain: list[ir.Node]) -> None:
    """Put `chain` where `old` was; its last output takes over old's output name and type."""
    old_out, chain_out = old.outputs[0], chain[-1].outputs[0]
    chain_out.type, chain_out.shape = old_out.type, old_out.shape
    graph.insert_before(old, chain)
    name = old_out.name
    if not bypass(old_out, chain_out):
        raise OnnxSlimError(f"cannot rewire the output of {old.name}")
    graph.remove(old, safe=True)
    if chain_out.name != name:
        old_out.name = None
        chain_out.name = name


def _params_of(nodes: list[ir.Node]) -> int:
    """Elements of the distinct constant inputs of `nodes` (weights, biases)."""
    constants = {
        id(v): v for node in nodes for v in node.inputs if v is not None and v.const_value is not None
    }
    return sum(v.const_value.size for v in constants.values())


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.is_initializer() and not list(value.uses()) and not value.is_graph_output():
        graph.initializers.pop(value.name, None)


def _add_to_const(value: ir.Value, delta: np.ndarray) -> None:
    current = const_array(value)
    updated = (current.astype(np.float64) + delta).astype(current.dtype)
    value.const_value = ir.tensor(np.ascontiguousarray(updated), name=value.name)
    value.shape = ir.Shape(updated.shape)


# ----- data-aware refit -------------------------------------------------------------------------


def _waves(graph: ir.Graph, plans: list[_Plan]) -> list[list[_Plan]]:
    """Plans grouped so that no layer of a wave reads (even indirectly) another pending one.

    A node's level is the number of planned layers on its longest input path; layers of
    equal level can be captured in one run, after every lower level is factorized.
    """
    planned = {id(plan.layer.node) for plan in plans}
    level: dict[int, int] = {}
    for node in graph:  # topological order (rewrite() sorted the graph)
        incoming = [level.get(id(v.producer()), 0) for v in node.inputs if v is not None and v.producer()]
        level[id(node)] = max(incoming, default=0) + (1 if id(node) in planned else 0)
    waves: dict[int, list[_Plan]] = {}
    for plan in plans:
        waves.setdefault(level[id(plan.layer.node)], []).append(plan)
    return [waves[k] for k in sorted(waves)]


@dataclass
class _Targets:
    """What the original layer output (before its bias) at the rows sampled from each
    calibration batch, and which rows those were, so the factorized model is read there too."""

    picks: list = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(len(y) for y in self.outputs)


class _Refitter:
    """Refits the last stage of each factorization on calibration data.

    The original model runs once: every planned layer's input is sampled (a seeded subset of
    rows or conv positions per batch) and turned into the original layer's output there.
    Then, wave by wave, the already-factorized model supplies the layer inputs at the same
    rows (asymmetric reconstruction: upstream approximation errors are compensated too).
    """

    def __init__(
        self, original: ir.Model, data: CalibrationData, plans: list[_Plan], max_rows: int, seed: int
    ) -> None:
        self.feeds = list(data.batches(BATCH))
        self.quota = max(1, math.ceil(max_rows / max(1, len(self.feeds))))
        self.targets = self._original_outputs(original, plans, seed)

    def _original_outputs(self, original: ir.Model, plans: list[_Plan], seed: int) -> dict[int, _Targets]:
        targets = {id(plan): _Targets() for plan in plans}
        rngs = {id(plan): np.random.default_rng([seed, index]) for index, plan in enumerate(plans)}
        names = list(dict.fromkeys(_input_of(plan.layer).name for plan in plans))
        for batch in runtime.stream_tensors(original, names, self.feeds, prune=True):
            for plan in plans:
                x = batch[_input_of(plan.layer).name]
                pick = plan.layer.sample(x, self.quota, rngs[id(plan)])
                rows = plan.layer.input_rows(x, pick)
                flat = rows.reshape(rows.shape[0], -1)
                targets[id(plan)].picks.append(pick)
                targets[id(plan)].outputs.append(flat @ plan.layer.full_matrix().astype(flat.dtype))
        return targets

    def refit(self, model: ir.Model, wave: list[tuple[_Plan, _Factors]], record: PassRecord) -> None:
        fits = []
        for plan, factors in wave:
            targets = self.targets.pop(id(plan))
            fitted, scope = _fit_scope(factors, targets.rows)
            if fitted is None:
                record.notes.append(f"{plan.layer.name}: weight-only ({scope})")
            else:
                fits.append((plan, factors, fitted, scope, targets, linalg.LinearStats(*fitted.prior.shape)))
        names = list(dict.fromkeys(_input_of(plan.layer).name for plan, *_ in fits))
        if fits:
            for index, batch in enumerate(runtime.stream_tensors(model, names, self.feeds, prune=True)):
                for plan, _, fitted, _, targets, stats in fits:
                    rows = plan.layer.input_rows(batch[_input_of(plan.layer).name], targets.picks[index])
                    stats.add(fitted.project(rows), targets.outputs[index])
        for plan, factors, fitted, scope, _, stats in fits:
            record.notes.append(_solve(plan.layer, factors, fitted, scope, stats))


def _input_of(layer: _MatrixLayer | _ConvLayer) -> ir.Value:
    return layer.activation if isinstance(layer, _MatrixLayer) else layer.node.inputs[0]


def _fit_scope(factors: _Factors, rows: int) -> tuple[_Factors | None, str]:
    """What the refit can afford: the whole last stage, only its last factor (the earlier
    factor stays as the weight-only SVD chose it), or nothing; and why it is narrowed."""
    features, outputs = factors.prior.shape
    affordable = features <= MAX_FIT_FEATURES and rows * features**2 <= MAX_FIT_WORK
    if affordable and (factors.rank is None or outputs <= MAX_FIT_OUTPUTS):
        fitted, scope = factors, ""
    elif factors.rank is not None and factors.rank <= MAX_FIT_FEATURES:
        fitted, scope = factors.last_factor(), f"last factor only: {features} features x {outputs} outputs"
    else:
        return None, f"{features} input features: too large to refit"
    too_few = _too_few_rows(fitted, rows)
    return (None, too_few) if too_few else (fitted, scope)


def _too_few_rows(fitted: _Factors, rows: int) -> str | None:
    """A fit needs at least as many rows as the smaller side of the map it fits; with fewer
    it would interpolate the calibration rows (a rank-constrained fit chooses an output
    subspace, which its outputs alone bound)."""
    features, outputs = fitted.prior.shape
    needed = min(features, outputs)
    return None if rows >= needed else f"{rows} calibration rows < {needed} needed to refit"


def _solve(layer, factors: _Factors, fitted: _Factors, scope: str, stats: linalg.LinearStats) -> str:
    """Refit one layer from its statistics; the note says what that gained."""
    intercept = layer.bias_adjustable
    before = stats.relative_error(fitted.stage)
    if fitted.rank is not None:
        left, right, offset = linalg.reduced_rank_fit(stats, fitted.prior, fitted.rank, intercept=intercept)
        after = stats.relative_error(left @ right, offset)
    else:
        left, offset = linalg.ridge_fit(stats, fitted.prior, intercept=intercept)
        right = None
        after = stats.relative_error(left, offset)
    if not after < before:
        return f"{layer.name}: weight-only kept (refit {after:.3g} not below {before:.3g})"
    if fitted is factors:
        factors.left, factors.right = left, right
    else:
        factors.right = left
    factors.offset = offset if intercept and np.any(offset) else None
    gain = f"output rel. error {before:.3g} weight-only -> {after:.3g} refit"
    return f"{layer.name}: {gain} ({stats.rows} rows{'; ' + scope if scope else ''})"
