"""Target-driven allocation: cheapest savings first, passes that compose, a target met."""

from __future__ import annotations

import pytest

from onnxslim_tool import api, io
from onnxslim_tool.allocation import Option, Target, build_passes, greedy
from onnxslim_tool.cli import parse_size
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError


def test_greedy_takes_the_least_drop_per_unit_saved_until_the_goal():
    options = [
        Option("a", "prune", 0.3, saving=100, drop=0.010),  # 1e-4 per unit
        Option("a", "prune", 0.7, saving=300, drop=0.090),  # the step from 0.3: 4e-4 per unit
        Option("b", "share", 4, saving=100, drop=0.001),  # 1e-5 per unit: first
        Option("c", "lowrank", 0.5, saving=50, drop=0.050),  # 1e-3 per unit: last
    ]
    chosen, saved = greedy(options, goal_saving=150)
    assert {k: v.setting for k, v in chosen.items()} == {"b": 4, "a": 0.3}
    assert saved == 200
    chosen, saved = greedy(options, goal_saving=10_000)  # out of reach: everything, once per layer
    assert {k: v.setting for k, v in chosen.items()} == {"a": 0.7, "b": 4, "c": 0.5}
    assert saved == 450


def test_passes_prune_first_fold_then_share():
    options = [
        Option("fc", "share", 3, 10, 0.0),
        Option("conv", "prune", 0.5, 10, 0.0),
        Option("conv2", "lowrank", 0.5, 10, 0.0),
    ]
    names = [p.name for p in build_passes(options)]
    assert names == ["channel-pruning", "cleanup", "lowrank", "weight-sharing"]


@pytest.mark.parametrize(
    ("kind", "value", "fragment"),
    [("size", 0, "bytes"), ("macs", 1.5, "fraction"), ("speed", 0.5, "unknown target")],
)
def test_bad_targets_are_refused(kind, value, fragment):
    with pytest.raises(OnnxSlimError, match=fragment):
        Target(kind, value)


def test_sizes_parse_with_units():
    assert parse_size("2MB") == 2_000_000
    assert parse_size("500kB") == 500_000
    assert parse_size("1.5MiB") == 1_572_864
    assert parse_size("12345") == 12345
    with pytest.raises(OnnxSlimError, match="expected bytes"):
        parse_size("two megs")


def test_size_target_is_met_within_the_budget_on_the_sample_mlp():
    """Measured: digits MLP 62 kB -> under 25 kB at a 1-point budget (sharing the big layers)."""
    model = "sample_models/digits_mlp.onnx"
    calib = CalibrationData.from_npz("sample_models/digits_mlp_calib.npz")
    test = CalibrationData.from_npz("sample_models/digits_mlp_eval.npz")
    result = api.compress(model, calib, eval_data=test, target=Target("size", 25_000), max_drop=0.01)
    assert result.allocation["met"]
    assert io.serialized_size(result.model) <= 25_000
    assert result.accuracy_before - result.accuracy_after <= 0.01
    assert result.allocation["chosen"] and result.allocation["evaluations"] > 0


def test_search_ends_when_estimated_savings_exceed_the_whole_model(monkeypatch):
    """Per-layer savings measured alone can add up to more than the model: the re-aim loop
    must still end (it once shrank its aim forever) and report the target out of reach."""
    from types import SimpleNamespace

    from onnxslim_tool import allocation

    model = io.load("sample_models/digits_mlp.onnx")
    base = io.serialized_size(model)
    options = [Option(f"layer{i}", "share", 4, base, 0.001) for i in range(3)]
    monkeypatch.setattr(allocation, "measure_options", lambda *a, **k: (options, 0.0, len(options)))
    data = CalibrationData.from_npz("sample_models/digits_mlp_eval.npz")
    runs = []

    def run(passes):
        runs.append(passes)
        return SimpleNamespace(model=model)  # never smaller: the target is never met

    found, _ = allocation.search(model, Target("size", 1000), data, data, run)
    assert not found.met
    assert 1 <= len(runs) <= allocation.ATTEMPTS
    assert any("out of reach" in note for note in found.notes)
