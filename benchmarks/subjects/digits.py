"""The three sample classifiers trained on scikit-learn's digits: labelled test accuracy."""

from __future__ import annotations

from pathlib import Path

from benchmarks.subject import SetupContext, Subject, save_feeds
from benchmarks.subjects.common import accuracy_score, first_feed, predict_outputs, validated
from onnxslim_tool.data import CalibrationData

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
NAMES = ("digits_mlp", "digits_cnn", "digits_transformer")


def build(name: str, ctx: SetupContext) -> Subject:
    model = SAMPLES / f"{name}.onnx"
    calibration = SAMPLES / f"{name}_calib.npz"
    evaluation = validated(CalibrationData.from_npz(SAMPLES / f"{name}_eval.npz"), model)
    calib = validated(CalibrationData.from_npz(calibration), model)
    feeds = save_feeds(ctx.work / "calibration_feeds.npz", calib.feeds(1))
    return Subject(
        name=name,
        family="sample",
        model_path=model,
        feeds=feeds,
        calibration=calibration,
        predict=predict_outputs(evaluation),
        score=accuracy_score(evaluation),
        metric="test accuracy",
        metric_kind="task",
        latency_feed=first_feed(evaluation),
        input_shapes={"input": [1, *calib.inputs["input"].shape[1:]]},
        latency_runs=20 if ctx.quick else 200,
        setup={
            "calibration": f"{calibration.name}: {len(calib)} training samples (labels unused by peers)",
            "evaluation": f"{name}_eval.npz: {len(evaluation)} held-out test samples with labels",
        },
    )
