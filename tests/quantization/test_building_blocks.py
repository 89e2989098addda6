"""The small pieces: detection, weight-only storage, Gemm rewrite, compaction, tail detection."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import quant_models as qm
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, TensorsData

from onnxslim_tool import io, runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.quantization.compact import compact, restore_layer_names
from onnxslim_tool.quantization.detect import is_quantized
from onnxslim_tool.quantization.gemm import gemm_to_matmul
from onnxslim_tool.quantization.tails import heterogeneous_tails
from onnxslim_tool.quantization.weight_only import (
    FOLDED,
    MIN_ELEMENTS,
    quantize_layer_weights,
    store_remaining_constants,
)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return runtime.run_model(model, [{"x": x}])["y"]


def _gemm_model(trans_b: int, alpha: float = 1.0, beta: float = 1.0, out_features: int = 32) -> ir.Model:
    rng = np.random.default_rng(0)
    shape = (out_features, 16) if trans_b else (16, out_features)
    inits = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(out_features).astype(np.float32), "b"),
    ]
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_features])],
        inits,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


X = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)


@pytest.mark.parametrize(
    ("op", "domain"),
    [("QLinearConv", ""), ("MatMulInteger", ""), ("DequantizeLinear", ""), ("MatMulNBits", "com.microsoft")],
)
def test_quantized_operators_are_recognised(op, domain):
    model = _gemm_model(0)
    model.graph.append(ir.node(op, [model.graph.inputs[0]], domain=domain, name="q"))
    reason = is_quantized(model)
    assert reason == f"model is already quantized (found {op} x1); give the float model instead"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_weight_only_int8_stays_close_with_per_channel_scales(trans_b):
    model = _gemm_model(trans_b)
    before = _run(model, X)
    stored, skipped = quantize_layer_weights(model.graph, list(model.graph), per_channel=True)
    assert [s.layer for s in stored] == ["fc"] and not skipped
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["axis"].value == (0 if trans_b else 1)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    after = _run(model, X)
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 0.01


def test_tiny_weights_are_left_float_with_a_reason():
    model = _gemm_model(0, out_features=1)  # 16 weights
    assert MIN_ELEMENTS > 16
    stored, skipped = quantize_layer_weights(model.graph, list(model.graph), per_channel=True)
    assert not stored and "int8 would save less" in skipped[0][1]


def test_remaining_constants_are_stored_only_when_int8_barely_moves_them():
    model = _gemm_model(0, out_features=64)
    bias = model.graph.initializers["b"]
    spiky = np.zeros(64, np.float32)
    spiky[0], spiky[1:] = 1000.0, np.linspace(0.1, 1.0, 63)  # one outlier: small entries would round away
    bias.const_value = ir.tensor(spiky, name="b")
    assert store_remaining_constants(model.graph) == []
    bias.const_value = ir.tensor(np.linspace(-1.0, 1.0, 64, dtype=np.float32), name="b")
    before = _run(model, X)
    assert store_remaining_constants(model.graph) == ["b"]
    assert np.abs(_run(model, X) - before).max() < 1e-2


@pytest.mark.parametrize(("trans_b", "alpha", "beta"), [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm_becomes_matmul_plus_add_with_the_same_outputs(trans_b, alpha, beta):
    model = _gemm_model(trans_b, alpha, beta)
    before = _run(model, X)
    assert gemm_to_matmul(model.graph, skip=set()) == 1
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    assert model.graph.outputs[0].name == "y"
    np.testing.assert_allclose(_run(model, X), before, rtol=1e-5, atol=1e-4)


def test_compaction_keeps_outputs_public_names_and_layer_names(tmp_path):
    model = io.load(qm.conv_model(opset=17))
    quantize_layer_weights(model.graph, list(model.graph), per_channel=True)
    model.opset_imports["com.microsoft.nchwc"] = 1  # as onnxruntime's optimizer leaves them
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    before, size_before = _run(model, x), io.serialized_size(model)
    compact(model, keep_node_names={"conv1", "relu", "conv2"})
    assert np.array_equal(_run(model, x), before)
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]
    assert {n.name for n in model.graph if n.op_type != "DequantizeLinear"} == {"conv1", "relu", "conv2"}
    assert all(n.name is None or n.name == "" for n in model.graph if n.op_type == "DequantizeLinear")
    assert "com.microsoft.nchwc" not in model.opset_imports
    assert io.serialized_size(model) < size_before


def test_a_renamed_replacement_takes_its_layer_name_back():
    model = _gemm_model(0)
    gemm = next(iter(model.graph))
    helper_node = ir.node("Identity", [model.graph.inputs[0]], name="fc_MatMul_quant_scales_mul")
    model.graph.insert_before(gemm, helper_node)
    gemm.name = "fc_MatMul_quant"
    restore_layer_names(model, {"fc"})
    assert gemm.name == "fc" and helper_node.name == "fc_MatMul_quant_scales_mul"


def test_tail_detection_needs_a_real_range_gap():
    model = ir.from_proto(qm.boxes_and_scores_model())

    def ranges(box_max: float) -> TensorsData:
        entries = {"boxes": (np.float32(0), np.float32(box_max)), "scores": (np.float32(0), np.float32(1))}
        return TensorsData(CalibrationMethod.MinMax, entries)

    tails = heterogeneous_tails(model, ranges(320.0))
    assert len(tails) == 1 and tails[0].nodes == ["concat"] and "320" in tails[0].reason
    assert heterogeneous_tails(model, ranges(4.0)) == []


def test_folded_int8_storage_is_restored_to_float_by_onnxruntime_at_load(tmp_path):
    import onnxruntime as ort

    model = _gemm_model(1)
    before = _run(model, X)
    quantize_layer_weights(model.graph, list(model.graph), per_channel=True, form=FOLDED)
    assert [n.op_type for n in model.graph] == ["Cast", "Mul", "Gemm"]
    assert is_quantized(model) == (
        "model is already quantized (found Cast of int8 weights x1); give the float model instead"
    )
    assert np.linalg.norm(_run(model, X) - before) / np.linalg.norm(before) < 0.01
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node] == ["Gemm"]


def test_latency_report_flags_a_slower_result_and_names_the_faster_format(monkeypatch, tmp_path):
    from onnxslim_tool.quantization import formats as formats_module
    from onnxslim_tool.quantization.formats import Context, Formats
    from onnxslim_tool.quantization.static import StaticOptions

    model = io.load(qm.bias_shift_model())
    calib, holdout = qm.data((16,), 32, 1, mean=5), qm.data((16,), 16, 2, mean=5)
    context = Context(model, True, {}, calib, holdout, tmp_path, StaticOptions())
    fake = {"fp32": 1.0, "int8-dynamic": 1.5, "int8 (static)": 0.7, "int8-weights": 1.0, "dequantize": 1.0}
    fake["folded"] = 1.0
    monkeypatch.setattr(formats_module, "latencies", lambda models, feed: {n: fake[n] for n in models})
    lines = Formats(context).latency_report("int8-dynamic", model)
    assert lines[0] == (
        "latency vs fp32 at batch 1 (onnxruntime CPU, 1 thread, fp32 1 ms): "
        "fp32 1.00x, int8-dynamic 1.50x, int8 (static) 0.70x, int8-weights 1.00x"
    )
    assert (
        lines[1] == "SLOWER than fp32 at batch 1: int8-dynamic runs 1.50x; int8 (static) measured 0.70x here"
    )
    assert lines[2].startswith("latency vs fp32 at batch 16 ")


def test_latency_report_leaves_out_a_format_that_cannot_be_built(monkeypatch, tmp_path):
    # onnxruntime's static quantizer raises on some graphs; the comparison must go on without it.
    from onnxslim_tool.quantization import formats as formats_module
    from onnxslim_tool.quantization.formats import Context, Formats
    from onnxslim_tool.quantization.static import StaticOptions

    model = io.load(qm.bias_shift_model())
    calib, holdout = qm.data((16,), 32, 1), qm.data((16,), 16, 2)
    formats = Formats(Context(model, True, {}, calib, holdout, tmp_path, StaticOptions()))

    def broken(options):
        raise RuntimeError("Only an existing tensor can be modified")

    monkeypatch.setattr(formats, "_static_flow", broken)
    monkeypatch.setattr(formats_module, "latencies", lambda models, feed: dict.fromkeys(models, 1.0))
    lines = formats.latency_report("int8-dynamic", model)
    assert "int8 (static)" not in lines[0] and "int8-weights 1.00x" in lines[0]
    assert lines[-1].startswith("latency of int8 (static) not compared: it could not be built (RuntimeError")


def test_judge_compares_string_outputs_exactly():
    from onnxslim_tool.quantization.evaluation import Judge

    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["N"])],
    )
    model = io.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    data = CalibrationData.from_arrays({"s": np.array(["monday", "tuesday"], dtype=object)}, source="test")
    assert Judge(model, data).score(model).rel_error == 0.0


def test_static_int8_takes_its_final_ranges_from_every_sample(tmp_path):
    from onnxslim_tool.quantization.static import StaticFlow, StaticOptions

    model = io.load(qm.bias_shift_model())
    calib, holdout = qm.data((16,), 16, 1), qm.data((16,), 16, 2, std=4.0)  # held-out inputs reach 4x wider
    every = CalibrationData.from_arrays({"x": np.concatenate([calib.inputs["x"], holdout.inputs["x"]])})
    options = StaticOptions(**qm.BARE)

    def input_scale(final_data, workdir) -> float:
        workdir.mkdir()
        outcome = StaticFlow(model, calib, holdout, options, workdir, final_data=final_data).run()
        graph = outcome.model.graph
        quantize = next(n for n in graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x")
        return float(quantize.inputs[1].const_value.numpy()), outcome

    half, half_outcome = input_scale(None, tmp_path / "half")
    full, full_outcome = input_scale(every, tmp_path / "full")
    span = float(every.inputs["x"].max() - min(every.inputs["x"].min(), 0))
    assert full == pytest.approx(span / 255, rel=1e-3) and full > 2 * half
    note = (
        "ranges recalibrated on all 32 samples (held-out ones included; "
        "every score above used ranges from 16)"
    )
    assert note in full_outcome.notes
    assert full_outcome.score is None and half_outcome.score is not None  # no held-out score of its own
    assert full_outcome.fitted_score is not None and half_outcome.fitted_score is None


def test_static_int8_keeps_the_calibration_halfs_ranges_when_all_samples_score_worse(tmp_path):
    from onnxslim_tool.quantization.static import StaticFlow, StaticOptions

    model = io.load(qm.bias_shift_model())
    calib, holdout = qm.data((16,), 16, 1), qm.data((16,), 16, 2)
    # One extreme sample among all of them stretches every min/max range 100-fold: the held-out
    # samples, inside the new ranges, lose nearly all their resolution.
    outlier = 100 * np.abs(qm.data((16,), 1, 3).inputs["x"])
    samples = np.concatenate([calib.inputs["x"], holdout.inputs["x"], outlier])
    every = CalibrationData.from_arrays({"x": samples})
    flows = {
        label: StaticFlow(model, calib, holdout, StaticOptions(**qm.BARE), tmp_path / label, final_data=data)
        for label, data in (("half", None), ("every", every))
    }
    for label in flows:
        (tmp_path / label).mkdir()
    half, kept = (flow.run() for flow in flows.values())

    assert kept.fitted_score is None and kept.score == half.score
    assert any("even on the held-out samples they include" in note for note in kept.notes)
    scale = {
        label: next(
            float(n.inputs[1].const_value.numpy())
            for n in outcome.model.graph
            if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x"
        )
        for label, outcome in (("half", half), ("kept", kept))
    }
    assert scale["kept"] == scale["half"]


@pytest.mark.parametrize(("shape", "axis"), [((16, 3, 3, 3), 0), ((24, 40), 0), ((30, 7), 1)])
def test_per_channel_int8_storage_follows_onnxruntimes_rounding_slice_by_slice(shape, axis):
    from onnxruntime.quantization.quant_utils import quantize_data

    from onnxslim_tool.quantization.weight_only import _quantize

    rng = np.random.default_rng(3)
    spread = rng.uniform(1e-3, 10, shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    array = (rng.standard_normal(shape) * spread).astype(np.float32)
    np.moveaxis(array, axis, 0)[2] = 0  # an all-zero slice gets onnxruntime's scale of 1
    np.moveaxis(array, axis, 0)[1] = np.abs(np.moveaxis(array, axis, 0)[1])  # one-signed slice
    quantized, scales = _quantize(array, axis)
    for index, channel in enumerate(np.moveaxis(array, axis, 0)):
        _zp, scale, q = quantize_data(channel.ravel(), TensorProto.INT8, symmetric=True)
        assert scales[index] == np.float32(scale)
        np.testing.assert_array_equal(np.moveaxis(quantized, axis, 0)[index].ravel(), np.asarray(q, np.int8))


def test_float_constants_stay_float_when_storing_them_int8_costs_accuracy(tmp_path, monkeypatch):
    from onnxslim_tool.quantization import static
    from onnxslim_tool.quantization.static import StaticFlow, StaticOptions

    def harmful(model):  # stands for int8 storage whose rounding a deep net cannot absorb
        for value in model.graph.initializers.values():
            if value.const_value.dtype == ir.DataType.INT32:  # the quantized bias
                value.const_value = ir.tensor(value.const_value.numpy() + 10_000, name=value.name)
        return ["b"]

    model = io.load(qm.bias_shift_model())
    calib, holdout = qm.data((16,), 32, 1), qm.data((16,), 32, 2)
    monkeypatch.setattr(static, "store_all_remaining_constants", harmful)
    outcome = StaticFlow(model, calib, holdout, StaticOptions(**qm.BARE), tmp_path).run()
    assert any(n.startswith("other float constants") and n.endswith("kept float") for n in outcome.notes)
    inits = outcome.model.graph.initializers.values()
    biases = [v for v in inits if v.const_value.dtype == ir.DataType.INT32]
    assert biases and all(np.abs(v.const_value.numpy()).max() < 10_000 for v in biases)  # untouched

    monkeypatch.setattr(static, "store_all_remaining_constants", lambda model: [])
    (tmp_path / "harmless").mkdir()
    harmless = StaticFlow(model, calib, holdout, StaticOptions(**qm.BARE), tmp_path / "harmless").run()
    assert not any(n.startswith("other float constants") for n in harmless.notes)  # nothing to decide
