"""The 9 architectures onnx ships (light zoo) with seeded random weights: fidelity to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from benchmarks.subject import Score, SetupContext, Subject, save_feeds
from benchmarks.subjects.common import fidelity_numbers, first_feed, predict_outputs
from onnxslim_tool import io, metrics
from onnxslim_tool.data import CalibrationData, input_specs
from onnxslim_tool.testing import light_models, with_random_weights

PREFIX = "zoo_"


def names() -> list[str]:
    return [PREFIX + short for short in light_models()]


def build(name: str, ctx: SetupContext) -> Subject:
    short = name.removeprefix(PREFIX)
    model_path = _weighted_model(short, ctx)
    specs = input_specs(io.load(model_path, lift_constants=False))
    n_calib, n_eval = (4, 4) if ctx.quick else (16, 16)
    # Different seeds: calibration and evaluation inputs never overlap.
    calib = CalibrationData.synthetic_for(specs, n=n_calib, seed=ctx.seed + 1)
    evaluation = CalibrationData.synthetic_for(specs, n=n_eval, seed=ctx.seed + 2)
    calibration = ctx.work / "calibration.npz"
    calibration.parent.mkdir(parents=True, exist_ok=True)
    np.savez(calibration, **calib.inputs)
    return Subject(
        name=name,
        family="light-zoo",
        model_path=model_path,
        feeds=save_feeds(ctx.work / "calibration_feeds.npz", calib.feeds(1)),
        calibration=calibration,
        predict=predict_outputs(evaluation),
        score=centred_score,
        metric="centred output cosine vs fp32 (top-1 agreement beside it)",
        metric_kind="fidelity",
        latency_feed=first_feed(evaluation),
        latency_runs=5 if ctx.quick else 20,
        setup={
            "weights": f"onnx light zoo {short}, placeholder weights filled with seed {ctx.seed}, then "
            "fitted layer by layer to unit-variance activations on random inputs "
            "(onnxslim_tool.testing.with_random_weights)",
            "calibration": f"{n_calib} standard-normal inputs (seed {ctx.seed + 1})",
            "evaluation": f"{n_eval} standard-normal inputs (seed {ctx.seed + 2})",
            "gate": "our recipes judge by the same centred cosine (--task-metric "
            f"{GATE_METRIC}), 1-point budget",
        },
        task_metric=GATE_METRIC,
    )


# Random weights give 1000 nearly tied class scores (the top two about 0.3 standard deviations
# apart), so top-1 flips under perturbations a trained net would shrug off: int8 weights flipped
# one AlexNet input in eight. The metric is therefore the cosine of the outputs with each
# sample's mean removed (plain cosine of near-uniform softmax rows reads ~1 whatever changes),
# and the gate judges by it too; top-1 agreement is reported beside it.
GATE_METRIC = "benchmarks.subjects.light_zoo:centred_cosine"


def centred_cosine(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """Worst output's cosine to fp32 over the batch, each sample's mean removed first."""
    return min(metrics.cosine(_centred(outputs[name]), _centred(ref)) for name, ref in reference.items())


def centred_score(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Score:
    return Score(centred_cosine(candidate, reference), fidelity_numbers(reference, candidate))


def _centred(values: np.ndarray) -> np.ndarray:
    rows = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return rows - rows.mean(axis=1, keepdims=True)


def _weighted_model(short: str, ctx: SetupContext) -> Path:
    # "_fitted": the weights since the layer-by-layer fit; older cache entries are not reused.
    path = ctx.cache / "light_zoo" / f"{short}_seed{ctx.seed}_fitted.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        onnx.save(with_random_weights(light_models()[short], seed=ctx.seed), str(partial))
        partial.replace(path)  # a run killed mid-write never leaves a truncated cache entry
    return path
