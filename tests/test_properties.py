"""Property-based tests: random small Conv/Gemm/MatMul graphs with residuals and concats.

Every pass must produce a model that validates and runs, and the settings that should change
nothing (pruning 0%, full rank, 8-bit sharing of <= 256 distinct values) must change nothing.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.pipeline import check_model
from onnxslim_tool.testing import random_feed, run_proto

PROPERTY_SETTINGS = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def conv_graphs(draw) -> onnx.ModelProto:
    """Conv stem, a few blocks (plain / residual / concat / depthwise), GAP, Gemm head."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels = draw(st.sampled_from([4, 6, 8]))
    nodes, inits = [], []

    def weight(name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        inits.append(
            numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)
        )
        return name

    def conv(x: str, c_in: int, c_out: int, k: int, tag: str, group: int = 1) -> str:
        w = weight(f"{tag}_w", (c_out, c_in // group, k, k))
        b = weight(f"{tag}_b", (c_out,))
        nodes.append(
            helper.make_node("Conv", [x, w, b], [f"{tag}_c"], name=tag, pads=[k // 2] * 4, group=group)
        )
        nodes.append(helper.make_node("Relu", [f"{tag}_c"], [f"{tag}_r"], name=f"{tag}_relu"))
        return f"{tag}_r"

    x = conv("x", 3, channels, 3, "stem")
    c = channels
    for i, kind in enumerate(
        draw(st.lists(st.sampled_from(["plain", "residual", "concat", "depthwise"]), min_size=1, max_size=3))
    ):
        tag = f"b{i}"
        if kind == "plain":
            x, c = conv(x, c, c + 2, 3, tag), c + 2
        elif kind == "residual":
            y = conv(conv(x, c, c, 3, f"{tag}a"), c, c, 1, f"{tag}b")
            nodes.append(helper.make_node("Add", [x, y], [f"{tag}_sum"], name=f"{tag}_add"))
            x = f"{tag}_sum"
        elif kind == "concat":
            left, right = conv(x, c, 2, 1, f"{tag}l"), conv(x, c, 4, 3, f"{tag}r")
            nodes.append(
                helper.make_node("Concat", [left, right], [f"{tag}_cat"], name=f"{tag}_concat", axis=1)
            )
            x, c = f"{tag}_cat", 6
        else:
            x = conv(conv(x, c, c, 3, f"{tag}dw", group=c), c, c, 1, f"{tag}pw")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    if draw(st.booleans()):
        nodes.append(
            helper.make_node(
                "Gemm",
                ["flat", weight("head_w", (5, c)), weight("head_b", (5,))],
                ["y"],
                name="head",
                transB=1,
            )
        )
    else:
        nodes.append(helper.make_node("MatMul", ["flat", weight("head_w", (c, 5))], ["y"], name="head"))
    graph = helper.make_graph(
        nodes,
        "random_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _outputs(proto: onnx.ModelProto) -> np.ndarray:
    return run_proto(proto, random_feed(proto, seed=5, batch=2))[0]


def _apply(compression, proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # onnx_ir wraps the proto it is given; passes may rename its tensors
    model = ir.from_proto(copy)
    compression(model)
    check_model(model)
    return ir.to_proto(model)


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@PROPERTY_SETTINGS
@given(conv_graphs())
def test_cleanup_is_an_identity(proto):
    np.testing.assert_allclose(_outputs(_apply(Cleanup(), proto)), _outputs(proto), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    not _available("onnxslim_tool.passes.channel_pruning"), reason="channel pruning not built"
)
@PROPERTY_SETTINGS
@given(conv_graphs())
def test_channel_pruning_zero_ratio_is_identity_and_any_ratio_validates(proto):
    from onnxslim_tool.passes.channel_pruning import ChannelPruning

    np.testing.assert_allclose(
        _outputs(_apply(ChannelPruning(ratio=0.0, reconstruct=False), proto)),
        _outputs(proto),
        rtol=1e-5,
        atol=1e-6,
    )
    pruned = _apply(ChannelPruning(ratio=0.5, criterion="l1", reconstruct=False), proto)
    assert _outputs(pruned).shape == _outputs(proto).shape


@pytest.mark.skipif(not _available("onnxslim_tool.passes.lowrank"), reason="low-rank not built")
@PROPERTY_SETTINGS
@given(conv_graphs())
def test_lowrank_full_rank_is_identity(proto):
    from onnxslim_tool.passes.lowrank import LowRank

    full = _apply(LowRank(ratio=None, energy=1.0, min_params=0), proto)
    np.testing.assert_allclose(_outputs(full), _outputs(proto), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not _available("onnxslim_tool.passes.weight_sharing"), reason="weight sharing not built")
@PROPERTY_SETTINGS
@given(conv_graphs())
def test_eight_bit_sharing_of_few_values_is_identity(proto):
    from onnxslim_tool.passes.weight_sharing import WeightSharing

    # Snap every weight onto <= 200 distinct values first: 8-bit sharing must then be exact.
    for t in proto.graph.initializer:
        w = numpy_helper.to_array(t)
        levels = np.linspace(w.min(), w.max(), 200, dtype=np.float32) if w.size > 1 else w.ravel()
        snapped = levels[np.abs(w.reshape(-1, 1) - levels.reshape(1, -1)).argmin(1)].reshape(w.shape)
        t.CopyFrom(numpy_helper.from_array(snapped.astype(np.float32), t.name))
    expected = _outputs(proto)
    shared = _apply(WeightSharing(bits=8, min_params=0), proto)
    np.testing.assert_allclose(_outputs(shared), expected, rtol=1e-5, atol=1e-6)
