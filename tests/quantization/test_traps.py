"""The traps measured on real exports, each on a small model built to show it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import quant_models as qm
from onnxruntime.quantization import QuantType, quantize_static

from onnxslim_tool import api, io, runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.passes.quantization import Quantize
from onnxslim_tool.quantization.calibration import FeedReader, calibrate

BARE = qm.BARE


def test_weights_in_constant_nodes_are_lifted_and_quantized():
    model = ir.from_proto(qm.constant_weights_model())  # straight to the pass, no lifting at load
    result = Quantize("int8-weights")(model)
    assert [c.layer for c in result.record.changes] == ["fc"]
    assert not any(node.op_type == "Constant" for node in model.graph)
    assert any(v.const_value.dtype == ir.DataType.INT8 for v in model.graph.initializers.values())
    assert io.serialized_size(model) < 0.5 * len(qm.constant_weights_model().SerializeToString())


def test_per_channel_on_opset_11_upgrades_the_opset():
    proto = qm.conv_model(opset=11)
    calib, evaluation = qm.data((4, 8, 8), 32, 1), qm.data((4, 8, 8), 32, 2)
    result = api.compress(
        ir.from_proto(proto), calib, passes=[Quantize("int8", **BARE)], eval_data=evaluation
    )
    step = result.steps[0]
    assert step.status == "applied", step.reason
    assert result.model.opset_imports[""] >= 13
    assert any("opset upgraded 11 -> 13" in n for n in step.record.notes)
    axes = [
        n.attributes["axis"].value
        for n in result.model.graph
        if n.op_type == "DequantizeLinear" and "axis" in n.attributes
    ]
    assert axes, "weights should carry per-channel scales"
    assert result.fidelity[0].cosine > 0.999


def test_failing_symbolic_shape_inference_is_skipped_and_said():
    rng = np.random.default_rng(0)
    calib = CalibrationData.from_arrays({"x": rng.standard_normal((32, 4)).astype(np.float32)})
    evaluation = CalibrationData.from_arrays({"x": rng.standard_normal((16, 4)).astype(np.float32)})
    proto = qm.symbolic_breaker_model()
    result = api.compress(
        ir.from_proto(proto), calib, passes=[Quantize("int8", **BARE)], eval_data=evaluation
    )
    step = result.steps[0]
    assert step.status == "applied", step.reason
    assert any(
        "symbolic shape inference failed" in n and "skip_symbolic_shape=True" in n for n in step.record.notes
    )
    assert [c.layer for c in step.record.changes] == ["mm"]


def test_output_mixing_boxes_and_scores_keeps_its_tail_float(tmp_path):
    proto = qm.boxes_and_scores_model()
    calib, evaluation = qm.data((8,), 128, 1), qm.data((8,), 128, 2)
    reference = runtime.run_model(ir.from_proto(proto), evaluation.batches(64))["y"]
    # onnxruntime's defaults: one int8 scale for the concatenated output erases the scores.
    path = tmp_path / "float.onnx"
    onnx.save(proto, str(path))
    quantize_static(
        str(path), str(tmp_path / "ort.onnx"), FeedReader(calib.batches(16)), activation_type=QuantType.QUInt8
    )
    ort_out = runtime.run_model(io.load(tmp_path / "ort.onnx"), evaluation.batches(64))["y"]
    assert np.abs(ort_out[:, 4:] - reference[:, 4:]).max() > 0.2
    result = api.compress(
        ir.from_proto(proto), calib, passes=[Quantize("int8", **BARE)], eval_data=evaluation
    )
    ours = runtime.run_model(result.model, evaluation.batches(64))["y"]
    assert np.abs(ours[:, 4:] - reference[:, 4:]).max() < 0.03
    assert any(n.startswith("float tail: output 'y'") for n in result.steps[0].record.notes)
    assert {c.layer for c in result.steps[0].record.changes} == {"box_head", "score_head"}


def test_output_softmax_stays_float_where_int8_steps_would_erase_the_probabilities(tmp_path):
    proto = qm.many_class_softmax_model()
    calib, evaluation = qm.data((4, 8, 8), 64, 1), qm.data((4, 8, 8), 64, 2)
    reference = runtime.run_model(ir.from_proto(proto), evaluation.batches(64))["prob"]
    path = tmp_path / "float.onnx"
    onnx.save(proto, str(path))
    quantize_static(str(path), str(tmp_path / "ort.onnx"), FeedReader(calib.batches(16)))
    ort_out = runtime.run_model(io.load(tmp_path / "ort.onnx"), evaluation.batches(64))["prob"]
    # onnxruntime's defaults: steps of 1/255 leave a handful of distinct probabilities.
    assert len(np.unique(ort_out)) < 20
    assert np.mean(ort_out.argmax(1) == reference.argmax(1)) < 0.9
    result = api.compress(
        ir.from_proto(proto), calib, passes=[Quantize("int8", **BARE)], eval_data=evaluation
    )
    ours = runtime.run_model(result.model, evaluation.batches(64))["prob"]
    assert np.mean(ours.argmax(1) == reference.argmax(1)) > 0.95
    notes = result.steps[0].record.notes
    assert any(n.startswith("float tail: output 'prob' comes from Softmax 'softmax'") for n in notes)
    assert [c.layer for c in result.steps[0].record.changes] == ["conv", "fc"]  # both layers int8


def test_calibration_streams_batches_and_matches_one_pass_ranges(tmp_path, monkeypatch):
    from onnxslim_tool.quantization import calibration

    proto = qm.bias_shift_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    data = qm.data((16,), 200, 4, mean=5, std=0.2)
    # One sample's activations are the 32 floats of y: a 1 KiB budget allows 8 samples per batch.
    monkeypatch.setattr(calibration, "ACTIVATION_BUDGET", 1024)
    result = calibrate(path, data, "minmax", tmp_path)
    assert result.batch_size == 8 and result.batches == 25 and result.samples == 200
    low, high = result.ranges["x"].range_value
    assert np.isclose(float(np.min(low)), data.inputs["x"].min()) and np.isclose(
        float(np.max(high)), data.inputs["x"].max()
    )
    for method in ("entropy", "percentile"):
        ranged = calibrate(path, data, method, tmp_path).ranges
        assert float(np.max(ranged["y"].range_value[1])) > 0
