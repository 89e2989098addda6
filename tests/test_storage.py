"""Compact weight storage: exact in-graph expansion, smallest-encoding choice, round trips."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import io, runtime, storage

RNG = np.random.default_rng(0)


def _conv_gemm_model(conv_w: np.ndarray, fc_w: np.ndarray, opset: int = 17) -> ir.Model:
    """x[N,4,6,6] -> Conv(conv_w, pad 1) -> Flatten -> Gemm(fc_w, zero bias, transB=1) -> y."""
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", fc_w.shape[0]])],
        [
            numpy_helper.from_array(conv_w, "cw"),
            numpy_helper.from_array(fc_w, "fw"),
            numpy_helper.from_array(np.zeros(fc_w.shape[0], np.float32), "fb"),
        ],
    )
    return ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    )


def _matmul_model(w: np.ndarray) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _with_values(shape: tuple[int, ...], count: int, zeros: float = 0.0, seed: int = 0) -> np.ndarray:
    """A float32 array whose entries take `count` distinct values, a share `zeros` exactly 0."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal(count).astype(np.float32)
    array = table[rng.integers(0, count, shape)]
    array[rng.random(shape) < zeros] = 0
    return array.astype(np.float32)


def _expanded_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Each layer's weight as onnxruntime computes it from the stored encoding."""
    probe = io.load(model, lift_constants=False)
    weights = {}
    for node, _, value in storage.layer_weights(probe.graph):
        weights[node.name] = value
        if not value.is_initializer():
            probe.graph.outputs.append(value)
    session = runtime.make_session(probe)
    feed = {
        "x": np.zeros([1 if d is None or isinstance(d, str) else d for d in _input_dims(probe)], np.float32)
    }
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feed), strict=True))
    return {
        layer: values[v.name] if v.name in values else v.const_value.numpy() for layer, v in weights.items()
    }


def _input_dims(model: ir.Model) -> list:
    return [d if isinstance(d, int) else 1 for d in model.graph.inputs[0].shape]


def _pack_all(model: ir.Model) -> list[storage.StoredWeight]:
    return storage.pack(model, [v for _, _, v in storage.layer_weights(model.graph)])


# ----- bit streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 64, 1001])
def test_pack_codes_round_trips(bits: int, count: int) -> None:
    codes = RNG.integers(0, 1 << bits, count)
    stream = storage.pack_codes(codes, bits)
    assert stream.dtype == np.uint8
    assert stream.size == -(-count * bits // 8) or storage.layout(bits) == "planes"
    assert stream.size <= bits * (-(-count // 8))
    np.testing.assert_array_equal(storage.unpack_codes(stream, bits, count), codes)


def test_huffman_bits_matches_hand_computed_codes() -> None:
    assert storage.huffman_bits([5]) == 5  # one symbol: one bit each
    assert storage.huffman_bits([1, 1, 2]) == 6  # code lengths 2, 2, 1
    assert storage.huffman_bits([1, 1, 1, 1]) == 8
    assert storage.huffman_bits([0, 3, 0]) == 3


# ----- choosing the encoding -------------------------------------------------------------------------


def test_float_weights_stay_dense() -> None:
    weight = RNG.standard_normal((32, 32)).astype(np.float32)
    assert storage.choose_encoding(weight).kind == storage.DENSE


def test_sparse_storage_only_when_smaller() -> None:
    weight = RNG.standard_normal((64, 64)).astype(np.float32)
    few = weight.copy()
    few.ravel()[:40] = 0  # 1% zeros: mask + values would be larger than the dense tensor
    assert storage.choose_encoding(few).kind == storage.DENSE
    half = np.where(np.abs(weight) < np.median(np.abs(weight)), 0, weight).astype(np.float32)
    encoding = storage.choose_encoding(half)
    assert encoding.kind == storage.SPARSE
    assert encoding.payload_bytes < half.nbytes
    assert encoding.payload_bytes == 64 * 64 // 8 + 4 * np.count_nonzero(half)


def test_tiny_tensors_are_not_worth_packing() -> None:
    weight = _with_values((4, 3), 2)
    assert storage.choose_encoding(weight).kind == storage.DENSE


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_codebook_width_follows_distinct_values(bits: int) -> None:
    weight = _with_values((64, 48), 1 << bits, seed=bits)
    encoding = storage.choose_encoding(weight)
    assert encoding.kind == storage.CODES
    assert encoding.bits == bits
    assert encoding.payload_bytes == -(-weight.size * bits // 8) + 4 * (1 << bits)


def test_per_channel_codebooks_when_rows_differ() -> None:
    rows = [_with_values((1, 200), 4, seed=s) for s in range(80)]  # 4 values per row, 320 overall
    weight = np.concatenate(rows)
    encoding = storage.choose_encoding(weight)
    assert encoding.codebook.axis == 0 and encoding.bits == 2


def test_zero_gets_code_zero_when_present() -> None:
    weight = _with_values((40, 40), 15, zeros=0.5)
    encoding = storage.choose_encoding(weight)
    assert encoding.kind == storage.SPARSE_CODES
    assert encoding.codebook.values[0] == 0
    np.testing.assert_array_equal(encoding.codebook.codes == 0, weight == 0)


# ----- the written model -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conv_values", "fc_values", "zeros"),
    [(16, 16, 0.0), (4, 256, 0.0), (8, 3, 0.6), (2, 32, 0.3), (0, 0, 0.7)],
)
@pytest.mark.parametrize("narrow", [False, True], ids=["int32", "uint8"])
def test_expanded_weights_equal_the_codebook_lookup(
    conv_values: int, fc_values: int, zeros: float, narrow: bool, monkeypatch
) -> None:
    """Whatever encoding is chosen, onnxruntime rebuilds every weight bit for bit, with the
    int32 expansion of small streams and the uint8 one of large streams alike."""
    if narrow:
        monkeypatch.setattr(storage, "NARROW_ABOVE", 0)
    if conv_values:
        conv_w = _with_values((8, 4, 3, 3), conv_values, zeros, seed=1)
        fc_w = _with_values((5, 288), fc_values, zeros, seed=2)
    else:  # pruned floats: mask + values
        conv_w = np.where(RNG.random((8, 4, 3, 3)) < zeros, 0, RNG.standard_normal((8, 4, 3, 3)))
        fc_w = np.where(RNG.random((5, 288)) < zeros, 0, RNG.standard_normal((5, 288)))
    conv_w, fc_w = conv_w.astype(np.float32), fc_w.astype(np.float32)
    model = _conv_gemm_model(conv_w, fc_w)
    encodings = {name: storage.choose_encoding(w) for name, w in (("conv", conv_w), ("fc", fc_w))}
    stored = _pack_all(model)
    assert all(s.encoding != storage.DENSE for s in stored)
    expanded = _expanded_weights(model)
    for layer, original in (("conv", conv_w), ("fc", fc_w)):
        book = encodings[layer].codebook
        if book is not None:
            lookup = (
                book.values[book.codes]
                if book.axis is None
                else np.take_along_axis(book.values, book.codes.reshape(book.values.shape[0], -1), 1)
            )
            np.testing.assert_array_equal(expanded[layer].ravel(), lookup.ravel())
        np.testing.assert_array_equal(expanded[layer], original)


def test_per_channel_lookup_along_the_last_axis() -> None:
    columns = [_with_values((300, 1), 4, seed=s) for s in range(70)]
    weight = np.concatenate(columns, axis=1)  # MatMul [in, out]: channels are columns
    model = _matmul_model(weight)
    assert storage.choose_encoding(weight).codebook.axis == -1
    _pack_all(model)
    np.testing.assert_array_equal(_expanded_weights(model)["mm"], weight)


def test_packed_file_is_smaller_and_survives_the_checker_and_a_proto_round_trip() -> None:
    conv_w, fc_w = _with_values((8, 4, 3, 3), 16, seed=3), _with_values((5, 288), 16, seed=4)
    model = _conv_gemm_model(conv_w, fc_w)
    before = io.serialized_size(model)
    reference = runtime.run_model(model, [{"x": RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)}])
    _pack_all(model)
    copy = ir.from_proto(ir.to_proto(model))
    onnx.checker.check_model(ir.to_proto(copy), full_check=True)
    after = io.serialized_size(copy)
    assert after < before * 0.3  # 4-bit codes: weights take 1/8, the graph the rest
    feed = {"x": RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    outputs = runtime.run_model(copy, [feed])
    expected = runtime.run_model(io.load(_conv_gemm_model(conv_w, fc_w)), [feed])
    np.testing.assert_array_equal(outputs["y"], expected["y"])
    assert reference  # the model ran before packing too


def test_onnxruntime_folds_the_expansion_at_load(tmp_path) -> None:
    model = _conv_gemm_model(_with_values((8, 4, 3, 3), 8, 0.5, seed=5), _with_values((5, 288), 16, seed=6))
    _pack_all(model)
    options = runtime.session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert ops.isdisjoint({"BitShift", "Div", "Mod", "CumSum", "Gather", "Split", "MatMul", "Reshape"})


def test_integer_constants_are_written_as_varints_only_when_smaller() -> None:
    shape = storage.compact_tensor(np.array([16, 16, 3, 3], dtype=np.int64), "s")
    assert isinstance(shape, ir.TensorProtoTensor) and list(shape.raw.int64_data) == [16, 16, 3, 3]
    np.testing.assert_array_equal(shape.numpy(), [16, 16, 3, 3])
    wide = np.array([-1, 1 << 40], dtype=np.int64)  # 10 and 6 varint bytes: raw is smaller
    assert not isinstance(storage.compact_tensor(wide, "w"), ir.TensorProtoTensor)
    floats = np.ones(3, dtype=np.float32)
    assert not isinstance(storage.compact_tensor(floats, "f"), ir.TensorProtoTensor)
    model = _conv_gemm_model(_with_values((8, 4, 3, 3), 8, 0.5, seed=5), _with_values((5, 288), 16, seed=6))
    _pack_all(model)
    proto = ir.to_proto(model)
    ints = [t for t in proto.graph.initializer if t.data_type in (TensorProto.INT64, TensorProto.INT32)]
    assert ints and all(not t.raw_data for t in ints)
    assert not any(n.op_type == "BitShift" for n in proto.graph.node)  # Cast/Div/Mod: no attribute


def test_packed_streams_are_not_mistaken_for_quantized_weights() -> None:
    from onnxslim_tool.quantization.detect import is_quantized

    model = _conv_gemm_model(_with_values((8, 4, 3, 3), 8, 0.5, seed=5), _with_values((5, 288), 16, seed=6))
    _pack_all(model)
    assert any(n.op_type == "Cast" and n.inputs[0].is_initializer() for n in model.graph)  # uint8 -> int32
    assert is_quantized(model) is None


def test_unpack_restores_initializers_and_repacking_is_identical() -> None:
    model = _conv_gemm_model(_with_values((8, 4, 3, 3), 3, 0.4, seed=7), _with_values((5, 288), 16, seed=8))
    originals = {n.name: v.const_value.numpy() for n, _, v in storage.layer_weights(model.graph)}
    _pack_all(model)
    packed_size = io.serialized_size(model)
    restored = storage.unpack(model)
    assert len(restored) == 2 and len(model.graph) == 3  # only the layers are left
    for node, _, value in storage.layer_weights(model.graph):
        assert value.is_initializer()
        np.testing.assert_array_equal(value.const_value.numpy(), originals[node.name])
    storage.pack(model, restored)
    assert io.serialized_size(model) == packed_size


def test_old_opsets_get_codes_expanded_with_integer_division_but_no_masks() -> None:
    codes_w = _with_values((8, 4, 3, 3), 4, seed=11)
    pruned_w = np.where(RNG.random((5, 288)) < 0.7, 0, RNG.standard_normal((5, 288))).astype(np.float32)
    model = _conv_gemm_model(codes_w, pruned_w, opset=9)
    assert storage.can_pack(model) is None and storage.can_pack(model, sparse=True) is not None
    stored = {s.name: s.encoding for s in _pack_all(model)}
    assert stored["cw"] == "codes (2-bit, per-tensor codebook)"
    assert not stored["fw"].startswith("sparse")  # no mask; 7-bit per-channel codes are exact and smaller
    assert {n.op_type for n in model.graph} >= {"Div", "Sub", "Gather"}
    expanded = _expanded_weights(model)
    np.testing.assert_array_equal(expanded["conv"], codes_w)
    np.testing.assert_array_equal(expanded["fc"], pruned_w)
    assert storage.can_pack(_conv_gemm_model(codes_w, pruned_w, opset=6)) is not None


def test_old_opsets_write_large_sub_byte_streams_a_byte_per_code(monkeypatch) -> None:
    """Before opset 11 a large stream's expansion would be int32 throughout: bytes instead."""
    monkeypatch.setattr(storage, "NARROW_ABOVE", 1000)
    conv_w, fc_w = _with_values((8, 4, 3, 3), 4, seed=12), _with_values((5, 288), 40, seed=13)
    model = _conv_gemm_model(conv_w, fc_w, opset=9)
    stored = {s.name: s for s in _pack_all(model)}
    assert stored["fw"].encoding == "codes (8-bit, per-tensor codebook)"  # 6-bit codes, 1440 > 1000
    assert stored["fw"].written_bytes == 1440 + 40 * 4
    assert stored["cw"].encoding == "codes (2-bit, per-tensor codebook)"  # 288 codes: small stream
    expanded = _expanded_weights(model)
    np.testing.assert_array_equal(expanded["conv"], conv_w)
    np.testing.assert_array_equal(expanded["fc"], fc_w)


def test_storage_report_gives_written_bytes_and_a_huffman_estimate() -> None:
    model = _conv_gemm_model(_with_values((8, 4, 3, 3), 16, seed=9), _with_values((5, 288), 4, 0.8, seed=10))
    _pack_all(model)
    rows = {r.layer: r for r in storage.storage_report(model)}
    assert rows["conv"].encoding.startswith("codes (4-bit")
    assert rows["conv"].written_bytes == 288 * 4 // 8 + 64
    assert rows["fc"].encoding.startswith("sparse-codes")
    for row in rows.values():
        assert row.dense_bytes == 4 * row.params
        assert 0 < row.huffman_bytes <= row.written_bytes


def test_hashed_weights_expand_to_the_numpy_hash() -> None:
    weight = RNG.standard_normal((64, 24)).astype(np.float32)
    model = _matmul_model(weight)
    table = RNG.standard_normal(8).astype(np.float32)
    slots = storage.hash_slots(weight.size, 8, seed=3).reshape(weight.shape)
    expected = np.where(slots < 8, table[slots % 8], -table[slots % 8])
    storage.write_hashed(model, [(model.graph.initializers["w"], table)], seed=3)
    stored = sum(v.const_value.numpy().nbytes for v in model.graph.initializers.values())
    assert stored <= table.nbytes + 8 * 9  # the table, hash scalars and one shape: no per-weight data
    np.testing.assert_array_equal(_expanded_weights(model)["mm"], expected)


def test_unpack_leaves_foreign_constant_subgraphs_alone() -> None:
    """A float16 weight behind a Cast must not come back as a (twice as large) float32 tensor."""
    half = RNG.standard_normal((24, 10)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(half, "w16")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert storage.unpack(model) == []
    assert [n.op_type for n in model.graph] == ["Cast", "MatMul"]


# ----- float16 biases ------------------------------------------------------------------------------


def _biased_convs(biases: list[np.ndarray]) -> ir.Model:
    """x[N,4,5,5] -> one 1x1 Conv per bias (4 -> len(bias) channels), each a graph output."""
    rng = np.random.default_rng(3)
    nodes, inits, outputs = [], [], []
    for i, bias in enumerate(biases):
        weight = rng.standard_normal((bias.size, 4, 1, 1)).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes.append(helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"y{i}"], name=f"conv{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["N", bias.size, 5, 5]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])], outputs, inits
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_half_biases_expand_to_the_float16_rounding_and_shrink_the_file() -> None:
    biases = [RNG.standard_normal(n).astype(np.float32) * 3 for n in (16, 32, 10)]
    model = _biased_convs(biases)
    before = io.serialized_size(model)
    values = [model.graph.initializers[f"b{i}"] for i in range(3)]
    assert storage.pack_half(model, values) == values
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert io.serialized_size(model) < before
    assert before - io.serialized_size(model) >= storage.half_bytes_saved([16, 32, 10]) - 8  # estimate ~ real
    halves = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert len(halves) == 1 and not any(f"b{i}" in model.graph.initializers for i in range(3))
    feed = {"x": RNG.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    zero = {"x": np.zeros((1, 4, 5, 5), np.float32)}  # a 1x1 Conv of zeros is its bias
    outputs = runtime.run_model(model, [zero])
    for i, bias in enumerate(biases):
        expected = bias.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(outputs[f"y{i}"][0, :, 0, 0], expected)
    assert runtime.run_model(model, [feed])  # and it runs on real inputs


def test_half_biases_only_when_smaller_and_only_plain_float32_vectors() -> None:
    tiny = _biased_convs([np.ones(2, np.float32)])
    assert storage.half_bytes_saved([2]) <= 0
    assert storage.pack_half(tiny, [tiny.graph.initializers["b0"]]) == []
    assert "b0" in tiny.graph.initializers
    huge = _biased_convs([np.full(64, 1e6, np.float32), RNG.standard_normal(64).astype(np.float32)])
    kept = storage.pack_half(huge, list(huge.graph.initializers[f"b{i}"] for i in range(2)))
    assert [v.name for v in kept] == ["b1"]  # 1e6 is beyond float16's range
    assert "b0" in huge.graph.initializers


def test_exact_half_packs_only_vectors_float16_holds_exactly() -> None:
    exact = [RNG.standard_normal(n).astype(np.float16).astype(np.float32) for n in (32, 48)]
    inexact = RNG.standard_normal(40).astype(np.float32) + np.float32(1e-4)
    model = _biased_convs([*exact, inexact])
    zero = {"x": np.zeros((1, 4, 5, 5), np.float32)}
    before = runtime.run_model(model, [zero])
    packed = storage.pack_exact_half(model)
    assert sorted(v.name for v in packed) == ["b0", "b1"]
    assert "b2" in model.graph.initializers
    after = runtime.run_model(model, [zero])
    for name in before:  # lossless
        np.testing.assert_array_equal(before[name], after[name])


@pytest.mark.parametrize("bits_values", [8, 16, 64], ids=["3-bit planes", "4-bit fields", "6-bit planes"])
def test_large_streams_expand_in_uint8_are_not_taken_for_quantized_and_repack_the_same(
    bits_values: int, monkeypatch
) -> None:
    from onnxslim_tool.quantization.detect import is_quantized

    monkeypatch.setattr(storage, "NARROW_ABOVE", 0)
    fc = _with_values((5, 288), bits_values, seed=4)
    model = _conv_gemm_model(_with_values((8, 4, 3, 3), 4, seed=3), fc)
    _pack_all(model)
    ops = {n.op_type for n in model.graph}
    assert "BitShift" in ops and "Div" not in ops
    assert is_quantized(model) is None
    size, weights = io.serialized_size(model), _expanded_weights(model)
    storage.pack(model, storage.unpack(model))
    assert io.serialized_size(model) == size
    for name, array in _expanded_weights(model).items():
        np.testing.assert_array_equal(array, weights[name])
