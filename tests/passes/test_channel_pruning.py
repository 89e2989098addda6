"""ChannelPruning: criteria, ratios, protection and refits on tiny graphs and the sample CNN."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api, io
from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.passes.base import PassRecord
from onnxslim_tool.passes.channel_pruning import ChannelPruning
from onnxslim_tool.pipeline import check_model
from onnxslim_tool.pruning.importance import CRITERIA, GLOBAL
from onnxslim_tool.testing import run_proto

CNN = "sample_models/digits_cnn.onnx"
RNG = np.random.default_rng(0)


def _sample(name: str) -> CalibrationData:
    return CalibrationData.from_npz(f"sample_models/digits_cnn_{name}.npz")


@pytest.fixture(scope="module")
def cnn() -> ir.Model:
    return io.load(CNN)


@pytest.fixture(scope="module")
def calib(cnn) -> CalibrationData:
    return _sample("calib").validate(cnn)


def _prune(model: ir.Model, data: CalibrationData | None, **params) -> tuple[ir.Model, PassRecord]:
    """Run the pass directly on a copy (no pipeline), return the copy and the record."""
    copy = io.load(model, lift_constants=False)
    pruning = ChannelPruning(**params)
    pruning.calibration = data
    result = pruning(copy)
    check_model(result.model)
    return result.model, result.record


def _accuracy(model: ir.Model, data: CalibrationData) -> float:
    (logits,) = run_proto(ir.to_proto(model), {"input": data.inputs["input"]})
    return float((logits.argmax(axis=1) == data.labels).mean())


# ----- tiny graphs ----------------------------------------------------------------------------------


def _chain(first: np.ndarray, second: np.ndarray, relu: bool) -> onnx.ModelProto:
    """x -> Conv(first) [-> Relu] -> Conv(second, 3x3) -> Relu -> Conv(head): the middle group is prunable."""
    head = RNG.standard_normal((2, second.shape[0], 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1")]
    mid = "h"
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["r"], name="relu1"))
        mid = "r"
    nodes += [
        helper.make_node("Conv", [mid, "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["z"], name="relu2"),
        helper.make_node("Conv", ["z", "w3"], ["out"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(first.astype(np.float32), "w1"),
        numpy_helper.from_array(second.astype(np.float32), "w2"),
        numpy_helper.from_array(RNG.standard_normal(second.shape[0]).astype(np.float32), "b2"),
        numpy_helper.from_array(head, "w3"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", first.shape[1], 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 2, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# Prune a quarter of conv1's channels and nothing else.
ONLY_CONV1 = {"ratio": 0.0, "per_layer": {"conv1": 0.25}, "protect_ends": False}


def _tiny_data(channels: int, n: int = 32) -> CalibrationData:
    x = RNG.standard_normal((n, channels, 6, 6)).astype(np.float32)
    return CalibrationData.from_arrays({"x": x})


def _outputs(proto: onnx.ModelProto, data: CalibrationData) -> np.ndarray:
    return run_proto(proto, {"x": data.inputs["x"]})[0]


def test_removing_an_all_zero_filter_changes_nothing():
    first = RNG.standard_normal((4, 3, 1, 1))
    first[2] = 0.0  # channel 2 is always zero: the smallest L1 norm, and no contribution
    proto = _chain(first, RNG.standard_normal((5, 4, 3, 3)), relu=True)
    data = _tiny_data(3)
    for reconstruct in (False, True):
        model, record = _prune(ir.from_proto(proto), data, **ONLY_CONV1, reconstruct=reconstruct)
        assert [c.detail for c in record.changes] == ["kept 3/4 channels"]
        np.testing.assert_allclose(_outputs(ir.to_proto(model), data), _outputs(proto, data), atol=1e-5)


def test_refit_fuses_a_channel_the_kept_ones_explain():
    first = RNG.standard_normal((4, 3, 1, 1))
    first[3] = 0.05 * (first[0] - first[1])  # linear in the others and the smallest filter
    proto = _chain(first, RNG.standard_normal((5, 4, 3, 3)), relu=False)
    data = _tiny_data(3)
    want = _outputs(proto, data)
    sliced, _ = _prune(ir.from_proto(proto), data, **ONLY_CONV1, reconstruct=False)
    fused, record = _prune(ir.from_proto(proto), data, **ONLY_CONV1)
    sliced_error = np.linalg.norm(_outputs(ir.to_proto(sliced), data) - want) / np.linalg.norm(want)
    fused_error = np.linalg.norm(_outputs(ir.to_proto(fused), data) - want) / np.linalg.norm(want)
    # Not exactly 0: the ridge (1e-3 of the mean input power) pulls toward the sliced weights.
    assert fused_error < 2e-3 and fused_error < sliced_error / 20
    assert any(n.startswith("refit conv2") for n in record.notes)


def test_layers_downstream_of_the_readers_are_refit_too():
    proto = _chain(RNG.standard_normal((4, 3, 1, 1)), RNG.standard_normal((5, 4, 3, 3)), relu=True)
    _, record = _prune(ir.from_proto(proto), _tiny_data(3), **ONLY_CONV1)
    refits = [n.split(":")[0] for n in record.notes if "refit" in n]
    # conv2 reads the pruned channels; the head only sees conv2's (changed) output.
    assert [r.split()[-1] for r in refits] == ["conv2", "head"]


def test_zero_ratio_is_the_identity():
    proto = _chain(RNG.standard_normal((4, 3, 1, 1)), RNG.standard_normal((5, 4, 3, 3)), relu=True)
    data = _tiny_data(3)
    model, record = _prune(ir.from_proto(proto), data, ratio=0.0, protect_ends=False)
    assert not record.modified
    np.testing.assert_array_equal(_outputs(ir.to_proto(model), data), _outputs(proto, data))


def test_protected_ends_are_skipped_with_a_reason():
    proto = _chain(RNG.standard_normal((4, 3, 1, 1)), RNG.standard_normal((5, 4, 3, 3)), relu=True)
    _, record = _prune(ir.from_proto(proto), None, ratio=0.5)
    reasons = {s.layer: s.reason for s in record.skipped}
    assert "first layer" in reasons["conv1"] and "final layer" in reasons["conv2"]
    assert not record.modified


def test_exclude_skips_the_group_naming_the_node():
    proto = _chain(RNG.standard_normal((4, 3, 1, 1)), RNG.standard_normal((5, 4, 3, 3)), relu=True)
    _, record = _prune(ir.from_proto(proto), None, ratio=0.5, protect_ends=False, exclude=["conv2"])
    assert {s.layer: s.reason for s in record.skipped}["conv1"] == "excluded by --exclude (conv2)"


def test_include_limits_the_layers_touched():
    proto = _chain(RNG.standard_normal((4, 3, 1, 1)), RNG.standard_normal((5, 4, 3, 3)), relu=True)
    _, record = _prune(ir.from_proto(proto), None, ratio=0.5, protect_ends=False, include=["conv*"])
    assert [c.layer for c in record.changes] == ["conv1"]
    assert {s.layer: s.reason for s in record.skipped}["conv2"] == "not matched by --include (head)"


def test_round_to_keeps_multiples():
    proto = _chain(RNG.standard_normal((16, 3, 1, 1)), RNG.standard_normal((5, 16, 3, 3)), relu=True)
    params = {"ratio": 0.0, "per_layer": {"conv1": 0.3}, "protect_ends": False, "round_to": 4}
    model, record = _prune(ir.from_proto(proto), None, **params)
    assert [c.detail for c in record.changes] == ["kept 12/16 channels"]  # 11.2 rounds to 12
    assert ir.to_proto(model).graph.initializer[0].dims[0] == 12


# ----- data or not ------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_gamma", "random"])
def test_data_free_criteria_work_without_data(cnn, criterion):
    model, record = _prune(cnn, None, ratio=0.3, criterion=criterion)
    assert record.modified
    assert "no calibration data: consumers not refit (slice only)" in record.notes
    assert analyze_cost(model).total_macs < analyze_cost(cnn).total_macs


@pytest.mark.parametrize("criterion", ["apoz", "energy", "thinet", "dpp"])
def test_data_criteria_refuse_to_run_without_data(cnn, criterion):
    with pytest.raises(OnnxSlimError) as info:
        _prune(cnn, None, criterion=criterion)
    assert str(info.value) == f"criterion '{criterion}' needs calibration data: pass --data"


def test_bad_parameters_are_refused_at_construction():
    with pytest.raises(OnnxSlimError, match="unknown pruning criterion 'l3'; valid: l1, l2"):
        ChannelPruning(criterion="l3")
    with pytest.raises(OnnxSlimError, match="'thinet'"):
        ChannelPruning(criterion="taylor")
    with pytest.raises(OnnxSlimError, match="ratio must be in"):
        ChannelPruning(ratio=1.0)
    with pytest.raises(OnnxSlimError, match="target_macs must be in"):
        ChannelPruning(target_macs=0.0)
    with pytest.raises(OnnxSlimError, match="round_to"):
        ChannelPruning(round_to=0)


def test_milder_prunes_less_and_stops():
    assert ChannelPruning(ratio=0.4).milder().ratio == pytest.approx(0.3)
    assert ChannelPruning(target_macs=0.6).milder().target_macs == pytest.approx(0.7)
    assert ChannelPruning(ratio=0.06).milder() is None
    assert ChannelPruning(target_macs=0.95).milder() is None


# ----- the sample CNN ----------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_prunes_the_sample_cnn(cnn, calib, criterion):
    model, record = _prune(cnn, calib.subset(64), ratio=0.3, criterion=criterion, max_rows=2000)
    assert len(record.changes) == 3  # res_a and both concat branches; stem and pointwise protected
    assert not [n for n in record.notes if "scored by l1" in n]
    # nisp removes 30% of all channels by one global ranking: the cheap groups lose more.
    bound = 0.9 if criterion in GLOBAL else 0.8
    assert analyze_cost(model).total_macs < bound * analyze_cost(cnn).total_macs


def test_refit_recovers_most_of_what_slicing_loses(cnn, calib):
    """Measured (256 calibration samples, 450 test samples): fp32 0.9911; l1 at ratio 0.3
    keeps 0.9800 with the refit and 0.9378 slice-only."""
    test = _sample("eval").validate(cnn)
    refit, record = _prune(cnn, calib, ratio=0.3)
    sliced, _ = _prune(cnn, calib, ratio=0.3, reconstruct=False)
    assert _accuracy(refit, test) >= _accuracy(cnn, test) - 0.02
    assert _accuracy(sliced, test) < _accuracy(refit, test) - 0.03
    refits = [n.split(":")[0].split()[-1] for n in record.notes if "refit" in n]
    # res_b reads res_a's channels, pointwise the concat; the rest lie downstream of them.
    assert refits == [
        "/res_b/res_b.0/Conv",
        "/branch_1x1/Conv",
        "/branch_3x3/Conv",
        "/pointwise/pointwise.0/Conv",
        "/fc/Gemm",
    ]


def test_half_the_macs_within_one_point_of_fp32(cnn, calib):
    """The issue's goal, measured on the 450 test samples: fp32 0.9911, l1 at 50% MACs with
    the refit 0.9844 (cross-validated ridge, downstream layers refit toward the original)."""
    test = _sample("eval").validate(cnn)
    model, _ = _prune(cnn, calib, target_macs=0.5, criterion="l1")
    assert analyze_cost(model).total_macs <= 0.5 * analyze_cost(cnn).total_macs
    assert _accuracy(model, test) >= _accuracy(cnn, test) - 0.01


def test_target_macs_is_met_and_reported(cnn, calib):
    model, record = _prune(cnn, calib.subset(64), target_macs=0.5, max_rows=2000)
    assert analyze_cost(model).total_macs <= 0.5 * analyze_cost(cnn).total_macs
    assert any(n.startswith("MACs target 50.0%: pruned to 49") for n in record.notes)


def test_same_seed_same_model(cnn, calib):
    def weights(seed: int) -> list[np.ndarray]:
        model, _ = _prune(cnn, calib.subset(32), ratio=0.3, criterion="random", seed=seed, max_rows=500)
        return [v.const_value.numpy() for v in model.graph.initializers.values()]

    first, again, other = weights(1), weights(1), weights(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, other, strict=False))


def test_through_the_api_with_only_calibration_data():
    """What `compress --target-macs 0.5 --data calib.npz` runs: half the data fits, half judges."""
    result = api.compress(CNN, _sample("calib"), passes=[ChannelPruning(target_macs=0.5, max_rows=4000)])
    step = result.steps[0]
    assert step.status == "applied", step.reason
    assert result.after.macs <= 0.5 * result.before.macs
    assert result.accuracy_after > 0.9


def test_macs_target_counts_symbolic_spatial_dims_at_the_data_resolution():
    """Input [n, 3, H, W]: a full-resolution conv then a stride-4 one. Counted with H = W = 1,
    the stride-4 conv looks 2.7x costlier than the first; at the data's 16x16 it is 6x cheaper,
    so a plan sized at 1x1 leaves the real MACs over the target (0.78 where 0.7 was asked)."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="full", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wb"], ["b"], name="strided", pads=[1, 1, 1, 1], strides=[4, 4]),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Conv", ["rb", "wc"], ["out"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("wa", (8, 3, 3, 3)), ("wb", (8, 8, 3, 3)), ("wc", (2, 8, 1, 1)))
    ]
    graph = helper.make_graph(
        nodes,
        "strided",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 2, "oh", "ow"])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = CalibrationData.from_arrays({"x": RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)})
    model, record = _prune(ir.from_proto(proto), data, target_macs=0.7, protect_ends=False, reconstruct=False)
    shape = {"x": [1, 3, 16, 16]}
    reached = analyze_cost(model, shape).total_macs / analyze_cost(ir.from_proto(proto), shape).total_macs
    assert 0.6 < reached <= 0.7
    assert "MACs counted at the calibration data's input shape: x=1x3x16x16" in record.notes


def test_min_ridge_bounds_the_ridge_every_refit_uses():
    proto = _chain(RNG.standard_normal((4, 3, 1, 1)), RNG.standard_normal((5, 4, 3, 3)), relu=True)

    def refit_notes(samples: int, floor: float) -> list[str]:
        _, record = _prune(ir.from_proto(proto), _tiny_data(3, samples), **ONLY_CONV1, min_ridge=floor)
        return [n for n in record.notes if n.startswith(("refit", "kept slice"))]

    # 8 samples: few rows per unknown, so cross-validation chooses, from the floor up.
    chosen = [n for n in refit_notes(8, 0.5) if "held-out" in n]
    assert chosen and all("ridge " in n or "bias only" in n for n in chosen)
    assert min(float(n.split("ridge ")[1].rstrip(")")) for n in chosen if "ridge " in n) >= 0.5

    # 32 samples: plenty of rows, no cross-validation; the floor raises the default ridge, so
    # the fit stays nearer the slice and its training error is higher.
    def conv2_error(floor: float) -> float:
        note = next(n for n in refit_notes(32, floor) if n.startswith("refit conv2"))
        return float(note.split("-> ")[1].split()[0])

    assert conv2_error(0.5) > 1.1 * conv2_error(0.0)
    assert ChannelPruning(target_macs=0.6, min_ridge=0.1).milder().min_ridge == 0.1
    with pytest.raises(OnnxSlimError, match="min_ridge must be"):
        ChannelPruning(min_ridge=-1.0)


def _residual_stream(blocks: int) -> onnx.ModelProto:
    """Token ids -> embedding Gather -> blocks of h + Down(Relu(Up(h))), each then LayerNorm."""
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["h0"], name="embed")]
    inits = [numpy_helper.from_array(RNG.standard_normal((10, 8)).astype(np.float32), "embedding")]
    inits += [numpy_helper.from_array(np.ones(8, np.float32), n) for n in ("gamma", "beta")]
    for k in range(1, blocks + 1):
        inits += [
            numpy_helper.from_array(RNG.standard_normal((8, 16)).astype(np.float32), f"w_up{k}"),
            numpy_helper.from_array(RNG.standard_normal((16, 8)).astype(np.float32), f"w_down{k}"),
        ]
        nodes += [
            helper.make_node("MatMul", [f"h{k - 1}", f"w_up{k}"], [f"u{k}"], name=f"up{k}"),
            helper.make_node("Relu", [f"u{k}"], [f"r{k}"]),
            helper.make_node("MatMul", [f"r{k}", f"w_down{k}"], [f"d{k}"], name=f"down{k}"),
            helper.make_node("Add", [f"h{k - 1}", f"d{k}"], [f"s{k}"]),
            helper.make_node("LayerNormalization", [f"s{k}", "gamma", "beta"], [f"h{k}"], axis=-1),
        ]
    graph = helper.make_graph(
        nodes,
        "stream",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5])],
        [helper.make_tensor_value_info(f"h{blocks}", TensorProto.FLOAT, ["n", 5, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_residual_stream_protects_only_the_embedding_and_the_final_block():
    """From the token ids the skip connections reach every block without a weighted layer in
    between; ends are the embedding lookup and the final block, not every block."""
    model, record = _prune(ir.from_proto(_residual_stream(3)), None, ratio=0.5)
    pruned = {c.layer for c in record.changes}
    reasons = {s.layer: s.reason for s in record.skipped}
    assert pruned == {"up1", "up2"}
    assert "final layer" in reasons["up3"]
    assert (
        analyze_cost(model, {"ids": [1, 5]}).total_macs
        < analyze_cost(ir.from_proto(_residual_stream(3)), {"ids": [1, 5]}).total_macs
    )
