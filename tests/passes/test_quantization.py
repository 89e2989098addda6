"""The Quantize pass end to end on the sample models: accuracy kept, size, refusals, formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import quantize_dynamic

from onnxslim_tool import api, io, runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import PassError
from onnxslim_tool.passes.quantization import Quantize, is_quantized

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
# The acceptance floor: at most 1 point of accuracy lost on the 450 held-out test digits, and
# a written file at most 0.35x the original (graph overhead included).
MAX_ACCURACY_DROP = 0.01
MAX_SIZE_RATIO = 0.35


def _sample(kind: str) -> tuple[Path, CalibrationData, CalibrationData]:
    model = SAMPLES / f"digits_{kind}.onnx"
    calib = CalibrationData.from_npz(SAMPLES / f"digits_{kind}_calib.npz")
    evaluation = CalibrationData.from_npz(SAMPLES / f"digits_{kind}_eval.npz")
    return model, calib, evaluation


def _compress(kind: str, quantize: Quantize, tmp_path: Path):
    model, calib, evaluation = _sample(kind)
    result = api.compress(model, calib, passes=[quantize], eval_data=evaluation)
    written = result.save(tmp_path / f"{kind}.onnx")
    return result, written.stat().st_size / model.stat().st_size


@pytest.mark.parametrize(
    ("kind", "mode"),
    [("cnn", "int8"), ("transformer", "int8"), ("mlp", "int8-dynamic"), ("transformer", "int8-dynamic")],
)
def test_sample_models_keep_accuracy_at_a_third_of_the_size(kind, mode, tmp_path):
    # min_layer_macs=0: activations quantized although these layers are under the size rule.
    result, ratio = _compress(kind, Quantize(mode, min_layer_macs=0), tmp_path)
    step = result.steps[0]
    assert step.status == "applied", step.reason
    assert result.accuracy_before - result.accuracy_after <= MAX_ACCURACY_DROP
    assert ratio <= MAX_SIZE_RATIO
    assert step.record.changes and all("int8" in c.detail for c in step.record.changes)
    assert any(note.startswith("latency vs fp32") for note in step.record.notes)


def test_static_flow_reports_every_measured_decision(tmp_path):
    result, _ratio = _compress("cnn", Quantize("int8", min_layer_macs=0), tmp_path)
    notes = " | ".join(result.steps[0].record.notes)
    for expected in ("calibration (minmax)", "activation type by latency probe", "cross-layer equalization"):
        assert expected in notes
    assert "bias correction" in notes and "held-out output error" in notes
    # Every Conv/Gemm of the CNN ends with int8 weights and uint8 or int8 activations.
    details = {c.layer: c.detail for c in result.steps[0].record.changes}
    assert len(details) == 8 and all("activations" in d for d in details.values())


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_layers_too_small_for_int8_kernels_keep_float_compute_with_int8_weights(mode, tmp_path):
    # The MLP's layers (640-8192 MACs) ran 1.26x slower than fp32 with int8 activations.
    result, ratio = _compress("mlp", Quantize(mode), tmp_path)
    step = result.steps[0]
    assert step.status == "applied", step.reason
    assert ratio <= MAX_SIZE_RATIO
    assert any("every weighted layer is under 262,144 MACs" in note for note in step.record.notes)
    details = [c.detail for c in step.record.changes]
    assert len(details) == 3 and all("restored to float when onnxruntime loads it" in d for d in details)
    ops = {node.op_type for node in result.model.graph}
    assert not ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}


def test_only_the_small_layers_of_a_mixed_model_keep_float_compute():
    big, small = 128, 4  # 64x128x128 = 1M MACs over the threshold; 64x128x4 = 32k under it
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((big, big)).astype(np.float32) / 12, "w_big"),
        numpy_helper.from_array(rng.standard_normal((big, small)).astype(np.float32) / 12, "w_small"),
    ]
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w_big"], ["h"], name="big"),
            onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
            onnx.helper.make_node("MatMul", ["r", "w_small"], ["y"], name="small"),
        ],
        "mixed",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64, big])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64, small])],
        weights,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    inputs = {"x": rng.standard_normal((16, 64, big)).astype(np.float32)}
    data = CalibrationData.from_arrays(inputs, source="test")
    quantize = Quantize("int8", activation_type="uint8", equalize=False, bias_correction=False)
    result = api.compress(model, data, passes=[quantize])
    details = {c.layer: c.detail for c in result.steps[0].record.changes}
    assert "activations" in details["big"]
    assert "restored to float when onnxruntime loads it" in details["small"]
    assert any("1 layer(s) under 262,144 MACs" in note for note in result.steps[0].record.notes)


def test_weight_only_int8_and_int4_run_in_onnxruntime(tmp_path):
    model, calib, evaluation = _sample("mlp")
    reference = runtime.run_model(io.load(model), evaluation.batches(64))["logits"]
    sizes = {}
    for mode in ("int8-weights", "int4-weights"):
        result = api.compress(model, calib, passes=[Quantize(mode)], eval_data=evaluation)
        assert result.steps[0].status == "applied", result.steps[0].reason
        out = runtime.run_model(result.model, evaluation.batches(64))["logits"]
        agreement = np.mean(out.argmax(1) == reference.argmax(1))
        assert agreement >= 0.97, (mode, agreement)
        sizes[mode] = result.save(tmp_path / f"{mode}.onnx").stat().st_size
    ops = {node.op_type for node in io.load(tmp_path / "int4-weights.onnx").graph}
    assert "MatMulNBits" in ops
    assert sizes["int4-weights"] < sizes["int8-weights"] < 0.35 * model.stat().st_size


def test_already_quantized_model_is_refused_with_one_line(tmp_path):
    model, calib, _evaluation = _sample("mlp")
    quantized_path = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(model), str(quantized_path))
    quantized = io.load(quantized_path)
    reason = is_quantized(quantized)
    assert reason is not None and reason.startswith("model is already quantized (found ")
    assert "MatMulInteger" in reason and "\n" not in reason
    with pytest.raises(PassError, match="already quantized"):
        Quantize("int8")(quantized)
    with pytest.raises(PassError, match="already quantized"):  # the whole run refuses up front
        api.compress(quantized_path, calib, passes=[Quantize("int8")])


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_float_sample_models_are_not_taken_for_quantized(kind):
    assert is_quantized(io.load(SAMPLES / f"digits_{kind}.onnx")) is None


def test_bad_parameters_are_refused_at_construction():
    with pytest.raises(PassError, match="mode must be one of"):
        Quantize("int3")
    with pytest.raises(PassError, match="calibrator"):
        Quantize(calibrator="kl")
    with pytest.raises(PassError, match="activation_type"):
        Quantize(activation_type="fp8")
    with pytest.raises(PassError, match="max_drop"):
        Quantize(max_drop=1.5)


def test_milder_versions_end_in_weight_only_int8():
    chain, current = [], Quantize("int8", max_drop=0.004)
    while current is not None:
        chain.append((current.mode, current.max_drop))
        current = current.milder()
    assert chain[0] == ("int8", 0.004)
    assert chain[-1][0] == "int8-weights"
    assert all(b[1] is None or a[1] is None or b[1] < a[1] for a, b in zip(chain, chain[1:-1], strict=False))
    assert Quantize("int8-dynamic").milder().mode == "int8-weights"
    assert Quantize("int8-weights").milder() is None


@pytest.mark.parametrize("mode", ["int8", "int8-weights"])
def test_same_seed_gives_the_same_file(mode, tmp_path):
    # activation_type="auto" is decided by timing; fixed here, everything else is seeded.
    model, calib, evaluation = _sample("mlp")
    written = []
    for i in range(2):
        quantize = Quantize(mode, activation_type="uint8", equalize=False, seed=3)
        result = api.compress(model, calib, passes=[quantize], eval_data=evaluation)
        written.append(result.save(tmp_path / f"run{i}.onnx").read_bytes())
    assert written[0] == written[1]


def test_static_without_data_falls_back_to_dynamic_and_says_so():
    model = io.load(SAMPLES / "digits_mlp.onnx")
    quantize = Quantize("int8", min_layer_macs=0)  # the MLP's layers are under the size rule
    result = quantize(model)
    assert any("int8-dynamic was used" in note for note in result.record.notes)
    assert any(node.op_type == "MatMulInteger" for node in model.graph)
    assert isinstance(model, ir.Model)


def _single_node_model(op: str, elem_type: int) -> ir.Model:
    from onnx import helper

    inputs, shape = (["a"], ["N"]) if op == "StringNormalizer" else (["a", "b"], ["N", 3])
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"])],
        op,
        [helper.make_tensor_value_info(n, elem_type, shape) for n in inputs],
        [helper.make_tensor_value_info("y", elem_type, None)],
    )
    return io.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


WORDS = {"a": np.array(["monday", "tuesday", "wednesday"], dtype=object)}
BOOLS = {"a": np.ones((2, 3), bool), "b": np.zeros((2, 3), bool)}


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
@pytest.mark.parametrize(
    ("op", "elem_type", "arrays"),
    [("StringNormalizer", onnx.TensorProto.STRING, WORDS), ("And", onnx.TensorProto.BOOL, BOOLS)],
)
def test_model_without_float_constants_is_a_no_op_with_the_reason(mode, op, elem_type, arrays):
    # String and bool graphs (onnx's 'monday' and And tests) made onnxruntime's quantizers raise.
    from onnxslim_tool.passes.quantization import NOTHING_TO_QUANTIZE

    model = _single_node_model(op, elem_type)
    data = CalibrationData.from_arrays(arrays, source="test")
    result = api.compress(model, data, passes=[Quantize(mode)], eval_data=data)
    step = result.steps[0]
    assert step.status == "no-op", step.reason
    assert [s.reason for s in step.record.skipped] == [NOTHING_TO_QUANTIZE]


def test_static_int8_stores_the_embedding_table_int8_too():
    # A transformer's static int8 quantizes its matmuls only; MiniLM's float embeddings kept
    # its file at 0.64x of fp32.
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1000, 64)).astype(np.float32)
    weight = (rng.standard_normal((64, 512)) / 8).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            onnx.helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),  # 16x64x512 MACs
        ],
        "embedder",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16, 512])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    data = CalibrationData.from_arrays({"ids": rng.integers(0, 1000, (16, 16))}, source="test")
    quantize = Quantize("int8", activation_type="uint8", equalize=False, bias_correction=False)
    result = api.compress(model, data, passes=[quantize])
    details = {c.layer: c.detail for c in result.steps[0].record.changes}
    assert "activations" in details["proj"]
    assert "restored to float when onnxruntime loads it" in details["embed"]
    assert result.after.bytes < 0.35 * result.before.bytes
