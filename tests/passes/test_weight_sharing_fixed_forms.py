"""Ternary and power-of-two codebooks: fixed-form sharing with real low-bit storage."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_tool import io, runtime
from onnxslim_tool.passes.weight_sharing import WeightSharing, share_pow2, share_ternary
from tests.passes.test_weight_sharing import _apply, _data, _mlp, _weights


def test_ternary_table_follows_twn_threshold_and_scale() -> None:
    w = np.array([0.05, -0.05, 1.0, -2.0, 3.0, 0.1], dtype=np.float32)
    table = share_ternary(w, None)
    threshold = 0.7 * np.abs(w).mean()  # 0.728: 1, -2, 3 kept
    alpha = (1.0 + 2.0 + 3.0) / 3
    np.testing.assert_allclose(table.weights(np.float32), [0, 0, alpha, -alpha, alpha, 0], rtol=1e-6)
    assert threshold < 1.0


def test_pow2_values_are_zero_or_signed_powers_of_two_nearest_to_each_weight() -> None:
    w = np.array([0.0, 0.3, -0.26, 0.9, -1.6, 0.01], dtype=np.float32)
    table = share_pow2(w, 3, None)  # 3 exponents: 2^1, 2^0, 2^-1 (1.6 rounds up to 2)
    got = table.weights(np.float32)
    np.testing.assert_array_equal(got, [0.0, 0.5, -0.5, 1.0, -2.0, 0.0])
    nonzero = got[got != 0]
    assert np.all(np.log2(np.abs(nonzero)) == np.round(np.log2(np.abs(nonzero))))


@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_layers_hold_three_values_with_two_bit_storage(per_channel: bool) -> None:
    model = _mlp()
    before = io.serialized_size(model)
    record = _apply(WeightSharing(method="ternary", per_channel=per_channel, min_params=1), model)
    assert {c.layer for c in record.changes} == {"fc1", "fc2"}
    weights = _weights(model)
    # fc1 is Gemm(transB): rows are output channels, each with its own table when per_channel
    slices = list(weights["fc1"]) if per_channel else [w.ravel() for w in weights.values()]
    for values in map(np.unique, slices):
        assert values.size <= 3 and (values.size < 3 or values[1] == 0)
    dense = 4 * (32 * 16 + 32 * 12)
    tables = 44 * 4 * 4 + 44 * 4 if per_channel else 0  # a row of 4 floats + an offset per channel
    assert io.serialized_size(model) < before - dense + dense // 16 + tables + 800  # 2-bit codes
    assert any("not faster here" in note for note in record.notes)
    out = runtime.run_model(model, [{"x": np.ones((2, 16), np.float32)}])
    assert np.isfinite(out["y"]).all()


def test_pow2_expanded_weights_equal_the_table_lookup_and_refit_is_refused() -> None:
    model = _mlp()
    original = model.graph.initializers["w1"].const_value.numpy()
    record = _apply(WeightSharing(4, method="pow2", refit=True, min_params=1), model, _data())
    expected = share_pow2(original, 4, None).weights(np.float32)
    np.testing.assert_array_equal(_weights(model)["fc1"], expected)
    assert any("power-of-two values are fixed" in note for note in record.notes)


def test_ternary_refit_keeps_zero_and_lowers_the_output_error() -> None:
    data = _data()
    plain, refit = _mlp(), _mlp()
    _apply(WeightSharing(method="ternary", min_params=1), plain)
    record = _apply(WeightSharing(method="ternary", refit=True, min_params=1), refit, data)
    reference = runtime.run_model(_mlp(), list(data.batches(32)))["y"]

    def error(model) -> float:
        return float(np.abs(runtime.run_model(model, list(data.batches(32)))["y"] - reference).mean())

    assert any(note.startswith("refit fc1") for note in record.notes)
    assert error(refit) < error(plain)
    assert all(0.0 in np.unique(w) for w in _weights(refit).values())


def test_ternary_has_no_milder_form_and_pow2_needs_two_bits() -> None:
    assert WeightSharing(method="ternary").milder() is None
    assert WeightSharing(method="ternary").bits == 2
    assert WeightSharing(3, method="pow2").milder().bits == 4
    with pytest.raises(Exception, match="at least 2 bits"):
        WeightSharing(1, method="pow2")


def test_int8_after_sharing_keeps_the_codes_and_the_file_small() -> None:
    """Quantizing shared layers to int8 would expand 4-bit codes to 8 bits: they keep their codes."""
    from onnxslim_tool.passes.quantization import Quantize

    model = _mlp()
    _apply(WeightSharing(4, min_params=1), model)
    shared_size = io.serialized_size(model)
    shared = _weights(model)
    record = Quantize(mode="int8-weights")(model).record
    assert io.serialized_size(model) <= shared_size + 300  # scales of what was left float, at most
    after = list(_weights(model).values())  # onnxruntime's pre-processing may rename fused layers
    assert len(after) == len(shared)
    for weight in shared.values():
        assert any(w.shape == weight.shape and np.array_equal(w, weight) for w in after)
    assert any("kept the codes an earlier pass stored" in note for note in record.notes)
