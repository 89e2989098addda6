"""Weight sharing: k-means and hashed codebooks, stored as real low-bit codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api, io, runtime, storage
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import PassError
from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.passes.weight_sharing import WeightSharing, fit_centroids, share_kmeans

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
RNG = np.random.default_rng(0)


def _mlp(opset: int = 17) -> ir.Model:
    """x[N,16] -> Gemm(32, transB) -> Relu -> MatMul(32x12) + bias -> y."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) / 4, "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32) / 10, "b1"),
        numpy_helper.from_array(rng.standard_normal((32, 12)).astype(np.float32) / 6, "w2"),
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32) / 10, "b2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
            helper.make_node("Add", ["m", "b2"], ["y"], name="bias2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
        inits,
    )
    return ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    )


def _data(n: int = 96, seed: int = 2) -> CalibrationData:
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return CalibrationData.from_arrays({"x": x})


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Layer weights as onnxruntime expands them from the stored codes."""
    probe = io.load(model, lift_constants=False)
    values = {n.name: v for n, _, v in storage.layer_weights(probe.graph)}
    computed = [v for v in values.values() if not v.is_initializer()]
    probe.graph.outputs.extend(computed)
    session = runtime.make_session(probe)
    outs = session.run([v.name for v in computed], {"x": np.zeros((1, 16), np.float32)})
    by_name = dict(zip([v.name for v in computed], outs, strict=True))
    return {k: by_name[v.name] if v.name in by_name else v.const_value.numpy() for k, v in values.items()}


def _apply(compression: WeightSharing, model: ir.Model, data: CalibrationData | None = None):
    if data is not None:
        compression.bind_data(data.validate(model))
    return compression(model).record


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_each_layer_keeps_at_most_2_to_the_bits_values_and_the_file_shrinks(bits: int) -> None:
    model = _mlp()
    before = io.serialized_size(model)
    record = _apply(WeightSharing(bits, min_params=1), model)
    assert {c.layer for c in record.changes} == {"fc1", "fc2"}
    for weight in _weights(model).values():
        assert np.unique(weight).size <= 2**bits
    sizes = (32 * 16, 32 * 12)
    stored = sum(min(4 * n, n * bits / 8 + 4 * 2**bits) for n in sizes)  # codes + table, or dense
    assert io.serialized_size(model) < before - 4 * sum(sizes) + stored + 500
    out = runtime.run_model(model, [{"x": RNG.standard_normal((4, 16)).astype(np.float32)}])
    assert np.isfinite(out["y"]).all()


def test_expanded_weights_equal_the_codebook_lookup_exactly() -> None:
    model = _mlp()
    original = model.graph.initializers["w1"].const_value.numpy()
    table = share_kmeans(original, 3, "linear", 0, None)
    _apply(WeightSharing(3, min_params=1, half_biases=False), model)
    np.testing.assert_array_equal(_weights(model)["fc1"], table.values.astype(np.float32)[table.codes])


def test_codebooks_are_stored_as_float16_and_the_lookup_stays_exact() -> None:
    model = _mlp()
    original = model.graph.initializers["w1"].const_value.numpy()
    table = share_kmeans(original, 3, "linear", 0, None)
    record = _apply(WeightSharing(3, min_params=1), model)
    halves = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT16]
    assert len(halves) == 1 and any("rounded to float16" in n for n in record.notes)
    stored = table.values.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(_weights(model)["fc1"], stored[table.codes])


def test_small_layers_and_excluded_layers_are_skipped_with_a_reason() -> None:
    model = _mlp()
    record = _apply(WeightSharing(4, min_params=400, exclude=["fc1"]), model)
    reasons = {s.layer: s.reason for s in record.skipped}
    assert reasons["fc1"] == "excluded by --exclude"
    assert "384 params < min_params 400" in reasons["fc2"]
    assert not record.changes


def test_same_seed_same_file() -> None:
    first, second = _mlp(), _mlp()
    _apply(WeightSharing(4, init="random", min_params=1, seed=7), first)
    _apply(WeightSharing(4, init="random", min_params=1, seed=7), second)
    assert ir.to_proto(first).SerializeToString() == ir.to_proto(second).SerializeToString()


@pytest.mark.parametrize("init", ["linear", "density", "random", "kmeans++"])
def test_every_init_gives_a_sorted_codebook_of_the_asked_size(init: str) -> None:
    values = RNG.standard_normal(5000).astype(np.float32)
    centroids = fit_centroids(values, 16, init, seed=0)
    assert centroids.size == 16 and np.all(np.diff(centroids) > 0)
    assert values.min() <= centroids[0] and centroids[-1] <= values.max()


def test_big_layers_use_mini_batch_k_means_and_stay_deterministic() -> None:
    values = RNG.standard_normal(70_000).astype(np.float32)
    first, second = fit_centroids(values, 8, "linear", 3), fit_centroids(values, 8, "linear", 3)
    np.testing.assert_array_equal(first, second)
    assert first.size == 8


def test_pruned_zeros_stay_exact_with_zero_reserved() -> None:
    weight = RNG.standard_normal((40, 30)).astype(np.float32)
    weight[np.abs(weight) < 0.8] = 0
    table = share_kmeans(weight, 2, "linear", 0, None)
    shared = table.weights(np.float32)
    assert table.zero_reserved and table.values[0] == 0
    np.testing.assert_array_equal(shared == 0, weight == 0)
    assert np.unique(shared).size == 4  # zero and three nonzero centroids


def test_per_channel_tables_follow_the_output_axis() -> None:
    model = _mlp()
    record = _apply(WeightSharing(2, per_channel=True, min_params=1), model)
    assert all("per output channel" in c.detail for c in record.changes)
    weights = _weights(model)
    assert max(np.unique(row).size for row in weights["fc1"]) <= 4  # Gemm transB: rows are outputs
    assert max(np.unique(col).size for col in weights["fc2"].T) <= 4  # MatMul: columns are outputs


def test_hashing_stores_only_the_buckets() -> None:
    model = _mlp()
    original = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    record = _apply(WeightSharing(3, method="hash", min_params=1, seed=5), model)
    assert all("hashed sharing (8 buckets)" in c.detail for c in record.changes)
    stored = sum(v.const_value.numpy().nbytes for v in model.graph.initializers.values())
    biases = (32 + 12) * 4
    assert stored < biases + 2 * 8 * 4 + 120  # biases, two 8-value tables, hash scalars, shapes
    weights = _weights(model)
    slots = storage.hash_slots(original["w1"].size, 8, seed=5).reshape(original["w1"].shape)
    signs = np.where(slots < 8, 1.0, -1.0)
    for k in range(8):  # each bucket is the signed mean of its weights
        expected = np.mean((signs * original["w1"])[slots % 8 == k])
        np.testing.assert_allclose(np.mean((signs * weights["fc1"])[slots % 8 == k]), expected, rtol=1e-5)


def test_refit_lowers_the_output_error_on_calibration_data() -> None:
    data = _data()
    reference = runtime.run_model(_mlp(), data.batches(32))["y"]
    errors = {}
    for refit in (False, True):
        model = _mlp()
        record = _apply(WeightSharing(2, refit=refit, min_params=1), model, data)
        errors[refit] = float(np.mean((runtime.run_model(model, data.batches(32))["y"] - reference) ** 2))
    assert errors[True] < errors[False]
    assert any(n.startswith("refit fc1") for n in record.notes)


def test_refit_by_default_when_data_is_given_and_silently_not_without() -> None:
    default = WeightSharing(2, min_params=1)
    assert default.refit is None and default.uses_data
    assert not WeightSharing(2, refit=False).uses_data
    with_data = _apply(WeightSharing(2, min_params=1), _mlp(), _data())
    assert any(n.startswith("refit fc1") for n in with_data.notes)
    without = _apply(WeightSharing(2, min_params=1), _mlp())
    assert not any("refit" in n for n in without.notes)
    off = _apply(WeightSharing(2, refit=False, min_params=1), _mlp(), _data())
    assert not any("refit" in n for n in off.notes)


def test_biases_of_shared_layers_go_float16_unless_turned_off() -> None:
    def halves(model: ir.Model) -> int:
        return sum(v.const_value.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())

    halved, kept = _mlp(), _mlp()
    record = _apply(WeightSharing(4, min_params=1, refit=False), halved)
    assert any("stored as float16" in n for n in record.notes)
    _apply(WeightSharing(4, min_params=1, refit=False, half_biases=False), kept)
    assert halves(halved) == 1 and halves(kept) == 0
    assert io.serialized_size(halved) < io.serialized_size(kept)
    # Same codes and tables either way: the outputs differ only by the biases' float16 rounding.
    x = {"x": RNG.standard_normal((4, 16)).astype(np.float32)}
    a, b = runtime.run_model(halved, [x])["y"], runtime.run_model(kept, [x])["y"]
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)


def test_exact_sharing_keeps_float32_biases_and_the_outputs() -> None:
    model = _mlp()
    for name in ("w1", "w2"):  # at most 8 distinct values: 3-bit sharing is exact
        value = model.graph.initializers[name]
        w = value.const_value.numpy()
        levels = np.linspace(w.min(), w.max(), 8, dtype=np.float32)
        value.const_value = ir.tensor(levels[np.abs(w[..., None] - levels).argmin(-1)], name=name)
    x = {"x": RNG.standard_normal((4, 16)).astype(np.float32)}
    expected = runtime.run_model(model, [x])["y"]
    record = _apply(WeightSharing(3, min_params=1, refit=False), model)
    assert not any("float16" in n for n in record.notes)
    assert all(v.const_value.dtype != ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    np.testing.assert_array_equal(runtime.run_model(model, [x])["y"], expected)


def test_refit_without_data_says_so() -> None:
    record = _apply(WeightSharing(4, refit=True, min_params=1), _mlp())
    assert any("no calibration data" in n for n in record.notes)


def test_milder_adds_a_bit_until_eight_with_the_same_data() -> None:
    strict = WeightSharing(3, refit=True)
    strict.bind_data(_data())
    assert strict.milder().bits == 4 and strict.milder().calibration is strict.calibration
    assert WeightSharing(3, per_channel=True).milder().per_channel
    assert WeightSharing(8).milder() is None
    # Backing off twice (the gate does when the first step is not enough) must work too.
    assert WeightSharing(3).milder().milder().bits == 5


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 0}, {"bits": 9}, {"method": "lsh"}, {"init": "zeros"}, {"method": "hash", "per_channel": True}],
)
def test_bad_parameters_are_refused(kwargs) -> None:
    with pytest.raises(PassError):
        WeightSharing(**kwargs)


def test_old_opsets_share_with_an_opset_7_expansion_but_cannot_hash() -> None:
    model = _mlp(opset=9)
    record = _apply(WeightSharing(4, min_params=1), model)
    assert len(record.changes) == 2
    assert all(np.unique(w).size <= 16 for w in _weights(model).values())
    hashed = _apply(WeightSharing(4, method="hash", min_params=1), _mlp(opset=10))
    assert not hashed.changes and "opset >= 11" in hashed.notes[0]


def test_sample_cnn_4_bits_through_the_pipeline(tmp_path) -> None:
    """The acceptance run: written file at most 0.2x the original, accuracy within a point."""
    calib = CalibrationData.from_npz(SAMPLES / "digits_cnn_calib.npz")
    evaluation = CalibrationData.from_npz(SAMPLES / "digits_cnn_eval.npz")
    result = api.compress(
        SAMPLES / "digits_cnn.onnx", calib, passes=[Cleanup(), WeightSharing(4)], eval_data=evaluation
    )
    assert [s.status for s in result.steps] == ["applied", "applied"]
    written = result.save(tmp_path / "cnn4.onnx")
    assert io.file_size(written) <= 0.2 * result.before.bytes
    assert result.accuracy_before - result.accuracy_after <= 0.01
    reloaded = runtime.run_model(io.load(written), evaluation.batches(64))
    np.testing.assert_allclose(
        reloaded["logits"], runtime.run_model(result.model, evaluation.batches(64))["logits"]
    )
