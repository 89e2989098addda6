"""The 9 architectures onnx ships (light zoo) with seeded random weights: fidelity to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from benchmarks.subject import SetupContext, Subject, save_feeds
from benchmarks.subjects.common import agreement_score, first_feed, predict_outputs
from onnxslim_tool import io
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
        score=agreement_score,
        metric="top-1 agreement vs fp32 (output cosine where fp32's top-1 never varies)",
        metric_kind="fidelity",
        latency_feed=first_feed(evaluation),
        latency_runs=5 if ctx.quick else 20,
        setup={
            "weights": f"onnx light zoo {short}, placeholder weights filled with seed {ctx.seed}, then "
            "fitted layer by layer to unit-variance activations on random inputs "
            "(onnxslim_tool.testing.with_random_weights)",
            "calibration": f"{n_calib} standard-normal inputs (seed {ctx.seed + 1})",
            "evaluation": f"{n_eval} standard-normal inputs (seed {ctx.seed + 2})",
        },
    )


def _weighted_model(short: str, ctx: SetupContext) -> Path:
    # "_fitted": the weights since the layer-by-layer fit; older cache entries are not reused.
    path = ctx.cache / "light_zoo" / f"{short}_seed{ctx.seed}_fitted.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        onnx.save(with_random_weights(light_models()[short], seed=ctx.seed), str(partial))
        partial.replace(path)  # a run killed mid-write never leaves a truncated cache entry
    return path
