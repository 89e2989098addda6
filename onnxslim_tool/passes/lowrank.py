"""Low-rank factorization: replace a dense layer by a chain of thinner ones.

What each layer becomes is described in `onnxslim_tool.lowrank.dense` (Gemm / MatMul: two
products through r channels, truncated SVD) and `onnxslim_tool.lowrank.conv` (channel SVD,
spatial SVD, CP, Tucker-2; grouped convs per group). This module is the pass: which layers,
at which ranks, and in which order the data-aware refit (`onnxslim_tool.lowrank.refit`)
sees them.

Ranks come from `ratio` (the largest rank keeping at most that fraction of the layer's
weights), or, when `energy` is given, from the fraction of squared singular values kept (of
each unfolding for Tucker; CP searches the smallest rank whose reconstruction keeps that
energy), or, with `rank_rule="vbmf"`, from empirical variational Bayesian matrix
factorization of the matrix each method factorizes (of both unfoldings for Tucker, as Kim
et al. 2015 do; not for CP); `per_layer` maps node-name globs to ratios, which override the
rule for those layers. A factorization is applied only where it lowers both the layer's
parameters and its MACs, computed with the real shapes.

With calibration data and `refit`, the last stage of every factorization is refit on the
layer's output (see `onnxslim_tool.lowrank.refit`); the gain is reported per layer in the
record's notes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.lowrank.dense import MatrixLayer
from onnxslim_tool.lowrank.graph import Shapes, layer_name, params_of, value_shapes
from onnxslim_tool.lowrank.layers import OPS, layer_of
from onnxslim_tool.lowrank.plan import Plan
from onnxslim_tool.lowrank.rank import RULES
from onnxslim_tool.lowrank.refit import Refitter, waves
from onnxslim_tool.passes.base import CompressionPass, PassRecord

__all__ = ["METHODS", "LowRank", "factorize_node"]

METHODS = ("svd", "spatial-svd", "cp", "tucker")
# milder() stops once it would keep more than this fraction (or energy).
MAX_MILD_RATIO = 0.95
MAX_MILD_ENERGY = 0.9999


class LowRank(CompressionPass):
    """Factorize Gemm/MatMul (SVD) and Conv (channel SVD, spatial SVD, CP or Tucker-2) layers.

    `rank_rule` is "ratio", "energy" or "vbmf"; left None it is "energy" when `energy` is
    given, else "ratio".
    """

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
        rank_rule: str | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        if method not in METHODS:
            raise OnnxSlimError(f"unknown low-rank method '{method}'; use one of: {', '.join(METHODS)}")
        rule = rank_rule or ("energy" if energy is not None else "ratio")
        if rule not in RULES:
            raise OnnxSlimError(f"unknown rank rule '{rank_rule}'; use one of: {', '.join(RULES)}")
        if rule == "ratio" and ratio is None:
            raise OnnxSlimError("low-rank needs a ratio (fraction of params kept) or an energy fraction")
        if rule == "energy" and energy is None:
            raise OnnxSlimError("rank rule 'energy' needs an energy fraction")
        if rule == "vbmf" and method == "cp":
            raise OnnxSlimError("VBMF estimates matrix ranks; CP needs a tensor rank (use ratio or energy)")
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
        self.rank_rule = rule

    def milder(self) -> LowRank | None:
        """Half of what was removed is kept back: ratio 0.5 -> 0.75, energy 0.9 -> 0.95.

        VBMF has no setting to relax (its ranks are an estimate, not a target): None.
        """
        changes: dict = {}
        if self.rank_rule == "vbmf":
            return None
        if self.rank_rule == "energy":  # energy decides the ranks; ratio is not used then
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
            for k in (
                "ratio",
                "energy",
                "method",
                "refit",
                "per_layer",
                "min_params",
                "seed",
                "max_rows",
                "rank_rule",
            )
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

    def planned_savings(self, model: ir.Model) -> tuple[int, int]:
        """(params, MACs) the layers this pass would factorize would lose, from its plans
        alone: the model is not changed and nothing is decomposed (rank choice by CP energy
        excepted), so a search over settings (a MACs target) stays cheap."""
        record = PassRecord(self.name)
        with threadpool_limits(1):
            plans = self._plans(model, record)
        params = sum(plan.params[0] - plan.params[1] for plan in plans)
        return params, sum(plan.macs[0] - plan.macs[1] for plan in plans)

    def _plans(self, model: ir.Model, record: PassRecord) -> list[Plan]:
        shapes = value_shapes(model, record.notes)
        return [plan for node in list(model.graph) if (plan := self._plan(node, shapes, record)) is not None]

    def _rewrite(self, model: ir.Model, record: PassRecord) -> None:
        graph = model.graph
        graph.sort()
        plans = self._plans(model, record)
        if not plans:
            record.notes.append("no layer could be factorized with these settings")
            return
        refitter = self._refitter(model, plans, record)
        batches = waves(graph, plans) if refitter is not None else [plans]
        order = {id(plan): index for index, plan in enumerate(plans)}
        for wave in batches:
            factorized = [(plan, plan.factorize(self.seed + order[id(plan)])) for plan in wave]
            if refitter is not None:
                refitter.refit(model, factorized, record)
            for plan, factors in factorized:
                nodes = plan.layer.emit(graph, plan, factors)
                after = params_of(nodes)  # counted on the graph: a refit may have added a bias
                record.changed(plan.layer.name, plan.layer.node.op_type, plan.detail(), plan.params[0], after)

    def _refitter(self, model: ir.Model, plans: list[Plan], record: PassRecord) -> Refitter | None:
        if not self.refit:
            record.notes.append("refit disabled: weight-only factorization")
            return None
        if self.calibration is None:
            record.notes.append("no calibration data: weight-only factorization (no refit)")
            return None
        if self.calibration.synthetic:
            record.notes.append("calibration data is synthetic: the refit fits random inputs")
        return Refitter(model, self.calibration, plans, self.max_rows, self.seed)

    def _plan(self, node: ir.Node, shapes: Shapes, record: PassRecord) -> Plan | None:
        if node.op_type not in OPS:
            return None
        name = layer_name(node)
        ok, reason = self.selects(node)
        layer = layer_of(node, shapes) if ok else reason
        if isinstance(layer, str):
            record.skip(name, layer)
            return None
        if layer.weight_params < self.min_params:
            record.skip(name, f"{layer.weight_params} weights < min_params {self.min_params}")
            return None
        ratio = self._ratio_for(name)
        rule = "ratio" if ratio is not None else self.rank_rule
        plan = layer.plan(self.method, ratio, self.energy, self.seed, rule)
        if isinstance(plan, str):
            record.skip(name, plan)
            return None
        return plan

    def _ratio_for(self, name: str) -> float | None:
        for pattern, value in self.per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return value
        return self.ratio if self.rank_rule == "ratio" else None


def factorize_node(model: ir.Model, node: ir.Node, method: str, ranks: Sequence[int], seed: int = 0) -> None:
    """Factorize one layer at explicit ranks (weight-only), whether or not that pays.

    For tests and studies such as full-rank exactness; the pass chooses its own ranks.
    Gemm/MatMul always use SVD. Raises OnnxSlimError with the reason for a layer it cannot do.
    """
    layer = layer_of(node, value_shapes(model, []))
    if isinstance(layer, str):
        raise OnnxSlimError(f"{layer_name(node)}: {layer}")
    plan = Plan(layer, "svd" if isinstance(layer, MatrixLayer) else method, tuple(ranks), (0, 0), (0, 0))
    layer.emit(model.graph, plan, plan.factorize(seed))


def _check_fraction(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise OnnxSlimError(f"{what} must be in (0, 1], got {value!r}")
