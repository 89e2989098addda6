"""The Python API a pipeline author calls: compress a model with passes under a budget."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import onnx
import onnx_ir as ir

from onnxslim_tool import __version__, io, metrics, runtime
from onnxslim_tool.allocation import Target, search
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import DataError, OnnxSlimError
from onnxslim_tool.passes import pass_class
from onnxslim_tool.passes.base import CompressionPass
from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.pipeline import EVAL_BATCH, Pipeline, ProgressFn, Result, covered_labels
from onnxslim_tool.recipe import Recipe, Step, resolve
from onnxslim_tool.task_metrics import TaskMetricSpec, load_task_metric

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
    target: Target | None = None,
    target_layers: int | None = 24,
    n_jobs: int = 1,
    task_metric: TaskMetricSpec | None = None,
) -> Result:
    """Run `passes` (default: lossless cleanup) on `model`, validated and gated pass by pass.

    Give either `passes` or a `recipe` (a Recipe, a built-in name or a recipe file); a
    recipe brings its own budget and seed unless `max_drop`/`seed` are given here.

    `data` feeds the passes that fit to activations. Accuracy is measured on `eval_data`;
    without it, `data` is split (seeded) so that no calibration sample is ever used to judge
    the result. Lossless passes may run with no data at all: they are then validated on
    synthetic random inputs, and the result says so.

    `target` (size in bytes, MACs or latency as a fraction) lets a greedy search on measured
    per-layer sensitivity choose the passes (`allocation.py`: the `target_layers` heaviest
    layers are candidates, their evaluations run as `n_jobs` joblib jobs); give no passes
    or recipe with it. The result's `allocation` says what was chosen and reached.

    `task_metric` (a built-in name such as "detection-f1", "module:function", or a callable
    `(outputs, reference_outputs) -> float`) is what the budget judges: each candidate's
    score against the original model's outputs. Without it, labels give the accuracy, and
    unlabelled data falls back to top-1 agreement or output cosine. A recipe may name one.
    """
    # A named metric goes into the output's provenance; a callable has no name to replay.
    metric_spec = task_metric if isinstance(task_metric, str) else None
    if task_metric is not None:
        task_metric = load_task_metric(task_metric)  # a bad spec fails before any work
    if target is not None:
        if passes is not None or recipe is not None:
            raise OnnxSlimError("a target chooses its own passes: give no passes or recipe with it")
        return _compress_to_target(
            model,
            data,
            eval_data,
            target,
            max_drop,
            input_shapes,
            seed,
            progress,
            target_layers,
            n_jobs,
            task_metric,
            metric_spec,
        )
    if recipe is not None:
        if passes is not None:
            raise OnnxSlimError("give either passes or a recipe, not both")
        recipe = resolve(recipe) if isinstance(recipe, str) else recipe
        if seed:
            recipe.seed = seed
        max_drop = recipe.max_drop if max_drop is None else max_drop
        if task_metric is None and recipe.task_metric is not None:
            task_metric = load_task_metric(recipe.task_metric)
        passes = recipe.build()
    else:
        recipe = Recipe([Step(p.name, p.params()) for p in passes or [Cleanup()]], max_drop, seed)
    if metric_spec is not None:
        recipe.task_metric = metric_spec
    seed = recipe.seed
    loaded = io.load(model, lift_constants=False)
    io.check_finite_weights(loaded)
    passes = list(passes) if passes is not None else [Cleanup()]
    for compression_pass in passes:
        compression_pass.preflight(loaded)
    calibration, evaluation = _split_data(loaded, data, eval_data, passes, input_shapes, seed)
    result = _run_pipeline(
        loaded, passes, calibration, evaluation, max_drop, input_shapes, progress, task_metric
    )
    _record_provenance(result.model, recipe, model)
    if isinstance(model, (str, os.PathLike)):
        result.before.bytes = io.file_size(model)  # what is on disk, not a re-serialization
    return result


def _run_pipeline(
    loaded: ir.Model,
    passes: Sequence[CompressionPass],
    calibration: CalibrationData | None,
    evaluation: CalibrationData,
    max_drop: float | None,
    input_shapes: dict[str, Sequence[int]] | None,
    progress: ProgressFn | None,
    task_metric: TaskMetricSpec | None,
) -> Result:
    """Bind the calibration data to the passes and run them through the gated pipeline."""
    for p in passes:
        p.bind_data(calibration)
    pipeline = Pipeline(
        passes,
        evaluation,
        max_drop=max_drop,
        input_shapes=input_shapes,
        progress=progress,
        task_metric=task_metric,
    )
    return pipeline.run(loaded)


def _compress_to_target(
    model: ir.Model | str | os.PathLike | onnx.ModelProto,
    data: CalibrationData | None,
    eval_data: CalibrationData | None,
    target: Target,
    max_drop: float | None,
    input_shapes: dict[str, Sequence[int]] | None,
    seed: int,
    progress: ProgressFn | None,
    target_layers: int | None,
    n_jobs: int,
    task_metric: TaskMetricSpec | None = None,
    metric_spec: str | None = None,
) -> Result:
    loaded = io.load(model, lift_constants=False)
    io.check_finite_weights(loaded)
    probe = [pass_class("channel-pruning")()]  # lossy and data-hungry: the split it needs
    calibration, evaluation = _split_data(loaded, data, eval_data, probe, input_shapes, seed)
    chosen_passes: list[CompressionPass] = []

    def run(passes: list[CompressionPass]) -> Result:
        chosen_passes[:] = passes
        return _run_pipeline(
            loaded, passes, calibration, evaluation, max_drop, input_shapes, progress, task_metric
        )

    allocation, result = search(
        loaded,
        target,
        calibration,
        evaluation,
        run,
        max_layers=target_layers,
        n_jobs=n_jobs,
        seed=seed,
        progress=progress,
        task_metric=task_metric,
    )
    result.allocation = allocation.to_dict()
    recipe = Recipe(
        [Step(p.name, p.params()) for p in chosen_passes],
        max_drop,
        seed,
        name=f"target-{target.kind}",
        task_metric=metric_spec,
    )
    _record_provenance(result.model, recipe, model)
    if isinstance(model, (str, os.PathLike)):
        result.before.bytes = io.file_size(model)
    return result


def _record_provenance(model: ir.Model, recipe: Recipe, source) -> None:
    """Enough in the output's metadata to reproduce it: recipe, seed, tool version, input hash."""
    props = model.metadata_props
    props["onnxslim_tool.version"] = __version__
    # No spaces after separators: still one readable JSON line, ~10% fewer bytes (tiny models).
    props["onnxslim_tool.recipe"] = json.dumps(
        recipe.to_dict(), sort_keys=True, default=str, separators=(",", ":")
    )
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
