"""Each repair lowers the measured error on a model built to need it, and keeps float math exact."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import quant_models as qm

from onnxslim_tool import api, runtime
from onnxslim_tool.passes.quantization import Quantize
from onnxslim_tool.quantization.equalize import equalize
from onnxslim_tool.quantization.smoothquant import smooth

# Only the repair under test is switched on; the activation type is fixed so no latency probe
# decides anything.
BARE = qm.BARE


def _error(proto, calib, evaluation, **options) -> tuple[float, list[str]]:
    """Relative output error of the quantized model against the float one, on unseen data."""
    quantize = Quantize("int8", **(BARE | options))
    result = api.compress(ir.from_proto(proto), calib, passes=[quantize], eval_data=evaluation)
    assert result.steps[0].status == "applied", result.steps[0].reason
    reference = runtime.run_model(ir.from_proto(proto), evaluation.batches(64))["y"]
    output = runtime.run_model(result.model, evaluation.batches(64))["y"]
    return float(np.linalg.norm(output - reference) / np.linalg.norm(reference)), result.steps[0].record.notes


def test_bias_correction_removes_the_shift_of_a_biased_layer():
    proto = qm.bias_shift_model()
    calib, evaluation = qm.data((16,), 128, 1, mean=5, std=0.2), qm.data((16,), 128, 2, mean=5, std=0.2)
    without, _ = _error(proto, calib, evaluation, per_channel=False)
    with_it, notes = _error(proto, calib, evaluation, per_channel=False, bias_correction=True)
    assert with_it < 0.2 * without, (without, with_it)
    assert any(n.startswith("bias correction") and n.endswith("kept") for n in notes)


@pytest.mark.parametrize("per_channel", [False, True])
def test_equalization_rescues_channels_of_very_different_ranges(per_channel):
    proto = qm.unequal_channels_model()
    calib, evaluation = qm.data((4, 8, 8), 64, 1), qm.data((4, 8, 8), 64, 2)
    without, _ = _error(proto, calib, evaluation, per_channel=per_channel)
    with_it, notes = _error(proto, calib, evaluation, per_channel=per_channel, equalize=True)
    assert without > 0.5 and with_it < 0.05, (without, with_it)
    assert any(n.startswith("cross-layer equalization (1 pair(s))") for n in notes)


def test_smoothquant_tames_outlier_activation_channels():
    proto = qm.outlier_channels_model()
    calib, evaluation = qm.data((8, 16), 64, 1), qm.data((8, 16), 64, 2)
    without, _ = _error(proto, calib, evaluation)
    with_it, notes = _error(proto, calib, evaluation, smoothquant=True)
    assert with_it < 0.6 * without, (without, with_it)
    assert any(n.startswith("SmoothQuant (1 site(s)") for n in notes)


def test_mixed_precision_keeps_the_sensitive_layer_float_within_budget():
    proto = qm.sensitive_layer_model()
    calib, evaluation = qm.data((16,), 256, 1), qm.data((16,), 256, 2)
    all_int8 = api.compress(
        ir.from_proto(proto), calib, passes=[Quantize("int8", **BARE)], eval_data=evaluation
    )
    assert all_int8.fidelity[0].top1_agreement < 0.5  # quantizing everything destroys the task
    quantize = Quantize("int8", max_drop=0.02, **BARE)
    result = api.compress(ir.from_proto(proto), calib, passes=[quantize], eval_data=evaluation)
    record = result.steps[0].record
    kept = {s.layer: s.reason for s in record.skipped}
    assert list(kept) == ["fc2"] and "kept float by mixed precision" in kept["fc2"]
    assert [c.layer for c in record.changes] == ["fc1"]
    assert result.fidelity[0].top1_agreement >= 0.97
    assert any("budget met" in n for n in record.notes)


def _outputs(model: ir.Model, data) -> np.ndarray:
    return runtime.run_model(model, data.batches(64))["y"]


def test_equalization_leaves_the_float_function_unchanged():
    model = ir.from_proto(qm.unequal_channels_model())
    data = qm.data((4, 8, 8), 8, 3)
    before = _outputs(model, data)
    done, _skipped = equalize(model.graph)
    assert len(done) == 1 and done[0].spread_after < done[0].spread_before / 100
    np.testing.assert_allclose(_outputs(model, data), before, rtol=1e-4, atol=1e-4)


def test_smoothing_leaves_the_float_function_unchanged():
    model = ir.from_proto(qm.outlier_channels_model())
    data = qm.data((8, 16), 8, 3)
    before = _outputs(model, data)
    done = smooth(model.graph, ir.from_proto(qm.outlier_channels_model()), data.batches(8))
    assert len(done) == 1 and done[0].activation_spread_after < done[0].activation_spread_before
    np.testing.assert_allclose(_outputs(model, data), before, rtol=1e-4, atol=1e-4)
