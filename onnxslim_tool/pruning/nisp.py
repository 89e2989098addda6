"""NISP: the final responses' importance propagated backward to every channel (Yu et al. 2018).

Each value of the graph gets one importance per channel, starting from the graph outputs
and walking the nodes in reverse topological order. A weighted layer (Conv, Gemm, MatMul
with a constant weight) maps its outputs' importance to its inputs through |W|
(`importance.nisp_through_weight`), a BatchNorm through |gamma / sqrt(var + eps)|, and
channel-wise ops (activations, pooling, element-wise arithmetic) pass it on unchanged. A
value read by several nodes sums what each of them sends back.

The final responses get uniform importance: every output of the model counts the same (a
classifier's classes do), which keeps the criterion data-free. An op the walk does not
understand (Transpose, Softmax, attention MatMuls ...) gives each of its inputs uniform
importance at the mean level of its outputs', and is listed in `blocked`: the layers above
it are then ranked by their own weights only, not by what lies beyond the op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxslim_tool.cost import value_shapes
from onnxslim_tool.graph_utils import attr, const_array
from onnxslim_tool.pruning.importance import nisp_through_weight
from onnxslim_tool.pruning.reconstruct import LinearLayer, as_linear_layer

# Ops that act on each channel separately: the importance of a channel passes through as is.
_CHANNELWISE = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu",
        "Selu", "Celu", "Gelu", "Erf", "Softplus", "Softsign", "Mish", "Swish", "Identity", "Dropout",
        "Cast", "Neg", "Abs", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
        "GlobalMaxPool", "GlobalLpPool", "Resize", "Upsample", "Pad", "LayerNormalization",
        "InstanceNormalization", "LRN",
        "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "Where",
    }
)  # fmt: skip


@dataclass
class Score:
    """Importance of a value's channels: `vector` along `axis` (negative, from the end), or,
    when `vector` is None, the same `level` for every channel (no information)."""

    vector: np.ndarray | None = None
    axis: int = -1
    level: float = 0.0

    def mean(self) -> float:
        return float(self.vector.mean()) if self.vector is not None and self.vector.size else self.level

    def over(self, width: int) -> np.ndarray:
        """One importance per channel of a `width`-channel axis (uniform when lengths differ)."""
        if self.vector is not None and len(self.vector) == width:
            return self.vector
        return np.full(width, self.mean())

    def plus(self, other: Score) -> Score:
        if self.vector is None and other.vector is None:
            return Score(level=self.level + other.level)
        if self.vector is not None and other.vector is not None:
            if self.axis == other.axis and len(self.vector) == len(other.vector):
                return Score(self.vector + other.vector, self.axis)
            # Two readers disagree on the channel axis: keep the first, raise it by the other's mean.
            return Score(self.vector + other.mean(), self.axis)
        vector, axis = (self.vector, self.axis) if self.vector is not None else (other.vector, other.axis)
        return Score(vector + (other.level if self.vector is not None else self.level), axis)


@dataclass
class Propagation:
    """Importance by value name, and the op types the walk could not pass through."""

    scores: dict[str, Score] = field(default_factory=dict)
    blocked: dict[str, int] = field(default_factory=dict)

    def channels(self, value: str, width: int) -> np.ndarray | None:
        """`width` channel importances of `value`, or None when the walk reached it with none."""
        score = self.scores.get(value)
        if score is None or score.vector is None or len(score.vector) != width:
            return None
        return score.vector


def propagate(model: ir.Model) -> Propagation:
    """NISP importance of every value of `model` (its graph sorted topologically)."""
    graph = model.graph
    try:
        shapes = value_shapes(model)
    except Exception:  # noqa: BLE001 - without shapes, Concat/Split/Flatten just fall back
        shapes = {}
    out = Propagation()
    for value in graph.outputs:
        out.scores[value.name] = Score(level=1.0)
    for node in reversed(list(graph)):
        received = [out.scores.get(v.name) for v in node.outputs if v is not None]
        received = [s for s in received if s is not None]
        if not received:
            continue  # nothing downstream of it reaches an output
        for value, score in _backward(node, received, shapes, out):
            if value is None or value.is_initializer() or const_array(value) is not None:
                continue
            known = out.scores.get(value.name)
            out.scores[value.name] = score if known is None else known.plus(score)
    return out


def _backward(node: ir.Node, received: list[Score], shapes: dict[str, tuple], out: Propagation):
    """(input value, score it receives) pairs for one node."""
    first = received[0]
    layer = as_linear_layer(node) if node.op_type in ("Conv", "Gemm", "MatMul") else None
    if isinstance(layer, LinearLayer):
        weight = layer.weight()
        scores = nisp_through_weight(first.over(weight.shape[0]), weight, layer.groups)
        rank = len(node.inputs[1].shape) if node.op_type == "Conv" else 1
        return [(node.inputs[0], Score(scores, -(rank - 1) if rank > 1 else -1))]
    if node.op_type == "BatchNormalization":
        return [(node.inputs[0], _through_batchnorm(node, first))]
    if node.op_type in _CHANNELWISE and len(node.outputs) == 1:
        return [(v, first) for v in node.inputs]
    if node.op_type in ("Flatten", "Reshape"):
        score = _through_flatten(node, first, shapes)
        if score is not None:
            return [(node.inputs[0], score)]
    if node.op_type == "Concat":
        pairs = _through_concat(node, first, shapes)
        if pairs is not None:
            return pairs
    if node.op_type == "Split":
        score = _through_split(node, shapes, out)
        if score is not None:
            return [(node.inputs[0], score)]
    out.blocked[node.op_type] = out.blocked.get(node.op_type, 0) + 1
    level = float(np.mean([s.mean() for s in received]))
    return [(v, Score(level=level)) for v in node.inputs]


def _through_batchnorm(node: ir.Node, score: Score) -> Score:
    if score.vector is None or len(node.inputs) < 5:
        return score
    gamma, var = const_array(node.inputs[1]), const_array(node.inputs[4])
    if gamma is None or var is None or gamma.size != len(score.vector) or var.size != gamma.size:
        return score
    eps = float(attr(node, "epsilon", 1e-5))
    scale = np.abs(gamma.astype(np.float64).ravel()) / np.sqrt(var.astype(np.float64).ravel() + eps)
    return Score(score.vector * scale, score.axis)


def _through_flatten(node: ir.Node, score: Score, shapes: dict[str, tuple]) -> Score | None:
    """[N, C, *spatial] -> [N, C * span]: a channel's importance is the sum over its span."""
    before, after = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    if before is None or after is None or len(after) != 2 or len(before) < 2:
        return None
    channels = before[1]
    if score.vector is None:
        return Score(level=score.level)
    if not isinstance(channels, int) or score.axis != -1 or len(score.vector) % channels:
        return None
    return Score(score.vector.reshape(channels, -1).sum(axis=1), -(len(before) - 1))


def _through_concat(node: ir.Node, score: Score, shapes: dict[str, tuple]):
    if score.vector is None:
        return [(v, score) for v in node.inputs]
    rank = len(shapes.get(node.outputs[0].name, ()))
    axis = int(attr(node, "axis", 0))
    axis = axis - rank if axis >= 0 and rank else axis
    widths = [_dim(shapes, v, axis) for v in node.inputs]
    if axis != score.axis or not all(isinstance(w, int) for w in widths) or sum(widths) != len(score.vector):
        return None
    starts = np.cumsum([0, *widths])
    return [(v, Score(score.vector[starts[i] : starts[i + 1]], axis)) for i, v in enumerate(node.inputs)]


def _through_split(node: ir.Node, shapes: dict[str, tuple], out: Propagation) -> Score | None:
    rank = len(shapes.get(node.inputs[0].name, ()))
    axis = int(attr(node, "axis", 0))
    axis = axis - rank if axis >= 0 and rank else axis
    parts = []
    for value in node.outputs:
        width = _dim(shapes, value, axis)
        score = out.scores.get(value.name, Score(level=0.0))  # an unused part matters not at all
        if not isinstance(width, int) or (score.vector is not None and score.axis != axis):
            return None
        parts.append(score.over(width))
    return Score(np.concatenate(parts), axis)


def _dim(shapes: dict[str, tuple], value: ir.Value | None, axis: int) -> int | None:
    shape = shapes.get(value.name) if value is not None else None
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    return shape[axis] if isinstance(shape[axis], int) else None
