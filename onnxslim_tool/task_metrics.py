"""Task metrics: judge a compressed model by what its outputs are used for, without labels.

A task metric is `metric(outputs, reference) -> float`, higher is better, where both are
the evaluation data's outputs by output name (all batches concatenated) and `reference`
comes from the original model, so the original scores `metric(ref, ref)`.

Whole-output cosine or top-1 agreement can stay near perfect while a detector loses its
detections: most of a YOLO head is box coordinates and scores far below the confidence
threshold, so scores sliding under it barely move the cosine. `detection-f1` decodes the
head as its users do and scores the detections themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from onnxslim_tool.errors import OnnxSlimError

Outputs = dict[str, np.ndarray]
MetricFn = Callable[[Outputs, Outputs], float]
# One image's detections: boxes [K, 4] as x1, y1, x2, y2; classes [K]; scores [K].
Detections = tuple[np.ndarray, np.ndarray, np.ndarray]

# Ultralytics' defaults for YOLOv8 inference, and the usual one-to-one match threshold.
CONFIDENCE = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5


@dataclass(frozen=True)
class TaskMetric:
    """A task metric and the name reports give it."""

    name: str
    fn: MetricFn

    def __call__(self, outputs: Outputs, reference: Outputs) -> float:
        return self.fn(outputs, reference)

    @property
    def label(self) -> str:
        return f"task metric '{self.name}'"


# What callers may pass for a metric: a built-in name, "module:function", or the callable.
TaskMetricSpec = str | MetricFn | TaskMetric


# ----- detection decoding and matching --------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` with every box in `b` (x1, y1, x2, y2): [len(a), len(b)]."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, index: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression over the boxes `index` selects (one class)."""
    remaining = index[np.argsort(-scores[index], kind="stable")]
    kept: list[int] = []
    while remaining.size:
        best, remaining = remaining[0], remaining[1:]
        kept.append(int(best))
        remaining = remaining[box_iou(boxes[best : best + 1], boxes[remaining])[0] < iou_threshold]
    return kept


def decode(raw: np.ndarray, confidence: float = CONFIDENCE, nms_iou: float = NMS_IOU) -> Detections:
    """One image's YOLOv8 head [4 + classes, anchors] (cx, cy, w, h, scores...) to detections.

    Each anchor takes its best class; anchors scoring under `confidence` are dropped, then
    NMS runs per class. Detections come back in anchor order.
    """
    rows = raw.T
    class_scores = rows[:, 4:]
    classes = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(rows)), classes]
    keep = scores >= confidence
    cx, cy, w, h = rows[keep, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    classes, scores = classes[keep], scores[keep]
    chosen = [
        i for c in np.unique(classes) for i in nms(boxes, scores, np.flatnonzero(classes == c), nms_iou)
    ]
    order = np.array(sorted(chosen), dtype=np.int64)
    return boxes[order], classes[order], scores[order]


def matched_pairs(reference: Detections, candidate: Detections, match_iou: float = MATCH_IOU) -> int:
    """Candidate boxes matched one-to-one (Hungarian on IoU) to same-class reference boxes."""
    ref_boxes, ref_classes, _ = reference
    cand_boxes, cand_classes, _ = candidate
    if not len(ref_boxes) or not len(cand_boxes):
        return 0
    overlap = box_iou(ref_boxes, cand_boxes)
    overlap[ref_classes[:, None] != cand_classes[None, :]] = 0.0
    rows, cols = linear_sum_assignment(-overlap)
    return int(np.sum(overlap[rows, cols] >= match_iou))


@dataclass(frozen=True)
class DetectionScore:
    """Matched, reference and candidate detection counts over a set of images."""

    matched: int
    reference_boxes: int
    candidate_boxes: int

    @property
    def precision(self) -> float:
        if self.candidate_boxes:
            return self.matched / self.candidate_boxes
        return float(self.reference_boxes == 0)  # nothing found, nothing to find: perfect

    @property
    def recall(self) -> float:
        if self.reference_boxes:
            return self.matched / self.reference_boxes
        return float(self.candidate_boxes == 0)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def score_detections(
    reference: list[Detections], candidate: list[Detections], match_iou: float = MATCH_IOU
) -> DetectionScore:
    """Counts over all images (micro-averaged: every box weighs the same)."""
    matched = sum(matched_pairs(r, c, match_iou) for r, c in zip(reference, candidate, strict=True))
    return DetectionScore(matched, sum(len(r[0]) for r in reference), sum(len(c[0]) for c in candidate))


def detection_head(outputs: Outputs) -> np.ndarray:
    """The single YOLOv8-style output [N, 4 + classes, anchors], or a one-line refusal."""
    shapes = {name: tuple(a.shape) for name, a in outputs.items()}
    if len(outputs) == 1:
        head = next(iter(outputs.values()))
        if head.ndim == 3 and head.shape[1] > 4:
            return head
    raise OnnxSlimError(f"detection-f1 expects one output [N, 4 + classes, anchors]; got {shapes}")


def detection_f1(
    outputs: Outputs,
    reference: Outputs,
    *,
    confidence: float = CONFIDENCE,
    nms_iou: float = NMS_IOU,
    match_iou: float = MATCH_IOU,
) -> float:
    """F1 of the candidate's detections against the reference model's, over all images."""
    cand, ref = detection_head(outputs), detection_head(reference)
    if cand.shape != ref.shape:
        raise OnnxSlimError(
            f"detection-f1: output shape {cand.shape} differs from the original's {ref.shape}"
        )
    ref_dets = [decode(image, confidence, nms_iou) for image in ref]
    cand_dets = [decode(image, confidence, nms_iou) for image in cand]
    return score_detections(ref_dets, cand_dets, match_iou).f1


# ----- lookup ---------------------------------------------------------------------------------------

BUILTIN: dict[str, MetricFn] = {"detection-f1": detection_f1}


def load_task_metric(spec: TaskMetricSpec) -> TaskMetric:
    """A built-in name, "package.module:function", or a callable (named after its function)."""
    if isinstance(spec, TaskMetric):
        return spec
    if callable(spec):
        return TaskMetric(getattr(spec, "__name__", type(spec).__name__), spec)
    if spec in BUILTIN:
        return TaskMetric(spec, BUILTIN[spec])
    builtins = ", ".join(BUILTIN)
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise OnnxSlimError(
            f"unknown task metric '{spec}'; built-in: {builtins}, or give 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise OnnxSlimError(
            f"task metric '{spec}': cannot import module '{module_name}' ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}); built-in: {builtins}"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise OnnxSlimError(
            f"task metric '{spec}': module '{module_name}' has no '{attr}'; built-in: {builtins}"
        )
    if not callable(fn):
        raise OnnxSlimError(f"task metric '{spec}': '{attr}' is not callable; built-in: {builtins}")
    return TaskMetric(str(spec), fn)


def score(metric: TaskMetric, outputs: Outputs, reference: Outputs) -> float:
    """The metric's value as a finite float; a metric that fails says so in one line."""
    try:
        value = float(metric(outputs, reference))
    except OnnxSlimError:
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())[:200]
        raise OnnxSlimError(f"{metric.label} failed: {type(exc).__name__}: {message}") from None
    if not np.isfinite(value):
        raise OnnxSlimError(f"{metric.label} returned {value}: it must be a finite number")
    return value
