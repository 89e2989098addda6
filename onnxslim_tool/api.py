"""The Python API a pipeline author calls: compress a model with passes under a budget."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import onnx
import onnx_ir as ir

from onnxslim_tool import __version__, io, metrics, runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import DataError, OnnxSlimError
from onnxslim_tool.passes.base import CompressionPass
from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.pipeline import EVAL_BATCH, Pipeline, ProgressFn, Result, covered_labels
from onnxslim_tool.recipe import Recipe, Step, resolve

# Held-out share when one data set must serve both calibration and evaluation.
DEFAULT_HOLDOUT = 0.5


def compress(
    model: ir.Model | str | os.PathLike | onnx.ModelProto,
    data: CalibrationData | None = None,
    *,
    passes: Sequence[CompressionPass] | None = None,
    recipe: Recipe | str | None = None,
    eval_data: CalibrationData | None = None,
    max_drop: float | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> Result:
    """Run `passes` (default: lossless cleanup) on `model`, validated and gated pass by pass.

    Give either `passes` or a `recipe` (a Recipe, a built-in name or a recipe file); a
    recipe brings its own budget and seed unless `max_drop`/`seed` are given here.

    `data` feeds the passes that fit to activations. Accuracy is measured on `eval_data`;
    without it, `data` is split (seeded) so that no calibration sample is ever used to judge
    the result. Lossless passes may run with no data at all: they are then validated on
    synthetic random inputs, and the result says so.
    """
    if recipe is not None:
        if passes is not None:
            raise OnnxSlimError("give either passes or a recipe, not both")
        recipe = resolve(recipe) if isinstance(recipe, str) else recipe
        if seed:
            recipe.seed = seed
        max_drop = recipe.max_drop if max_drop is None else max_drop
        passes = recipe.build()
    else:
        recipe = Recipe([Step(p.name, p.params()) for p in passes or [Cleanup()]], max_drop, seed)
    seed = recipe.seed
    loaded = io.load(model, lift_constants=False)
    io.check_finite_weights(loaded)
    passes = list(passes) if passes is not None else [Cleanup()]
    for compression_pass in passes:
        compression_pass.preflight(loaded)
    calibration, evaluation = _split_data(loaded, data, eval_data, passes, input_shapes, seed)
    for p in passes:
        p.bind_data(calibration)
    result = Pipeline(
        passes, evaluation, max_drop=max_drop, input_shapes=input_shapes, progress=progress
    ).run(loaded)
    _record_provenance(result.model, recipe, model)
    if isinstance(model, (str, os.PathLike)):
        result.before.bytes = io.file_size(model)  # what is on disk, not a re-serialization
    return result


def _record_provenance(model: ir.Model, recipe: Recipe, source) -> None:
    """Enough in the output's metadata to reproduce it: recipe, seed, tool version, input hash."""
    props = model.metadata_props
    props["onnxslim_tool.version"] = __version__
    props["onnxslim_tool.recipe"] = json.dumps(recipe.to_dict(), sort_keys=True, default=str)
    props["onnxslim_tool.seed"] = str(recipe.seed)
    if isinstance(source, (str, os.PathLike)):
        props["onnxslim_tool.input_sha256"] = io.file_sha256(source)


def _split_data(
    model: ir.Model,
    data: CalibrationData | None,
    eval_data: CalibrationData | None,
    passes: Sequence[CompressionPass],
    input_shapes: dict[str, Sequence[int]] | None,
    seed: int,
) -> tuple[CalibrationData | None, CalibrationData]:
    needs_calibration = any(p.uses_data for p in passes)
    if data is not None:
        data = data.validate(model)
    if eval_data is not None:
        eval_data = eval_data.validate(model)
        return data, eval_data
    if data is None:
        if needs_calibration or not all(p.lossless for p in passes):
            raise DataError(
                "this compression needs data: pass --data FILE (or --synthetic to use random inputs)"
            )
        return None, CalibrationData.synthetic_for(model, n=8, seed=seed, input_shapes=input_shapes)
    if not needs_calibration:
        return data, data
    if len(data) < 2:
        raise DataError(f"need at least 2 samples to hold some out for evaluation, got {len(data)}")
    return data.split(DEFAULT_HOLDOUT, seed=seed)


def evaluate(
    reference: ir.Model | str | os.PathLike,
    candidate: ir.Model | str | os.PathLike,
    data: CalibrationData,
    *,
    threads: int = 1,
    runs: int = 20,
) -> dict:
    """Compare a candidate with its reference on the same data: fidelity, accuracy, size, speed.

    Latency is measured on one batch of the data, the two sessions interleaved run by run,
    so the ratio holds even on a noisy machine.
    """
    ref_model, cand_model = io.load(reference), io.load(candidate)
    data = data.validate(ref_model)
    data.validate(cand_model)
    ref_session = runtime.make_session(ref_model, threads)
    cand_session = runtime.make_session(cand_model, threads)
    ref_out = runtime.run_feeds(ref_session, data.batches(EVAL_BATCH))
    cand_out = runtime.run_feeds(cand_session, data.batches(EVAL_BATCH))
    labels = covered_labels(data, EVAL_BATCH)
    fidelity = metrics.compare_outputs(ref_out, cand_out)
    feed = next(iter(data.batches(1)))
    lat = runtime.measure_latency({"reference": ref_session, "candidate": cand_session}, feed, runs=runs)
    ref_bytes, cand_bytes = _stored_size(reference, ref_model), _stored_size(candidate, cand_model)
    agreements = [f.top1_agreement for f in fidelity if f.top1_agreement is not None]
    return {
        "min_cosine": min(f.cosine for f in fidelity),
        "min_snr_db": min(f.snr_db for f in fidelity),
        "max_abs_error": max(f.max_abs_error for f in fidelity),
        "top1_agreement": min(agreements) if agreements else None,
        "accuracy_reference": metrics.task_accuracy(ref_out, labels),
        "accuracy_candidate": metrics.task_accuracy(cand_out, labels),
        "reference_bytes": ref_bytes,
        "candidate_bytes": cand_bytes,
        "size_ratio": cand_bytes / ref_bytes if ref_bytes else None,
        "latency_ratio": lat["candidate"].median_ms / lat["reference"].median_ms,
        "latency": {
            "reference_ms": lat["reference"].median_ms,
            "candidate_ms": lat["candidate"].median_ms,
            "runs": runs,
            "threads": threads,
            "batch": int(next(iter(feed.values())).shape[0]) if feed else 0,
        },
        "outputs": [f.to_dict() for f in fidelity],
        "data": {"source": data.source, "synthetic": data.synthetic, "samples": len(data)},
    }


def _stored_size(source, model: ir.Model) -> int:
    """Bytes on disk when the model came from a file, else its serialized size."""
    if isinstance(source, (str, os.PathLike)):
        return io.file_size(source)
    return io.serialized_size(model)
