"""Mixed precision by measurement: keep the layers float whose quantization costs most.

Each candidate layer is quantized *alone* and scored on held-out samples; layers are ranked
by that cost (metric drop first, output error to break the many ties small data sets give).
The metric is the Judge's: the bound task metric when there is one, so the layers kept float
are those the task needs, not those whose outputs merely look most changed.
Then the worst are kept float, one more at a time, until the fully quantized rest meets the
budget. Every number is kept so the report can say why a layer stayed float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxslim_tool.quantization.evaluation import Judge, Score


@dataclass
class LayerCost:
    layer: str
    drop: float
    rel_error: float

    def describe(self) -> str:
        return f"quantized alone it costs {self.drop:+.4f} in the metric, output error {self.rel_error:.4f}"


@dataclass
class MixedPrecision:
    kept_float: list[LayerCost] = field(default_factory=list)
    ranking: list[LayerCost] = field(default_factory=list)
    drop_before: float = 0.0
    drop_after: float = 0.0
    met: bool = True


# quantize(include_only, exclude) -> quantized model
Quantizer = Callable[[Sequence[str], Sequence[str]], ir.Model]


def search(layers: Sequence[str], quantize: Quantizer, judge: Judge, budget: float) -> MixedPrecision:
    """Smallest prefix of the sensitivity ranking that, kept float, meets `budget`."""
    full = judge.score(quantize((), ()))
    result = MixedPrecision(drop_before=judge.drop(full), drop_after=judge.drop(full))
    if result.drop_before <= budget:
        return result
    result.ranking = rank(layers, quantize, judge)
    kept: list[LayerCost] = []
    for cost in result.ranking:
        kept.append(cost)
        score = judge.score(quantize((), [c.layer for c in kept]))
        result.drop_after = judge.drop(score)
        if result.drop_after <= budget:
            break
    result.kept_float = kept
    result.met = result.drop_after <= budget
    return result


def rank(layers: Sequence[str], quantize: Quantizer, judge: Judge) -> list[LayerCost]:
    costs = []
    for layer in layers:
        score: Score = judge.score(quantize([layer], ()))
        costs.append(LayerCost(layer, judge.drop(score), score.rel_error))
    return sorted(costs, key=lambda c: (c.drop, c.rel_error), reverse=True)
