"""VBMF rank selection: the EVBMF estimate itself, and the pass's rank_rule="vbmf"."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.lowrank.vbmf import noise_and_rank, threshold_signal, vbmf_rank
from onnxslim_tool.passes.lowrank import LowRank
from onnxslim_tool.recipe import Recipe


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def _low_rank_plus_noise(shape: tuple[int, int], rank: int, sigma: float, seed: int) -> np.ndarray:
    """Signal singular values 3-6 x the largest noise singular value (about sigma (sqrt L + sqrt M))."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    values = np.linspace(3.0, 6.0, rank) * sigma * (math.sqrt(rows) + math.sqrt(cols))
    signal = (_orthonormal(rng, rows, rank) * values) @ _orthonormal(rng, cols, rank).T
    return signal + sigma * rng.standard_normal(shape)


def test_threshold_is_the_zero_of_the_free_energy_gain():
    assert threshold_signal(1.0) == pytest.approx(2.5129, abs=1e-3)  # the constant of the paper
    for alpha in (0.1, 0.5, 0.9):
        t = threshold_signal(alpha)
        assert math.log1p(t) + alpha * math.log1p(t / alpha) - t == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("shape", "rank", "sigma"),
    [((60, 100), 5, 1.0), ((100, 60), 8, 0.5), ((200, 300), 20, 2.0), ((64, 576), 10, 0.1)],
)
def test_vbmf_recovers_the_rank_and_the_noise_of_a_low_rank_matrix(shape, rank, sigma):
    matrix = _low_rank_plus_noise(shape, rank, sigma, seed=rank)
    assert vbmf_rank(matrix) == rank
    sigma2, found = noise_and_rank(np.linalg.svd(matrix, compute_uv=False), shape)
    assert found == rank
    assert sigma2 == pytest.approx(sigma**2, rel=0.1)


def test_pure_noise_has_rank_zero():
    assert vbmf_rank(np.random.default_rng(0).standard_normal((50, 80))) == 0
    assert noise_and_rank(np.zeros(5), (5, 7)) == (0.0, 0)


def _tucker_conv(c_out: int, c_in: int, r1: int, r2: int, sigma: float) -> onnx.ModelProto:
    """A 3x3 conv whose kernel has Tucker ranks (r1 inputs, r2 outputs), plus noise."""
    rng = np.random.default_rng(7)
    core = rng.standard_normal((r2, r1, 3, 3))
    kernel = np.einsum("oa,ib,abyx->oiyx", _orthonormal(rng, c_out, r2), _orthonormal(rng, c_in, r1), core)
    kernel += sigma * rng.standard_normal(kernel.shape)
    weight = numpy_helper.from_array(kernel.astype(np.float32), "W")
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", pads=[1, 1, 1, 1])
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c_in, 16, 16])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_tucker_with_vbmf_finds_the_kernels_tucker_ranks():
    model = ir.from_proto(_tucker_conv(64, 48, r1=12, r2=16, sigma=0.01))
    record = LowRank(method="tucker", rank_rule="vbmf", refit=False)(model).record
    assert record.changes[0].detail.startswith("tucker rank 12x16;"), record.changes[0].detail


def test_vbmf_on_a_dense_layer_and_a_channel_svd():
    weight = _low_rank_plus_noise((96, 80), 7, 0.05, seed=3).astype(np.float32)
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 96])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    record = LowRank(rank_rule="vbmf", refit=False)(ir.from_proto(proto)).record
    assert record.changes[0].detail.startswith("svd rank 7;")
    model = ir.from_proto(_tucker_conv(64, 48, r1=12, r2=16, sigma=0.01))
    record = LowRank(method="svd", rank_rule="vbmf", refit=False)(model).record
    assert record.changes[0].detail.startswith("svd rank 16;")  # the output mode's rank


def test_per_layer_ratios_still_override_vbmf():
    model = ir.from_proto(_tucker_conv(64, 48, r1=12, r2=16, sigma=0.01))
    record = LowRank(method="svd", rank_rule="vbmf", per_layer={"conv": 0.5}, refit=False)(model).record
    rank = int(record.changes[0].detail.split()[2].rstrip(";"))
    assert rank * (48 * 9 + 64) <= 0.5 * 64 * 48 * 9 and rank > 16


def test_vbmf_settings_that_cannot_work_are_refused_and_it_has_no_milder_form():
    with pytest.raises(OnnxSlimError, match="CP needs a tensor rank"):
        LowRank(method="cp", rank_rule="vbmf")
    with pytest.raises(OnnxSlimError, match="unknown rank rule"):
        LowRank(rank_rule="bayes")
    with pytest.raises(OnnxSlimError, match="needs an energy"):
        LowRank(rank_rule="energy")
    assert LowRank(method="tucker", rank_rule="vbmf").milder() is None
    assert LowRank(ratio=0.5).milder().rank_rule == "ratio"


def test_a_recipe_file_can_ask_for_vbmf():
    recipe = Recipe.from_dict({"passes": [{"pass": "lowrank", "method": "tucker", "rank_rule": "vbmf"}]})
    (lowrank,) = recipe.build()
    assert (
        isinstance(lowrank, LowRank)
        and lowrank.rank_rule == "vbmf"
        and lowrank.params()["rank_rule"] == "vbmf"
    )
