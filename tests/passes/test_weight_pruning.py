"""Magnitude pruning: masks, allocation, refit, dead neurons, and storage that really shrinks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api, io, runtime, storage
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import PassError
from onnxslim_tool.passes.base import PassRecord
from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.passes.weight_pruning import (
    WeightPruning,
    allocate,
    magnitude_mask,
    remove_dead_neurons,
    scan_samples,
)
from onnxslim_tool.passes.weight_sharing import WeightSharing
from onnxslim_tool.testing import light_models, random_feed, with_random_weights

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
RNG = np.random.default_rng(0)


def _model(nodes, inits: dict[str, np.ndarray], x_shape, y_shape) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _mlp(w1=None, b1=None, w2=None, b2=None) -> ir.Model:
    """x[N,16] -> Gemm(w1 [24,16], transB) -> Relu -> Gemm(w2 [24,10]) -> y."""
    rng = np.random.default_rng(1)
    inits = {
        "w1": rng.standard_normal((24, 16)) / 4 if w1 is None else w1,
        "b1": rng.standard_normal(24) / 10 if b1 is None else b1,
        "w2": rng.standard_normal((24, 10)) / 5 if w2 is None else w2,
        "b2": rng.standard_normal(10) / 10 if b2 is None else b2,
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
    ]
    return _model(nodes, inits, ["N", 16], ["N", 10])


def _convnet() -> ir.Model:
    rng = np.random.default_rng(3)
    inits = {"c1": rng.standard_normal((8, 3, 3, 3)) / 3, "c2": rng.standard_normal((6, 8, 3, 3)) / 5}
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "c2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 6, 8, 8])


def _data(n: int = 128) -> CalibrationData:
    return CalibrationData.from_arrays(
        {"x": np.random.default_rng(5).standard_normal((n, 16)).astype(np.float32)}
    )


def _apply(compression, model: ir.Model, data: CalibrationData | None = None) -> PassRecord:
    if data is not None:
        compression.bind_data(data.validate(model))
    return compression(model).record


def _dense_weights(model: ir.Model) -> dict[str, np.ndarray]:
    copy = io.load(model, lift_constants=False)
    storage.unpack(copy)
    return {n.name: v.const_value.numpy() for n, _, v in storage.layer_weights(copy.graph)}


# ----- which weights go ----------------------------------------------------------------------------


def test_magnitude_mask_drops_exactly_the_smallest() -> None:
    scores = np.array([[0.5, -0.1, 3.0], [-2.0, 0.05, 0.2]])
    np.testing.assert_array_equal(magnitude_mask(scores, 0.5), [[True, False, True], [True, False, False]])


def test_data_free_sparsity_prunes_the_smallest_weights_of_every_layer() -> None:
    model = _mlp()
    originals = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    record = _apply(WeightPruning(0.6, sensitivity=False, min_params=1), model)
    assert any("no calibration data" in n for n in record.notes)
    weights = _dense_weights(model)
    for layer, name in (("fc1", "w1"), ("fc2", "w2")):
        kept = weights[layer] != 0
        assert kept.mean() == pytest.approx(0.4, abs=0.01)
        assert np.abs(originals[name][kept]).min() >= np.abs(originals[name][~kept]).max()
        np.testing.assert_array_equal(weights[layer][kept], originals[name][kept])  # no refit without data


def test_quality_threshold_is_quality_times_std() -> None:
    model = _mlp()
    w1 = model.graph.initializers["w1"].const_value.numpy()
    _apply(WeightPruning(None, quality=0.7, min_params=1), model)
    np.testing.assert_array_equal(_dense_weights(model)["fc1"] != 0, np.abs(w1) >= 0.7 * np.std(w1))


def test_allocation_meets_the_target_with_equal_damage() -> None:
    grid = [0.3, 0.5, 0.7, 0.9]
    damage = np.array([[0.01, 0.02, 0.04, 0.08], [0.1, 0.2, 0.4, 0.8]])  # layer 1 is 10x as sensitive
    sizes = np.array([1000, 1000])
    sparsities = allocate(damage, grid, sizes, 0.5)
    assert np.dot(sparsities, sizes) / sizes.sum() == pytest.approx(0.5, abs=1e-3)
    assert sparsities[0] > 0.7 > 0.3 > sparsities[1]
    same = allocate(np.vstack([damage[0], damage[0]]), grid, sizes, 0.6)
    assert same[0] == pytest.approx(same[1], abs=1e-3) and same[0] == pytest.approx(0.6, abs=1e-3)


def test_scans_of_many_layers_use_fewer_samples() -> None:
    assert scan_samples(3, 7) == 128
    assert scan_samples(64, 7) == 18
    assert scan_samples(2000, 7) == 8
    # a costly sample (YOLOv8n: 1 GMAC, 64 layers) caps the samples by MACs, not by runs
    assert scan_samples(64, 7, 10**9) == 8
    assert scan_samples(64, 7, 10**8) == 18
    assert scan_samples(3, 7, 10**10) == 9


def test_spread_subset_reaches_the_end_of_the_set():
    data = CalibrationData.from_arrays({"x": np.arange(10, dtype=np.float32)[:, None]})
    assert data.spread(4).inputs["x"][:, 0].tolist() == [0, 3, 6, 9]
    assert data.spread(20) is data


def test_sensitivity_scan_prunes_the_robust_layer_more() -> None:
    # 70% of fc2's weights are tiny: it loses little below 70% sparsity, fc1 loses more
    rng = np.random.default_rng(8)
    w2 = rng.standard_normal((24, 10)) * np.where(rng.random((24, 10)) < 0.7, 0.01, 1.0)
    model, data = _mlp(w2=w2), _data()
    record = _apply(WeightPruning(0.5, min_params=1), model, data)
    assert any("output change on 128 calibration samples" in n for n in record.notes)
    sparsity = {c.layer: 1 - c.params_after / c.params_before for c in record.changes}
    assert sparsity["fc2"] > sparsity["fc1"] + 0.1
    pruned = sum(c.params_before - c.params_after for c in record.changes)
    share = pruned / sum(c.params_before for c in record.changes)
    assert 0.5 <= share < 0.6  # the target, plus neurons left dead and removed


def test_refit_with_data_beats_plain_masking() -> None:
    data = _data()
    reference = runtime.run_model(_mlp(), data.batches(64))["y"]
    plain, refit = _mlp(), _mlp()
    _apply(WeightPruning(0.7, sensitivity=False, min_params=1), plain)
    record = _apply(WeightPruning(0.7, sensitivity=False, min_params=1), refit, data)
    error = {
        name: float(np.mean((runtime.run_model(m, data.batches(64))["y"] - reference) ** 2))
        for name, m in (("plain", plain), ("refit", refit))
    }
    assert error["refit"] < 0.7 * error["plain"]
    assert any(n.startswith("refit fc1") for n in record.notes)
    kept = _dense_weights(refit)["fc1"] != 0
    assert kept.mean() == pytest.approx(0.3, abs=0.01)  # the refit never revives pruned weights


def test_same_seed_same_file() -> None:
    files = []
    for _ in range(2):
        model = _mlp()
        _apply(WeightPruning(0.7, min_params=1, seed=4), model, _data())
        files.append(ir.to_proto(model).SerializeToString())
    assert files[0] == files[1]


# ----- storage ---------------------------------------------------------------------------------------


def test_sparse_storage_only_when_smaller() -> None:
    light, heavy = _mlp(), _mlp()
    _apply(WeightPruning(0.02, sensitivity=False, min_params=1), light)
    _apply(WeightPruning(0.6, sensitivity=False, min_params=1), heavy)
    assert all(v.is_initializer() for _, _, v in storage.layer_weights(light.graph))  # 2% zeros: dense
    rows = storage.storage_report(heavy)
    assert {r.encoding for r in rows} == {"sparse"}
    assert all(r.written_bytes < r.dense_bytes for r in rows)
    assert io.serialized_size(heavy) < io.serialized_size(light)


def test_chained_with_sharing_keeps_zeros_and_stores_sparse_codes() -> None:
    model = _mlp()
    _apply(WeightPruning(0.7, sensitivity=False, min_params=1), model)
    pruned = _dense_weights(model)
    record = _apply(WeightSharing(3, min_params=1), model)
    assert all("zero reserved" in c.detail for c in record.changes)
    for layer, weight in _dense_weights(model).items():
        np.testing.assert_array_equal(weight == 0, pruned[layer] == 0)
        assert np.unique(weight).size <= 8
    assert {r.encoding.split(" ")[0] for r in storage.storage_report(model)} == {"sparse-codes"}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


# ----- dead neurons ----------------------------------------------------------------------------------


def test_dead_neurons_are_removed_and_outputs_do_not_change() -> None:
    rng = np.random.default_rng(7)
    w1, b1, w2 = rng.standard_normal((24, 16)), rng.standard_normal(24), rng.standard_normal((24, 10))
    w1[3] = 0  # no inputs, bias > 0: outputs relu(b1[3]), folded into fc2's bias
    b1[3] = 0.7
    w1[5], b1[5] = 0, -0.4  # no inputs, relu(bias) == 0: simply gone
    w2[9] = 0  # no outgoing weights: unused
    model = _mlp(w1, b1, w2)
    feed = {"x": rng.standard_normal((5, 16)).astype(np.float32)}
    before = runtime.run_model(model, [feed])["y"]
    record = PassRecord("test")
    targets = storage.select_weights(model.graph, lambda n: (True, ""), 1, record)
    notes = remove_dead_neurons(model.graph, targets)
    assert "3 dead neuron(s) removed before fc2" in notes["w1"]
    assert model.graph.initializers["w1"].const_value.shape == (21, 16)
    assert model.graph.initializers["w2"].const_value.shape == (21, 10)
    np.testing.assert_allclose(runtime.run_model(model, [feed])["y"], before, rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_dead_conv_channels_are_removed() -> None:
    model = _convnet()
    c1 = model.graph.initializers["c1"].const_value.numpy().copy()
    c2 = model.graph.initializers["c2"].const_value.numpy().copy()
    c1[2] = 0  # no bias: outputs relu(0) = 0
    c2[:, 6] = 0  # input channel 6 unused
    for name, array in (("c1", c1), ("c2", c2)):
        model.graph.initializers[name].const_value = ir.tensor(array, name=name)
    feed = {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    before = runtime.run_model(model, [feed])["y"]
    targets = storage.select_weights(model.graph, lambda n: (True, ""), 1, PassRecord("t"))
    remove_dead_neurons(model.graph, targets)
    assert model.graph.initializers["c1"].const_value.shape == (6, 3, 3, 3)
    np.testing.assert_allclose(runtime.run_model(model, [feed])["y"], before, rtol=1e-5, atol=1e-5)


# ----- parameters, real models -------------------------------------------------------------------------


def test_milder_prunes_less_with_the_same_data() -> None:
    strict = WeightPruning(0.8)
    strict.bind_data(_data())
    assert strict.milder().sparsity == pytest.approx(0.7)
    assert strict.milder().calibration is strict.calibration
    assert WeightPruning(None, quality=1.0).milder().quality == pytest.approx(0.7)
    assert WeightPruning(0.1).milder() is None


@pytest.mark.parametrize(
    "kwargs", [{"sparsity": 1.0}, {"sparsity": 0.0}, {"sparsity": None}, {"quality": -1}]
)
def test_bad_parameters_are_refused(kwargs) -> None:
    with pytest.raises(PassError):
        WeightPruning(**kwargs)


def test_old_opsets_are_not_pruned_because_zeros_would_not_shrink_the_file() -> None:
    proto = with_random_weights(light_models()["squeezenet"], seed=0)  # opset 9: no CumSum
    record = _apply(WeightPruning(0.7, sensitivity=False), ir.from_proto(proto))
    assert not record.changes and "sparse storage needs opset >= 11" in record.notes[0]


def test_a_real_architecture_runs_after_pruning() -> None:
    proto = with_random_weights(light_models()["squeezenet"], seed=0)
    proto = onnx.version_converter.convert_version(proto, 13)
    model = ir.from_proto(proto)
    before = io.serialized_size(model)
    record = _apply(WeightPruning(0.7, sensitivity=False), model)
    assert len(record.changes) > 20
    assert io.serialized_size(model) < 0.45 * before
    out = runtime.run_model(model, [random_feed(proto, seed=1)])
    assert all(np.isfinite(v).all() for v in out.values())


def test_sample_mlp_80_percent_through_the_pipeline(tmp_path) -> None:
    calib = CalibrationData.from_npz(SAMPLES / "digits_mlp_calib.npz")
    evaluation = CalibrationData.from_npz(SAMPLES / "digits_mlp_eval.npz")
    result = api.compress(
        SAMPLES / "digits_mlp.onnx", calib, passes=[WeightPruning(0.8)], eval_data=evaluation
    )
    assert result.steps[0].status == "applied"
    written = result.save(tmp_path / "mlp80.onnx")
    assert io.file_size(written) <= 0.6 * result.before.bytes
    assert result.accuracy_before - result.accuracy_after <= 0.02


def test_sample_cnn_pruned_and_shared_through_the_pipeline(tmp_path) -> None:
    calib = CalibrationData.from_npz(SAMPLES / "digits_cnn_calib.npz")
    evaluation = CalibrationData.from_npz(SAMPLES / "digits_cnn_eval.npz")
    passes = [Cleanup(), WeightPruning(0.5), WeightSharing(4)]
    result = api.compress(SAMPLES / "digits_cnn.onnx", calib, passes=passes, eval_data=evaluation)
    assert [s.status for s in result.steps] == ["applied"] * 3
    written = result.save(tmp_path / "cnn.onnx")
    # Not the 8x of the issue: mask + 4-bit codes of 13.6K weights take 5.1 KB, the rest of the
    # model (graph, biases, small layers, metadata) ~5 KB, so ~6x is what storage can reach here.
    assert io.file_size(written) < 0.17 * result.before.bytes
    assert result.accuracy_before - result.accuracy_after <= 0.01


def _moments(p: np.ndarray, p0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return p.T @ p, p.T @ p0, p0.T @ p0


@pytest.mark.parametrize("rows", [400, 12])
def test_ridge_path_stops_once_a_weaker_ridge_predicts_worse(rows, monkeypatch):
    """Plenty of rows: the weakest ridge fits best and every ridge is tried. Far fewer rows
    than inputs: a weak ridge overfits, and the path stops before the slowest solves."""
    from onnxslim_tool.passes import weight_pruning as wp

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((6, 20))
    kept = rng.random((6, 20)) > 0.5
    mixing = rng.standard_normal((20, 20)) + 3 * np.eye(20)  # correlated inputs: a refit can compensate
    halves = [rng.standard_normal((rows, 20)) @ mixing for _ in range(2)]
    fit, check = (_moments(p, p) for p in halves)
    masked = wp._row_errors(check, np.where(kept, w0, 0.0), w0)
    solves = []
    real = wp._masked_ridge_fit
    monkeypatch.setattr(wp, "_masked_ridge_fit", lambda *a: solves.append(a[-1]) or real(*a))
    chosen = wp._choose_ridge(fit, check, w0, kept, masked)
    exhaustive = {r: float(wp._row_errors(check, real(fit, w0, kept, r), w0).sum()) for r in wp._RIDGES}
    assert chosen is not None and chosen[0] == min(exhaustive, key=exhaustive.get)
    if rows == 400:
        assert solves == sorted(wp._RIDGES, reverse=True)
    else:
        assert len(solves) < len(wp._RIDGES)
