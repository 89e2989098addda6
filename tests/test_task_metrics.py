"""Task metrics: detection F1 on raw YOLO-style heads, lookup errors, and the gate judging by them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.graph_utils import const_array
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.pipeline import Pipeline
from onnxslim_tool.recipe import Recipe, RecipeError
from onnxslim_tool.sensitivity import scan
from onnxslim_tool.task_metrics import decode, detection_f1, load_task_metric
from tests.test_cli import run_cli

CLASSES = 2
# Four well-separated boxes (cx, cy, w, h), one per anchor, then two empty anchors.
BOXES = [(20, 20, 10, 10), (60, 20, 10, 10), (20, 60, 10, 10), (60, 60, 10, 10)]
ANCHORS = len(BOXES) + 2


def _head(scores: list[tuple[int, float]], boxes=BOXES) -> np.ndarray:
    """A raw head [4 + classes, anchors]: anchor i has box i and class/score scores[i]."""
    raw = np.zeros((4 + CLASSES, ANCHORS), dtype=np.float32)
    for i, ((cx, cy, w, h), (cls, score)) in enumerate(zip(boxes, scores, strict=True)):
        raw[:4, i] = (cx, cy, w, h)
        raw[4 + cls, i] = score
    return raw


REFERENCE = [(0, 0.9), (1, 0.8), (0, 0.7), (1, 0.6)]


def _f1(candidate: np.ndarray, reference: np.ndarray) -> float:
    return detection_f1({"out": candidate[None]}, {"out": reference[None]})


def test_identical_heads_score_one():
    ref = _head(REFERENCE)
    assert _f1(ref, ref) == 1.0
    assert len(decode(ref)[0]) == 4


def test_a_score_under_the_threshold_loses_that_detection():
    ref = _head(REFERENCE)
    cand = _head([(0, 0.9), (1, 0.8), (0, 0.7), (1, 0.2)])  # 0.2 < 0.25: gone
    # precision 3/3, recall 3/4: F1 = 2 * 0.75 / 1.75
    assert _f1(cand, ref) == pytest.approx(6 / 7)


def test_a_box_shifted_under_iou_half_is_unmatched():
    ref = _head(REFERENCE)
    shifted = [*BOXES[:3], (66, 60, 10, 10)]  # IoU with the original box: 4x10 / (200 - 40) = 0.25
    cand = _head(REFERENCE, shifted)
    assert _f1(cand, ref) == pytest.approx(0.75)  # precision 3/4, recall 3/4
    slightly = [*BOXES[:3], (62, 60, 10, 10)]  # IoU 80 / 120 = 0.67: still the same detection
    assert _f1(_head(REFERENCE, slightly), ref) == 1.0


def test_same_box_other_class_is_unmatched_and_nms_merges_duplicates():
    ref = _head(REFERENCE)
    relabelled = _head([(0, 0.9), (1, 0.8), (0, 0.7), (0, 0.6)])
    assert _f1(relabelled, ref) == pytest.approx(0.75)
    duplicate = _head([(0, 0.9), (1, 0.8), (0, 0.7), (0, 0.6)], [*BOXES[:3], BOXES[0]])
    assert len(decode(duplicate)[0]) == 3  # anchor 3 overlaps anchor 0 (same class): suppressed


def test_detection_f1_refuses_other_outputs_in_one_line():
    with pytest.raises(OnnxSlimError, match=r"detection-f1 expects one output \[N, 4 \+ classes, anchors\]"):
        detection_f1({"logits": np.zeros((2, 10))}, {"logits": np.zeros((2, 10))})
    two = {"a": np.zeros((1, 6, 4)), "b": np.zeros((1, 6, 4))}
    with pytest.raises(OnnxSlimError, match="got"):
        detection_f1(two, two)


def test_load_task_metric_names_the_problem(tmp_path, monkeypatch):
    assert load_task_metric("detection-f1").label == "task metric 'detection-f1'"
    with pytest.raises(OnnxSlimError, match="unknown task metric 'f1'; built-in: detection-f1"):
        load_task_metric("f1")
    with pytest.raises(OnnxSlimError, match="cannot import module 'no_such_module_xyz'"):
        load_task_metric("no_such_module_xyz:score")
    with pytest.raises(OnnxSlimError, match="has no 'nothing'"):
        load_task_metric("json:nothing")
    with pytest.raises(OnnxSlimError, match="is not callable"):
        load_task_metric("sys:maxsize")
    (tmp_path / "my_metric_mod.py").write_text(
        "def score(outputs, reference):\n    return 0.5\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = load_task_metric("my_metric_mod:score")
    assert metric({}, {}) == 0.5 and metric.name == "my_metric_mod:score"


# ----- the gate on a tiny detector -----------------------------------------------------------------

# Head weights W [FEATURES, (4 + classes) * anchors]: row 0 is the per-anchor constant (the
# input's first feature is 1), the other rows add a little per-sample variation.
SCORE = 0.3  # just over the 0.25 threshold
FEATURES = 8  # enough weights (288) for weight sharing to take the layer


def _detector() -> onnx.ModelProto:
    base = _head([(0, SCORE), (1, SCORE), (0, SCORE), (1, SCORE)]).reshape(-1)
    rng = np.random.default_rng(0)
    w = np.concatenate([base[None], 0.003 * rng.standard_normal((FEATURES - 1, base.size))]).astype(
        np.float32
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["flat"], name="head"),
            helper.make_node("Reshape", ["flat", "shape"], ["out"], name="to_head"),
        ],
        "tiny_detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4 + CLASSES, ANCHORS])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([-1, 4 + CLASSES, ANCHORS], dtype=np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _inputs(n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    x[:, 0] = 1.0
    return x


def _data() -> CalibrationData:
    return CalibrationData.from_arrays({"x": _inputs()}).validate(ir.from_proto(_detector()))


class DimScores(CompressionPass):
    """Scales the class-score weights by 0.7: 0.3 -> 0.21, every detection falls under 0.25."""

    name = "dim-scores"

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        value = model.graph.initializers["w"]
        w = const_array(value).reshape(FEATURES, 4 + CLASSES, ANCHORS).copy()
        w[:, 4:, :] *= 0.7
        value.const_value = ir.tensor(w.reshape(FEATURES, -1), name="w")
        record.changed("head", "MatMul", "class scores x0.7")


class DimScoresThenNothing(DimScores):
    """Backs off to a version that changes nothing (as a mixed-precision search may)."""

    def milder(self) -> CompressionPass | None:
        return Untouched()


class Untouched(CompressionPass):
    name = "dim-scores"

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        pass


def test_backing_off_to_no_change_is_reported_as_over_budget():
    pipeline = Pipeline([DimScoresThenNothing()], _data(), max_drop=0.01, task_metric="detection-f1")
    step = pipeline.run(ir.from_proto(_detector())).steps[0]
    assert step.status == "rolled back" and step.over_budget
    assert "dropped by" in step.reason and "changes nothing" in step.attempts[-1]


def _gate(task_metric):
    pipeline = Pipeline([DimScores()], _data(), max_drop=0.01, task_metric=task_metric)
    return pipeline.run(ir.from_proto(_detector()))


def test_default_gate_passes_a_detector_that_lost_every_detection():
    result = _gate(None)
    assert result.steps[0].status == "applied"
    assert min(f.cosine for f in result.fidelity) > 0.99  # whole-output cosine barely moves
    outputs = Pipeline([], _data()).evaluate(result.model).outputs
    original = Pipeline([], _data()).evaluate(ir.from_proto(_detector())).outputs
    assert detection_f1(outputs, original) == 0.0  # ... while no detection is left


def test_task_metric_gate_rolls_the_pass_back():
    result = _gate("detection-f1")
    step = result.steps[0]
    assert step.status == "rolled back" and step.over_budget
    assert "task metric 'detection-f1' dropped by 1.0000" in step.reason
    assert result.metric == "task metric 'detection-f1'"
    assert result.accuracy_before == 1.0 and result.accuracy_after == 1.0
    assert result.to_dict()["metric"] == "task metric 'detection-f1'"


def test_a_callable_metric_is_scored_against_the_original():
    seen = []

    def boxes_kept(outputs, reference):
        seen.append(outputs["out"] is reference["out"])
        return float(np.mean(outputs["out"][:, 4:] >= 0.25) / np.mean(reference["out"][:, 4:] >= 0.25))

    result = _gate(boxes_kept)
    assert result.steps[0].status == "rolled back"
    assert seen[0] and not seen[1]  # the original against itself, then the candidate against it


def test_api_takes_the_metric_from_a_recipe():
    recipe = Recipe.from_dict({"passes": ["cleanup"], "task_metric": "detection-f1"})
    result = api.compress(_detector(), _data(), recipe=recipe)
    assert result.metric == "task metric 'detection-f1'" and result.accuracy_after == 1.0
    written = json.loads(result.model.metadata_props["onnxslim_tool.recipe"])
    assert written["task_metric"] == "detection-f1"


def test_sensitivity_scan_reports_the_task_metric():
    model = ir.from_proto(_detector())
    report = scan(model, "share", _data(), _data(), settings=[2], task_metric="detection-f1")
    point = report.layers[0].points[0]
    assert point.error == "" and point.metric == "task metric 'detection-f1'"
    assert 0.0 <= point.metric_drop <= 1.0


# ----- recipes and the command line ----------------------------------------------------------------


def test_recipe_task_metric_validation():
    recipe = Recipe.from_dict({"passes": ["cleanup"], "task_metric": "detection-f1"})
    assert recipe.to_dict()["task_metric"] == "detection-f1"
    assert "task_metric" not in Recipe.from_dict({"passes": ["cleanup"]}).to_dict()
    with pytest.raises(RecipeError, match="allowed: passes, max_drop, seed, name, task_metric"):
        Recipe.from_dict({"passes": ["cleanup"], "metric": "detection-f1"})
    with pytest.raises(RecipeError, match="task_metric must be a built-in name"):
        Recipe.from_dict({"passes": ["cleanup"], "task_metric": 3})
    with pytest.raises(RecipeError, match="unknown task metric 'map'"):
        Recipe.from_dict({"passes": ["cleanup"], "task_metric": "map"})


def _files(tmp_path):
    model = tmp_path / "det.onnx"
    onnx.save(_detector(), model)
    data = tmp_path / "x.npz"
    np.savez(data, x=_inputs())
    return model, data


def test_cli_bad_task_metric_is_one_line(monkeypatch, capsys, tmp_path):
    model, data = _files(tmp_path)
    for spec, fragment in (
        ("f1", "unknown task metric 'f1'; built-in: detection-f1"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ):
        code, _, err = run_cli(
            monkeypatch,
            capsys,
            "compress",
            model,
            "-o",
            tmp_path / "o.onnx",
            "--data",
            data,
            "--task-metric",
            spec,
        )
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and fragment in lines[0], err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_task_metric_gates_and_reports(monkeypatch, capsys, tmp_path):
    model, data = _files(tmp_path)
    args = ("compress", model, "-o", tmp_path / "o.onnx", "--data", data, "--recipe", "lossless")
    code, out, _ = run_cli(monkeypatch, capsys, *args, "--task-metric", "detection-f1", "--json")
    report = json.loads(out)
    assert code == 0 and report["metric"] == "task metric 'detection-f1'"
    assert report["accuracy_before"] == report["accuracy_after"] == 1.0
    assert report["recipe"]["task_metric"] == "detection-f1"


def test_cli_recipe_file_task_metric_is_applied(monkeypatch, capsys, tmp_path):
    model, data = _files(tmp_path)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"passes": ["cleanup"], "task_metric": "detection-f1"}), encoding="utf-8")
    code, out, _ = run_cli(
        monkeypatch, capsys, "compress", model, "-o", tmp_path / "o.onnx", "--data", data, "--recipe", recipe
    )
    assert code == 0 and "task metric 'detection-f1'" in out


def test_markdown_report_names_the_task_metric():
    from onnxslim_tool import api
    from onnxslim_tool.data import CalibrationData
    from onnxslim_tool.passes import Cleanup
    from onnxslim_tool.report_files import result_markdown

    def agreement(outputs, reference):
        (name,) = outputs
        return float((outputs[name].argmax(1) == reference[name].argmax(1)).mean())

    data = CalibrationData.from_npz("sample_models/digits_mlp_eval.npz")
    result = api.compress("sample_models/digits_mlp.onnx", data, passes=[Cleanup()], task_metric=agreement)
    text = result_markdown(result)
    assert f"| {result.metric} | 1.0000 | 1.0000 |" in text
    assert "task metric" in result.metric
