"""With a task metric bound, the quantization pass decides by it, not by output fidelity.

The model has two independent branches: `a` (its input has one huge feature, so int8
activations wipe out the small ones it depends on: a poor output) and `b` (well-behaved:
about 1% output error). Fidelity says keep `a` float; the task metric reads only `b`, very
strictly, so it says keep `b` float. The decision must follow the metric that is bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import io, sensitivity
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.passes.quantization import Quantize
from onnxslim_tool.quantization.evaluation import Judge, Score
from onnxslim_tool.quantization.static import StaticFlow, StaticOptions
from onnxslim_tool.task_metrics import TaskMetric, load_task_metric

N, D, K = 128, 8, 8


def _branches() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    wa = rng.normal(size=(D, K)).astype(np.float32)
    wa[0] = 1e-4  # the outlier feature barely matters; the small ones it drowns do
    wb = rng.normal(size=(D, K)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["xa", "wa"], ["a"], name="branch_a"),
        helper.make_node("Gemm", ["xb", "wb"], ["b"], name="branch_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_branches",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", D]) for n in ("xa", "xb")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", K]) for n in ("a", "b")],
        [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data(n: int = N) -> CalibrationData:
    rng = np.random.default_rng(1)
    xa = rng.normal(size=(n, D)).astype(np.float32)
    xa[:, 0] = rng.choice([-1000.0, 1000.0], size=n)
    xb = rng.normal(size=(n, D)).astype(np.float32)
    return CalibrationData({"xa": xa, "xb": xb}, source="test").validate(io.load(_branches()))


def strict_b(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """Only output `b` matters, and 1% relative error already costs 0.1."""
    ref = reference["b"].astype(np.float64)
    err = np.linalg.norm(outputs["b"].astype(np.float64) - ref) / np.linalg.norm(ref)
    return float(max(0.0, 1.0 - 10.0 * err))


METRIC = TaskMetric("strict-b", strict_b)


def _quantize(task_metric: TaskMetric | None) -> dict[str, str]:
    """The pass's layers kept float (name -> reason) under a 5-point budget."""
    quantize = Quantize(
        mode="int8",
        max_drop=0.05,
        bias_correction=False,
        equalize=False,
        activation_type="uint8",
        seed=0,
        min_layer_macs=0,  # tiny layers: the size rule would keep them float-compute
    )
    quantize.bind_data(_data())
    if task_metric is not None:
        quantize.bind_task_metric(task_metric)
    model = io.load(_branches())
    record = quantize(model).record
    notes = " ".join(record.notes)
    assert "mixed precision" in notes, notes
    return {skip.layer: skip.reason for skip in record.skipped if "mixed precision" in skip.reason}


def test_fidelity_and_the_task_metric_disagree_on_this_model():
    """The premise: each judge ranks the other branch as the one to keep float."""
    float_model = io.load(_branches())
    data = _data(64)
    fidelity, task = Judge(float_model, data), Judge(float_model, data, METRIC)
    assert fidelity.metric_name == "top-1 agreement"
    assert task.metric_name == "task metric 'strict-b'" and task.reference_metric == 1.0


def test_mixed_precision_keeps_float_what_the_task_metric_needs():
    assert set(_quantize(None)) == {"branch_a"}  # fidelity: a's output is the damaged one
    assert set(_quantize(METRIC)) == {"branch_b"}  # the task reads only b


def test_static_flow_notes_say_which_metric_decided(tmp_path):
    float_model = io.load(_branches())
    calibration, holdout = _data().split(0.5, seed=0)
    options = StaticOptions(
        bias_correction=False, equalize=False, activation_type="uint8", max_drop=0.05, task_metric=METRIC
    )
    outcome = StaticFlow(float_model, calibration, holdout, options, tmp_path).run()
    notes = " ".join(outcome.notes)
    assert "decisions judged by task metric 'strict-b'" in notes
    assert "budget 0.0500 task metric 'strict-b' drop" in notes
    assert outcome.score is not None and outcome.score.metric_name == "task metric 'strict-b'"
    assert set(outcome.excluded) >= {"branch_b"} and "branch_a" not in outcome.excluded


def test_repairs_follow_the_task_metric_and_break_ties_on_output_error():
    float_model = io.load(_branches())
    judge = Judge(float_model, _data(64), METRIC)
    worse_metric_lower_error = Score(rel_error=0.01, metric=0.80, metric_name=judge.metric_name)
    better_metric_higher_error = Score(rel_error=0.50, metric=0.90, metric_name=judge.metric_name)
    assert judge.better(better_metric_higher_error, worse_metric_lower_error)
    assert not judge.better(worse_metric_lower_error, better_metric_higher_error)
    tie = Score(rel_error=0.40, metric=0.90, metric_name=judge.metric_name)
    assert judge.better(tie, better_metric_higher_error)  # same metric: the lower error wins
    plain = Judge(float_model, _data(64))  # no task metric: the fallback metric decides the same way
    assert plain.metric_name in ("top-1 agreement", "accuracy")
    assert not plain.better(worse_metric_lower_error, better_metric_higher_error)
    plain.metric_name = "output cosine"  # a continuous metric: the finer output error decides
    assert plain.better(worse_metric_lower_error, better_metric_higher_error)


def test_a_failing_task_metric_is_one_line(tmp_path):
    def broken(outputs, reference):
        raise KeyError("no such output")

    with pytest.raises(Exception, match="task metric 'broken' failed: KeyError"):
        Judge(io.load(_branches()), _data(16), load_task_metric(broken))


def test_sensitivity_scan_binds_the_task_metric_to_the_measured_pass(monkeypatch):
    """`analyze --method quantize` and the target search judge each candidate's own repairs by
    the same metric as its drop."""
    bound: list[object] = []
    original = Quantize.bind_task_metric

    def spy(self, metric):
        bound.append(metric)
        original(self, metric)

    monkeypatch.setattr(Quantize, "bind_task_metric", spy)
    calibration, evaluation = _data().split(0.5, seed=0)
    report = sensitivity.scan(
        io.load(_branches()), "quantize", calibration, evaluation, layers=["branch_b"], task_metric=METRIC
    )
    (point,) = report.layers[0].points
    assert point.metric == "task metric 'strict-b'" and point.metric_drop > 0.05
    assert bound and all(getattr(m, "name", None) == "strict-b" for m in bound)


def test_compress_binds_a_module_function_metric_to_the_quantization_pass():
    """The user's path: `--task-metric module:function` reaches the pass's own decisions."""
    from onnxslim_tool import api

    quantize = Quantize(
        mode="int8",
        max_drop=0.05,
        bias_correction=False,
        equalize=False,
        activation_type="uint8",
        min_layer_macs=0,
    )
    result = api.compress(
        _branches(),
        _data(2 * N),
        passes=[quantize],
        max_drop=0.05,
        task_metric="tests.test_task_metric_quantize:strict_b",
    )
    (step,) = result.steps
    assert step.status == "applied"
    kept = {s.layer for s in step.record.skipped if "mixed precision" in s.reason}
    assert kept == {"branch_b"}
    assert result.metric == "task metric 'tests.test_task_metric_quantize:strict_b'"
    assert result.accuracy_before - result.accuracy_after <= 0.05
