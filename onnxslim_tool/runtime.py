"""onnxruntime sessions from in-memory models: inference, activation capture, latency.

Passes and the pipeline ask this module for outputs and intermediate tensors by name;
nobody else builds sessions.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxslim_tool import io
from onnxslim_tool.errors import OnnxSlimError

Feed = dict[str, np.ndarray]


def session_options(threads: int = 1, optimize: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # we report failures ourselves, in one line
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def make_session(
    model: ir.Model | str | Path, threads: int = 1, optimize: bool = True
) -> ort.InferenceSession:
    """A CPU session for a model in memory (serialized on the fly) or on disk."""
    opts = session_options(threads, optimize)
    providers = ["CPUExecutionProvider"]
    try:
        if not isinstance(model, ir.Model):
            return ort.InferenceSession(str(model), opts, providers=providers)
        if io.weight_bytes(model) > io.EXTERNAL_DATA_THRESHOLD or io.has_external_tensors(model):
            # Over the protobuf limit: onnxruntime needs a file with external data. The session
            # keeps what it needs, so the folder can go right after.
            with tempfile.TemporaryDirectory(prefix="onnxslim-sess-") as tmp:
                path = Path(tmp) / "model.onnx"
                io.save(model, path, external_data_threshold=0)
                return ort.InferenceSession(str(path), opts, providers=providers)
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=providers)
    except OnnxSlimError:
        raise
    except Exception as exc:
        raise OnnxSlimError(f"onnxruntime cannot load the model: {_one_line(exc)}") from exc


def output_names(session: ort.InferenceSession) -> list[str]:
    return [o.name for o in session.get_outputs()]


def run_feeds(
    session: ort.InferenceSession, feeds: Iterable[Feed], names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Run every feed and concatenate each output along the sample axis."""
    names = list(names) if names is not None else output_names(session)
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        try:
            outs = session.run(names, feed)
        except Exception as exc:
            raise OnnxSlimError(f"onnxruntime failed to run the model: {_one_line(exc)}") from exc
        for name, out in zip(names, outs, strict=True):
            chunks[name].append(_as_array(out))
    return {n: _concat(parts) for n, parts in chunks.items()}


def _as_array(out: object) -> np.ndarray:
    """A tensor output as is; a sequence of tensors (SplitToSequence...) flattened into one."""
    if isinstance(out, list) and all(isinstance(item, np.ndarray) for item in out):
        return np.concatenate([item.ravel() for item in out]) if out else np.empty((0,))
    return np.asarray(out)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.empty((0,))
    if len(parts) == 1:
        return parts[0]
    if all(p.ndim >= 1 for p in parts):
        try:
            return np.concatenate(parts, axis=0)
        except ValueError:
            pass
    # Scalars or ragged outputs: keep them as a flat sequence so comparisons still work.
    return np.concatenate([p.ravel() for p in parts])


def run_model(model: ir.Model, feeds: Iterable[Feed], threads: int = 1) -> dict[str, np.ndarray]:
    return run_feeds(make_session(model, threads), feeds)


class WeightSwapSession:
    """One session in which the weights `names` are graph inputs, so candidates that differ
    only in those weights (a sensitivity scan) run without a new session each: building a
    session serializes and optimizes the whole model, which on a 90 MB transformer costs more
    than running it on a dozen samples.

    `run(feeds, weights)` feeds `weights[name]` where given and the model's own value
    otherwise. The reference outputs of a scan must come from this session too: kernels
    for a weight that is an input (not pre-packed) round differently from the original's.
    """

    def __init__(self, model: ir.Model, names: Sequence[str], threads: int = 1) -> None:
        self.originals = {name: model.graph.initializers[name].const_value.numpy() for name in names}
        proto = ir.to_proto(model)
        graph = proto.graph
        declared = {value.name for value in graph.input}
        for tensor in [t for t in graph.initializer if t.name in self.originals]:
            if tensor.name not in declared:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                )
            graph.initializer.remove(tensor)
        try:
            self.session = ort.InferenceSession(
                proto.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise OnnxSlimError(f"onnxruntime cannot load the model: {_one_line(exc)}") from exc
        self.outputs = [o.name for o in model.graph.outputs]

    @staticmethod
    def supports(model: ir.Model, names: Sequence[str]) -> bool:
        """Whether every name is a top-level initializer of a model under the protobuf limit."""
        inits = model.graph.initializers
        return not _needs_external_data(model) and all(
            name in inits and inits[name].const_value is not None for name in names
        )

    def run(
        self, feeds: Iterable[Feed], weights: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        given = {**self.originals, **(weights or {})}
        return run_feeds(self.session, ({**feed, **given} for feed in feeds), self.outputs)


@dataclass
class Capture:
    """Intermediate tensors collected over a data set, at most `max_rows` rows each.

    Conv activations are kept as [rows, channels] samples of spatial positions so memory
    stays bounded however large the feature maps or the data set are.
    """

    tensors: dict[str, np.ndarray]


def capture(
    model: ir.Model,
    names: Sequence[str],
    feeds: Iterable[Feed],
    *,
    channel_axis: int = 1,
    max_rows: int | None = None,
    seed: int = 0,
) -> Capture:
    """Collect intermediate values `names` as [rows, channels] matrices.

    Each batch's tensor is moved to channels-last and flattened; when `max_rows` is set, a
    seeded random subset of rows is kept per batch so the total stays near the bound.
    """
    probe = io.load(model, lift_constants=False)
    values = {v.name: v for v in _all_values(probe.graph)}
    missing = [n for n in names if n not in values]
    if missing:
        raise OnnxSlimError(f"cannot capture unknown tensor(s): {', '.join(missing)}")
    existing = {o.name for o in probe.graph.outputs}
    for name in names:
        if name not in existing:
            probe.graph.outputs.append(values[name])
    session = make_session(probe)
    rng = np.random.default_rng(seed)
    feeds = list(feeds)
    per_batch = None if max_rows is None else max(1, max_rows // max(1, len(feeds)))
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        outs = session.run(list(names), feed)
        for name, out in zip(names, outs, strict=True):
            rows = _as_rows(np.asarray(out), channel_axis)
            if per_batch is not None and rows.shape[0] > per_batch:
                rows = rows[np.sort(rng.choice(rows.shape[0], per_batch, replace=False))]
            parts[name].append(rows)
    return Capture({n: np.concatenate(p, axis=0) for n, p in parts.items()})


def stream_tensors(
    model: ir.Model, names: Sequence[str], feeds: Iterable[Feed], *, prune: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Run `model` on each feed and yield the full intermediate tensors `names` of that batch.

    For statistics that need whole neighbourhoods (convolution patches) rather than the
    flattened rows `capture` keeps. Memory stays bounded as long as the caller reduces each
    batch before asking for the next. With `prune`, the session holds only the nodes and
    weights `names` depend on: reading an early layer of a big model then costs a fraction
    of a full session and of a full run.
    """
    names = list(dict.fromkeys(names))
    values = {v.name: v for v in _all_values(model.graph)}
    missing = [n for n in names if n not in values]
    if missing:
        raise OnnxSlimError(f"cannot capture unknown tensor(s): {', '.join(missing)}")
    graph_inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in graph_inputs]  # graph inputs come from the feed
    session = None  # nothing to compute when every name is a graph input
    if prune and computed and not _needs_external_data(model):
        session = _pruned_session(model, [values[n] for n in computed])
    elif computed:
        probe = io.load(model, lift_constants=False)
        probe_values = {v.name: v for v in _all_values(probe.graph)}
        existing = {o.name for o in probe.graph.outputs}
        for name in computed:
            if name not in existing:
                probe.graph.outputs.append(probe_values[name])
        session = make_session(probe)
    for feed in feeds:
        try:
            outs = session.run(computed, feed) if computed else []
        except Exception as exc:
            raise OnnxSlimError(f"onnxruntime failed to run the model: {_one_line(exc)}") from exc
        batch = {name: np.asarray(out) for name, out in zip(computed, outs, strict=True)}
        yield {name: batch[name] if name in batch else np.asarray(feed[name]) for name in names}


def _needs_external_data(model: ir.Model) -> bool:
    return io.weight_bytes(model) > io.EXTERNAL_DATA_THRESHOLD or io.has_external_tensors(model)


def _pruned_session(model: ir.Model, outputs: Sequence[ir.Value]) -> ort.InferenceSession:
    """A session computing only `outputs`, from a serialized copy cut down to what they need."""
    proto = ir.to_proto(model)
    graph = proto.graph
    del graph.output[:]
    graph.output.extend(ir.serde.serialize_value(v) for v in outputs)
    _keep_needed(graph, [v.name for v in outputs])
    try:
        return ort.InferenceSession(
            proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise OnnxSlimError(f"onnxruntime cannot load the model: {_one_line(exc)}") from exc


def _keep_needed(graph: onnx.GraphProto, names: Sequence[str]) -> None:
    """Drop the nodes and initializers of `graph` that none of `names` depends on."""
    producer = {out: node for node in graph.node for out in node.output if out}
    needed: set[str] = set()
    kept: set[int] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in kept:
            kept.add(id(node))
            stack.extend(_names_read(node))
    nodes = [node for node in graph.node if id(node) in kept]
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _names_read(node: onnx.NodeProto) -> list[str]:
    """The values a node reads, including outer-scope values its subgraphs use."""
    names = [i for i in node.input if i]
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in sub.node:
                names.extend(_names_read(inner))
    return names


def _as_rows(x: np.ndarray, channel_axis: int) -> np.ndarray:
    if x.ndim <= 1:
        return x.reshape(-1, 1)
    axis = channel_axis if x.ndim > 2 else x.ndim - 1
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


@dataclass
class Latency:
    """Median and spread of repeated single-feed runs, in milliseconds."""

    median_ms: float
    p90_ms: float
    runs: int
    threads: int


def measure_latency(
    sessions: dict[str, ort.InferenceSession], feed: Feed, *, runs: int = 20, warmup: int = 3
) -> dict[str, Latency]:
    """Time several sessions on the same feed, interleaved run by run.

    Interleaving spreads machine noise (turbo, other processes) over all candidates alike,
    so their ratio is trustworthy even when absolute times drift.
    """
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for key, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[key].append((time.perf_counter() - start) * 1e3)
    result = {}
    for key, ts in times.items():
        ordered = sorted(ts)
        threads = sessions[key].get_session_options().intra_op_num_threads
        result[key] = Latency(statistics.median(ts), ordered[int(0.9 * (len(ts) - 1))], runs, threads)
    return result


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    with contextlib.suppress(Exception):
        # onnxruntime prefixes messages with "[ONNXRuntimeError] : 10 : INVALID_GRAPH : ..."
        text = text.split(" : ")[-1] if text.startswith("[ONNXRuntimeError]") else text
    return text[:300]
