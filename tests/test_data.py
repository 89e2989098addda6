"""Tests for onnxslim_tool.data: loading, validating and batching calibration/evaluation data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxslim_tool.data import CalibrationData, ImageOptions, InputSpec, input_specs, load_data
from onnxslim_tool.errors import DataError

Shape = list[int | str | None] | None


def make_model(*inputs: tuple[str, int, Shape], initializer: str | None = None) -> ir.Model:
    """One Identity per input so every input is used; optional initializer that is also a graph input."""
    values = [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs]
    outputs = [helper.make_tensor_value_info(f"{name}_out", dtype, None) for name, dtype, _ in inputs]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    inits = []
    if initializer:
        values.append(helper.make_tensor_value_info(initializer, TensorProto.FLOAT, [2]))
        inits.append(helper.make_tensor(initializer, TensorProto.FLOAT, [2], [1.0, 2.0]))
    graph = helper.make_graph(nodes, "g", values, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def image_model(shape: Shape) -> ir.Model:
    return make_model(("image", TensorProto.FLOAT, shape))


def run_feeds(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def raises_one_line(func, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----- specs ----------------------------------------------------------------------------------------


def test_input_specs_skip_initializers_and_name_symbolic_dims():
    model = make_model(
        ("x", TensorProto.FLOAT, ["batch", 3, None]), ("ids", TensorProto.INT64, [1, 4]), initializer="w"
    )
    specs = input_specs(model)
    assert [s.name for s in specs] == ["x", "ids"]
    assert specs[0].shape == ("batch", 3, "?")
    assert specs[0].dtype == np.float32
    assert specs[1].shape == (1, 4) and specs[1].dtype == np.int64


# ----- files ----------------------------------------------------------------------------------------


def test_npz_round_trip_with_labels(tmp_path: Path):
    model = make_model(("a", TensorProto.FLOAT, ["N", 3]), ("ids", TensorProto.INT64, ["N", 5]))
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.arange(20, dtype=np.int64).reshape(4, 5)
    labels = np.array([0, 1, 1, 0])
    np.savez(tmp_path / "d.npz", a=a, ids=ids, labels=labels)
    data = load_data(tmp_path / "d.npz", model)
    assert len(data) == 4 and not data.synthetic
    assert data.source == str(tmp_path / "d.npz")
    np.testing.assert_array_equal(data.inputs["a"], a)
    np.testing.assert_array_equal(data.inputs["ids"], ids)
    np.testing.assert_array_equal(data.labels, labels)


def test_npz_input_named_labels_is_an_input(tmp_path: Path):
    model = make_model(("labels", TensorProto.INT64, ["N"]))
    np.savez(tmp_path / "d.npz", labels=np.arange(3))
    data = load_data(tmp_path / "d.npz", model)
    assert data.labels is None and list(data.inputs) == ["labels"]


def test_npz_unknown_key_refused(tmp_path: Path):
    model = make_model(("a", TensorProto.FLOAT, ["N", 3]), ("b", TensorProto.FLOAT, ["N", 3]))
    ones = np.ones((2, 3), np.float32)
    np.savez(tmp_path / "d.npz", a=ones, b=ones, extra=ones)
    message = raises_one_line(load_data, tmp_path / "d.npz", model)
    assert "'extra'" in message and "a, b" in message


def test_npy_single_input(tmp_path: Path):
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    data = load_data(tmp_path / "x.npy", model)
    assert list(data.inputs) == ["x"] and len(data) == 5 and data.labels is None


def test_npy_on_two_input_model_refused(tmp_path: Path):
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]), ("y", TensorProto.FLOAT, ["N", 2]))
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    message = raises_one_line(load_data, tmp_path / "x.npy", model)
    assert "x, y" in message and ".npz" in message


def test_missing_file_and_unsupported_extension(tmp_path: Path):
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    missing = tmp_path / "nope.npz"
    assert raises_one_line(load_data, missing, model) == f"data file not found: {missing}"
    (tmp_path / "d.csv").write_text("1,2\n")
    assert "unsupported" in raises_one_line(load_data, tmp_path / "d.csv", model)


def test_corrupt_npz_refused(tmp_path: Path):
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    np.savez(tmp_path / "good.npz", x=np.ones((2, 2), np.float32))
    for name, content in [("bad.npz", b"not a zip"), ("cut.npz", (tmp_path / "good.npz").read_bytes()[:60])]:
        (tmp_path / name).write_bytes(content)
        assert "cannot read data file" in raises_one_line(load_data, tmp_path / name, model)
    np.save(tmp_path / "array.npy", np.ones((2, 2), np.float32))
    (tmp_path / "array.npz").write_bytes((tmp_path / "array.npy").read_bytes())
    assert "rename it .npy" in raises_one_line(load_data, tmp_path / "array.npz", model)
    (tmp_path / "archive.npy").write_bytes((tmp_path / "good.npz").read_bytes())
    assert "rename it .npz" in raises_one_line(load_data, tmp_path / "archive.npy", model)


# ----- validation -----------------------------------------------------------------------------------


def test_wrong_name_names_input_and_data_keys():
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    data = CalibrationData.from_arrays({"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)})
    assert raises_one_line(data.validate, model) == "input 'x' missing from data; data has: a, b"


def test_wrong_shape_names_input_expected_and_got():
    model = make_model(("input", TensorProto.FLOAT, ["batch", 1, 8, 8]))
    data = CalibrationData.from_arrays({"input": np.zeros((3, 64), np.float32)})
    message = raises_one_line(data.validate, model)
    assert message == "input 'input': expected shape [N, 1, 8, 8] (float32), got [N, 64] (float32)"


def test_symbolic_dims_are_free_static_dims_must_match():
    model = make_model(("ids", TensorProto.INT64, ["batch", "seq"]))
    for seq in (4, 9):
        assert len(CalibrationData.from_arrays({"ids": np.zeros((2, seq), np.int64)}).validate(model)) == 2
    model = make_model(("x", TensorProto.FLOAT, ["batch", 3]))
    data = CalibrationData.from_arrays({"x": np.zeros((2, 4), np.float32)})
    message = raises_one_line(data.validate, model)
    assert "expected shape [N, 3]" in message and "got [N, 4]" in message


def test_wrong_dtype_names_input_expected_and_got():
    model = make_model(("ids", TensorProto.INT64, ["N", 4]))
    data = CalibrationData.from_arrays({"ids": np.zeros((2, 4), np.float32)})
    message = raises_one_line(data.validate, model)
    assert "'ids'" in message and "int64" in message and "float32" in message


def test_float64_cast_to_float32_silently():
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    values = np.array([[0.5, 1.5], [2.5, -1.0]], dtype=np.float64)
    data = CalibrationData.from_arrays({"x": values}).validate(model)
    assert data.inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(data.inputs["x"], values.astype(np.float32))


def test_float32_to_float16_refused():
    model = make_model(("x", TensorProto.FLOAT16, ["N", 2]))
    message = raises_one_line(CalibrationData.from_arrays({"x": np.ones((2, 2), np.float32)}).validate, model)
    assert "'x'" in message and "float16" in message and "float32" in message


def test_int_casts_only_when_lossless():
    model = make_model(("ids", TensorProto.INT32, ["N", 2]))
    ok = CalibrationData.from_arrays({"ids": np.array([[1, 2], [3, 4]], np.int64)}).validate(model)
    assert ok.inputs["ids"].dtype == np.int32
    big = CalibrationData.from_arrays({"ids": np.array([[1, 2**40], [3, 4]], np.int64)})
    assert "'ids'" in raises_one_line(big.validate, model)
    model64 = make_model(("ids", TensorProto.INT64, ["N", 2]))
    widened = CalibrationData.from_arrays({"ids": np.ones((2, 2), np.int32)}).validate(model64)
    assert widened.inputs["ids"].dtype == np.int64


def test_too_few_samples_says_how_many_are_needed():
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    data = CalibrationData.from_arrays({"x": np.ones((3, 2), np.float32)})
    assert raises_one_line(data.validate, model, min_samples=8) == "data has 3 samples; at least 8 are needed"
    assert len(data.validate(model, min_samples=3)) == 3


def test_nan_and_inf_refused_naming_the_input():
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    values = np.ones((3, 2), np.float32)
    values[1, 0] = np.nan
    message = raises_one_line(CalibrationData.from_arrays({"x": values}).validate, model)
    assert "'x'" in message and "NaN" in message and "sample 1" in message
    # Finite in float64 but overflows to inf when cast to the model's float32.
    huge = np.full((2, 2), 1e300)
    assert "'x'" in raises_one_line(CalibrationData.from_arrays({"x": huge}).validate, model)


def test_sample_counts_and_labels_must_agree():
    ones = np.ones((3, 2), np.float32)
    message = raises_one_line(CalibrationData.from_arrays, {"a": ones, "b": ones[:2]})
    assert "a=3" in message and "b=2" in message
    message = raises_one_line(CalibrationData.from_arrays, {"a": ones}, labels=np.arange(4))
    assert "4" in message and "3 samples" in message


# ----- synthetic ------------------------------------------------------------------------------------


def test_synthetic_only_when_asked():
    model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    message = raises_one_line(load_data, None, model)
    assert "--data" in message and "--synthetic" in message


def test_synthetic_is_seeded_and_marked():
    model = make_model(
        ("x", TensorProto.FLOAT, ["N", 3, "H"]),
        ("ids", TensorProto.INT64, ["N", "seq"]),
        ("flag", TensorProto.BOOL, ["N"]),
    )
    first = load_data(None, model, synthetic=True, n_synthetic=6, seed=3, input_shapes={"seq": 7, "H": 1})
    again = load_data(None, model, synthetic=True, n_synthetic=6, seed=3, input_shapes={"seq": 7, "H": 1})
    other = load_data(None, model, synthetic=True, n_synthetic=6, seed=4, input_shapes={"seq": 7, "H": 1})
    assert first.synthetic and first.source == "synthetic (seed 3)"
    assert first.inputs["x"].shape == (6, 3, 1) and first.inputs["x"].dtype == np.float32
    assert first.inputs["ids"].shape == (6, 7) and first.inputs["ids"].dtype == np.int64
    assert first.inputs["ids"].min() >= 0 and first.inputs["ids"].max() < 10
    assert first.inputs["flag"].dtype == np.bool_
    for name in first.inputs:
        np.testing.assert_array_equal(first.inputs[name], again.inputs[name])
    assert not np.array_equal(first.inputs["x"], other.inputs["x"])


def test_synthetic_refuses_unresolved_dynamic_dims():
    model = make_model(("x", TensorProto.FLOAT, ["N", 3, "H", "W"]))
    message = raises_one_line(load_data, None, model, synthetic=True)
    assert "dynamic dimension 'H'" in message and "--input-shape x=Nx3xNxN" in message
    data = load_data(None, model, synthetic=True, n_synthetic=2, input_shapes={"x": [1, 3, 8, 8]})
    assert data.inputs["x"].shape == (2, 3, 8, 8)


def test_synthetic_full_input_shape_and_fixed_batch():
    model = make_model(("x", TensorProto.FLOAT, [1, "C", 4]))
    data = CalibrationData.synthetic_for(model, n=5, input_shapes={"x": [1, 2, 4]})
    assert data.inputs["x"].shape == (5, 2, 4) and data.fixed_batch == 1  # validated on creation
    assert [f["x"].shape for f in data.batches(64)] == [(1, 2, 4)] * 5
    message = raises_one_line(CalibrationData.synthetic_for, model, input_shapes={"x": [1, 2, 5]})
    assert "'x'" in message


# ----- images ---------------------------------------------------------------------------------------


def write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def test_image_folder_with_class_labels_and_options(tmp_path: Path):
    write_image(tmp_path / "imgs" / "cat" / "b.png", (10, 20, 30))
    write_image(tmp_path / "imgs" / "cat" / "a.png", (0, 0, 0))
    write_image(tmp_path / "imgs" / "dog" / "c.png", (255, 255, 255))
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    options = ImageOptions(
        size=(2, 3), mean=(0.5, 0.25, 0.125), std=(2.0, 4.0, 0.5), scale=1 / 255, layout="NHWC", color="BGR"
    )
    data = load_data(tmp_path / "imgs", image_model(["N", 2, 3, 3]), image_options=options)
    np.testing.assert_array_equal(data.labels, [0, 0, 1])
    assert data.inputs["image"].shape == (3, 2, 3, 3) and data.inputs["image"].dtype == np.float32
    # Second file in sorted order is cat/b.png; BGR puts blue first, mean/std follow that order.
    expected = [(30 / 255 - 0.5) / 2.0, (20 / 255 - 0.25) / 4.0, (10 / 255 - 0.125) / 0.5]
    np.testing.assert_allclose(data.inputs["image"][1, 1, 2], expected, rtol=1e-6)


def test_image_folder_defaults_from_model(tmp_path: Path):
    write_image(tmp_path / "imgs" / "x.png", (30, 60, 90), size=(9, 7))
    write_image(tmp_path / "imgs" / "y.bmp", (0, 0, 0), size=(5, 5))
    data = load_data(tmp_path / "imgs", image_model([1, 3, 4, 5]))  # NCHW, RGB, resize to 4x5, scale 1/255
    assert data.labels is None and data.fixed_batch == 1
    assert data.inputs["image"].shape == (2, 3, 4, 5)
    np.testing.assert_allclose(data.inputs["image"][0, :, 3, 4], [30 / 255, 60 / 255, 90 / 255], rtol=1e-6)
    gray = load_data(tmp_path / "imgs", image_model(["N", 4, 5, 1]))  # NHWC, one channel -> L
    assert gray.inputs["image"].shape == (2, 4, 5, 1)
    luma = (30 * 299 + 60 * 587 + 90 * 114) / 1000  # Pillow's ITU-R 601-2 conversion
    assert gray.inputs["image"][0, 0, 0, 0] == pytest.approx(round(luma) / 255, rel=1e-6)


def test_image_folder_problems_are_data_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    model = image_model(["N", 3, "H", "W"])
    assert "no images" in raises_one_line(load_data, tmp_path / "empty", model)
    write_image(tmp_path / "mixed" / "a.png", (0, 0, 0), size=(4, 4))
    write_image(tmp_path / "mixed" / "b.png", (0, 0, 0), size=(5, 4))
    assert "pass an image size" in raises_one_line(load_data, tmp_path / "mixed", model)
    two = make_model(("a", TensorProto.FLOAT, ["N", 3, 4, 4]), ("b", TensorProto.FLOAT, ["N", 3, 4, 4]))
    assert "a, b" in raises_one_line(load_data, tmp_path / "mixed", two)


# ----- splitting and batching -----------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    ids = np.arange(10, dtype=np.int64)[:, None]
    data = CalibrationData.from_arrays({"ids": ids}, labels=np.arange(10) * 10)
    calib, held = data.split(0.7, seed=1)
    again, _ = data.split(0.7, seed=1)
    other, _ = data.split(0.7, seed=2)
    assert len(calib) == 7 and len(held) == 3
    first = set(calib.inputs["ids"][:, 0].tolist())
    assert first.isdisjoint(held.inputs["ids"][:, 0].tolist())
    assert first | set(held.inputs["ids"][:, 0].tolist()) == set(range(10))
    np.testing.assert_array_equal(calib.inputs["ids"], again.inputs["ids"])
    assert not np.array_equal(calib.inputs["ids"], other.inputs["ids"])
    np.testing.assert_array_equal(calib.labels, calib.inputs["ids"][:, 0] * 10)
    assert "between 0 and 1" in raises_one_line(data.split, 1.0)


def test_subset_takes_the_first_samples():
    data = CalibrationData.from_arrays({"x": np.arange(6, dtype=np.float32)[:, None]})
    np.testing.assert_array_equal(data.subset(2).inputs["x"][:, 0], [0, 1])
    assert len(data.subset(100)) == 6


def test_batches_fixed_batch_one_vs_dynamic():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    fixed_model = make_model(("x", TensorProto.FLOAT, [1, 2]))
    fixed = CalibrationData.from_arrays({"x": x}).validate(fixed_model)
    assert fixed.fixed_batch == 1
    assert [f["x"].shape for f in fixed.batches(4)] == [(1, 2)] * 5
    assert len(run_feeds(fixed_model, fixed.feeds(4))) == 5

    dynamic_model = make_model(("x", TensorProto.FLOAT, ["N", 2]))
    dynamic = CalibrationData.from_arrays({"x": x}).validate(dynamic_model)
    assert dynamic.fixed_batch is None
    assert [f["x"].shape for f in dynamic.batches(2)] == [(2, 2), (2, 2), (1, 2)]
    assert [f["x"].shape for f in dynamic.feeds()] == [(1, 2)] * 5
    outputs = run_feeds(dynamic_model, dynamic.feeds(2))
    np.testing.assert_array_equal(np.concatenate([o[0] for o in outputs]), x)


def test_fixed_batch_above_one_drops_short_batch_and_slices_match_labels():
    model = make_model(("x", TensorProto.FLOAT, [2, 1]))
    data = CalibrationData.from_arrays({"x": np.arange(5, dtype=np.float32)[:, None]}, labels=np.arange(5))
    data = data.validate(model)
    assert data.batch_slices(8) == [slice(0, 2), slice(2, 4)]
    assert [f["x"][:, 0].tolist() for f in data.batches(8)] == [[0, 1], [2, 3]]
    one = CalibrationData.from_arrays({"x": np.zeros((1, 1), np.float32)})
    assert "fixed batch size is 2" in raises_one_line(one.validate, model)


def test_static_batch_one_accepts_samples_with_their_own_batch_axis():
    model = make_model(("x", TensorProto.FLOAT, [1, 3]))
    data = CalibrationData.from_arrays({"x": np.ones((4, 1, 3), np.float32)}).validate(model)
    assert data.inputs["x"].shape == (4, 3)
    assert [f["x"].shape for f in data.feeds()] == [(1, 3)] * 4


def test_multi_input_token_ids_run_in_onnxruntime():
    model = make_model(
        ("input_ids", TensorProto.INT64, ["batch", "seq"]),
        ("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ("scale", TensorProto.FLOAT, []),
    )
    data = CalibrationData.from_arrays(
        {
            "input_ids": np.arange(12, dtype=np.int32).reshape(3, 4),
            "attention_mask": np.ones((3, 4), np.int64),
            "scale": np.array([0.5, 1.0, 2.0]),
        }
    ).validate(model)
    assert data.inputs["input_ids"].dtype == np.int64 and data.inputs["scale"].dtype == np.float32
    feeds = data.feeds(batch_size=3)  # the scalar input forces one sample per run
    assert [f["input_ids"].shape for f in feeds] == [(1, 4)] * 3 and feeds[2]["scale"].shape == ()
    outputs = run_feeds(model, feeds)
    assert outputs[2][2] == pytest.approx(2.0)
    np.testing.assert_array_equal(outputs[1][0], [[4, 5, 6, 7]])


def test_validate_accepts_specs_and_leaves_original_untouched():
    specs = [InputSpec("x", ("N", 2), np.dtype(np.float32))]
    original = CalibrationData.from_arrays({"x": np.ones((2, 2), np.float64)})
    checked = original.validate(specs)
    assert checked.inputs["x"].dtype == np.float32 and original.inputs["x"].dtype == np.float64


# ----- whole feeds -----------------------------------------------------------------------------------


def _stateful_model() -> ir.Model:
    """Inputs shaped like silero VAD's: no batch axis shared by all of them."""
    return make_model(
        ("chunk", TensorProto.FLOAT, ["", ""]),
        ("state", TensorProto.FLOAT, [2, "", 4]),
        ("sr", TensorProto.INT64, []),
    )


def test_whole_feeds_are_fed_exactly_as_stored():
    model = _stateful_model()
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((5, 1, 6)).astype(np.float32)
    state = rng.standard_normal((5, 2, 1, 4)).astype(np.float32)
    sr = np.full(5, 16000, np.int64)
    data = CalibrationData.from_arrays({"chunk": chunk, "state": state, "sr": sr}).validate(model)
    assert len(data) == 5 and data.fixed_batch is None
    feeds = data.feeds(batch_size=4)  # whole feeds are never re-batched
    assert len(feeds) == 5
    assert feeds[3]["state"].shape == (2, 1, 4) and feeds[3]["sr"].shape == ()
    np.testing.assert_array_equal(feeds[3]["chunk"], chunk[3])
    outputs = run_feeds(model, feeds)
    np.testing.assert_array_equal(outputs[2][1], state[2])
    first, second = data.split(0.6, seed=1)
    assert len(first) + len(second) == 5 and len(second.feeds(8)) == len(second)


def test_per_sample_reading_wins_when_it_fits():
    # [N, 1, 3] for a [1, 3] model reads both ways; the per-sample reading (batch 1) is kept.
    model = make_model(("x", TensorProto.FLOAT, [1, 3]))
    data = CalibrationData.from_arrays({"x": np.ones((4, 1, 3), np.float32)}).validate(model)
    assert data.inputs["x"].shape == (4, 3) and data.fixed_batch == 1


def test_inputs_without_a_shared_batch_axis_read_as_one_feed():
    # Node-test style: x [3, 4] and y [4] with no batch axis; one stacked feed works.
    model = make_model(("x", TensorProto.FLOAT, [3, 4]), ("y", TensorProto.FLOAT, [4]))
    x, y = np.ones((3, 4), np.float32), np.arange(4, dtype=np.float32)
    with pytest.raises(DataError):
        CalibrationData.from_arrays({"x": x, "y": y}).validate(model)
    data = CalibrationData.from_arrays({"x": x[None], "y": y[None]}).validate(model)
    [feed] = data.feeds()
    assert feed["x"].shape == (3, 4) and feed["y"].shape == (4,)


def test_mixed_layouts_are_refused_with_the_per_sample_message():
    model = _stateful_model()
    data = CalibrationData.from_arrays(
        {
            "chunk": np.zeros((3, 1, 6), np.float32),  # whole feed
            "state": np.zeros((3, 2, 4), np.float32),  # one per-sample slice: ambiguous, refused
            "sr": np.full(3, 16000, np.int64),
        }
    )
    message = raises_one_line(data.validate, model)
    assert "input 'chunk'" in message or "input 'state'" in message
