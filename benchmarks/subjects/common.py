"""Pieces the classifier-like subjects share: evaluation through runtime.py, scores from metrics.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.subject import Feed, Score
from onnxslim_tool import io, metrics, runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.pipeline import EVAL_BATCH, covered_labels

Outputs = dict[str, np.ndarray]


def validated(data: CalibrationData, model_path: Path) -> CalibrationData:
    return data.validate(io.load(model_path, lift_constants=False))


def predict_outputs(data: CalibrationData):
    """A `Predict` that runs the data in the pipeline's evaluation batches."""

    def predict(session: ort.InferenceSession) -> Outputs:
        return runtime.run_feeds(session, data.batches(EVAL_BATCH))

    return predict


def fidelity_numbers(reference: Outputs, candidate: Outputs) -> dict[str, float]:
    """Worst-output cosine and, for class scores, top-1 agreement with the fp32 original."""
    found = metrics.compare_outputs(reference, candidate)
    numbers = {"min_cosine": min(f.cosine for f in found)}
    agreements = [f.top1_agreement for f in found if f.top1_agreement is not None]
    if agreements:
        numbers["top1_agreement"] = min(agreements)
    return numbers


def accuracy_score(data: CalibrationData):
    """A `ScoreFn`: labelled top-1 accuracy, with fidelity to fp32 as secondary numbers."""
    labels = covered_labels(data, EVAL_BATCH)

    def score(reference: Outputs, candidate: Outputs) -> Score:
        value = metrics.task_accuracy(candidate, labels)
        if value is None:
            raise ValueError("no output looks like class scores for the labels")
        return Score(value, fidelity_numbers(reference, candidate))

    return score


def first_feed(data: CalibrationData) -> Feed:
    return next(iter(data.batches(1)))
