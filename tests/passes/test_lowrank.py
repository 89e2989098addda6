"""Low-rank factorization: exactness at full rank, rank choice, skip reasons, refit, real models."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api, io, linalg, runtime
from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.passes.lowrank import LowRank, factorize_node
from onnxslim_tool.pipeline import check_model
from onnxslim_tool.testing import light_models, random_feed, run_proto, with_random_weights

SAMPLES = "sample_models"


# ----- model builders ------------------------------------------------------------------------------


def _model(nodes, inputs, inits, outputs=("Y",), opset: int = 17) -> onnx.ModelProto:
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    graph = helper.make_graph(nodes, "g", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)  # the full checker wants output shapes


def _input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _array(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def conv_model(
    c_in: int = 3,
    c_out: int = 5,
    kernel: tuple[int, int] = (3, 3),
    size: tuple[int, int] = (11, 10),
    bias: bool = True,
    group: int = 1,
    seed: int = 0,
    **attrs,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_array(rng, c_out, c_in // group, *kernel), "W")]
    inputs = ["X", "W"]
    if bias:
        inits.append(numpy_helper.from_array(_array(rng, c_out), "B"))
        inputs.append("B")
    if group != 1:
        attrs["group"] = group
    node = helper.make_node("Conv", inputs, ["Y"], name="conv", **attrs)
    return _model([node], [_input("X", [2, c_in, *size])], inits)


def _feed(proto: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    return random_feed(proto, seed=seed, batch=2)


def _relative_error(before: onnx.ModelProto, after: ir.Model, feed) -> float:
    after_proto = ir.to_proto(after)
    want, got = run_proto(before, feed)[0], run_proto(after_proto, feed)[0]
    assert want.shape == got.shape
    return float(np.abs(want - got).max() / np.abs(want).max())


def _factorized(proto: onnx.ModelProto, method: str, ranks) -> ir.Model:
    model = ir.from_proto(proto)
    node = next(n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul"))
    factorize_node(model, node, method, ranks)
    check_model(model)
    return model


def _full_ranks(method: str, c_out: int, c_in: int, kernel: tuple[int, int]) -> tuple[int, ...]:
    taps = math.prod(kernel)
    return {
        "svd": (min(c_out, c_in * taps),),
        "spatial-svd": (min(c_in * kernel[0], c_out * kernel[1]),),
        "cp": (linalg.cp_full_rank((c_out, c_in, *kernel)),),
        "tucker": (c_in, min(c_out, c_in * taps)),
    }[method]


# ----- exactness at full rank ----------------------------------------------------------------------

PADDINGS = {
    "none": {},
    "one": {"pads": [1, 1, 1, 1]},
    "asymmetric": {"pads": [0, 2, 1, 0]},
    "same-upper": {"auto_pad": "SAME_UPPER"},
}
# onnxruntime refuses dilation with auto_pad SAME_*, so the original of that pair cannot run.
CONV_GRID = [
    case
    for case in itertools.product(
        ["svd", "spatial-svd", "cp", "tucker"], [(3, 3), (5, 3)], [1, 2], PADDINGS, [1, 2]
    )
    if not (case[3] == "same-upper" and case[4] == 2)
]


@pytest.mark.parametrize(("method", "kernel", "stride", "padding", "dilation"), CONV_GRID)
def test_every_conv_method_is_exact_at_full_rank(method, kernel, stride, padding, dilation):
    for bias in (True, False):
        proto = conv_model(
            kernel=kernel,
            bias=bias,
            strides=[stride, stride],
            dilations=[dilation, dilation],
            **PADDINGS[padding],
        )
        model = _factorized(proto, method, _full_ranks(method, 5, 3, kernel))
        assert _relative_error(proto, model, _feed(proto)) < 1e-4


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "cp", "tucker"])
def test_factor_chain_has_the_published_structure(method):
    ranks = (2, 2) if method == "tucker" else (2,)
    model = _factorized(conv_model(kernel=(3, 3), pads=[1, 1, 1, 1], strides=[2, 2]), method, ranks)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    kernels = [tuple(n.inputs[1].const_value.shape.dims[2:]) for n in convs]
    groups = [n.attributes.get_int("group", 1) for n in convs]
    expected = {
        "svd": [(3, 3), (1, 1)],
        "spatial-svd": [(3, 1), (1, 3)],
        "cp": [(1, 1), (3, 1), (1, 3), (1, 1)],
        "tucker": [(1, 1), (3, 3), (1, 1)],
    }[method]
    assert kernels == expected
    assert groups == ([1, 2, 2, 1] if method == "cp" else [1] * len(expected))
    assert len(convs[-1].inputs) == 3 and convs[-1].inputs[2].name == "B"  # the bias is on the last factor
    assert "W" not in model.graph.initializers  # the dense kernel is gone


def test_conv_1d_channel_svd_and_tucker_are_exact():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(_array(rng, 6, 4, 3), "W"), numpy_helper.from_array(_array(rng, 6), "B")]
    node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], strides=[2], pads=[1, 0])
    proto = _model([node], [_input("X", [2, 4, 13])], inits)
    for method, ranks in (("svd", (6,)), ("tucker", (4, 6))):
        assert _relative_error(proto, _factorized(proto, method, ranks), _feed(proto)) < 1e-4


GEMM_GRID = list(itertools.product([0, 1], [0, 1], [1.0, 0.7], [1.0, 1.3], ["none", "vector", "matrix"]))


@pytest.mark.parametrize(("trans_a", "trans_b", "alpha", "beta", "c"), GEMM_GRID)
@pytest.mark.parametrize("constant", ["B", "A"])
def test_gemm_is_exact_at_full_rank(constant, trans_a, trans_b, alpha, beta, c):
    rng = np.random.default_rng(3)
    m, k, n = 4, 7, 6
    a = _array(rng, *((k, m) if trans_a else (m, k)))
    b = _array(rng, *((n, k) if trans_b else (k, n)))
    inits = [numpy_helper.from_array(b if constant == "B" else a, constant)]
    activation = "A" if constant == "B" else "B"
    inputs = [_input(activation, list((a if constant == "B" else b).shape))]
    names = ["A", "B"]
    if c != "none":
        inits.append(numpy_helper.from_array(_array(rng, *((n,) if c == "vector" else (m, n))), "C"))
        names.append("C")
    node = helper.make_node("Gemm", names, ["Y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    proto = _model([node], inputs, inits)
    model = _factorized(proto, "svd", (min(m, k, n) if constant == "A" else min(k, n),))
    assert [n.op_type for n in model.graph] == ["Gemm", "Gemm"]
    assert _relative_error(proto, model, random_feed(proto, seed=1)) < 1e-4


def test_gemm_before_opset_11_gets_the_c_input_it_requires():
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(_array(rng, 6, 8), "W"), numpy_helper.from_array(_array(rng, 6), "C")]
    node = helper.make_node("Gemm", ["X", "W", "C"], ["Y"], transB=1)
    proto = _model([node], [_input("X", [3, 8])], inits, opset=9)
    model = _factorized(proto, "svd", (6,))
    assert all(len(n.inputs) == 3 for n in model.graph)
    assert _relative_error(proto, model, random_feed(proto, seed=1)) < 1e-4
    refit = ir.from_proto(proto)  # an offset from the refit lands in the new C
    lowrank = LowRank(ratio=0.5, min_params=0)
    lowrank.calibration = CalibrationData.from_arrays({"X": _array(rng, 40, 8) + 3}).validate(refit)
    assert lowrank(refit).record.changes
    check_model(refit)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "weight_first"),
    [((2, 3, 8), (8, 5), False), ((8,), (8, 5), False), ((5, 8), (6, 5), True), ((2, 3, 5, 4), (6, 5), True)],
    ids=["batched-right", "vector-right", "left", "batched-left"],
)
def test_matmul_with_either_constant_operand_is_exact_at_full_rank(x_shape, w_shape, weight_first):
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(_array(rng, *w_shape), "W")]
    node = helper.make_node("MatMul", ["W", "X"] if weight_first else ["X", "W"], ["Y"])
    proto = _model([node], [_input("X", list(x_shape))], inits)
    model = _factorized(proto, "svd", (min(w_shape),))
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
    assert _relative_error(proto, model, random_feed(proto, seed=2)) < 1e-4


# ----- rank choice ----------------------------------------------------------------------------------


def _mlp(d: int = 64, hidden: int = 48, out: int = 40, seed: int = 0, spectrum=None) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = _array(rng, d, hidden)
    if spectrum is not None:
        u, _, vt = np.linalg.svd(w1, full_matrices=False)
        s = np.zeros(min(d, hidden))
        s[: len(spectrum)] = spectrum
        w1 = ((u * s) @ vt).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(_array(rng, hidden), "B1"),
        numpy_helper.from_array(_array(rng, hidden, out) / np.float32(np.sqrt(hidden)), "W2"),
        numpy_helper.from_array(_array(rng, out), "B2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "B1"], ["H"], name="fc1"),
        helper.make_node("Relu", ["H"], ["R"]),
        helper.make_node("MatMul", ["R", "W2"], ["M"], name="fc2"),
        helper.make_node("Add", ["M", "B2"], ["Y"]),
    ]
    return _model(nodes, [_input("X", ["batch", d])], inits)


def _run_pass(proto: onnx.ModelProto, **kwargs) -> tuple[ir.Model, object]:
    model = ir.from_proto(proto)
    result = LowRank(**kwargs)(model)
    return model, result.record


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_rank_from_ratio_keeps_at_most_that_fraction_of_each_layer(ratio):
    proto = _mlp()
    model, record = _run_pass(proto, ratio=ratio, refit=False, min_params=0)
    assert {c.layer for c in record.changes} == {"fc1", "fc2"}
    for change in record.changes:
        bias = 48 if change.layer == "fc1" else 0  # Gemm's C counts with the layer; it is not factorized
        assert change.params_after - bias <= ratio * (change.params_before - bias)
    params = {name: v.const_value.size for name, v in model.graph.initializers.items()}
    assert sum(v for k, v in params.items() if k.startswith("fc1_lr")) <= ratio * 64 * 48


def test_conv_rank_from_ratio_lowers_params_and_macs_for_every_method():
    proto = conv_model(c_in=16, c_out=16, kernel=(3, 3), size=(12, 12), pads=[1, 1, 1, 1])
    before = analyze_cost(ir.from_proto(proto))
    for method in ("svd", "spatial-svd", "cp", "tucker"):
        model, record = _run_pass(proto, ratio=0.5, method=method, refit=False)
        after = analyze_cost(model)
        assert len(record.changes) == 1, record.skipped
        assert after.total_params - 16 <= 0.5 * 16 * 16 * 9
        assert after.total_macs < before.total_macs


def test_energy_picks_the_rank_that_keeps_that_share_of_squared_singular_values():
    proto = _mlp(spectrum=[8.0, 4.0, 2.0, 1.0, 0.5])  # squares 64, 16, 4, 1, .25 of 85.25
    _, record = _run_pass(proto, ratio=None, energy=0.9, refit=False, min_params=0, include=["fc1"])
    assert "rank 2;" in record.changes[0].detail  # 80 / 85.25 = 0.94 >= 0.9 > 64 / 85.25
    _, record = _run_pass(proto, ratio=None, energy=0.99, refit=False, min_params=0, include=["fc1"])
    assert "rank 4;" in record.changes[0].detail


def test_conv_energy_selection_for_tucker_and_cp_and_the_rgb_input_rule():
    proto = conv_model(c_in=16, c_out=16, kernel=(3, 3), size=(12, 12), pads=[1, 1, 1, 1])
    _, record = _run_pass(proto, ratio=None, energy=0.5, method="tucker", refit=False)
    assert record.changes[0].detail.startswith("tucker rank ")
    _, record = _run_pass(proto, ratio=None, energy=0.3, method="cp", refit=False)
    rank = int(record.changes[0].detail.split()[2].rstrip(";"))
    kernel = numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    error = kernel - linalg.cp_reconstruct(linalg.cp_als(kernel, rank, iterations=50))
    assert 1 - np.sum(error**2) / np.sum(kernel**2) >= 0.3  # the chosen CP rank keeps that energy
    rgb = conv_model(c_in=3, c_out=64, kernel=(3, 3), size=(12, 12), pads=[1, 1, 1, 1])
    _, record = _run_pass(rgb, ratio=0.5, method="tucker", refit=False)
    assert record.changes[0].detail.startswith("svd rank 9;")  # 9 x (27 + 64) <= 864 weights
    assert "input mode kept whole" in record.changes[0].detail


def test_per_layer_override_and_milder_keep_more():
    proto = _mlp()
    _, record = _run_pass(proto, ratio=0.2, per_layer={"fc2": 0.6}, refit=False, min_params=0)
    after = {c.layer: c.params_after / c.params_before for c in record.changes}
    assert after["fc2"] > 0.4 > after["fc1"]
    mild = LowRank(ratio=0.5, per_layer={"fc2": 0.6}).milder()
    assert mild.ratio == 0.75 and mild.per_layer == {"fc2": 0.8}
    assert LowRank(ratio=0.96).milder() is None


def test_milder_with_energy_keeps_more_energy():
    mild = LowRank(ratio=None, energy=0.9).milder()
    assert mild.energy == pytest.approx(0.95) and mild.ratio is None
    assert LowRank(ratio=None, energy=0.99995).milder() is None


def test_bad_parameters_are_refused():
    for kwargs in ({"method": "qr"}, {"ratio": 0.0}, {"ratio": 1.5}, {"ratio": None}, {"energy": 2.0}):
        with pytest.raises(OnnxSlimError):
            LowRank(**kwargs)


# ----- skip reasons -----------------------------------------------------------------------------------


def _skips(record) -> dict[str, str]:
    return {s.layer: s.reason for s in record.skipped}


def test_skip_reasons_are_stated():
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(_array(rng, 8, 1, 3, 3), "Wdw"),
        numpy_helper.from_array(_array(rng, 8, 8, 1, 1), "Wpw"),
        numpy_helper.from_array(_array(rng, 8, 8, 3, 3), "Wsmall"),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "Wdw"], ["A"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["A", "Wpw"], ["B"], name="pointwise"),
        helper.make_node("Conv", ["B", "Wsmall"], ["C"], name="small", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["C", "Wlive"], ["D"], name="dynamic"),
        helper.make_node("MatMul", ["D", "D"], ["Y"], name="attention"),
    ]
    inputs = [_input("X", [1, 8, 6, 6]), _input("Wlive", [6, 8, 1, 1])]
    proto = _model(nodes, inputs, inits)
    _, record = _run_pass(proto, method="cp", refit=False, min_params=0, exclude=["small"])
    skips = _skips(record)
    assert "depthwise conv" in skips["depthwise"]
    pointwise = next(c for c in record.changes if c.layer == "pointwise")  # CP has no 1x1 form: channel SVD
    assert pointwise.detail.startswith("svd rank") and "1x1 conv: channel SVD (cp splits" in pointwise.detail
    assert "excluded" in skips["small"]
    assert "not a constant" in skips["dynamic"]
    assert "activation x activation" in skips["attention"]
    _, record = _run_pass(proto, method="svd", refit=False, min_params=100)
    assert "< min_params 100" in _skips(record)["pointwise"]
    assert not record.changes or record.changes[0].layer == "small"


def test_a_factorization_that_would_not_pay_is_skipped():
    # A 4x4 weight at ratio 1.0: rank 2 already holds 16 params, no fewer than the layer.
    rng = np.random.default_rng(0)
    proto = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="square")],
        [_input("X", [3, 4])],
        [numpy_helper.from_array(_array(rng, 4, 4), "W")],
    )
    _, record = _run_pass(proto, ratio=1.0, min_params=0, refit=False)
    assert "would not lower params" in _skips(record)["square"]
    # CP of a strided conv pays in params but its 1x1 at input resolution costs more MACs.
    proto = conv_model(c_in=64, c_out=8, kernel=(3, 3), size=(16, 16), strides=[2, 2])
    _, record = _run_pass(proto, ratio=0.5, method="cp", refit=False)
    assert "would not lower MACs" in _skips(record)["conv"]


# ----- data-aware refit --------------------------------------------------------------------------------


def _structured_inputs(n: int, d: int, seed: int) -> np.ndarray:
    """Inputs that live near a 6-dimensional subspace: what real activations look like."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((6, d))
    return (rng.standard_normal((n, 6)) @ basis + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def _mean_output_error(proto: onnx.ModelProto, model: ir.Model, x: np.ndarray) -> float:
    want = run_proto(proto, {"X": x})[0]
    got = run_proto(ir.to_proto(model), {"X": x})[0]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_refit_on_calibration_data_lowers_the_output_error_on_held_out_data():
    proto = _mlp()
    calibration = CalibrationData.from_arrays({"X": _structured_inputs(300, 64, seed=1)})
    held_out = _structured_inputs(200, 64, seed=2)
    errors = {}
    for refit in (False, True):
        model = ir.from_proto(proto)
        lowrank = LowRank(ratio=0.25, refit=refit, min_params=0)
        lowrank.calibration = calibration.validate(model)
        record = lowrank(model).record
        errors[refit] = _mean_output_error(proto, model, held_out)
    assert errors[True] < 0.5 * errors[False]
    gains = [note for note in record.notes if "weight-only ->" in note]
    assert len(gains) == 2 and all("refit (300 rows)" in note for note in gains)


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "cp", "tucker"])
def test_conv_refit_reports_its_gain_and_keeps_shapes(method):
    # Half the methods on a conv without bias: the refit's offset then becomes a new bias.
    bias = method in ("spatial-svd", "tucker")
    proto = conv_model(c_in=8, c_out=8, kernel=(3, 3), size=(8, 8), pads=[1, 1, 1, 1], bias=bias)
    rng = np.random.default_rng(5)
    # Smooth inputs: neighbouring pixels agree, so patches are far from isotropic.
    raw = rng.standard_normal((40, 8, 4, 4)).astype(np.float32)
    x = np.repeat(np.repeat(raw, 2, axis=2), 2, axis=3)
    model = ir.from_proto(proto)
    lowrank = LowRank(ratio=0.4, method=method, min_params=0)
    lowrank.calibration = CalibrationData.from_arrays({"X": x}).validate(model)
    record = lowrank(model).record
    check_model(model)
    gain = next(note for note in record.notes if note.startswith("conv:"))
    before, after = (float(t.split()[0]) for t in gain.split("error ")[1].split("weight-only -> "))
    assert after < before
    assert run_proto(ir.to_proto(model), {"X": x[:2]})[0].shape == (2, 8, 8, 8)
    last = [n for n in model.graph if n.op_type == "Conv"][-1]
    assert len(last.inputs) == 3  # the original bias, or the offset the refit added


def test_pruned_capture_reads_the_same_tensors_as_a_full_session():
    model = io.load(f"{SAMPLES}/digits_cnn.onnx")
    names = [n.outputs[0].name for n in model.graph if n.op_type == "Conv"][:3] + ["input"]
    feeds = list(_sample("cnn", "calib").validate(model).batches(64))[:2]
    full = list(runtime.stream_tensors(model, names, feeds))
    pruned = list(runtime.stream_tensors(model, names, feeds, prune=True))
    for a, b in zip(full, pruned, strict=True):
        for name in names:
            np.testing.assert_array_equal(a[name], b[name])


def test_no_data_means_weight_only_and_says_so():
    _, record = _run_pass(_mlp(), ratio=0.5, min_params=0)
    assert "no calibration data: weight-only factorization (no refit)" in record.notes


def test_same_seed_same_model():
    proto = conv_model(c_in=8, c_out=8, kernel=(3, 3), size=(8, 8), pads=[1, 1, 1, 1])
    outputs = []
    for _ in range(2):
        model = ir.from_proto(proto)
        lowrank = LowRank(ratio=0.4, method="cp", min_params=0)
        lowrank.calibration = CalibrationData.from_arrays(
            {"X": np.random.default_rng(0).standard_normal((6, 8, 8, 8)).astype(np.float32)}
        ).validate(model)
        lowrank(model)
        outputs.append(ir.to_proto(model).SerializeToString())
    assert outputs[0] == outputs[1]


# ----- real models -------------------------------------------------------------------------------------


def _sample(name: str, kind: str) -> CalibrationData:
    return CalibrationData.from_npz(f"{SAMPLES}/digits_{name}_{kind}.npz")


def test_transformer_keeps_accuracy_at_half_the_params_with_refit():
    path = f"{SAMPLES}/digits_transformer.onnx"
    result = api.compress(path, _sample("transformer", "calib"), passes=[LowRank(ratio=0.5)])
    assert result.steps[0].status == "applied"
    assert result.after.params <= 0.8 * result.before.params
    evaluation = _sample("transformer", "eval")
    model = io.load(path)
    before = runtime.run_model(model, evaluation.validate(model).batches(64))["logits"]
    after = runtime.run_model(result.model, evaluation.validate(model).batches(64))["logits"]
    drop = (before.argmax(1) == evaluation.labels).mean() - (after.argmax(1) == evaluation.labels).mean()
    assert drop <= 0.01


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "cp", "tucker"])
def test_sample_cnn_every_conv_method_lowers_macs(method):
    model = io.load(f"{SAMPLES}/digits_cnn.onnx")
    before = analyze_cost(model)
    record = LowRank(ratio=0.5, method=method, refit=False)(model).record
    after = analyze_cost(model)
    assert after.total_macs < before.total_macs and after.total_params < before.total_params
    assert any(c.op_type == "Conv" for c in record.changes)
    assert "depthwise conv (group=32" in _skips(record)["/depthwise/depthwise.0/Conv"]
    check_model(model)


def test_light_zoo_squeezenet_tucker_runs_with_the_same_output_shape():
    proto = with_random_weights(light_models()["squeezenet"])
    model = io.load(proto)
    record = LowRank(ratio=0.5, method="tucker", refit=False)(model).record
    assert len(record.changes) > 5
    check_model(model)
    feed = random_feed(proto)
    assert run_proto(ir.to_proto(model), feed)[0].shape == run_proto(proto, feed)[0].shape


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_planned_savings_match_what_the_pass_then_does(method):
    model = io.load(f"{SAMPLES}/digits_cnn.onnx")
    before = analyze_cost(model)
    lowrank = LowRank(ratio=0.5, method=method, refit=False)
    params, macs = lowrank.planned_savings(model)
    assert analyze_cost(model).total_params == before.total_params  # planning changes nothing
    lowrank(model)
    after = analyze_cost(model)
    assert before.total_params - after.total_params == params
    assert before.total_macs - after.total_macs == pytest.approx(macs, rel=0.01)


@pytest.mark.parametrize("method", ["spatial-svd", "cp"])
@pytest.mark.parametrize(
    ("kernel", "why"), [((1, 1), "1x1 conv"), ((1, 5), "1x5 kernel"), ((5,), "1-D kernel")]
)
def test_kernels_without_a_spatial_split_get_the_channel_svd(method, kernel, why):
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(_array(rng, 32, 32, *kernel), "W")
    pads = [0, 2, 0, 2] if kernel == (1, 5) else [2, 2] if kernel == (5,) else [0, 0, 0, 0]
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", pads=pads)
    proto = _model([node], [_input("X", [2, 32, *([9, 9] if len(kernel) == 2 else [9])])], [weight])
    model, record = _run_pass(proto, ratio=0.5, method=method, refit=False)
    assert record.changes[0].detail.startswith("svd rank")
    assert f"{why}: channel SVD ({method} splits a 2-D k x k kernel)" in record.changes[0].detail
    check_model(model)
    feed = _feed(proto)
    assert run_proto(ir.to_proto(model), feed)[0].shape == run_proto(proto, feed)[0].shape
