"""Data-aware refit of factorized layers (asymmetric reconstruction, Zhang et al. 2016).

The last stage of every factorization is refit by least squares so that the layer's
*output* on real inputs is approximated, not its weight: inputs come from the
already-factorized model, targets from the original one. For SVD and Tucker this is a
reduced-rank regression that also chooses the rank-r subspace from the data; for spatial
SVD and CP the last factor is refit with the earlier ones fixed. Where the full refit would
be too costly (see MAX_FIT_*), only the last factor is refit. Each group of a grouped conv
is its own problem. The gain (relative output error on the calibration rows, weight-only vs
refit) is reported per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxslim_tool import linalg, runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.lowrank.layers import Layer
from onnxslim_tool.lowrank.plan import Factors, Plan
from onnxslim_tool.passes.base import PassRecord

# Calibration samples per onnxruntime run while collecting layer inputs.
BATCH = 32
# A refit keeps X^T X of its input features in memory (8192 features: 512 MB).
MAX_FIT_FEATURES = 8192
# A rank-constrained refit solves an eigenproblem as large as the layer's outputs, and
# accumulating X^T X costs rows x features^2: above these bounds (VGG's 4096-wide classifier,
# its 512-channel 3x3 convs) only the last factor is refit, which costs rows x rank^2.
MAX_FIT_OUTPUTS = 2048
MAX_FIT_WORK = 2e10


def waves(graph: ir.Graph, plans: list[Plan]) -> list[list[Plan]]:
    """Plans grouped so that no layer of a wave reads (even indirectly) another pending one.

    A node's level is the number of planned layers on its longest input path; layers of
    equal level can be captured in one run, after every lower level is factorized.
    The graph must be in topological order.
    """
    planned = {id(plan.layer.node) for plan in plans}
    level: dict[int, int] = {}
    for node in graph:
        incoming = [level.get(id(v.producer()), 0) for v in node.inputs if v is not None and v.producer()]
        level[id(node)] = max(incoming, default=0) + (1 if id(node) in planned else 0)
    grouped: dict[int, list[Plan]] = {}
    for plan in plans:
        grouped.setdefault(level[id(plan.layer.node)], []).append(plan)
    return [grouped[k] for k in sorted(grouped)]


@dataclass
class _Targets:
    """What the original layer output (before its bias) at the rows sampled from each
    calibration batch, per part, and which rows those were, so the factorized model is read
    there too."""

    picks: list = field(default_factory=list)
    outputs: list[list[np.ndarray]] = field(default_factory=list)  # [batch][part]

    @property
    def rows(self) -> int:
        return sum(len(parts[0]) for parts in self.outputs)


@dataclass
class _Fit:
    """One part's refit problem."""

    part: int
    factors: Factors
    fitted: Factors
    scope: str
    stats: linalg.LinearStats


class Refitter:
    """Refits the last stage of each factorization on calibration data.

    The original model runs once: every planned layer's input is sampled (a seeded subset of
    rows or conv positions per batch) and turned into the original layer's output there.
    Then, wave by wave, the already-factorized model supplies the layer inputs at the same
    rows (asymmetric reconstruction: upstream approximation errors are compensated too).
    """

    def __init__(
        self, original: ir.Model, data: CalibrationData, plans: list[Plan], max_rows: int, seed: int
    ) -> None:
        self.feeds = list(data.batches(BATCH))
        self.quota = max(1, math.ceil(max_rows / max(1, len(self.feeds))))
        self.targets = self._original_outputs(original, plans, seed)

    def _original_outputs(self, original: ir.Model, plans: list[Plan], seed: int) -> dict[int, _Targets]:
        targets = {id(plan): _Targets() for plan in plans}
        rngs = {id(plan): np.random.default_rng([seed, index]) for index, plan in enumerate(plans)}
        names = list(dict.fromkeys(plan.layer.input_value.name for plan in plans))
        for batch in runtime.stream_tensors(original, names, self.feeds, prune=True):
            for plan in plans:
                layer = plan.layer
                x = batch[layer.input_value.name]
                pick = layer.sample(x, self.quota, rngs[id(plan)])
                rows = layer.input_rows(x, pick)
                outputs = []
                for part in range(layer.groups):
                    flat = _flat(layer.part_inputs(rows, part))
                    outputs.append(flat @ layer.part_matrix(part).astype(flat.dtype))
                targets[id(plan)].picks.append(pick)
                targets[id(plan)].outputs.append(outputs)
        return targets

    def refit(self, model: ir.Model, wave: list[tuple[Plan, list[Factors]]], record: PassRecord) -> None:
        """Refit every part of the wave's factorizations in place; notes say what it gained."""
        fits: list[tuple[Plan, _Targets, list[_Fit]]] = []
        for plan, parts in wave:
            targets = self.targets.pop(id(plan))
            layer_fits, reasons = [], []
            for part, factors in enumerate(parts):
                fitted, scope = _fit_scope(factors, targets.rows)
                if fitted is None:
                    reasons.append(scope)
                else:
                    stats = linalg.LinearStats(*fitted.prior.shape)
                    layer_fits.append(_Fit(part, factors, fitted, scope, stats))
            if reasons:
                record.notes.append(f"{plan.layer.name}: weight-only ({reasons[0]})")
            if layer_fits and not reasons:
                fits.append((plan, targets, layer_fits))
        names = list(dict.fromkeys(plan.layer.input_value.name for plan, *_ in fits))
        if fits:
            for index, batch in enumerate(runtime.stream_tensors(model, names, self.feeds, prune=True)):
                for plan, targets, layer_fits in fits:
                    layer = plan.layer
                    rows = layer.input_rows(batch[layer.input_value.name], targets.picks[index])
                    for fit in layer_fits:
                        features = fit.fitted.project(layer.part_inputs(rows, fit.part))
                        fit.stats.add(features, targets.outputs[index][fit.part])
        for plan, _, layer_fits in fits:
            record.notes.append(_solve_layer(plan.layer, layer_fits))


def _flat(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(rows.shape[0], -1)


def _fit_scope(factors: Factors, rows: int) -> tuple[Factors | None, str]:
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


def _too_few_rows(fitted: Factors, rows: int) -> str | None:
    """A fit needs at least as many rows as the smaller side of the map it fits; with fewer
    it would interpolate the calibration rows (a rank-constrained fit chooses an output
    subspace, which its outputs alone bound)."""
    features, outputs = fitted.prior.shape
    needed = min(features, outputs)
    return None if rows >= needed else f"{rows} calibration rows < {needed} needed to refit"


def _solve_layer(layer: Layer, fits: list[_Fit]) -> str:
    """Refit each part; the note gives the layer's output error before and after (pooled
    over its parts), and how many parts kept their weight-only factors."""
    before_sq = after_sq = total = 0.0
    kept = 0
    for fit in fits:
        before, after = _solve(layer, fit)
        kept += after >= before
        before_sq, after_sq, total = before_sq + before, after_sq + min(before, after), total + fit.stats.yy
    before_rel = math.sqrt(before_sq / total) if total > 0 else 0.0
    after_rel = math.sqrt(after_sq / total) if total > 0 else 0.0
    if kept == len(fits):
        return f"{layer.name}: weight-only kept (refit {after_rel:.3g} not below {before_rel:.3g})"
    rows, scope = fits[0].stats.rows, fits[0].scope
    extra = [f"{rows} rows"]
    if scope:
        extra.append(scope)
    if len(fits) > 1:
        extra.append(f"{len(fits)} groups, {kept} kept weight-only")
    gain = f"output rel. error {before_rel:.3g} weight-only -> {after_rel:.3g} refit"
    return f"{layer.name}: {gain} ({'; '.join(extra)})"


def _solve(layer: Layer, fit: _Fit) -> tuple[float, float]:
    """Refit one part from its statistics, in place when it lowers the squared error;
    returns the squared errors (weight-only, refit)."""
    intercept = layer.bias_adjustable
    fitted, factors, stats = fit.fitted, fit.factors, fit.stats
    before = stats.error(fitted.stage)
    if fitted.rank is not None:
        left, right, offset = linalg.reduced_rank_fit(stats, fitted.prior, fitted.rank, intercept=intercept)
        after = stats.error(left @ right, offset)
    else:
        left, offset = linalg.ridge_fit(stats, fitted.prior, intercept=intercept)
        right = None
        after = stats.error(left, offset)
    if not after < before:
        return before, after
    if fitted is factors:
        factors.left, factors.right = left, right
    else:
        factors.right = left
    factors.offset = offset if intercept and np.any(offset) else None
    return before, after
