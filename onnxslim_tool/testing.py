"""Fixtures for tests and benchmarks: the light model zoo with real weights, random feeds."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light_models() -> dict[str, Path]:
    """The 9 real architectures onnx ships (placeholder weights), by short name."""
    return {p.stem.removeprefix("light_"): p for p in sorted(LIGHT_ZOO.glob("light_*.onnx"))}


def with_random_weights(path: str | Path, seed: int = 0, standardize: bool = True) -> onnx.ModelProto:
    """A light-zoo model whose ConstantOfShape placeholder weights become seeded initializers.

    Weights are scaled by fan-in and BatchNorm/scale parameters kept near identity. With
    `standardize` (the default) the weights are then fitted to data, layer by layer (see
    `_standardize_activations`): fan-in scaling alone lets residual sums grow to ~1e4 and
    every input gives the same output, which makes fidelity numbers meaningless.
    Built once per process (DenseNet121's fit takes ~20 s); each call gets its own copy.
    """
    model = onnx.ModelProto()
    model.CopyFrom(_cached_random_weights(str(Path(path).resolve()), seed, standardize))
    return model


@functools.lru_cache(maxsize=4)
def _cached_random_weights(path: str, seed: int, standardize: bool) -> onnx.ModelProto:
    model = onnx.load(str(path))
    graph = model.graph
    # The placeholder shapes live in Constant nodes or in initializers, depending on the model.
    shapes = {
        n.output[0]: [int(d) for d in numpy_helper.to_array(n.attribute[0].t).ravel()]
        for n in graph.node
        if n.op_type == "Constant"
    }
    shapes.update({t.name: [int(d) for d in numpy_helper.to_array(t).ravel()] for t in graph.initializer})
    roles = _parameter_roles(graph)
    rng = np.random.default_rng(seed)
    kept, produced = [], []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = shapes[node.input[0]]
            array = _random_parameter(rng, shape, roles.get(node.output[0]))
            produced.append(numpy_helper.from_array(array, node.output[0]))
        else:
            kept.append(node)
    used = {i for n in kept for i in n.input}
    kept = [n for n in kept if not (n.op_type == "Constant" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(kept)
    used |= {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live + produced)
    initializer_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names and i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)  # initializers no longer listed as inputs
    if standardize:
        _standardize_activations(model, seed)
    return model


def _standardize_activations(model: onnx.ModelProto, seed: int, samples: int = 4) -> None:
    """Data-dependent init (LSUV, Mishkin & Matas 2016), in place, on seeded random inputs.

    A BatchNormalization gets the mean and variance its input really has (what training's
    running statistics would hold); a Conv or Gemm with a bias and no BatchNormalization
    after it is rescaled so each output channel has zero mean and unit variance. Layers are
    fitted in dependency order, one onnxruntime run per depth level, so each level sees the
    already-fitted layers before it.
    """
    import onnxruntime as ort

    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    targets = _standardize_targets(graph, tensors)
    if not targets:
        return
    feeds = [random_feed(model, seed=seed + 1 + i) for i in range(samples)]
    nodes, outputs = list(graph.node), list(graph.output)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        for level in sorted({lvl for lvl, _, _ in targets}):
            batch = [(node, measured) for lvl, node, measured in targets if lvl == level]
            names = list(dict.fromkeys(m for _, m in batch))
            # Only the nodes these tensors depend on: deep models would otherwise run whole per level.
            del graph.node[:]
            graph.node.extend(_upstream(nodes, names))
            del graph.output[:]
            graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
            session = ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
            stats = {name: _ChannelStats() for name in names}
            for feed in feeds:
                for name, value in zip(names, session.run(names, feed), strict=True):
                    stats[name].add(value)
            for node, measured in batch:
                _refit(node, tensors, *stats[measured].mean_std())
    finally:
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.output[:]
        graph.output.extend(outputs)


def _upstream(nodes: list[onnx.NodeProto], names: list[str]) -> list[onnx.NodeProto]:
    """The nodes (in their order) that the tensors `names` are computed from."""
    needed, keep = set(names), []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


class _ChannelStats:
    """Per-channel (axis 1) running sums over samples and positions."""

    def __init__(self) -> None:
        self.count = 0
        self.total: np.ndarray | float = 0.0
        self.squares: np.ndarray | float = 0.0

    def add(self, value: np.ndarray) -> None:
        flat = np.moveaxis(value.astype(np.float64), 1, 0).reshape(value.shape[1], -1)
        self.count += flat.shape[1]
        self.total = self.total + flat.sum(axis=1)
        self.squares = self.squares + (flat * flat).sum(axis=1)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.total) / self.count
        var = np.maximum(np.asarray(self.squares) / self.count - mean * mean, 0.0)
        if self.count < 64:  # a few samples of a dense layer: one scale for all, not noise per channel
            var = np.full_like(var, var.mean())
        return mean, np.sqrt(var)


def _standardize_targets(
    graph: onnx.GraphProto, tensors: dict[str, onnx.TensorProto]
) -> list[tuple[int, onnx.NodeProto, str]]:
    """(depth level, node, tensor whose statistics fit it) for every layer to fit."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    depth: dict[str, int] = {}
    targets = []
    for node in graph.node:  # the zoo's nodes are in topological order
        level = max((depth.get(i, 0) for i in node.input), default=0)
        measured = None
        if node.op_type == "BatchNormalization" and all(i in tensors for i in node.input[3:5]):
            measured = node.input[0]
        elif (
            node.op_type in ("Conv", "Gemm")
            and len(node.input) > 2
            and all(i in tensors for i in node.input[1:3])
            and not any(c.op_type == "BatchNormalization" for c in consumers.get(node.output[0], []))
        ):
            measured = node.output[0]
        if measured is not None:
            targets.append((level, node, measured))
            level += 1
        for out in node.output:
            depth[out] = level
    return targets


def _refit(
    node: onnx.NodeProto, tensors: dict[str, onnx.TensorProto], mean: np.ndarray, std: np.ndarray
) -> None:
    def put(name: str, array: np.ndarray) -> None:
        tensors[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    if node.op_type == "BatchNormalization":
        put(node.input[3], mean)
        put(node.input[4], std * std)
        return
    scale = np.where(std > 1e-6, 1.0 / np.maximum(std, 1e-6), 1.0)
    weight = numpy_helper.to_array(tensors[node.input[1]]).astype(np.float64)
    bias = numpy_helper.to_array(tensors[node.input[2]]).astype(np.float64)
    if bias.shape != mean.shape:
        return  # a broadcast bias has no per-channel entry to move
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        beta = float(attrs.get("beta", 1.0))
        if beta == 0.0:
            return
        weight = weight * (scale[:, None] if attrs.get("transB", 0) else scale[None, :])
        put(node.input[1], weight)
        put(node.input[2], (beta * bias - mean) * scale / beta)
        return
    put(node.input[1], weight * scale.reshape(-1, *[1] * (weight.ndim - 1)))
    put(node.input[2], (bias - mean) * scale)


def _parameter_roles(graph: onnx.GraphProto) -> dict[str, str]:
    roles: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            roles.update(zip(node.input[1:5], ("scale", "shift", "mean", "var"), strict=False))
        elif node.op_type in ("Mul", "Div"):
            roles.update({name: "scale" for name in node.input})
    return roles


def _random_parameter(rng: np.random.Generator, shape: list[int], role: str | None) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)  # float32 draws: VGG19 has 143M weights
    if len(shape) > 1:
        fan_in = int(np.prod(shape[1:]))
        noise *= np.float32(np.sqrt(2.0 / max(fan_in, 1)))
        return noise
    values = {
        "scale": 1.0 + 0.1 * noise,
        "var": 1.0 + 0.1 * np.abs(noise),
        "mean": 0.1 * noise,
    }.get(role or "", 0.01 * noise)
    return values.astype(np.float32)


def random_feed(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input (dynamic dims = 1, leading dim = batch)."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feed = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        ttype = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in ttype.shape.dim]
        if dims and not ttype.shape.dim[0].HasField("dim_value"):
            dims[0] = batch
        dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            feed[inp.name] = rng.integers(0, 4, dims).astype(dtype)
    return feed


def run_proto(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feed)
