"""Exact, compact storage of compressed weights, expanded in-graph when a session loads.

Weight sharing leaves a layer with few distinct values and pruning leaves it with many
zeros; neither makes the *file* smaller while the weight is a float tensor. `pack` stores
each such weight in the cheapest of these exact encodings:

- ``codes``: b-bit codes (b = 1..8) plus a float codebook, one per tensor or one per
  output channel;
- ``sparse``: a 1-bit mask plus the nonzero float values;
- ``sparse-codes``: a 1-bit mask plus b-bit codes of the nonzeros (code 0 is reserved for
  zero, so the same codebook serves the dense and the sparse form);
- ``dense``: left as it is when nothing above is smaller.

`pack_half` (lossy, so only a lossy pass calls it) stores float32 vectors such as biases
as one float16 tensor, cast back and split in-graph, when that is smaller.

Codes of all weights that share an encoding are concatenated into one stream (fewer nodes:
the sample models are 60-90 KB, where every node counts). Standard ops expand the stream:
Cast, integer Div and Mod (Div/Mul/Sub before opset 10), MatMul, CumSum for the
masks (opset >= 11), Gather, Add, Split, Reshape. onnxruntime constant-folds all of them when
it builds a session, so inference runs on ordinary dense float weights at the original
speed. ONNX ``sparse_initializer`` is not used: onnx_ir drops it on load and the full
onnx checker rejects it. UINT4 initializers (opset 21) would take the same bytes as the
packed 4-bit stream.

The choice is a pure function of a weight's values (`choose_encoding`), so `unpack` then
`pack` writes the same model again: a pass unpacks what earlier passes packed, edits plain
arrays, and packs again.

Stream layouts (`pack_codes`): 8-bit codes are bytes; 1, 2 and 4-bit codes are fields of
a byte (code j of a byte in its bits b*j .. b*j+b-1); 3, 5, 6 and 7-bit codes are b
bit-planes, plane p holding bit p of every code, least significant bit first.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxslim_tool.graph_utils import attr

MIN_OPSET = 7  # codes: Cast, Div/Mul/Sub on int32, MatMul, Gather, Reshape, Split
SPARSE_MIN_OPSET = 11  # masks need CumSum
MAX_CODEBOOK = 256  # codes are at most 8 bits
# Bytes a packed weight costs beyond its tensors (its Reshape/Gather nodes and shape constant):
# packing a weight must beat its dense size by more than this.
PER_WEIGHT_OVERHEAD = 48
# Streams of at least this many codes expand in uint8 (BitShift, Mod; planes by MatMulInteger)
# rather than int32: onnxruntime keeps every folded intermediate until the session is built,
# and int32 bit-planes of VGG19's 6-bit fc6 took 19x the layer's float size to load. Smaller
# streams keep the int32 form, a few bytes shorter (no BitShift direction attribute).
NARROW_ABOVE = 1 << 20
NARROW_MIN_OPSET = 11  # BitShift

# Ops of the expansion subgraphs `pack` writes; `unpack` evaluates only subgraphs made of them.
EXPANSION_OPS = frozenset(
    {
        "BitShift",  # large streams (uint8 arithmetic), and files written before Div/Mod
        "MatMulInteger",  # bit-planes of large streams
        "Mod",
        "Cast",
        "Reshape",
        "MatMul",
        "CumSum",
        "Mul",
        "Add",
        "Neg",
        "Concat",
        "Gather",
        "Div",
        "Sub",
        "Split",
        "Range",
    }
)
# Inputs of these ops that are layer weights (the slots a compression pass may encode).
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
}

DENSE, SPARSE, CODES, SPARSE_CODES = "dense", "sparse", "codes", "sparse-codes"


# ----- choosing an encoding ---------------------------------------------------------------------


@dataclass(frozen=True)
class Codebook:
    """Codes into a codebook: one row per channel along `axis` (0 or -1), or one for all.

    ``values`` is [K] (one codebook), [C, K] (axis 0) or [K, C] (axis -1). Entry 0 is 0.0
    whenever the weight has zeros, so zeros have code 0 in every row.
    """

    values: np.ndarray
    codes: np.ndarray  # int, same shape as the weight
    bits: int
    axis: int | None = None


@dataclass(frozen=True)
class Encoding:
    """How one weight is stored, and the bytes its tensors take in the file."""

    kind: str
    payload_bytes: int
    codebook: Codebook | None = None

    @property
    def bits(self) -> int:
        return self.codebook.bits if self.codebook is not None else 0

    def describe(self) -> str:
        if self.kind in (DENSE, SPARSE):
            return self.kind
        layout = "per-tensor" if self.codebook.axis is None else "per-channel"
        return f"{self.kind} ({self.bits}-bit, {layout} codebook)"


def bits_for(count: int) -> int:
    """Code width for `count` distinct symbols (at least 1)."""
    return max(1, math.ceil(math.log2(max(count, 1))))


def choose_encoding(array: np.ndarray, sparse: bool = True) -> Encoding:
    """The smallest exact encoding of `array` (ties go to the simpler one); masks only if `sparse`."""
    n, item = array.size, array.dtype.itemsize
    options = [Encoding(DENSE, n * item)]
    if array.dtype.kind != "f" or n == 0 or not np.isfinite(array).all():
        return options[0]
    nnz = int(np.count_nonzero(array))
    sparse = sparse and nnz < n
    mask_bytes = _ceil_div(n, 8)
    if sparse:
        options.append(Encoding(SPARSE, mask_bytes + nnz * item))
    for book in _codebooks(array):
        options.append(Encoding(CODES, _ceil_div(n * book.bits, 8) + book.values.nbytes, book))
        if sparse:
            stream = mask_bytes + _ceil_div((nnz + 1) * book.bits, 8)
            options.append(Encoding(SPARSE_CODES, stream + book.values.nbytes, book))
    best = min(options, key=lambda e: e.payload_bytes + (0 if e.kind == DENSE else PER_WEIGHT_OVERHEAD))
    return best if best.payload_bytes + PER_WEIGHT_OVERHEAD < options[0].payload_bytes else options[0]


def _codebooks(array: np.ndarray) -> Iterator[Codebook]:
    """Exact codebooks of `array`: one for the tensor, and per channel along axis 0 / -1."""
    has_zero = bool((array == 0).any())
    book = _tensor_codebook(array.ravel(), has_zero)
    if book is not None:
        values, codes = book
        yield Codebook(values, codes.reshape(array.shape), bits_for(values.size))
    if array.ndim < 2:
        return
    axes = (0, -1) if array.ndim == 2 else (0,)
    for axis in axes:
        rows = array.reshape(array.shape[0], -1) if axis == 0 else array.T
        per_row = _row_codebooks(rows, has_zero)
        if per_row is None:
            continue
        values, codes = per_row
        if axis == 0:
            yield Codebook(values, codes.reshape(array.shape), bits_for(values.shape[1]), 0)
        else:
            yield Codebook(values.T.copy(), codes.T.copy(), bits_for(values.shape[1]), -1)


def _tensor_codebook(flat: np.ndarray, zero_first: bool) -> tuple[np.ndarray, np.ndarray] | None:
    values = np.unique(flat)
    if values.size > MAX_CODEBOOK:
        return None
    codes = code_of(flat, values)
    if zero_first:
        values, codes = _move_zero_first(values, codes)
    return values, codes


_CHUNK = 1 << 20  # elements per step where a whole-tensor int64 temporary would not fit


def code_of(flat: np.ndarray, values: np.ndarray) -> np.ndarray:
    """uint8 `np.searchsorted(values, flat)` for sorted `values` (<= 256 of them): the index
    of each element among `values`, a chunk at a time (np.unique's int64 inverse of a
    100M-weight layer is 800 MB)."""
    codes = np.empty(flat.shape, dtype=np.uint8)
    for start in range(0, flat.size, _CHUNK):
        codes[start : start + _CHUNK] = np.searchsorted(values, flat[start : start + _CHUNK])
    return codes


def _row_codebooks(rows: np.ndarray, zero_first: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """[C, K] codebooks (rows padded with zeros) and [C, M] codes, or None if a row is too diverse."""
    tables = []
    codes = np.empty(rows.shape, dtype=np.uint8)
    for r, row in enumerate(rows):  # row by row: no sorted copy of the whole tensor
        values = np.unique(row)
        if zero_first and not (values == 0).any():  # every row gets 0.0 at code 0
            values = np.concatenate([[0], values]).astype(rows.dtype)
        if values.size > MAX_CODEBOOK:
            return None
        row_codes = code_of(row, values)
        if zero_first:
            values, row_codes = _move_zero_first(values, row_codes)
        tables.append(values)
        codes[r] = row_codes
    width = 2 ** bits_for(max(t.size for t in tables))
    books = np.zeros((rows.shape[0], width), dtype=rows.dtype)
    for r, values in enumerate(tables):
        books[r, : values.size] = values
    return books, codes


def _move_zero_first(values: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    zero = int(np.flatnonzero(values == 0)[0])
    order = np.concatenate([[zero], np.delete(np.arange(values.size), zero)])
    remap = np.empty(order.size, dtype=codes.dtype)
    remap[order] = np.arange(order.size)
    return values[order], remap[codes]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ----- bit streams (numpy side) -----------------------------------------------------------------


def layout(bits: int) -> str:
    """How b-bit codes sit in bytes: whole bytes (8), fields of one byte (1, 2, 4), bit-planes."""
    if bits == 8:
        return "bytes"
    return "fields" if 8 % bits == 0 else "planes"


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes < 2**bits as the uint8 stream the in-graph expansion reads.

    bytes: [1, n]; fields: [ceil(n*b/8), 1], code j of a byte in bits b*j..b*j+b-1;
    planes: [b, ceil(n/8), 1], plane p holding bit p of each code, LSB first.
    """
    # uint8 throughout (codes < 256): int64 bit-planes of a 100M-weight layer took 5 GB.
    flat = np.asarray(codes).ravel().astype(np.uint8, copy=False)
    kind = layout(bits)
    if kind == "bytes":
        return flat.reshape(1, -1)
    if kind == "fields":
        per_byte = 8 // bits
        padded = np.zeros(expanded_length(flat.size, bits), dtype=np.uint8)
        padded[: flat.size] = flat
        fields = padded.reshape(-1, per_byte)
        stream = np.zeros(fields.shape[0], dtype=np.uint8)
        for j in range(per_byte):  # disjoint bit fields: or-ing them is their sum
            stream |= fields[:, j] << np.uint8(bits * j)
        return stream.reshape(-1, 1)
    planes = [np.packbits((flat >> np.uint8(p)) & np.uint8(1), bitorder="little") for p in range(bits)]
    return np.stack(planes)[:, :, None]


def unpack_codes(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_codes`: the numpy reference of the in-graph expansion."""
    kind = layout(bits)
    if kind == "bytes":
        return stream.reshape(-1)[:count].astype(np.int64)
    if kind == "fields":
        shifts = bits * np.arange(8 // bits)
        return ((stream.reshape(-1, 1).astype(np.int64) >> shifts) % (1 << bits)).reshape(-1)[:count]
    planes = np.unpackbits(stream.reshape(bits, -1), axis=1, bitorder="little")[:, :count]
    return (planes.astype(np.int64) << np.arange(bits)[:, None]).sum(axis=0)


def expanded_length(count: int, bits: int) -> int:
    """Codes the in-graph expansion yields for `count` codes: whole bytes, so maybe a few more."""
    kind = layout(bits)
    if kind == "bytes":
        return count
    if kind == "fields":
        return _ceil_div(count * bits, 8) * (8 // bits)
    return _ceil_div(count, 8) * 8


# ----- Huffman estimate -------------------------------------------------------------------------


def huffman_bits(counts: Iterable[int]) -> int:
    """Total bits of an optimal prefix code for symbols with these counts (1 bit each if one)."""
    weights = [c for c in counts if c > 0]
    if len(weights) <= 1:
        return sum(weights)
    heapq.heapify(weights)
    total = 0
    while len(weights) > 1:
        merged = heapq.heappop(weights) + heapq.heappop(weights)
        total += merged  # every merge adds one bit to each symbol below it
        heapq.heappush(weights, merged)
    return total


def huffman_estimate(array: np.ndarray) -> int:
    """Bytes Deep Compression's Huffman stage would reach on this weight: an ESTIMATE, not written.

    Per exact codebook: codes (zeros included) Huffman-coded at their own frequencies, plus
    the table; for a sparse weight also Huffman-coded relative indices (gaps between
    nonzeros, 8-bit with filler entries as in Deep Compression) plus the nonzeros' codes.
    Float weights without a codebook only gain from the sparse form (indices + floats).
    """
    flat = array.ravel()
    item = array.dtype.itemsize
    options = [flat.size * item]
    sparse = flat.size > 0 and not flat.all()
    nonzero = np.flatnonzero(flat) if sparse else None
    gap_bits = fillers = 0
    if sparse:
        # Histograms, not Python lists: a list of a 100M-weight layer's gaps took ~9 GB.
        gaps = np.diff(nonzero, prepend=-1) - 1
        fillers = int((gaps // 256).sum())
        gap_bits = huffman_bits(np.bincount(gaps % 256, minlength=256).tolist()) + 8 * fillers
        del gaps
    books = _codebooks(array) if array.dtype.kind == "f" and np.isfinite(array).all() else ()
    for book in books:  # one at a time: each holds codes as large as the weight
        codes = book.codes.ravel()
        options.append(_ceil_div(huffman_bits(np.bincount(codes).tolist()), 8) + book.values.nbytes)
        if sparse:
            nz_bits = huffman_bits(np.bincount(codes[nonzero]).tolist()) if nonzero.size else 0
            options.append(_ceil_div(gap_bits + nz_bits, 8) + book.values.nbytes)
    if sparse:
        options.append(_ceil_div(gap_bits, 8) + (nonzero.size + fillers) * item)
    return int(min(options))


# ----- finding layer weights --------------------------------------------------------------------


def layer_weights(graph: ir.Graph) -> list[tuple[ir.Node, int, ir.Value]]:
    """(layer, input slot, value) for every constant weight of a Conv/ConvTranspose/Gemm/MatMul.

    Constant means an initializer or the output of an expansion `pack` wrote. Nodes whose
    inputs are all constant (an expansion's own MatMul) are computations, not layers.
    """
    found = []
    memo: dict[ir.Value, bool] = {}
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_SLOTS:
            continue
        if all(v is None or _is_expansion(v, memo) for v in node.inputs):
            continue
        for slot in WEIGHT_SLOTS[node.op_type]:
            value = node.inputs[slot] if slot < len(node.inputs) else None
            if value is not None and _is_expansion(value, memo):
                found.append((node, slot, value))
    return found


def layer_name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "") or node.op_type


def _is_expansion(value: ir.Value, memo: dict[ir.Value, bool]) -> bool:
    """Whether `value` is computed from initializers by expansion ops only."""
    if value in memo:
        return memo[value]
    if value.is_initializer() or value.const_value is not None:
        return True
    node = value.producer()
    ok = (
        node is not None
        and node.domain in ("", "ai.onnx")
        and node.op_type in EXPANSION_OPS
        and all(v is None or _is_expansion(v, memo) for v in node.inputs)
        and not value.is_graph_input()
    )
    memo[value] = ok
    return ok


@dataclass
class WeightTarget:
    """A layer weight a compression pass may rewrite: one initializer and the layers reading it."""

    value: ir.Value
    layers: list[ir.Node]
    slot: int

    @property
    def layer(self) -> ir.Node:
        return self.layers[0]

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()

    def set(self, array: np.ndarray) -> None:
        self.value.const_value = ir.tensor(array, name=self.value.name)
        self.value.shape = ir.Shape(array.shape)

    def output_axis(self) -> int:
        """The weight axis of the layer's output channels (0 or -1), where per-channel tables go."""
        node, array = self.layer, self.array
        if array.ndim != 2 or node.op_type == "Conv":
            return 0
        if node.op_type == "Gemm" and self.slot == 1:
            return 0 if attr(node, "transB", 0) else -1
        return -1 if node.op_type == "MatMul" and self.slot == 1 else 0


def select_weights(
    graph: ir.Graph, selects: Callable[[ir.Node], tuple[bool, str]], min_params: int, record
) -> list[WeightTarget]:
    """Float initializer weights of layers a pass may touch; every refusal goes to `record.skip`."""
    consumers: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
    for node, slot, value in layer_weights(graph):
        consumers.setdefault(value, []).append((node, slot))
    targets = []
    for value, users in consumers.items():
        layers = [node for node, _ in users]
        name = layer_name(layers[0])
        reason = _refusal(value, layers, selects, min_params)
        if reason:
            record.skip(name, reason)
        else:
            targets.append(WeightTarget(value, layers, users[0][1]))
    return targets


def _refusal(value: ir.Value, layers: list[ir.Node], selects, min_params: int) -> str | None:
    for node in layers:
        ok, why = selects(node)
        if not ok:
            return why if node is layers[0] else f"weight also used by {layer_name(node)}: {why}"
    if not value.is_initializer() or value.const_value is None:
        return "weight is computed in the graph, not stored"
    if value.is_graph_input():
        return "weight is also a graph input (can be overridden at run time)"
    array = value.const_value.numpy()
    if array.dtype.kind != "f":
        return f"weight is {array.dtype}, not float (already quantized?)"
    if array.size < min_params:
        return f"{array.size} params < min_params {min_params}"
    if not np.isfinite(array).all():
        return "weight has NaN/Inf values"
    return None


# ----- unpack -----------------------------------------------------------------------------------


def unpack(model: ir.Model) -> list[ir.Value]:
    """Turn every packed layer weight back into a plain initializer; returns those initializers.

    The expansion is evaluated with onnx's reference evaluator (exact integer ops and
    lookups), its nodes and the stream/codebook initializers it leaves unused are removed.
    """
    graph = model.graph
    computed = _unique(v for _, _, v in layer_weights(graph) if not v.is_initializer())
    packed = [v for v in computed if _written_by_pack(_expansion_nodes(graph, [v]))]
    if not packed:
        return []
    region = _expansion_nodes(graph, packed)
    arrays = _evaluate(model, region, packed)
    restored = []
    for value, array in zip(packed, arrays, strict=True):
        restored.append(_replace_with_initializer(graph, value, array))
    _remove_dead(graph, region)
    return restored


def _written_by_pack(nodes: Sequence[ir.Node]) -> bool:
    """Whether an expansion is ours: a lookup (Gather) fed by a uint8 stream or an index Range.

    Other constant subgraphs in front of a weight (a Cast of float16 weights, say) are left
    alone: materializing them could make the file larger.
    """
    ops = {n.op_type for n in nodes}
    streams = any(
        v is not None and v.is_initializer() and v.const_value.dtype == ir.DataType.UINT8
        for n in nodes
        for v in n.inputs
    )
    return "Gather" in ops and (streams or "Range" in ops)


def _expansion_nodes(graph: ir.Graph, outputs: Sequence[ir.Value]) -> list[ir.Node]:
    needed: set[ir.Node] = set()
    stack = [v.producer() for v in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in needed:
            continue
        needed.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return [node for node in graph if node in needed]  # graph order is topological


def _evaluate(model: ir.Model, nodes: Sequence[ir.Node], outputs: Sequence[ir.Value]) -> list[np.ndarray]:
    initializers = _unique(v for n in nodes for v in n.inputs if v is not None and v.is_initializer())
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "expansion",
        [],
        [onnx.ValueInfoProto(name=v.name) for v in outputs],
        initializer=[numpy_helper.from_array(v.const_value.numpy(), v.name) for v in initializers],
    )
    opset = _opset(model) or MIN_OPSET
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return [np.asarray(a) for a in ReferenceEvaluator(proto).run(None, {})]


def _replace_with_initializer(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> ir.Value:
    name = value.name
    value.name = None  # free the name for the initializer
    plain = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(_dtype(array)))
    plain.const_value = ir.tensor(array, name=name)
    graph.register_initializer(plain)
    value.replace_all_uses_with(plain)
    return plain


def _remove_dead(graph: ir.Graph, nodes: Sequence[ir.Node]) -> None:
    inputs = _unique(v for n in nodes for v in n.inputs if v is not None and v.is_initializer())
    for node in reversed(nodes):
        if not any(o.uses() or o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)
    for value in inputs:
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            del graph.initializers[value.name]


def _unique(values: Iterable[ir.Value]) -> list[ir.Value]:
    return list(dict.fromkeys(values))


def _dtype(array: np.ndarray) -> ir.DataType:
    return ir.DataType.from_numpy(array.dtype)


# ----- pack -------------------------------------------------------------------------------------


@dataclass
class StoredWeight:
    """What `pack` did with one weight: its encoding and bytes (payload: tensors only)."""

    name: str
    shape: tuple[int, ...]
    encoding: str
    dense_bytes: int
    written_bytes: int
    huffman_bytes: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.written_bytes if self.written_bytes else float("inf")


def can_pack(model: ir.Model, *, sparse: bool = False) -> str | None:
    """None when `pack` can write codes (and with `sparse`, masks) into this model, else why not."""
    opset = _opset(model)
    needed = SPARSE_MIN_OPSET if sparse else MIN_OPSET
    if opset is None or opset < needed:
        what = "sparse storage" if sparse else "compact storage"
        return f"{what} needs opset >= {needed} (model has {opset})"
    return None


def _opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def pack(model: ir.Model, values: Iterable[ir.Value]) -> list[StoredWeight]:
    """Store each initializer in `values` in its cheapest exact encoding; report every one.

    Initializers for which nothing beats the dense tensor stay as they are.
    """
    graph = model.graph
    if can_pack(model) is not None:
        return [_stored(v, Encoding(DENSE, 0), dense=True) for v in _unique(values)]
    sparse = can_pack(model, sparse=True) is None
    writer = _Writer(graph, _opset(model))
    chosen = []
    for value in _unique(values):
        array = value.const_value.numpy()
        # An initializer that is also a graph input can be overridden at run time: keep it.
        overridable = value.is_graph_input() or value.is_graph_output()
        encoding = Encoding(DENSE, array.nbytes) if overridable else choose_encoding(array, sparse)
        chosen.append((value, array, encoding))
    if writer.opset < NARROW_MIN_OPSET:
        chosen = _bytes_for_large_streams(chosen)
    groups: dict[tuple[str, int], list[tuple[ir.Value, np.ndarray, Encoding]]] = {}
    report = []
    for value, array, encoding in chosen:
        report.append(_stored(value, encoding, dense=encoding.kind == DENSE))
        if encoding.kind != DENSE:
            groups.setdefault((encoding.kind, encoding.bits), []).append((value, array, encoding))
    tables = writer.half_tables([e for members in groups.values() for _, _, e in members])
    for (kind, bits), members in groups.items():
        flats = writer.stream_outputs(kind, bits, members)
        for (value, array, encoding), flat in zip(members, flats, strict=True):
            weight = writer.lookup(flat, array, encoding, tables.get(id(encoding)))
            _swap_in(graph, value, weight)
    writer.commit()
    return report


def _half_exact(values: np.ndarray) -> bool:
    """Whether float16 holds every value exactly (a table a lossy pass rounded to float16)."""
    if values.dtype != np.float32 or not np.isfinite(values).all() or np.abs(values).max() > HALF_MAX:
        return False
    return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def _bytes_for_large_streams(chosen: list[tuple[ir.Value, np.ndarray, Encoding]]) -> list:
    """Before opset 11 (no uint8 BitShift), a stream of `NARROW_ABOVE` or more sub-byte codes
    is written a byte per code: its int32 expansion would take up to 19x the layer's float size
    while onnxruntime builds the session, the byte form 2x, for a file up to 8/b larger."""
    totals: dict[int, int] = {}
    for _, array, encoding in chosen:
        if encoding.kind == CODES and layout(encoding.bits) != "bytes":
            totals[encoding.bits] = totals.get(encoding.bits, 0) + array.size
    wide = {bits for bits, total in totals.items() if total >= NARROW_ABOVE}
    out = []
    for value, array, encoding in chosen:
        if encoding.kind == CODES and encoding.bits in wide:
            book = dataclasses.replace(encoding.codebook, bits=8)
            encoding = Encoding(CODES, array.size + book.values.nbytes, book)
        out.append((value, array, encoding))
    return out


def _stored(value: ir.Value, encoding: Encoding, *, dense: bool) -> StoredWeight:
    array = value.const_value.numpy()
    return StoredWeight(
        name=value.name or "",
        shape=tuple(array.shape),
        encoding=DENSE if dense else encoding.describe(),
        dense_bytes=array.nbytes,
        written_bytes=array.nbytes if dense else encoding.payload_bytes,
        huffman_bytes=huffman_estimate(array),
    )


def _swap_in(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Consumers of initializer `old` read `new`; `old` leaves the graph."""
    old.replace_all_uses_with(new)
    if old.name in graph.initializers and not old.uses():
        del graph.initializers[old.name]


def _flat_table(book: Codebook) -> np.ndarray:
    """The codebook as `lookup` reads it: [K], or per-channel rows [C, K] laid out flat."""
    rows = book.values if book.axis in (None, 0) else book.values.T
    return np.ascontiguousarray(rows).reshape(-1)


class _Writer:
    """Builds expansion subgraphs with short names; nodes go first in the graph on `commit`."""

    def __init__(self, graph: ir.Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[ir.Node] = []
        self._taken = _all_names(graph)
        self._counter = 0
        self._consts: dict[tuple[str, tuple[int, ...], bytes], ir.Value] = {}

    # -- naming and constants --
    def name(self) -> str:
        # '_0'..'_Z', '_00'..: short (a pass that packs after the final renaming, as the
        # quantizer storing codes again does, leaves them as they are) and never one of the
        # [0-9a-zA-Z]+ names `shorten_names` renames to, one by one, afterwards.
        while True:
            candidate = "_" + _base62(self._counter)
            self._counter += 1
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate

    def const(self, array: np.ndarray) -> ir.Value:
        """An initializer holding `array`, shared when the same bytes were asked for before."""
        array = np.asarray(array, order="C")  # ascontiguousarray would make scalars 1-d
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.name()
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(_dtype(array)))
            value.const_value = compact_tensor(array, name)
            self.graph.register_initializer(value)
            self._consts[key] = value
        return self._consts[key]

    def op(
        self, op_type: str, inputs: Sequence[ir.Value], num_outputs: int = 1, **attributes
    ) -> list[ir.Value]:
        # An empty name (not None) keeps onnx_ir from naming the node: ~15 bytes per node.
        node = ir.node(op_type, list(inputs), attributes or None, num_outputs=num_outputs, name="")
        for output in node.outputs:
            output.name = self.name()
        self.nodes.append(node)
        return list(node.outputs)

    def commit(self) -> None:
        if not self.nodes:
            return
        first = next(iter(self.graph), None)
        if first is None:
            self.graph.extend(self.nodes)
        else:
            self.graph.insert_before(first, self.nodes)

    # -- streams --
    def codes(self, codes: np.ndarray, bits: int) -> ir.Value:
        """Int32 [1, N'] codes expanded from a packed stream (N' >= N, see `expanded_length`)."""
        stream = self.const(pack_codes(codes, bits))
        kind = layout(bits)
        if kind == "bytes":
            return self.op("Cast", [stream], to=int(ir.DataType.INT32))[0]
        if kind == "fields":
            shifts, modulus, rows = bits * np.arange(8 // bits), 1 << bits, 1
        else:
            shifts, modulus, rows = np.arange(8), 2, bits
        count = int(np.asarray(codes).size)
        narrow = count >= NARROW_ABOVE and self.opset >= NARROW_MIN_OPSET
        expand = self._narrow_fields if narrow else self._fields
        fields = expand(stream, shifts, modulus)
        # The exact length, not -1: a varint -1 takes 10 bytes.
        length = expanded_length(count, bits)
        (flat,) = self.op("Reshape", [fields, self.const(np.array([rows, length], dtype=np.int64))])
        if kind == "fields":
            return self.op("Cast", [flat], to=int(ir.DataType.INT32))[0] if narrow else flat
        if narrow:  # uint8 planes summed straight into int32: no int32 copy of every plane
            weights = self.const((1 << np.arange(bits, dtype=np.uint8)).reshape(1, bits))
            return self.op("MatMulInteger", [weights, flat])[0]
        weights = self.const((1 << np.arange(bits, dtype=np.int32)).reshape(1, bits))
        return self.op("MatMul", [weights, flat])[0]

    def _narrow_fields(self, stream: ir.Value, shifts: np.ndarray, modulus: int) -> ir.Value:
        """uint8 (byte >> shift) % modulus: one byte per field where `_fields` takes four."""
        (shifted,) = self.op("BitShift", [stream, self.const(shifts.astype(np.uint8))], direction="RIGHT")
        return self.op("Mod", [shifted, self.const(np.array(modulus, dtype=np.uint8))])[0]

    def _fields(self, stream: ir.Value, shifts: np.ndarray, modulus: int) -> ir.Value:
        """int32 (byte >> shift) % modulus for every byte and shift (broadcast on the last axis).

        Cast, Div by 2^shift, Mod: 28 bytes fewer per stream than BitShift (its 'direction'
        attribute) + Mod + Cast, and the same values. Before opset 10 (no Mod): x - m * (x / m).
        """
        (wide,) = self.op("Cast", [stream], to=int(ir.DataType.INT32))
        (shifted,) = self.op("Div", [wide, self.const((1 << shifts).astype(np.int32))])
        m = self.const(np.array(modulus, dtype=np.int32))
        if self.opset >= 10:
            return self.op("Mod", [shifted, m])[0]
        (high,) = self.op("Div", [shifted, m])
        (scaled,) = self.op("Mul", [high, m])
        return self.op("Sub", [shifted, scaled])[0]

    def stream_outputs(
        self, kind: str, bits: int, members: Sequence[tuple[ir.Value, np.ndarray, Encoding]]
    ) -> list[ir.Value]:
        """One flat expanded tensor per member: float values (sparse) or int codes."""
        sizes = [array.size for _, array, _ in members]
        if kind == CODES:
            full = self.codes(np.concatenate([e.codebook.codes.ravel() for _, _, e in members]), bits)
            return self.split(full, sizes, 1, padded=expanded_length(sum(sizes), bits))
        masks = np.concatenate([array.ravel() != 0 for _, array, _ in members])
        positions = self._positions(masks)
        if kind == SPARSE:
            nonzeros = np.concatenate([array.ravel()[array.ravel() != 0] for _, array, _ in members])
            table = self.const(np.concatenate([np.zeros(1, nonzeros.dtype), nonzeros]))
            (gathered,) = self.op("Gather", [table, positions])
            return self.split(gathered, sizes, 1, padded=expanded_length(masks.size, 1))
        # sparse-codes: code 0 (zero) first, then the nonzeros' codes
        nz_codes = np.concatenate([e.codebook.codes.ravel()[array.ravel() != 0] for _, array, e in members])
        table = self.codes(np.concatenate([[0], nz_codes]), bits)
        (gathered,) = self.op("Gather", [table, positions], axis=1)  # [1, 1, N']
        return self.split(gathered, sizes, 2, padded=expanded_length(masks.size, 1))

    def _positions(self, mask: np.ndarray) -> ir.Value:
        """Per element: 0 where masked out, else the 1-based rank among the kept elements."""
        keep = self.codes(mask.astype(np.int64), 1)
        (rank,) = self.op("CumSum", [keep, self.const(np.array(1, dtype=np.int32))])
        return self.op("Mul", [rank, keep])[0]

    def split(self, flat: ir.Value, sizes: list[int], axis: int, padded: int) -> list[ir.Value]:
        pieces = list(sizes) + ([padded - sum(sizes)] if padded > sum(sizes) else [])
        if len(pieces) == 1:
            return [flat]
        split = np.array(pieces, dtype=np.int64)
        if self.opset >= 13:
            outputs = self.op("Split", [flat, self.const(split)], num_outputs=len(pieces), axis=axis)
        else:
            outputs = self.op("Split", [flat], num_outputs=len(pieces), axis=axis, split=split.tolist())
        return outputs[: len(sizes)]

    # -- per weight --
    def half_tables(self, encodings: Sequence[Encoding]) -> dict[int, ir.Value]:
        """Codebooks that float16 holds exactly, stored as one float16 tensor, Cast and Split
        (by `id` of their encoding); none when that would not be smaller. Still exact: only
        tables a lossy pass already rounded to float16 qualify."""
        chosen = [
            (e, _flat_table(e.codebook))
            for e in encodings
            if e.codebook is not None and _half_exact(_flat_table(e.codebook))
        ]
        if half_bytes_saved([t.size for _, t in chosen]) <= 0:
            return {}
        pieces = self.half_stream([t for _, t in chosen])
        return {id(e): piece for (e, _), piece in zip(chosen, pieces, strict=True)}

    def half_stream(self, vectors: Sequence[np.ndarray]) -> list[ir.Value]:
        """The vectors as one float16 tensor, cast to float32 and split back in-graph."""
        sizes = [v.size for v in vectors]
        stored = self.const(np.concatenate(vectors).astype(np.float16))
        (wide,) = self.op("Cast", [stored], to=int(ir.DataType.FLOAT))
        return self.split(wide, sizes, 0, padded=sum(sizes))

    def lookup(
        self, flat: ir.Value, array: np.ndarray, encoding: Encoding, table: ir.Value | None = None
    ) -> ir.Value:
        """The dense weight from its flat slice: reshape, then codebook lookup for codes
        (from `table` where `half_tables` stored the codebook, else a float constant).

        Per-channel tables are stored flat, row c at c*K; each code gets its row's offset
        added (a broadcast [C, 1] or [1, C] constant) before one Gather.
        """
        shape = np.array(array.shape, dtype=np.int64)
        if encoding.kind == SPARSE:
            return self.op("Reshape", [flat, self.const(shape)])[0]
        book = encoding.codebook
        if table is None:
            table = self.const(_flat_table(book).astype(array.dtype))
        if book.axis is None:
            (codes,) = self.op("Reshape", [flat, self.const(shape)])
            return self.op("Gather", [table, codes])[0]
        rows = book.values if book.axis == 0 else book.values.T  # [C, K]
        offsets = np.arange(rows.shape[0], dtype=np.int32) * rows.shape[1]
        if book.axis == -1:  # codes [M, C]: channel offsets along the last axis
            (codes,) = self.op("Reshape", [flat, self.const(shape)])
            (index,) = self.op("Add", [codes, self.const(offsets.reshape(1, -1))])
            return self.op("Gather", [table, index])[0]
        (codes,) = self.op("Reshape", [flat, self.const(np.array([rows.shape[0], -1], dtype=np.int64))])
        (index,) = self.op("Add", [codes, self.const(offsets.reshape(-1, 1))])
        (weight,) = self.op("Gather", [table, index])
        return weight if array.ndim == 2 else self.op("Reshape", [weight, self.const(shape)])[0]


def compact_tensor(array: np.ndarray, name: str) -> ir.TensorProtocol:
    """`array` as a tensor whose serialized form is the smaller of raw bytes and varints.

    Shapes, split sizes and small integer constants take 1-2 bytes per entry as protobuf
    varints (``int64_data``/``int32_data``) instead of 8 or 4 raw; the values are the same.
    """
    raw = ir.tensor(array, name=name)
    if array.dtype not in (np.int32, np.int64) or array.size == 0:
        return raw
    proto = onnx.TensorProto(name=name, data_type=int(_dtype(array)), dims=list(array.shape))
    field = proto.int64_data if array.dtype == np.int64 else proto.int32_data
    field.extend(array.ravel().tolist())
    if proto.ByteSize() >= numpy_helper.from_array(array, name).ByteSize():
        return raw
    return ir.TensorProtoTensor(proto)


def _all_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    names |= {v.name for v in graph.outputs if v.name}
    for node in graph.all_nodes():
        names.update(o.name for o in node.outputs if o.name)
        if node.name:
            names.add(node.name)
    return names


_NAME_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _base62(number: int) -> str:
    """The number-th name in shortlex order: '0'..'Z', '00'..'ZZ', '000'..."""
    base, length = len(_NAME_CHARS), 1
    while number >= base**length:
        number -= base**length
        length += 1
    text = ""
    for _ in range(length):
        number, rest = divmod(number, base)
        text = _NAME_CHARS[rest] + text
    return text


def shorten_names(model: ir.Model) -> None:
    """Give internal tensors short names, as the quantization pass does: on 60-90 KB models the
    exporter's names ('/res_a/res_a.0/Conv_output_0') cost more than a 4-bit layer.

    Graph inputs/outputs and node names (what --include/--exclude and reports use) are kept;
    duplicate initializers are stored once. The model computes exactly what it did.
    """
    from onnxslim_tool.quantization.compact import compact

    compact(model, {node.name for graph in model.graphs() for node in graph if node.name})


def compacted_size(model: ir.Model) -> int:
    """Serialized bytes of `model` after `shorten_names` (on a copy): sizes compared on this
    footing differ by what was compressed, not by which passes happened to compact names."""
    from onnxslim_tool import io

    if io.weight_bytes(model) > io.EXTERNAL_DATA_THRESHOLD or io.has_external_tensors(model):
        return io.serialized_size(model)  # names are noise beside gigabytes of weights
    copy = io.load(io.to_compact_proto(model).SerializeToString())
    shorten_names(copy)
    return io.serialized_size(copy)


# ----- float16 vectors (biases) -------------------------------------------------------------------

HALF_MAX = 65504.0  # largest finite float16
# Serialized bytes, measured on onnx protos with 1-2 character names: an initializer's own
# framing (name, dims, type, tags), and the Cast + Split + split sizes that expand the
# float16 vector (the Split's per-output bytes included).
_INITIALIZER_BYTES = 12
_HALF_FIXED_BYTES = 70  # rounded up: the decision must never make a file larger
_HALF_PER_PIECE_BYTES = 9


def half_bytes_saved(sizes: Sequence[int]) -> int:
    """Bytes that storing float32 vectors of these sizes as one float16 tensor saves (<= 0: none)."""
    dense = sum(4 * n + _INITIALIZER_BYTES for n in sizes)
    half = 2 * sum(sizes) + _HALF_FIXED_BYTES + _HALF_PER_PIECE_BYTES * len(sizes)
    return dense - half


def pack_half(model: ir.Model, values: Iterable[ir.Value]) -> list[ir.Value]:
    """Store float32 1-D initializers (layer biases) as one float16 tensor, Cast and Split in-graph.

    Lossy: each value is rounded to float16 (relative error <= 2^-11, absolute below 6e-8
    for subnormals), so callers put it behind an accuracy check. Values that are graph
    inputs/outputs, not float32 1-D, or outside float16's range stay as they are, and so does
    everything when the float16 form would not be smaller. Returns the values replaced.
    """
    chosen = []
    for value in _unique(values):
        array = value.const_value.numpy() if value.const_value is not None else None
        if (
            array is None
            or not value.is_initializer()
            or value.is_graph_input()
            or value.is_graph_output()
            or array.dtype != np.float32
            or array.ndim != 1
            or array.size == 0
            or not np.isfinite(array).all()
            or float(np.abs(array).max()) > HALF_MAX
        ):
            continue
        chosen.append((value, array))
    if half_bytes_saved([a.size for _, a in chosen]) <= 0 or _opset(model) is None:
        return []
    writer = _Writer(model.graph, _opset(model))
    pieces = writer.half_stream([a for _, a in chosen])
    for (value, _), piece in zip(chosen, pieces, strict=True):
        _swap_in(model.graph, value, piece)
    writer.commit()
    return [v for v, _ in chosen]


def pack_exact_half(model: ir.Model) -> list[ir.Value]:
    """`pack_half` for the float32 vectors float16 holds exactly: lossless, so any pass may
    call it. A lossy pass's float16 biases come back as float32 from a step that folds
    constants (onnxruntime's quantizer pre-processing does)."""
    exact = [
        value
        for value in model.graph.initializers.values()
        if value.const_value is not None
        and value.const_value.dtype == ir.DataType.FLOAT
        and len(value.const_value.shape) == 1
        # Quantization parameters stay plain initializers, as onnxruntime's fusions expect.
        and not any(use.node.op_type in ("QuantizeLinear", "DequantizeLinear") for use in value.uses())
        and _half_exact(value.const_value.numpy())
    ]
    return pack_half(model, exact)


# ----- hashed weights (Chen et al. 2015) --------------------------------------------------------

HASH_PRIME = 2_147_483_647  # 2**31 - 1: a*i stays below 2**62 for every index of a < 2**31-element stream


def hash_slots(count: int, buckets: int, seed: int, start: int = 0) -> np.ndarray:
    """Signed bucket of elements start..start+count-1 of the hashed stream, in [0, 2*buckets).

    slot < buckets reads +table[slot], slot >= buckets reads -table[slot - buckets]: the
    bucket and the sign hash of HashedNets in one universal hash ((a*i + c) mod p) mod 2K.
    """
    a, c = _hash_parameters(seed)
    index = np.arange(start, start + count, dtype=np.int64)
    return ((a * index + c) % HASH_PRIME) % (2 * buckets)


def _hash_parameters(seed: int) -> tuple[int, int]:
    rng = np.random.default_rng([seed, 0x4A54])
    return int(rng.integers(1, HASH_PRIME)), int(rng.integers(0, HASH_PRIME))


def can_hash(model: ir.Model) -> str | None:
    """None when the in-graph hash (Range, int64 Mod) can be written into this model."""
    opset = _opset(model)
    if opset is None or opset < SPARSE_MIN_OPSET:
        return f"hashed sharing needs opset >= {SPARSE_MIN_OPSET} for Range (model has {opset})"
    return None


def write_hashed(model: ir.Model, items: Sequence[tuple[ir.Value, np.ndarray]], seed: int) -> None:
    """Replace each initializer by its bucket table, the index hashing recomputed in-graph.

    Only the tables are stored; Range/Mul/Add/Mod rebuild the slots of every element (items
    in order form one stream, as `hash_slots` numbers them), which onnxruntime folds at load.
    """
    if not items:
        return
    buckets = items[0][1].size
    writer = _Writer(model.graph, _opset(model))
    sizes = [value.const_value.numpy().size for value, _ in items]
    a, c = _hash_parameters(seed)
    scalar = lambda x: writer.const(np.array(x, dtype=np.int64))  # noqa: E731
    (index,) = writer.op("Range", [scalar(0), scalar(sum(sizes)), scalar(1)])
    (mixed,) = writer.op("Mul", [index, scalar(a)])
    (shifted,) = writer.op("Add", [mixed, scalar(c)])
    (hashed,) = writer.op("Mod", [shifted, scalar(HASH_PRIME)])
    (slots,) = writer.op("Mod", [hashed, scalar(2 * buckets)])
    pieces = writer.split(slots, sizes, 0, padded=sum(sizes))
    for (value, table), piece in zip(items, pieces, strict=True):
        array = value.const_value.numpy()
        stored = writer.const(table.astype(array.dtype))
        (negated,) = writer.op("Neg", [stored])
        (signed,) = writer.op("Concat", [stored, negated], axis=0)
        (codes,) = writer.op("Reshape", [piece, writer.const(np.array(array.shape, dtype=np.int64))])
        (weight,) = writer.op("Gather", [signed, codes])
        _swap_in(model.graph, value, weight)
    writer.commit()


# ----- accounting -------------------------------------------------------------------------------


@dataclass
class LayerStorage:
    """One row of the storage report: a layer weight as it is stored in the model."""

    layer: str
    op_type: str
    weight: str
    params: int
    encoding: str
    dense_bytes: int
    written_bytes: int
    huffman_bytes: int  # ESTIMATE of Deep Compression's Huffman stage; not what is written


def storage_report(model: ir.Model) -> list[LayerStorage]:
    """Per layer weight: how it is stored, its bytes in the file and a Huffman estimate.

    Works on a copy: packed weights are evaluated, and their encoding re-derived from their
    values (the choice is deterministic, so it is the one `pack` wrote).
    """
    copy = ir.from_proto(ir.to_proto(model))
    packed = {v.name for _, _, v in layer_weights(copy.graph) if not v.is_initializer()}
    unpack(copy)
    rows = []
    seen: set[str] = set()
    for node, _, value in layer_weights(copy.graph):
        if value.name in seen or value.const_value is None:
            continue
        seen.add(value.name)
        array = value.const_value.numpy()
        sparse = can_pack(copy, sparse=True) is None
        encoding = choose_encoding(array, sparse) if value.name in packed else Encoding(DENSE, array.nbytes)
        rows.append(
            LayerStorage(
                layer=layer_name(node),
                op_type=node.op_type,
                weight=value.name,
                params=int(array.size),
                encoding=encoding.describe(),
                dense_bytes=int(array.nbytes),
                written_bytes=int(encoding.payload_bytes),
                huffman_bytes=int(huffman_estimate(array)),
            )
        )
    return rows
