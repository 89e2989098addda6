"""Loading and saving: every kind of file, every way a file can be bad, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import io
from onnxslim_tool.errors import ModelLoadError, OnnxSlimError
from onnxslim_tool.testing import light_models, random_feed, run_proto


def _conv_model(opset: int = 13, ir_version: int = 7, weight_as_constant: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inits = [w]
    if weight_as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w))
        inits = []
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _roundtrip_outputs(proto: onnx.ModelProto, tmp_path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    src = tmp_path / "in.onnx"
    onnx.save(proto, str(src))
    out = tmp_path / "out.onnx"
    io.save(io.load(src), out)
    feed = random_feed(proto)
    return run_proto(proto, feed), run_proto(onnx.load(str(out)), feed)


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, 21])
def test_opsets_load_and_roundtrip(opset, tmp_path):
    ref, got = _roundtrip_outputs(_conv_model(opset, ir_version=3 if opset < 9 else 7), tmp_path)
    np.testing.assert_array_equal(ref[0], got[0])


def test_ir_version_3_with_initializers_as_inputs(tmp_path):
    proto = _conv_model(opset=8, ir_version=3)
    proto.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    ref, got = _roundtrip_outputs(proto, tmp_path)
    np.testing.assert_array_equal(ref[0], got[0])


def test_constant_weights_become_initializers(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(weight_as_constant=True), str(path))
    model = io.load(path)
    assert "Constant" not in {n.op_type for n in model.graph}
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[1].is_initializer()


def test_external_data_loads_and_saves_embedded(tmp_path):
    proto = _conv_model()
    src = tmp_path / "ext.onnx"
    # onnx.save moves the weights of the proto it is given: hand it a copy.
    onnx.save(_conv_model(), str(src), save_as_external_data=True, location="ext.weights", size_threshold=0)
    assert (tmp_path / "ext.weights").is_file()
    out = tmp_path / "out" / "embedded.onnx"
    out.parent.mkdir()
    io.save(io.load(src), out)
    reloaded = onnx.load(str(out), load_external_data=False)
    assert all(not t.external_data for t in reloaded.graph.initializer)  # no link to the input's data file
    feed = random_feed(proto)
    np.testing.assert_array_equal(run_proto(proto, feed)[0], run_proto(onnx.load(str(out)), feed)[0])


def test_save_switches_to_external_data_above_threshold(tmp_path):
    model = io.load(_conv_model())
    out = tmp_path / "big.onnx"
    io.save(model, out, external_data_threshold=100)  # weights are 432 bytes
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size >= 432
    assert io.file_size(out) == out.stat().st_size + data.stat().st_size
    feed = random_feed(_conv_model())
    np.testing.assert_array_equal(run_proto(_conv_model(), feed)[0], run_proto(onnx.load(str(out)), feed)[0])
    # saving it again below the threshold removes the stale data file
    io.save(io.load(out), out, external_data_threshold=10_000)
    assert not data.exists()


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    io.save(io.load(_conv_model()), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ir, "save", boom)
    monkeypatch.setattr(onnx, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save(io.load(_conv_model()), target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "not found"),
        (b"", "empty"),
        (b"this is a text file, not a model\n" * 10, "not"),
        ("truncated", "not"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        full = _conv_model().SerializeToString()
        path.write_bytes(full[: len(full) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        io.load(path)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_missing_external_data_is_named(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(_conv_model(), str(src), save_as_external_data=True, location="w.bin", size_threshold=0)
    os.remove(tmp_path / "w.bin")
    with pytest.raises(ModelLoadError, match="external data file missing"):
        io.load(src)


def test_save_refuses_missing_directory(tmp_path):
    with pytest.raises(OnnxSlimError, match="does not exist"):
        io.save(io.load(_conv_model()), tmp_path / "nope" / "m.onnx")


def _control_flow_model() -> onnx.ModelProto:
    """If, Loop and Scan in one graph, each with a real body."""
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Add", ["x", "two"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "x"], ["acc_out"]),
        ],
        "loop",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2]),
        ],
    )
    scan_body = helper.make_graph(
        [
            helper.make_node("Add", ["s_in", "row"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["row_out"]),
        ],
        "scan",
        [
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("row", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [2]),
        ],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "true", "branch"], ["looped"], body=loop_body),
        helper.make_node("Scan", ["looped", "rows"], ["final", "scanned"], body=scan_body, num_scan_inputs=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cf",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, [3, 2]),
        ],
        [
            helper.make_tensor_value_info("final", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("scanned", TensorProto.FLOAT, [3, 2]),
        ],
        [
            numpy_helper.from_array(np.array([2.0, 2.0], np.float32), "two"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(3, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "true"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_control_flow_subgraphs_roundtrip(tmp_path):
    proto = _control_flow_model()
    onnx.checker.check_model(proto, full_check=True)
    for sign in (1.0, -1.0):  # both If branches
        src = tmp_path / "cf.onnx"
        onnx.save(proto, str(src))
        out = tmp_path / "cf_out.onnx"
        io.save(io.load(src), out)
        feed = {
            "x": np.array([sign, 2 * sign], np.float32),
            "rows": np.arange(6, dtype=np.float32).reshape(3, 2),
        }
        for a, b in zip(run_proto(proto, feed), run_proto(onnx.load(str(out)), feed), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(light_models()))
def test_light_zoo_roundtrips_with_identical_outputs(name, tmp_path):
    path = light_models()[name]
    out = tmp_path / "rt.onnx"
    io.save(io.load(path), out)
    proto = onnx.load(str(path))
    feed = random_feed(proto)
    for a, b in zip(run_proto(proto, feed), run_proto(onnx.load(str(out)), feed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_file_size_and_same_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(), str(path))
    assert io.file_size(path) == path.stat().st_size
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    assert io.same_file(path, link)
    assert not io.same_file(path, tmp_path / "other.onnx")


def test_nonfinite_weights_refused():
    proto = _conv_model()
    w = numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.inf
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    with pytest.raises(ModelLoadError, match="weight 'w' holds 1 NaN/Inf"):
        io.check_finite_weights(io.load(proto))
    io.check_finite_weights(io.load(_conv_model()))  # a clean model passes
