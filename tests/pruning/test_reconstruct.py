"""Reconstruction: patches match onnxruntime's convolution, the ridge fit recovers what it can."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.graph_utils import const_array
from onnxslim_tool.pruning.reconstruct import (
    ALPHA_GRID,
    ConvGeometry,
    FitStats,
    as_linear_layer,
    conv_patches,
    cross_validate,
    match_spread,
    refit_layers,
    ridge_grid,
    ridge_solve,
    sample_positions,
)
from onnxslim_tool.testing import run_proto

RNG = np.random.default_rng(0)


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.mark.parametrize(
    ("attrs", "group"),
    [
        ({"kernel_shape": [3, 3], "pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}, 1),
        ({"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}, 1),
        ({"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"}, 2),
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 4),
    ],
)
def test_patches_times_weights_is_the_onnxruntime_conv(attrs, group):
    x, w = _f32(2, 4, 7, 6), _f32(8, 4 // group, *attrs["kernel_shape"])
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group, **attrs)
    proto = _model([node], [_vi("x", x.shape)], [_vi("y", None)], [numpy_helper.from_array(w, "w")])
    (y,) = run_proto(proto, {"x": x})
    conv = ir.from_proto(proto).graph.node(0)
    geometry = ConvGeometry.of(conv, w.shape, x.shape[2:])
    assert geometry.output_spatial(x.shape[2:]) == y.shape[2:]
    samples, coords = sample_positions((2, *y.shape[2:]), 15, np.random.default_rng(1))
    patches = conv_patches(x.astype(np.float64), geometry, samples, coords)
    per_group_in, per_group_out = 4 // group, 8 // group
    got = np.concatenate(
        [
            np.einsum(
                "rct,oct->ro",
                patches[:, g * per_group_in : (g + 1) * per_group_in],
                w[g * per_group_out : (g + 1) * per_group_out].reshape(per_group_out, per_group_in, -1),
            )
            for g in range(group)
        ],
        axis=1,
    )
    want = y[(samples, slice(None), *coords.T)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sample_positions_are_distinct_and_capped():
    n, coords = sample_positions((3, 4, 5), 1000, np.random.default_rng(0))
    assert len(n) == 60  # fewer positions than asked: take them all
    n, coords = sample_positions((3, 4, 5), 7, np.random.default_rng(0))
    assert len({(a, *c) for a, c in zip(n, coords, strict=True)}) == 7


def _stats(x: np.ndarray, y: np.ndarray) -> FitStats:
    stats = FitStats(x.shape[1], y.shape[1])
    for part in np.array_split(np.arange(len(x)), 3):  # streamed in batches like real captures
        stats.add(x[part], y[part])
    return stats


def test_fusion_recovers_exactly_a_removed_channel_that_kept_ones_explain():
    kept = RNG.standard_normal((500, 3))
    removed = kept @ np.array([0.5, -1.0, 2.0]) + 0.7  # a linear combination plus a constant
    w, b = RNG.standard_normal((4, 2)), RNG.standard_normal(2)
    y = np.column_stack([kept, removed]) @ w + b
    stats = _stats(kept, y)
    fit_w, fit_b = ridge_solve(stats, w[:3], b, alpha=1e-9)
    assert stats.residual(w[:3], b) > 1.0  # slicing alone is badly off
    assert stats.residual(fit_w, fit_b) / stats.target_sq < 1e-12
    np.testing.assert_allclose(fit_w, w[:3] + np.outer([0.5, -1.0, 2.0], w[3]), atol=1e-6)
    np.testing.assert_allclose(fit_b, b + 0.7 * w[3], atol=1e-6)


def test_refit_reduces_the_error_when_the_removed_channel_is_independent():
    x = RNG.standard_normal((400, 5))
    w = RNG.standard_normal((5, 3))
    y = x @ w
    stats = _stats(x[:, :4], y)
    fit_w, fit_b = ridge_solve(stats, w[:4], np.zeros(3))
    assert stats.residual(fit_w, fit_b) <= stats.residual(w[:4], np.zeros(3))


def test_ridge_pulls_toward_the_sliced_weights_not_toward_zero():
    x = RNG.standard_normal((6, 4))  # fewer rows than unknowns + bias: the prior decides
    w0 = RNG.standard_normal((4, 2))
    stats = _stats(x, x @ w0 + RNG.standard_normal((6, 2)))
    strong, _ = ridge_solve(stats, w0, np.zeros(2), alpha=1e6)
    np.testing.assert_allclose(strong, w0, atol=1e-3)


def test_bias_can_be_held_fixed():
    x = RNG.standard_normal((200, 3))
    y = x @ RNG.standard_normal((3, 2)) + 5.0
    stats = _stats(x, y)
    _, b = ridge_solve(stats, np.zeros((3, 2)), np.zeros(2), fit_bias=False)
    np.testing.assert_array_equal(b, 0.0)
    _, b = ridge_solve(stats, np.zeros((3, 2)), np.zeros(2), alpha=1e-9, fit_bias=True)
    np.testing.assert_allclose(b, 5.0, atol=1e-6)


def test_infinite_ridge_keeps_the_weights_and_fits_only_the_bias():
    x = RNG.standard_normal((300, 3))
    w0 = RNG.standard_normal((3, 2))
    stats = _stats(x, x @ w0 + np.array([1.5, -2.0]))
    fit_w, fit_b = ridge_solve(stats, w0, np.zeros(2), alpha=math.inf)
    np.testing.assert_array_equal(fit_w, w0)
    np.testing.assert_allclose(fit_b, [1.5, -2.0], atol=1e-9)


def test_match_spread_undoes_the_shrinkage_of_a_fit_on_noisy_inputs():
    signal = RNG.standard_normal((4000, 1))
    noisy = signal + RNG.standard_normal((4000, 1))  # the pruned model's input: signal plus error
    y = 3.0 * signal + 1.0
    stats = _stats(noisy, y)
    fit_w, fit_b = ridge_solve(stats, np.zeros((1, 1)), np.zeros(1), alpha=1e-9)
    assert 1.3 < fit_w[0, 0] < 1.7  # least squares halves the slope (regression dilution)
    wide_w, wide_b = match_spread(stats, fit_w, fit_b)
    prediction = noisy @ wide_w + wide_b
    assert prediction.std() == pytest.approx(y.std(), rel=1e-6)
    assert prediction.mean() == pytest.approx(y.mean(), rel=1e-6)
    # Never narrows: an output already as wide as its target is left alone.
    same_w, same_b = match_spread(_stats(signal, y), np.array([[3.0]]), np.array([1.0]))
    np.testing.assert_allclose([same_w[0, 0], same_b[0]], [3.0, 1.0], atol=1e-9)


def _folds(x: np.ndarray, y: np.ndarray, k: int = 4) -> list[list[FitStats]]:
    return [[_stats(x[part], y[part])] for part in np.array_split(np.arange(len(x)), k)]


def test_cross_validation_refuses_to_interpolate_noise_with_few_rows():
    # 40 rows, 60 inputs: a weak ridge fits the calibration rows exactly, noise included,
    # and predicts held-out rows worse than the sliced weights do.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 60))
    w0 = rng.standard_normal((60, 3))
    y = x @ w0 + 0.5 * rng.standard_normal((40, 3))
    alpha, before, after = cross_validate(_folds(x, y), [(w0, np.zeros(3))])
    assert alpha >= 1.0
    assert after < 1.1 * before  # about the slice's own error: the noise is not learnt


def test_a_ridge_floor_keeps_directions_the_calibration_data_barely_excites():
    """Input 4 hardly varies on the calibration rows, so held-out calibration rows cannot show
    what bending its weight costs: here cross-validation picks the weakest ridge, which fits
    the noise through that input and errs by 10x where it does vary. A floor of 0.1 keeps
    its weight near the slice's. (A trade-off: the floor also pulls the other weights.)"""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((5, 2))
    w_true = w0 + 0.05 * rng.standard_normal((5, 2)) * np.array([[1], [1], [1], [1], [0]])
    calib = rng.standard_normal((200, 5)) * np.array([1, 1, 1, 1, 0.05])
    y = calib @ w_true + 0.1 * rng.standard_normal((200, 2))
    unseen = rng.standard_normal((500, 5))

    def fit(grid) -> tuple[float, float]:
        alpha, _, _ = cross_validate(_folds(calib, y), [(w0, np.zeros(2))], grid=grid)
        w, b = ridge_solve(_stats(calib, y), w0, np.zeros(2), alpha)
        return alpha, float(np.sqrt(((unseen @ w + b - unseen @ w_true) ** 2).mean()))

    assert ridge_grid(0.1) == (0.1, 1.0, math.inf) and ridge_grid(0.0) == ALPHA_GRID
    (weak, free_error), (floor, floor_error) = fit(ALPHA_GRID), fit(ridge_grid(0.1))
    assert weak == ALPHA_GRID[0] and floor == 0.1
    assert floor_error < 0.2 * free_error


def test_cross_validation_picks_a_weak_ridge_when_rows_are_plentiful():
    x = RNG.standard_normal((2000, 5))
    w_true, w0 = RNG.standard_normal((5, 2)), RNG.standard_normal((5, 2))
    alpha, before, after = cross_validate(_folds(x, x @ w_true), [(w0, np.zeros(2))])
    assert alpha <= 1e-2
    assert after < 0.01 * before


# ----- whole layers in a model ------------------------------------------------------------------


def _two_layer(kind: str, mix: np.ndarray) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Original and hand-pruned model: layer 1 makes 3 channels, the third a combination of the others.

    Layer 2 (Conv/Gemm/MatMul+Add) reads all 3; the pruned model drops channel 2 from both.
    """
    w1 = _f32(2, 4) if kind != "conv" else _f32(2, 4, 1, 1)
    w1_full = np.concatenate([w1, np.tensordot(mix, w1, axes=1)[None]], axis=0).astype(np.float32)
    if kind == "conv":
        w2, b2 = _f32(5, 3, 3, 3), _f32(5)
    else:
        w2, b2 = _f32(5, 3), _f32(5)
    models = []
    for channels in (3, 2):
        a, b = w1_full[:channels], w2[:, :channels]
        if kind == "conv":
            nodes = [
                helper.make_node("Conv", ["x", "w1"], ["h"], name="l1"),
                helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="l2", pads=[1, 1, 1, 1]),
            ]
            inits = [numpy_helper.from_array(a, "w1"), numpy_helper.from_array(b, "w2")]
            x_shape = [2, 4, 5, 5]
        elif kind == "gemm":
            nodes = [
                helper.make_node("Gemm", ["x", "w1"], ["h"], name="l1", transB=1),
                helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="l2", transB=1, alpha=2.0, beta=0.5),
            ]
            inits = [numpy_helper.from_array(a, "w1"), numpy_helper.from_array(b, "w2")]
            x_shape = [2, 4]
        else:
            nodes = [
                helper.make_node("MatMul", ["x", "w1"], ["h"], name="l1"),
                helper.make_node("MatMul", ["h", "w2"], ["m"], name="l2"),
                helper.make_node("Add", ["m", "b2"], ["y"], name="bias"),
            ]
            inits = [numpy_helper.from_array(a.T.copy(), "w1"), numpy_helper.from_array(b.T.copy(), "w2")]
            x_shape = [2, 3, 4]
        inits.append(numpy_helper.from_array(b2, "b2"))
        y_shape = {"conv": ["n", 5, 5, 5], "gemm": ["n", 5], "matmul": ["n", 3, 5]}[kind]
        models.append(_model(nodes, [_vi("x", ["n", *x_shape[1:]])], [_vi("y", y_shape)], inits))
    return models[0], models[1]


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_refit_layers_fuses_a_dependent_channel_back_exactly(kind):
    original, pruned = _two_layer(kind, np.array([0.8, -1.5]))
    x = _f32(40, 4, 5, 5) if kind == "conv" else (_f32(40, 4) if kind == "gemm" else _f32(40, 3, 4))
    feeds = [{"x": x[i : i + 10]} for i in range(0, 40, 10)]
    pruned_ir, original_ir = ir.from_proto(pruned), ir.from_proto(original)
    layer = as_linear_layer(next(n for n in pruned_ir.graph if n.name == "l2"))
    (result,) = refit_layers(pruned_ir, original_ir, [layer], feeds, alpha=1e-10)
    assert result.applied and result.error_before > 0.05 and result.error_after < 1e-4
    (want,) = run_proto(original, {"x": x})
    (got,) = run_proto(ir.to_proto(pruned_ir), {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_refit_adds_a_bias_to_a_conv_that_had_none():
    original, pruned = _two_layer("conv", np.array([0.3, 0.3]))
    pruned_ir = ir.from_proto(pruned)
    conv = next(n for n in pruned_ir.graph if n.name == "l2")
    conv.resize_inputs(2)  # drop the bias: the refit must add one back
    x = _f32(20, 4, 5, 5)
    refit_layers(pruned_ir, ir.from_proto(original), [as_linear_layer(conv)], [{"x": x}], alpha=1e-10)
    assert len(conv.inputs) == 3 and const_array(conv.inputs[2]).shape == (5,)
    onnx.checker.check_model(ir.to_proto(pruned_ir), full_check=True)


def test_unsupported_layers_say_why():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c")
    proto = _model([node], [_vi("x", [1, 2, 4, 4]), _vi("w", [3, 2, 1, 1])], [_vi("y", None)], [])
    reason = as_linear_layer(ir.from_proto(proto).graph.node(0))
    assert reason == "Conv without a constant weight"


def _gemm_chain(weights: list[np.ndarray]) -> onnx.ModelProto:
    nodes, inits, current = [], [], "x"
    for i, w in enumerate(weights):
        nodes.append(helper.make_node("Gemm", [current, f"w{i}"], [f"g{i}"], name=f"l{i}"))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        current = f"g{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes[-1].output[0] = "y"
    return _model(nodes, [_vi("x", ["n", 6])], [_vi("y", ["n", 6])], inits)


def test_sharing_one_original_run_across_waves_changes_no_fit(monkeypatch):
    """Targets read for many waves in one run of the original give the fits one run each gives."""
    import onnxslim_tool.pruning.reconstruct as reconstruct

    weights = [_f32(6, 6) for _ in range(4)]
    original = _gemm_chain(weights)
    pruned = _gemm_chain([w + 0.3 * _f32(6, 6) for w in weights])
    feeds = [{"x": _f32(8, 6)} for _ in range(3)]

    def refit(chunk_waves: int) -> list[np.ndarray]:
        monkeypatch.setattr(reconstruct, "MAX_CHUNK_WAVES", chunk_waves)
        model = ir.from_proto(pruned)
        layers = [as_linear_layer(n) for n in model.graph if n.op_type == "Gemm"]
        results = refit_layers(model, ir.from_proto(original), layers, feeds, alpha=1e-3)
        assert len(results) == 4 and all(r.applied for r in results)
        return [const_array(layer.node.inputs[1]) for layer in layers]

    chain = [as_linear_layer(n) for n in ir.from_proto(pruned).graph if n.op_type == "Gemm"]
    waves = reconstruct._waves(chain)
    assert [len(w) for w in waves] == [1, 1, 1, 1]  # a chain: each fit waits for the one before
    assert len(reconstruct._chunk(waves, 100, {})) == 4
    assert len(reconstruct._chunk(waves, reconstruct.TARGET_BYTES // 48, {})) == 2  # half the budget each
    one_each, shared = refit(1), refit(8)
    for a, b in zip(one_each, shared, strict=True):
        np.testing.assert_array_equal(a, b)
