"""Weight sharing: each layer keeps only 2^B distinct weights, stored as B-bit codes.

Two ways to choose the shared values:

- ``kmeans`` (Gong et al. 2014; Han et al., "Deep Compression", ICLR 2016): a codebook of
  2^B centroids per layer (or per output channel) fit by scikit-learn's k-means on the
  weights (mini-batch k-means above `MINIBATCH_ABOVE` weights), initialised linearly
  between min and max (Deep Compression's best), by density (quantiles), at random
  weights, or by k-means++. When a layer has zeros from pruning, zero is a reserved
  codebook entry and the other 2^B - 1 centroids are fit on the nonzero weights only,
  so the pruning mask survives.
- ``hash`` (Chen et al., "HashedNets", ICML 2015): weight i reads bucket h(i) of 2^B
  with a hashed sign; bucket values are the least-squares fit (the signed mean of their
  weights). Only the buckets are stored; the hash is recomputed in-graph. Without the
  training HashedNets assume, a random assignment loses most of a layer: expect large
  drops and let the accuracy budget decide.

Two fixed-form codebooks for hardware that computes with them (Zhou et al.'s and ShiftCNN's
targets, not onnxruntime's: it expands every codebook to float weights at load, so these
save file bytes exactly like k-means codes and run at fp32 speed here; the pass says so):

- ``ternary`` (Li & Liu, "Ternary Weight Networks", 2016): {-a, 0, +a} per layer (or per
  output channel), threshold 0.7 x mean|w|, a = mean |w| above it; 2-bit codes.
- ``pow2`` (ShiftCNN, Gudovskiy & Rigazio 2017; INQ, Zhou et al. 2017): 0 and +-2^e for the
  2^(B-1) - 1 exponents below the layer's largest weight, so a multiply becomes a shift;
  B-bit codes. The values are fixed powers of two: no refit.

With calibration data (``refit=None``, the default, or ``True``; ``False`` turns it off),
the shared values are then refit by least squares so that each layer's output on
calibration activations matches the original layer's output (the post-training stand-in
for Deep Compression's retraining of the centroids). Codes stay fixed; only the 2^B values
per table move.

Storage is `onnxslim_tool.storage`: codes packed at B bits plus the codebook, expanded
in-graph and constant-folded by onnxruntime at load, so the file shrinks by about 32/B on
the shared layers and inference speed is unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits

from onnxslim_tool import storage
from onnxslim_tool.errors import PassError
from onnxslim_tool.graph_utils import attr, single_consumer
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.storage import WeightTarget

METHODS = ("kmeans", "hash", "ternary", "pow2")
TERNARY_THRESHOLD = 0.7  # x mean |w|: TWN's approximation of the optimal threshold
INITS = ("linear", "density", "random", "kmeans++")
MINIBATCH_ABOVE = 65_536  # weights per fit above which mini-batch k-means is used
# Biases and shared values go float16 when that rounding is at most this share of the weight's
# sharing error.
HALF_BIAS_SHARE = 0.01
# A table whose weights are at least this share exactly zero was pruned: keep zero exact.
ZERO_RESERVED_ABOVE = 0.01


class WeightSharing(CompressionPass):
    """Share 2^`bits` values per layer (k-means codebook or hashed buckets), stored as codes."""

    name = "weight-sharing"
    lossless = False

    def __init__(
        self,
        bits: int = 4,
        method: str = "kmeans",
        per_channel: bool = False,
        init: str = "linear",
        refit: bool | None = None,
        min_params: int = 256,
        seed: int = 0,
        half_biases: bool = True,
        include=(),
        exclude=(),
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        if not 1 <= int(bits) <= 8:
            raise PassError(f"weight sharing needs 1 to 8 bits, got {bits}")
        if method not in METHODS:
            raise PassError(f"unknown weight sharing method '{method}'; choose from: {', '.join(METHODS)}")
        if init not in INITS:
            raise PassError(f"unknown k-means init '{init}'; choose from: {', '.join(INITS)}")
        if method == "hash" and per_channel:
            raise PassError("hashed weight sharing has one bucket table per layer; drop per_channel")
        if method == "pow2" and int(bits) < 2:
            raise PassError("power-of-two sharing needs at least 2 bits (zero and one +-2^e pair)")
        if method == "ternary":
            bits = 2  # {-a, 0, +a}: the codes are 2-bit whatever was asked
        self.bits = int(bits)
        self.method = method
        self.per_channel = bool(per_channel)
        self.init = init
        self.refit = None if refit is None else bool(refit)  # None: refit when data is given
        self.min_params = int(min_params)
        self.seed = int(seed)
        self.half_biases = bool(half_biases)

    @property
    def uses_data(self) -> bool:  # type: ignore[override]
        return self.refit is not False

    def milder(self) -> WeightSharing | None:
        if self.bits >= 8 or self.method == "ternary":  # ternary has no milder form of its own
            return None
        params = self.params()
        params["bits"] = self.bits + 1
        mild = WeightSharing(**params)
        mild.calibration = self.calibration  # usable outside the pipeline too
        return mild

    def rewrite(self, model, record: PassRecord) -> None:
        reason = storage.can_hash(model) if self.method == "hash" else storage.can_pack(model)
        if reason:
            record.notes.append(f"nothing shared: {reason}")
            return
        restored = storage.unpack(model)
        targets = storage.select_weights(model.graph, self.selects, self.min_params, record)
        if not targets:
            storage.pack(model, restored)  # leave earlier passes' storage as it was
            return
        originals = {t.value.name: t.array for t in targets}
        tables = self._share(targets)
        if self.refit and self.method == "pow2":
            record.notes.append("refit skipped: power-of-two values are fixed by construction")
        elif self.refit is not False and self.method != "pow2":
            self._refit(model, targets, tables, record)
        if self.method in ("ternary", "pow2"):
            record.notes.append(
                f"{self.method} codes: the file shrinks like any codebook, but onnxruntime expands "
                "them to float weights at load, so inference is not faster here (the form pays on "
                "shift/ternary hardware)"
            )
        rounded = 0
        for target, table in zip(targets, tables, strict=True):
            if self.half_biases and self.method != "hash":
                rounded += _round_to_half(table, target.array)
            target.set(table.weights(target.array.dtype))
        if rounded:
            record.notes.append(
                f"shared values of {rounded} layer(s) rounded to float16 (2^-11 relative, under 1% of "
                "the sharing error) and stored as float16"
            )
        biases = _biases(targets, originals) if self.half_biases else []
        ours = {t.value for t in targets}
        leftovers = [v for v in restored if v not in ours]  # packed by an earlier pass: pack again
        if self.method == "hash":
            items = [(t.value, table.values) for t, table in zip(targets, tables, strict=True)]
            storage.write_hashed(model, items, self.seed)
            storage.pack(model, leftovers)
            stored = {}
        else:
            stored = {s.name: s for s in storage.pack(model, [t.value for t in targets] + leftovers)}
        self._record(targets, tables, originals, stored, record)
        halved = storage.pack_half(model, biases)
        if halved:
            count = sum(v.const_value.size for v in halved)
            record.notes.append(
                f"biases of {len(halved)} shared layer(s) stored as float16 ({count} values, "
                f"{storage.half_bytes_saved([v.const_value.size for v in halved])} B saved; "
                "rounded to 2^-11 relative, cast back to float32 at load)"
            )
        storage.shorten_names(model)
        record.notes.append("internal tensor names shortened (graph inputs/outputs and node names kept)")

    # ----- choosing the shared values ---------------------------------------------------------------

    def _share(self, targets: list[WeightTarget]) -> list[SharedTable]:
        if self.method == "hash":
            return self._hash(targets)
        tables = []
        for target in targets:
            array = target.array
            axis = target.output_axis() if self.per_channel else None
            if self.method == "ternary":
                tables.append(share_ternary(array, axis))
            elif self.method == "pow2":
                tables.append(share_pow2(array, self.bits, axis))
            else:
                tables.append(share_kmeans(array, self.bits, self.init, self.seed, axis))
        return tables

    def _hash(self, targets: list[WeightTarget]) -> list[SharedTable]:
        buckets = 1 << self.bits
        tables, start = [], 0
        for target in targets:
            array = target.array
            slots = storage.hash_slots(array.size, buckets, self.seed, start).reshape(array.shape)
            start += array.size
            tables.append(SharedTable.hashed(array, slots, buckets))
        return tables

    # ----- data-aware refit -------------------------------------------------------------------------

    def _refit(self, model, targets, tables, record: PassRecord) -> None:
        if self.calibration is None:
            if self.refit:
                record.notes.append("refit asked for but no calibration data was given: values are data-free")
            return
        record.notes.extend(refit_tables(model, self.calibration, targets, tables, seed=self.seed))

    # ----- report -----------------------------------------------------------------------------------

    def _record(self, targets, tables, originals, stored, record: PassRecord) -> None:
        dense = written = huffman = 0
        for target, table in zip(targets, tables, strict=True):
            original = originals[target.value.name]
            error = _relative_error(original, target.array)
            what = self._describe(table)
            if self.method == "hash":
                size = table.values.nbytes
                storage_text = f"buckets {size} B stored, slots recomputed in-graph"
                estimate = size
            else:
                info = stored[target.value.name]
                size, estimate = info.written_bytes, info.huffman_bytes
                storage_text = (
                    f"stored as {info.encoding}: {size:,} B (was {info.dense_bytes:,} B, "
                    f"{info.ratio:.1f}x); Huffman estimate {estimate:,} B"
                )
            dense += original.nbytes
            written += size
            huffman += estimate
            n = int(original.size)
            for layer in target.layers:
                record.changed(
                    storage.layer_name(layer),
                    layer.op_type,
                    f"{what}, weight rel. error {error:.3f}; {storage_text}",
                    n,
                    n,
                )
        record.notes.append(
            f"shared weights: {dense:,} B as float -> {written:,} B written (codes + tables); "
            f"Huffman-coded estimate {huffman:,} B (Deep Compression's last stage; an estimate, "
            "not written)"
        )

    def _describe(self, table: SharedTable) -> str:
        if self.method == "hash":
            return f"{self.bits}-bit hashed sharing ({table.values.size} buckets)"
        layout = "per output channel" if table.axis is not None else "per layer"
        if self.method == "ternary":
            return f"ternary {{-a, 0, +a}} ({layout})"
        if self.method == "pow2":
            return f"{self.bits}-bit powers of two (0 and +-2^e, {layout})"
        zero = ", zero reserved" if table.zero_reserved else ""
        layout = "per output channel" if table.axis is not None else "per layer"
        return f"{self.bits}-bit k-means ({self.init} init, codebook {layout}{zero})"


# ----- tables: shared values + codes ----------------------------------------------------------------


class SharedTable:
    """Shared values and the code of every weight: weights = values[codes] (x sign for hashing).

    ``values`` is [K] (one table) or [C, K] (one per output channel, rows along ``axis``).
    With ``zero_reserved``, entry 0 is the pruned weights' exact zero: a refit never moves it.
    """

    def __init__(
        self,
        values: np.ndarray,
        codes: np.ndarray,
        axis: int | None = None,
        signs: np.ndarray | None = None,
        zero_reserved: bool = False,
    ) -> None:
        self.values = values
        self.codes = codes
        self.axis = axis
        self.signs = signs
        self.zero_reserved = zero_reserved

    @classmethod
    def hashed(cls, array: np.ndarray, slots: np.ndarray, buckets: int) -> SharedTable:
        codes = slots % buckets
        signs = np.where(slots < buckets, 1.0, -1.0)
        flat_codes, signed = codes.ravel(), (signs * array).ravel().astype(np.float64)
        sums = np.bincount(flat_codes, weights=signed, minlength=buckets)
        counts = np.bincount(flat_codes, minlength=buckets)
        values = np.divide(sums, counts, out=np.zeros(buckets), where=counts > 0)
        return cls(values, codes, signs=signs)

    def weights(self, dtype) -> np.ndarray:
        values = self.values.astype(dtype)
        if self.axis is None:
            out = values[self.codes]
        else:
            codes = self.codes if self.axis == 0 else np.moveaxis(self.codes, self.axis, 0)
            rows = np.take_along_axis(values, codes.reshape(codes.shape[0], -1), axis=1).reshape(codes.shape)
            out = rows if self.axis == 0 else np.moveaxis(rows, 0, self.axis)
        if self.signs is not None:
            out = out * self.signs.astype(dtype)
        return out.astype(dtype)


def share_kmeans(array: np.ndarray, bits: int, init: str, seed: int, axis: int | None) -> SharedTable:
    """k-means tables for `array`: one for all weights (axis None) or one per slice along `axis`."""
    k = 1 << bits
    if axis is None:
        values, codes, zero = _fit_table(array.ravel(), k, init, seed, array.dtype)
        return SharedTable(values, codes.reshape(array.shape), zero_reserved=zero)
    moved = np.moveaxis(array, axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    fits = [_fit_table(row, k, init, seed, array.dtype) for row in rows]
    values = np.zeros((rows.shape[0], k))
    for r, (row_values, _, _) in enumerate(fits):
        values[r, : row_values.size] = row_values
    codes = np.stack([c for _, c, _ in fits]).reshape(moved.shape)
    return SharedTable(values, np.moveaxis(codes, 0, axis), axis, zero_reserved=any(z for _, _, z in fits))


def share_ternary(array: np.ndarray, axis: int | None) -> SharedTable:
    """{-a, 0, +a} tables (TWN): per layer, or per slice along `axis`; code 0 is the exact zero."""
    return _per_slice(array, axis, _ternary_table)


def share_pow2(array: np.ndarray, bits: int, axis: int | None) -> SharedTable:
    """0 and +-2^e tables for the 2^(bits-1) - 1 exponents at and below each slice's largest."""
    return _per_slice(array, axis, lambda flat: _pow2_table(flat, bits))


def _per_slice(array: np.ndarray, axis: int | None, fit) -> SharedTable:
    if axis is None:
        values, codes = fit(array.ravel())
        return SharedTable(values, codes.reshape(array.shape), zero_reserved=True)
    moved = np.moveaxis(array, axis, 0)
    fits = [fit(row) for row in moved.reshape(moved.shape[0], -1)]
    width = max(v.size for v, _ in fits)
    values = np.zeros((len(fits), width))
    for r, (row_values, _) in enumerate(fits):
        values[r, : row_values.size] = row_values
    codes = np.stack([c for _, c in fits]).reshape(moved.shape)
    return SharedTable(values, np.moveaxis(codes, 0, axis), axis, zero_reserved=True)


def _ternary_table(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values [0, -a, +a] and codes; a minimises the error for TWN's threshold."""
    w = flat.astype(np.float64)
    magnitude = np.abs(w)
    threshold = TERNARY_THRESHOLD * magnitude.mean() if w.size else 0.0
    kept = magnitude > threshold
    alpha = float(magnitude[kept].mean()) if kept.any() else 0.0
    codes = np.where(kept, np.where(w < 0, 1, 2), 0).astype(np.int64)
    return np.array([0.0, -alpha, alpha]), codes


def _pow2_table(flat: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """values [0, +-2^e_max, +-2^(e_max-1), ...] and the nearest value's code for every weight."""
    w = flat.astype(np.float64)
    largest = float(np.abs(w).max()) if w.size else 0.0
    if largest == 0.0:
        return np.zeros(1), np.zeros(w.shape, dtype=np.int64)
    # The top exponent rounds the largest weight to its nearest power of two (log2 rounding
    # would pick 2^e for 1.45 * 2^e, whose nearest power is 2^(e+1)).
    top = int(np.floor(np.log2(largest)))
    if largest > 1.5 * 2.0**top:
        top += 1
    magnitudes = 2.0 ** (top - np.arange((1 << (bits - 1)) - 1))
    values = np.concatenate([[0.0], -magnitudes, magnitudes])
    order = np.argsort(values)
    codes_sorted = nearest(w, values[order])
    return values, order[codes_sorted].astype(np.int64)


def _fit_table(flat: np.ndarray, k: int, init: str, seed: int, dtype) -> tuple[np.ndarray, np.ndarray, bool]:
    """(values, codes, zero reserved) for one table; zeros keep code 0 when the slice was pruned."""
    zero = flat.size > 0 and np.mean(flat == 0) >= ZERO_RESERVED_ABOVE
    if not zero:
        values = fit_centroids(flat, k, init, seed, dtype)
        return values, nearest(flat, values), False
    nonzero = flat != 0
    centroids = fit_centroids(flat[nonzero], k - 1, init, seed, dtype) if nonzero.any() else np.zeros(0)
    values = np.concatenate([[0.0], centroids])
    codes = np.zeros(flat.shape, dtype=np.uint8)
    if centroids.size:
        codes[nonzero] = nearest(flat[nonzero], centroids) + 1
    return values, codes, True


def fit_centroids(values: np.ndarray, k: int, init: str, seed: int, dtype=np.float32) -> np.ndarray:
    """At most `k` sorted centroids (exact distinct values when there are no more than `k`).

    Above `MINIBATCH_ABOVE` weights, mini-batch k-means runs on a seeded sample of that many
    weights (1-D centroids are estimated as well from a sample, and a full pass over millions
    of weights is slow). Centroids are rounded to the weight dtype before use.
    """
    distinct = np.unique(values)
    if distinct.size <= k:
        return distinct.astype(np.float64)
    start = _initial_centroids(values, distinct, k, init, seed)
    kwargs = {"n_clusters": k, "init": start, "n_init": 1, "random_state": seed}
    # One thread: 1-D fits of <= 64K points take well under a second on one core, while
    # OpenMP threads on a busy machine made the same fit 25x slower (measured: 0.34 s vs 8.5 s).
    with threadpool_limits(1):
        if values.size > MINIBATCH_ABOVE:
            sample = np.random.default_rng(seed).choice(values.size, MINIBATCH_ABOVE, replace=False)
            # Only the sample in float64: a copy of a 100M-weight layer would be 800 MB.
            x = values.ravel()[sample].astype(np.float64).reshape(-1, 1)
            batch = MiniBatchKMeans(batch_size=4096, max_iter=20, compute_labels=False, **kwargs)
            model = batch.fit(x)
        else:
            model = KMeans(max_iter=300, **kwargs).fit(values.astype(np.float64).reshape(-1, 1))
    return np.unique(model.cluster_centers_.ravel().astype(dtype)).astype(np.float64)


def _initial_centroids(x: np.ndarray, distinct: np.ndarray, k: int, init: str, seed: int):
    if init == "kmeans++":
        return "k-means++"
    if init == "linear":  # Deep Compression: evenly spaced between min and max
        start = np.linspace(float(distinct[0]), float(distinct[-1]), k)
    elif init == "density":  # evenly spaced on the weights' CDF
        start = np.quantile(x.astype(np.float64), np.linspace(0.0, 1.0, k))
    else:  # Forgy: k distinct weights at random
        start = np.random.default_rng(seed).choice(distinct, k, replace=False)
    start = np.unique(start)
    if start.size < k:  # ties (many equal weights): fall back to k-means++ seeding
        return "k-means++"
    return start.reshape(-1, 1)


def nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted `centroids` for each value (midpoint search)."""
    if centroids.size == 1:
        return np.zeros(values.shape, dtype=np.uint8)
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    if centroids.size > 256:
        return np.searchsorted(midpoints, values.astype(np.float64)).astype(np.int64)
    return storage.code_of(values.reshape(-1), midpoints).reshape(values.shape)


def _relative_error(original: np.ndarray, shared: np.ndarray) -> float:
    norm = float(np.linalg.norm(original))
    return float(np.linalg.norm(original - shared) / norm) if norm else 0.0


# ----- least-squares refit of the shared values on calibration activations -------------------------

REFIT_ROWS = 4096  # sampled output positions per layer
REFIT_BATCH = 32
_CHUNK_ELEMENTS = 1 << 22  # bound on rows x outputs x K of one design block


def refit_tables(model, calibration, targets, tables, *, seed: int = 0) -> list[str]:
    """Move each table's values to fit the original layer's output on calibration inputs.

    For layer outputs y = P w (P: input patches), w = sum_k c_k S_k with S_k the signed
    indicator of code k, so y is linear in the table values c: accumulate the normal
    equations over sampled rows and solve them with a small ridge that pulls towards the
    k-means values. A table is refit only if values fit on half of the sampled rows predict
    the other half better than the starting values.
    """
    from onnxslim_tool import runtime  # onnxruntime, only when a refit runs

    notes, jobs = [], []
    for target, table in zip(targets, tables, strict=True):
        view, why = LinearView.of(target)
        if view is None:
            notes.append(f"refit skipped for {storage.layer_name(target.layer)}: {why}")
        else:
            jobs.append((target, table, view, _Normal(table, target.array, view)))
    if not jobs:
        return notes
    feeds = list(calibration.batches(REFIT_BATCH))
    quota = max(1, REFIT_ROWS // max(1, len(feeds)))
    rng = np.random.default_rng(seed)
    names = list(dict.fromkeys(view.input_name for _, _, view, _ in jobs))
    for batch in runtime.stream_tensors(model, names, feeds):
        for _, _, view, normal in jobs:
            x = batch[view.input_name]
            normal.add(view.patches(x, view.positions(x.shape, quota, rng)))
    for target, table, _, normal in jobs:
        before, after = normal.solve_into(table)
        notes.append(
            f"refit {storage.layer_name(target.layer)}: layer output rel. error on held-out "
            f"calibration rows {before:.4f} -> {after:.4f}"
        )
    return notes


class LinearView:
    """A layer as rows of weights applied to input patches: y[r, o] = P_group(o)[r] . W2[o] + b[o].

    ``bias`` is the layer's constant bias (Conv/Gemm input 2, or the initializer of the Add
    after a MatMul) when it is a plain vector; ``bias_scale`` is Gemm's beta.
    """

    def __init__(
        self,
        input_name: str,
        *,
        transposed: bool = False,
        groups: int = 1,
        conv: dict | None = None,
        bias: ir.Value | None = None,
        bias_scale: float = 1.0,
    ) -> None:
        self.input_name = input_name
        self.transposed = transposed  # weight stored [in, out]
        self.groups = groups
        self.conv = conv
        self.bias = bias
        self.bias_scale = bias_scale

    def to_rows(self, weight: np.ndarray) -> np.ndarray:
        """Weight-shaped array -> [out, in_per_group]."""
        if self.conv is not None:
            return weight.reshape(weight.shape[0], -1)
        return weight.T if self.transposed else weight

    def from_rows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return rows.T.reshape(shape) if self.transposed else rows.reshape(shape)

    @classmethod
    def of(cls, target: WeightTarget) -> tuple[LinearView | None, str]:
        if len(target.layers) != 1:
            return None, "weight shared by several layers"
        node, array = target.layer, target.array
        source = node.inputs[0]
        if source is None or not source.name:
            return None, "layer input has no name"
        out = array.shape[0]
        if node.op_type == "Conv" and array.ndim == 4 and target.slot == 1:
            if str(attr(node, "auto_pad", "NOTSET")) not in ("NOTSET", ""):
                return None, "auto_pad convolution"
            conv = {
                "kernel": array.shape[2:],
                "pads": list(attr(node, "pads", [0, 0, 0, 0])),
                "strides": list(attr(node, "strides", [1, 1])),
                "dilations": list(attr(node, "dilations", [1, 1])),
            }
            groups = int(attr(node, "group", 1))
            return cls(source.name, groups=groups, conv=conv, bias=_vector_input(node, 2, out)), ""
        if node.op_type == "Gemm" and target.slot == 1 and not attr(node, "transA", 0):
            transposed = not attr(node, "transB", 0)
            out = array.shape[1] if transposed else out
            beta = float(attr(node, "beta", 1.0))
            bias = _vector_input(node, 2, out) if beta != 0 else None
            return cls(source.name, transposed=transposed, bias=bias, bias_scale=beta), ""
        if node.op_type == "MatMul" and target.slot == 1 and array.ndim == 2:
            return cls(source.name, transposed=True, bias=_following_bias(node, array.shape[1])), ""
        return None, f"{node.op_type} layout not supported by the refit"

    def positions(self, shape: tuple[int, ...], quota: int, rng: np.random.Generator) -> np.ndarray:
        """Up to `quota` sampled output positions (flat index) for an input of this shape."""
        if self.conv is None:
            return _sample(int(np.prod(shape[:-1])), quota, rng)
        out_h, out_w = _conv_output_size(shape, self.conv)
        return _sample(shape[0] * out_h * out_w, quota, rng)

    def patches(self, x: np.ndarray, chosen: np.ndarray) -> list[np.ndarray]:
        """Per group, the [rows, in_per_group] input patches at output positions `chosen`."""
        x = np.asarray(x, dtype=np.float64)
        if self.conv is None:
            return [x.reshape(-1, x.shape[-1])[chosen]]
        patch = _conv_patches(x, self.conv, chosen)
        per_group = patch.shape[1] // self.groups
        return [
            patch[:, g * per_group : (g + 1) * per_group].reshape(patch.shape[0], -1)
            for g in range(self.groups)
        ]


def _biases(targets: list[WeightTarget], originals: dict[str, np.ndarray]) -> list[ir.Value]:
    """The plain bias vectors (one reader each) of shared layers that float16 leaves exact enough.

    Exact enough: the bias's float16 rounding error (relative) is at most `HALF_BIAS_SHARE`
    of the error sharing made in the layer's weight, so an exact codebook (error 0) keeps
    its float32 biases and the model stays identical.
    """
    found = []
    for target in targets:
        view, _ = LinearView.of(target)
        if view is None or view.bias is None:
            continue
        bias = view.bias.const_value.numpy()
        if _half_is_close_enough(bias, _relative_error(originals[target.value.name], target.array)):
            found.append(view.bias)
    return found


def _round_to_half(table: SharedTable, original: np.ndarray) -> bool:
    """Round the shared values to float16 where that is close enough (the rule of `_biases`):
    storage then keeps the table as float16 at no loss. The sample CNN's seven 16-entry tables
    were 448 B of a 7.8 KB file."""
    values = table.values.astype(np.float32)
    if not _half_is_close_enough(values, _relative_error(original, table.weights(np.float32))):
        return False
    table.values = values.astype(np.float16).astype(table.values.dtype)
    return True


def _half_is_close_enough(array: np.ndarray, weight_error: float) -> bool:
    """Whether float16 rounding moves `array` (relative) by at most `HALF_BIAS_SHARE` of the
    error sharing made in the layer's weight."""
    if array.dtype != np.float32:
        return False
    rounded = array.astype(np.float16).astype(np.float32)
    return _relative_error(array, rounded) <= HALF_BIAS_SHARE * weight_error


def _vector_input(node: ir.Node, index: int, size: int) -> ir.Value | None:
    value = node.inputs[index] if len(node.inputs) > index else None
    return value if _plain_vector(value, size) else None


def _following_bias(node: ir.Node, size: int) -> ir.Value | None:
    """The bias initializer of an Add that is the only reader of a MatMul's output."""
    after = single_consumer(node.outputs[0])
    if after is None or after.op_type != "Add":
        return None
    other = after.inputs[1] if after.inputs[0] is node.outputs[0] else after.inputs[0]
    return other if _plain_vector(other, size) else None


def _plain_vector(value: ir.Value | None, size: int) -> bool:
    if value is None or not value.is_initializer() or value.const_value is None or len(value.uses()) != 1:
        return False
    shape = value.const_value.numpy().shape
    return int(np.prod(shape)) == size and len(shape) >= 1 and shape[-1] == size


def _sample(total: int, quota: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(total) if total <= quota else np.sort(rng.choice(total, quota, replace=False))


def _conv_output_size(shape: tuple[int, ...], conv: dict) -> tuple[int, int]:
    (kh, kw), (top, left, bottom, right) = conv["kernel"], conv["pads"]
    (sh, sw), (dh, dw) = conv["strides"], conv["dilations"]
    out_h = (shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    return out_h, out_w


def _conv_patches(x: np.ndarray, conv: dict, chosen: np.ndarray) -> np.ndarray:
    """[rows, C, kh, kw] input windows of a 2-D convolution at output positions `chosen`."""
    (kh, kw), (top, left, bottom, right) = conv["kernel"], conv["pads"]
    (sh, sw), (dh, dw) = conv["strides"], conv["dilations"]
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h, out_w = _conv_output_size(x.shape, conv)
    n, rest = np.divmod(chosen, out_h * out_w)
    i, j = np.divmod(rest, out_w)
    rows = (i * sh)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    cols = (j * sw)[:, None, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    channels = np.arange(x.shape[1])[None, :, None, None]
    return padded[n[:, None, None, None], channels, rows, cols]


class _Normal:
    """Normal equations G c = h of a table's values (one system per channel for per-channel
    tables), for two halves of the sampled rows: one fits, the other checks the fit."""

    def __init__(self, table: SharedTable, original: np.ndarray, view: LinearView) -> None:
        self.codes = view.to_rows(table.codes)  # [out, in_per_group]
        self.signs = None if table.signs is None else view.to_rows(table.signs)
        self.weights = view.to_rows(original)  # float64 a chunk at a time (a copy would be 2x)
        self.per_channel = table.axis is not None
        self.k = table.values.shape[-1]
        tables = self.codes.shape[0] if self.per_channel else 1
        self.gram = np.zeros((2, tables, self.k, self.k))
        self.rhs = np.zeros((2, tables, self.k))
        self.energy = np.zeros((2, tables))
        self.group_size = self.codes.shape[0] // view.groups

    def add(self, patches: list[np.ndarray]) -> None:
        for g, patch in enumerate(patches):
            outputs = np.arange(g * self.group_size, (g + 1) * self.group_size)
            # Bounds both the design block (rows x outputs x K) and the chunk's sparse basis
            # (outputs x inputs, with int64 indices): VGG19's fc6 is 4096 x 25088.
            step = max(1, _CHUNK_ELEMENTS // max(1, patch.shape[0] * self.k, self.codes.shape[1]))
            for start in range(0, outputs.size, step):
                for half in (0, 1):  # alternate rows: samples for a Gemm, positions for a Conv
                    self._accumulate(half, outputs[start : start + step], patch[half::2])

    def _accumulate(self, half: int, chunk: np.ndarray, patch: np.ndarray) -> None:
        from scipy import sparse  # scipy is heavy; only refits need it

        codes = self.codes[chunk]  # [o, in]
        signs = np.ones(codes.shape) if self.signs is None else self.signs[chunk]
        cols = (np.arange(chunk.size)[:, None] * self.k + codes).ravel()
        rows = np.tile(np.arange(codes.shape[1]), chunk.size)
        basis = sparse.csr_matrix((signs.ravel(), (rows, cols)), shape=(codes.shape[1], chunk.size * self.k))
        design = np.asarray((basis.T @ patch.T).T).reshape(patch.shape[0], chunk.size, self.k)
        target = patch @ self.weights[chunk].astype(np.float64).T  # [rows, o]
        gram = np.einsum("rok,rol->okl", design, design)
        rhs = np.einsum("rok,ro->ok", design, target)
        energy = (target**2).sum(axis=0)
        if self.per_channel:
            self.gram[half, chunk] += gram
            self.rhs[half, chunk] += rhs
            self.energy[half, chunk] += energy
        else:
            self.gram[half, 0] += gram.sum(axis=0)
            self.rhs[half, 0] += rhs.sum(axis=0)
            self.energy[half, 0] += energy.sum()

    def solve_into(self, table: SharedTable) -> tuple[float, float]:
        """Refit `table.values` in place where a fit on one half predicts the other better;
        returns the held-out relative output error before and after."""
        values = np.atleast_2d(np.asarray(table.values, dtype=np.float64)).copy()
        free = np.ones(self.k, dtype=bool)
        if table.zero_reserved:
            free[0] = False  # the pruning mask stays exact
        start_error = after_error = 0.0
        for t in range(values.shape[0]):
            start = values[t]
            check = (self.gram[1, t], self.rhs[1, t], self.energy[1, t])
            before = after = _residual(*check, start)
            trial = _ridge_solve(self.gram[0, t], self.rhs[0, t], start, free)
            if _residual(*check, trial) < before:  # validated: fit on both halves
                values[t] = _ridge_solve(self.gram[:, t].sum(0), self.rhs[:, t].sum(0), start, free)
                after = _residual(*check, trial)
            start_error += before
            after_error += after
        table.values = values if self.per_channel else values[0]
        scale = max(float(self.energy[1].sum()), 1e-30)
        return _rel(start_error, scale), _rel(after_error, scale)


def _ridge_solve(gram: np.ndarray, rhs: np.ndarray, start: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Values minimising c'Gc - 2h'c + ridge ||c - start||^2 over the free entries."""
    g = gram[np.ix_(free, free)]
    ridge = 1e-4 * max(float(np.trace(g)) / max(1, int(free.sum())), 1e-12)
    solved = start.copy()
    solved[free] = np.linalg.solve(g + ridge * np.eye(g.shape[0]), rhs[free] + ridge * start[free])
    return solved


def _residual(gram: np.ndarray, rhs: np.ndarray, energy: float, values: np.ndarray) -> float:
    """||design @ values - target||^2 from the normal equations."""
    return float(values @ gram @ values - 2 * rhs @ values + energy)


def _rel(residual: float, energy: float) -> float:
    return float(np.sqrt(max(residual, 0.0) / energy))
