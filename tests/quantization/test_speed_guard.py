"""--speed-guard: a quantized model measured slower than fp32 gives way to int8-weights.

The latency probe is replaced by fixed timings so the decision, not the machine, is tested.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxslim_tool import api
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.passes.quantization import Quantize
from onnxslim_tool.quantization import formats
from onnxslim_tool.recipe import RecipeError, recipe_from_flags

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def _fixed_probe(ratios: dict[str, float]):
    def latencies(models, _feed):
        return {name: ratios.get(name, 1.0) for name in models}

    return latencies


def _compress(guard: bool) -> api.Result:
    calib = CalibrationData.from_npz(SAMPLES / "digits_mlp_calib.npz")
    quantize = Quantize("int8-dynamic", speed_guard=guard, min_layer_macs=0)  # tiny layers, int8 anyway
    return api.compress(SAMPLES / "digits_mlp.onnx", calib, passes=[quantize])


@pytest.mark.parametrize("guard", [True, False])
def test_slower_format_gives_way_to_int8_weights_only_with_the_guard(guard, monkeypatch):
    probe = _fixed_probe({"fp32": 1.0, "int8-dynamic": 1.4, "int8-weights": 1.0, "int8 (static)": 1.3})
    monkeypatch.setattr(formats, "latencies", probe)
    step = _compress(guard).steps[0]
    assert step.status == "applied", step.reason
    details = {c.detail for c in step.record.changes}
    notes = " | ".join(step.record.notes)
    if guard:
        assert "speed guard: int8-dynamic ran 1.40x" in notes
        assert all("restored to float when onnxruntime loads it" in d for d in details)
    else:
        assert "speed guard" not in notes
        assert any("activations quantized at run time" in d for d in details)


def test_no_fast_format_leaves_the_model_unchanged(monkeypatch):
    probe = _fixed_probe({"fp32": 1.0, "int8-dynamic": 1.4, "int8-weights": 1.2, "int8 (static)": 1.3})
    monkeypatch.setattr(formats, "latencies", probe)
    step = _compress(True).steps[0]
    assert step.status == "rolled back"
    assert "speed guard: int8-dynamic ran 1.40x" in step.reason
    assert "no int8 format was as fast" in step.reason


def test_guard_needs_quantize():
    with pytest.raises(RecipeError, match="--speed-guard applies to quantization"):
        recipe_from_flags(speed_guard=True)
    steps = recipe_from_flags(quantize="int8", speed_guard=True).steps
    assert steps[-1].params["speed_guard"] is True
