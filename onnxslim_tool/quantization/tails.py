"""Output tails that must stay float.

One tensor joining values of very different ranges: a detector that concatenates box
coordinates (0..320) with class scores (0..1) into one output loses the scores under a single
int8 scale (step 320/255 > most scores). Walking back from each graph output through
data-movement ops, a Concat whose inputs' calibrated ranges differ by more than RANGE_RATIO
marks the walked tail (Concat and the ops after it) to stay float; the Concat's inputs keep
their own, well-fitting scales.

A Softmax producing a graph output: onnxruntime gives its output the fixed range [0, 1], a
step of 1/255, so every probability under 0.002 reads 0 and a 1000-class output keeps only its
few largest entries (on the light-zoo nets with random weights, whose probabilities are all
near 0.001, the int8 output was the same constant for every input). The last op of a model is
cheap, so keeping it float costs no speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import TensorsData

# 32x range difference: the smaller part keeps fewer than 3 of 8 bits under a shared scale.
RANGE_RATIO = 32.0
_MOVEMENT_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Concat", "Split", "Slice"}
)


@dataclass
class FloatTail:
    output: str
    nodes: list[str]
    reason: str


def heterogeneous_tails(model: ir.Model, ranges: TensorsData) -> list[FloatTail]:
    tails = []
    for output in model.graph.outputs:
        tail = _tail_nodes(output)
        for node in tail:
            if node.op_type != "Concat":
                continue
            spans = [_span(ranges, value.name) for value in node.inputs if value is not None]
            known = [s for s in spans if s is not None and s > 0]
            if len(known) >= 2 and max(known) / min(known) > RANGE_RATIO:
                reason = (
                    f"output '{output.name}' concatenates ranges from {min(known):.3g} to {max(known):.3g} "
                    f"wide at '{node.name}'; one int8 scale would erase the small part"
                )
                tails.append(FloatTail(output.name or "", [n.name or "" for n in tail], reason))
                break
    return tails


PROBABILITY_OPS = frozenset({"Softmax", "LogSoftmax"})


def probability_tails(model: ir.Model) -> list[FloatTail]:
    """Softmax outputs (through data-movement ops) that an int8 step of 1/255 would erase."""
    tails = []
    for output in model.graph.outputs:
        tail = _tail_nodes(output)
        frontier = [output.producer()] + [v.producer() for n in tail for v in n.inputs if v is not None]
        softmax = next((n for n in frontier if n is not None and n.op_type in PROBABILITY_OPS), None)
        if softmax is None:
            continue
        reason = (
            f"output '{output.name}' comes from {softmax.op_type} '{softmax.name}': int8's fixed "
            "1/255 step on [0, 1] would zero every probability under 0.002"
        )
        tails.append(FloatTail(output.name or "", [n.name or "" for n in (softmax, *tail)], reason))
    return tails


def _tail_nodes(output: ir.Value) -> list[ir.Node]:
    """Data-movement and Concat nodes between `output` and the compute that feeds it."""
    tail: list[ir.Node] = []
    frontier = [output.producer()]
    while frontier:
        node = frontier.pop()
        if node is None or node.op_type not in _MOVEMENT_OPS or node in tail:
            continue
        tail.append(node)
        frontier.extend(value.producer() for value in node.inputs if value is not None)
    return tail


def _span(ranges: TensorsData, name: str | None) -> float | None:
    if not name or name not in ranges:
        return None
    entry = ranges[name]
    low, high = (entry.range_value if hasattr(entry, "range_value") else entry)[:2]
    return float(max(np.max(np.abs(low)), np.max(np.abs(high))))
