"""Low-rank on grouped convs: every group factorized on its own, emitted as grouped convs."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import linalg
from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.passes.lowrank import LowRank, factorize_node
from onnxslim_tool.pipeline import check_model
from onnxslim_tool.testing import run_proto

GROUPS, C_IN, C_OUT = 2, 4, 6  # groups of 2 -> 3 channels


def grouped_conv(
    c_in: int = C_IN,
    c_out: int = C_OUT,
    group: int = GROUPS,
    kernel: tuple[int, int] = (3, 3),
    size: tuple[int, int] = (11, 10),
    bias: bool = True,
    **attrs,
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((c_out, c_in // group, *kernel)).astype(np.float32), "W")
    ]
    inputs = ["X", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["Y"], name="conv", group=group, **attrs)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, c_in, *size])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def _outputs(proto: onnx.ModelProto, model: ir.Model) -> tuple[np.ndarray, np.ndarray]:
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return run_proto(proto, {"X": x})[0], run_proto(ir.to_proto(model), {"X": x})[0]


def _full_ranks(method: str, kernel: tuple[int, int]) -> tuple[int, ...]:
    c_in, c_out = C_IN // GROUPS, C_OUT // GROUPS
    taps = kernel[0] * kernel[1]
    return {
        "svd": (min(c_out, c_in * taps),),
        "spatial-svd": (min(c_in * kernel[0], c_out * kernel[1]),),
        "cp": (linalg.cp_full_rank((c_out, c_in, *kernel)),),
        "tucker": (c_in, min(c_out, c_in * taps)),
    }[method]


PADDINGS = {
    "none": {},
    "one": {"pads": [1, 1, 1, 1]},
    "asymmetric": {"pads": [0, 2, 1, 0]},
    "same-upper": {"auto_pad": "SAME_UPPER"},
}
# onnxruntime refuses dilation with auto_pad SAME_*, so the original of that pair cannot run.
GRID = [
    case
    for case in itertools.product(
        ["svd", "spatial-svd", "cp", "tucker"], [(3, 3), (5, 3)], [1, 2], PADDINGS, [1, 2]
    )
    if not (case[3] == "same-upper" and case[4] == 2)
]


@pytest.mark.parametrize(("method", "kernel", "stride", "padding", "dilation"), GRID)
def test_grouped_conv_is_exact_at_full_rank(method, kernel, stride, padding, dilation):
    for bias in (True, False):
        proto = grouped_conv(
            kernel=kernel,
            bias=bias,
            strides=[stride, stride],
            dilations=[dilation, dilation],
            **PADDINGS[padding],
        )
        model = ir.from_proto(proto)
        factorize_node(model, next(iter(model.graph)), method, _full_ranks(method, kernel))
        check_model(model)
        want, got = _outputs(proto, model)
        assert want.shape == got.shape
        assert np.abs(want - got).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "cp", "tucker"])
def test_every_factor_keeps_the_groups_apart(method):
    ranks = (2, 2) if method == "tucker" else (2,)
    model = ir.from_proto(grouped_conv(pads=[1, 1, 1, 1]))
    factorize_node(model, next(iter(model.graph)), method, ranks)
    groups = [n.attributes.get_int("group", 1) for n in model.graph if n.op_type == "Conv"]
    # CP's two depthwise stages have one group per rank-1 term of every group.
    assert groups == ([GROUPS, 2 * GROUPS, 2 * GROUPS, GROUPS] if method == "cp" else [GROUPS] * len(groups))


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "cp", "tucker"])
def test_pass_factorizes_a_grouped_conv_when_that_lowers_params_and_macs(method):
    proto = grouped_conv(c_in=32, c_out=32, group=4, size=(12, 12), pads=[1, 1, 1, 1])
    before = analyze_cost(ir.from_proto(proto))
    model = ir.from_proto(proto)
    record = LowRank(ratio=0.5, method=method, refit=False, min_params=0)(model).record
    assert len(record.changes) == 1, record.skipped
    assert "per group: 4 groups of 8 -> 8 channels" in record.changes[0].detail
    after = analyze_cost(model)
    assert after.total_params - 32 <= 0.5 * 32 * 8 * 9 and after.total_macs < before.total_macs
    check_model(model)


def test_grouped_conv_whose_groups_are_too_small_to_pay_says_so():
    proto = grouped_conv(c_in=8, c_out=8, group=4, kernel=(1, 1))  # 2 -> 2 channels, 1x1
    record = LowRank(ratio=1.0, method="svd", refit=False, min_params=0)(ir.from_proto(proto)).record
    reason = record.skipped[0].reason
    assert "would not lower params" in reason and "per group (4 groups of 2 -> 2 channels)" in reason


def test_depthwise_conv_stays_skipped_with_its_reason():
    proto = grouped_conv(c_in=8, c_out=8, group=8, pads=[1, 1, 1, 1])
    for method in ("svd", "tucker", "cp"):
        record = LowRank(ratio=0.5, method=method, refit=False, min_params=0)(ir.from_proto(proto)).record
        assert "depthwise conv (group=8 = channels)" in record.skipped[0].reason


def test_grouped_refit_lowers_each_groups_output_error():
    proto = grouped_conv(c_in=16, c_out=16, group=2, size=(8, 8), pads=[1, 1, 1, 1], bias=False)
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((40, 16, 4, 4)).astype(np.float32)
    x = np.repeat(np.repeat(raw, 2, axis=2), 2, axis=3)  # smooth inputs: patches far from isotropic
    model = ir.from_proto(proto)
    lowrank = LowRank(ratio=0.4, method="tucker", min_params=0)
    lowrank.calibration = CalibrationData.from_arrays({"X": x}).validate(model)
    record = lowrank(model).record
    check_model(model)
    gain = next(note for note in record.notes if note.startswith("conv:"))
    assert "2 groups" in gain
    before, after = (float(t.split()[0]) for t in gain.split("error ")[1].split("weight-only -> "))
    assert after < before
    assert run_proto(ir.to_proto(model), {"X": x[:2]})[0].shape == (2, 16, 8, 8)
