"""entropy, nisp and random-search: score functions on hand-made arrays, then end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import io
from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.passes.base import PassRecord
from onnxslim_tool.passes.channel_pruning import ChannelPruning, _global_counts
from onnxslim_tool.pipeline import check_model
from onnxslim_tool.pruning import importance as imp
from onnxslim_tool.pruning.groups import DependencyGroup
from onnxslim_tool.pruning.nisp import propagate
from onnxslim_tool.pruning.reconstruct import FitStats
from onnxslim_tool.testing import run_proto

RNG = np.random.default_rng(0)
NEW = ("entropy", "nisp", "random-search")


# ----- score functions --------------------------------------------------------------------------


def test_entropy_ranks_constant_below_narrow_below_wide():
    samples = 400
    pooled = np.column_stack(
        [
            RNG.uniform(-1, 1, samples),  # spread over the whole range
            np.full(samples, 0.3),  # constant: one bin
            RNG.uniform(-0.05, 0.05, samples),  # barely varies: a bin or two
        ]
    )
    scores = imp.entropy(pooled)
    assert scores[1] == 0.0
    assert scores[1] < scores[2] < scores[0]
    assert scores[0] == pytest.approx(np.log(16), abs=0.1)  # uniform over 16 bins


def test_entropy_averages_the_span_and_survives_all_equal_input():
    pooled = RNG.standard_normal((200, 3, 4))
    pooled[:, 2] = 1.0
    assert np.argmin(imp.entropy(pooled)) == 2
    np.testing.assert_array_equal(imp.entropy(np.ones((50, 3))), np.zeros(3))


def test_nisp_through_weight_sums_the_kernel_and_respects_groups():
    weight = np.array([[[1.0, -2.0], [0.5, 0.0]], [[0.0, 1.0], [-3.0, 1.0]]])  # [2 out, 2 in, 2 taps]
    np.testing.assert_allclose(imp.nisp_through_weight(np.array([1.0, 2.0]), weight), [3 + 2, 0.5 + 8])
    # Two groups of one channel: input c reaches output c only.
    grouped = np.array([[[2.0, -1.0]], [[4.0, 0.0]]])  # [2 out, 1 in per group, 2 taps]
    np.testing.assert_allclose(imp.nisp_through_weight(np.array([1.0, 0.5]), grouped, groups=2), [3.0, 2.0])


def _mlp(first: np.ndarray, second: np.ndarray) -> onnx.ModelProto:
    """x -> Gemm(first, transB) -> Relu -> Gemm(second, transB) -> y."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", first.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", second.shape[0]])],
        [
            numpy_helper.from_array(first.astype(np.float32), "w1"),
            numpy_helper.from_array(second.astype(np.float32), "w2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_nisp_propagates_uniform_final_importance_through_a_two_layer_chain():
    first = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 hidden from 2 inputs
    second = np.array([[0.1, 2.0, -1.0], [0.1, -1.0, 0.5]])  # 2 outputs from 3 hidden
    model = ir.from_proto(_mlp(first, second))
    result = propagate(model)
    hidden = result.channels("h", 3)
    np.testing.assert_allclose(hidden, [0.2, 3.0, 1.5])  # |W2|^T [1, 1]
    assert list(np.argsort(hidden)) == [0, 2, 1]
    np.testing.assert_allclose(result.channels("x", 2), np.abs(first).T @ hidden)
    assert result.blocked == {}


def test_refit_residual_matches_a_direct_least_squares_fit():
    x = RNG.standard_normal((300, 4))
    x[:, 3] = 2 * x[:, 0] - x[:, 1]  # column 3 is explained by columns 0 and 1
    w = RNG.standard_normal((4, 2))
    y = x @ w
    stats = FitStats(4, 2)
    stats.add(x, y)
    kept = np.array([0, 2])
    design = np.hstack([x[:, kept], np.ones((300, 1))])
    direct = ((design @ np.linalg.lstsq(design, y, rcond=None)[0] - y) ** 2).sum()
    ridge_free = imp.refit_residual(stats.gram, stats.cross, stats.target_sq, kept, ridge=0.0)
    assert ridge_free == pytest.approx(direct, rel=1e-6)
    # Dropping the redundant column costs nothing once the others are refit.
    assert imp.refit_residual(stats.gram, stats.cross, stats.target_sq, np.array([0, 1, 2])) < 1e-3 * direct


def test_random_search_keeps_the_lowest_error_mask_and_is_seeded():
    cost = np.array([5.0, 0.1, 3.0, 0.2, 4.0, 0.3])  # error = cost of the removed channels

    def error(kept: np.ndarray) -> float:
        return float(cost.sum() - cost[kept].sum())

    best, errors = imp.random_mask_search(error, 6, 3, trials=30, seed=1)
    assert len(errors) == 30 and error(best) == min(errors)
    assert min(errors) < max(errors)
    again, _ = imp.random_mask_search(error, 6, 3, trials=30, seed=1)
    np.testing.assert_array_equal(best, again)
    other = [imp.random_mask_search(error, 6, 3, trials=1, seed=s)[0] for s in range(5)]
    assert len({tuple(o) for o in other}) > 1  # seeds give different masks
    blocked, _ = imp.random_mask_search(error, 6, 2, trials=5, seed=2, blocks=2)
    assert [int((blocked < 3).sum()), int((blocked >= 3).sum())] == [1, 1]


def test_scores_from_mask_put_the_mask_first_then_the_base_order():
    scores = imp.scores_from_mask(np.array([1, 3]), base=np.array([0.9, 0.1, 0.5, 0.2]))
    assert list(np.argsort(-scores)) == [3, 1, 0, 2]


def test_global_counts_take_the_globally_lowest_channels():
    flat = DependencyGroup(0, 10)
    skewed = DependencyGroup(1, 10)
    scores = {0: np.ones(10), 1: np.array([3.0, 3, 2, 1, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1])}
    assert _global_counts([flat, skewed], scores, 4, round_to=1) == {0: 10, 1: 6}
    # The floor (10% of a group, at least one unit) holds however large the budget.
    assert _global_counts([flat, skewed], scores, 20, round_to=1) == {0: 1, 1: 1}
    # Removals round to the unit.
    assert _global_counts([flat, skewed], scores, 5, round_to=2) == {0: 10, 1: 4}


def test_criteria_are_registered():
    assert set(NEW) <= set(imp.CRITERIA)
    assert not imp.needs_data("nisp")
    assert imp.needs_data("entropy") and imp.needs_data("random-search")
    for name in NEW:
        assert imp.check_criterion(name) == name


# ----- through the pass on a tiny model ---------------------------------------------------------


def _chain(first: np.ndarray, bias: np.ndarray, second: np.ndarray, head: np.ndarray) -> onnx.ModelProto:
    """x -> Conv(first, bias) -> Relu -> Conv(second, 3x3) -> Relu -> Conv(head) -> out."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["z"], name="relu2"),
        helper.make_node("Conv", ["z", "w3"], ["out"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(np.asarray(a, dtype=np.float32), n)
        for a, n in ((first, "w1"), (bias, "b1"), (second, "w2"), (head, "w3"))
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", first.shape[1], 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", head.shape[0], 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _weights(channels: int = 4, middle: int = 5) -> tuple[np.ndarray, ...]:
    first = RNG.standard_normal((channels, 3, 1, 1))
    bias = np.full(channels, 0.5)
    return first, bias, RNG.standard_normal((middle, channels, 3, 3)), RNG.standard_normal((2, middle, 1, 1))


def _data(n: int = 48) -> CalibrationData:
    return CalibrationData.from_arrays({"x": RNG.standard_normal((n, 3, 6, 6)).astype(np.float32)})


def _prune(proto: onnx.ModelProto, data: CalibrationData | None, **params) -> tuple[ir.Model, PassRecord]:
    pruning = ChannelPruning(**params)
    pruning.calibration = data
    result = pruning(ir.from_proto(proto))
    check_model(result.model)
    return result.model, result.record


def _kept_filters(model: ir.Model, name: str = "w1") -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


# Remove a quarter of conv1's channels (one of four) and nothing else.
ONLY_CONV1 = {"ratio": 0.0, "per_layer": {"conv1": 0.25}, "protect_ends": False}


def test_entropy_removes_the_channel_whose_response_never_changes():
    first, bias, second, head = _weights()
    first[2] = 0.0  # channel 2 outputs its bias whatever the input: zero entropy
    model, record = _prune(_chain(first, bias, second, head), _data(), criterion="entropy", **ONLY_CONV1)
    assert [c.detail for c in record.changes] == ["kept 3/4 channels"]
    np.testing.assert_array_equal(_kept_filters(model), first[[0, 1, 3]].astype(np.float32))


def test_nisp_removes_the_channel_the_next_layer_barely_reads_without_data():
    first, bias, second, head = _weights()
    second[:, 1] *= 1e-3  # conv2 hardly reads channel 1: little importance flows back to it
    model, record = _prune(_chain(first, bias, second, head), None, criterion="nisp", **ONLY_CONV1)
    assert [c.detail for c in record.changes] == ["kept 3/4 channels"]
    np.testing.assert_array_equal(_kept_filters(model), first[[0, 2, 3]].astype(np.float32))


def test_nisp_global_ratio_takes_channels_where_importance_is_lowest():
    first, bias, second, head = _weights()
    head[:, [0, 3]] *= 1e-3  # conv2's channels 0 and 3 barely reach the output
    model, record = _prune(
        _chain(first, bias, second, head), None, criterion="nisp", ratio=0.2, protect_ends=False
    )
    # round(0.2 * (4 + 5)) = 2 channels go, both from conv2's group, none from conv1's.
    assert [c.detail for c in record.changes] == ["kept 3/5 channels"]
    np.testing.assert_array_equal(
        _kept_filters(model, "w2")[:, :, 1, 1], second[[1, 2, 4], :, 1, 1].astype(np.float32)
    )


def test_random_search_removes_a_duplicate_channel_the_refit_restores():
    first, bias, second, head = _weights()
    first[3], bias[3] = first[0], bias[0]  # channel 3 repeats channel 0: one of them is free to go
    model, record = _prune(
        _chain(first, bias, second, head), _data(), criterion="random-search", search_trials=8, **ONLY_CONV1
    )
    kept = _kept_filters(model)
    assert kept.shape[0] == 3
    assert sum(np.allclose(k, first[0]) for k in kept) == 1  # exactly one of the pair kept
    note = next(n for n in record.notes if "random masks" in n)
    assert note.startswith("conv1: best of 8 random masks, relative refit error 0.0000")


def test_random_search_is_seeded_and_takes_its_trials_as_a_parameter():
    first, bias, second, head = _weights(channels=12)
    proto, data = _chain(first, bias, second, head), _data()
    params = {"criterion": "random-search", "ratio": 0.0, "per_layer": {"conv1": 0.5}, "protect_ends": False}
    assert ChannelPruning(**params, search_trials=5).params()["search_trials"] == 5
    runs = [_kept_filters(_prune(proto, data, **params, seed=s)[0]) for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])  # 6 of 12 channels: another seed, another mask
    assert ChannelPruning(criterion="random-search", ratio=0.4, search_trials=5).milder().search_trials == 5
    with pytest.raises(OnnxSlimError, match="search_trials"):
        ChannelPruning(search_trials=0)


@pytest.mark.parametrize("criterion", ["entropy", "random-search"])
def test_data_driven_new_criteria_refuse_to_run_without_data(criterion):
    with pytest.raises(OnnxSlimError, match=f"criterion '{criterion}' needs calibration data"):
        _prune(_chain(*_weights()), None, criterion=criterion, **ONLY_CONV1)


# ----- the sample CNN ---------------------------------------------------------------------------

CNN = "sample_models/digits_cnn.onnx"


@pytest.fixture(scope="module")
def cnn() -> ir.Model:
    return io.load(CNN)


@pytest.fixture(scope="module")
def samples(cnn) -> tuple[CalibrationData, CalibrationData]:
    calib = CalibrationData.from_npz("sample_models/digits_cnn_calib.npz").validate(cnn)
    test = CalibrationData.from_npz("sample_models/digits_cnn_eval.npz").validate(cnn)
    return calib.subset(64), test


@pytest.mark.parametrize("criterion", NEW)
def test_half_the_macs_of_the_sample_cnn_runs_and_stays_accurate(cnn, samples, criterion):
    calib, test = samples
    pruning = ChannelPruning(criterion=criterion, target_macs=0.5, max_rows=2000, search_trials=4)
    pruning.calibration = calib
    result = pruning(io.load(cnn, lift_constants=False))
    check_model(result.model)
    assert not [n for n in result.record.notes if "scored by l1" in n]
    assert analyze_cost(result.model).total_macs <= 0.5 * analyze_cost(cnn).total_macs
    assert len(ir.to_proto(result.model).SerializeToString()) < len(ir.to_proto(cnn).SerializeToString())
    (logits,) = run_proto(ir.to_proto(result.model), {"input": test.inputs["input"]})
    assert float((logits.argmax(axis=1) == test.labels).mean()) > 0.95  # fp32: 0.9911


def test_nisp_prunes_the_sample_cnn_without_data_and_unevenly(cnn):
    pruning = ChannelPruning(criterion="nisp", ratio=0.3)
    result = pruning(io.load(cnn, lift_constants=False))
    check_model(result.model)
    kept = sorted(c.detail for c in result.record.changes)
    assert len(set(kept)) > 1  # one global ranking: the groups lose different shares
    assert analyze_cost(result.model).total_macs < analyze_cost(cnn).total_macs


def test_nisp_names_the_ops_it_cannot_pass_and_still_scores_attention_heads():
    model = io.load("sample_models/digits_transformer.onnx")
    result = ChannelPruning(criterion="nisp", ratio=0.3)(model)
    check_model(result.model)
    blocked = [n for n in result.record.notes if n.startswith("nisp: importance cannot pass through")]
    assert len(blocked) == 1 and "Softmax" in blocked[0] and "Transpose" in blocked[0]
    # Heads: the walk stops at the attention Reshape, so the out-projection's |W| scores them.
    assert not [n for n in result.record.notes if "scored by l1" in n]
    assert result.record.changes
