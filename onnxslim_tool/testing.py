"""Fixtures for tests and benchmarks: the light model zoo with real weights, random feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light_models() -> dict[str, Path]:
    """The 9 real architectures onnx ships (placeholder weights), by short name."""
    return {p.stem.removeprefix("light_"): p for p in sorted(LIGHT_ZOO.glob("light_*.onnx"))}


def with_random_weights(path: str | Path, seed: int = 0) -> onnx.ModelProto:
    """A light-zoo model whose ConstantOfShape placeholder weights become seeded initializers.

    Weights are scaled by fan-in and BatchNorm/scale parameters kept near identity, so
    activations stay finite through 100+ layers and numeric comparisons mean something.
    """
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
    return model


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
