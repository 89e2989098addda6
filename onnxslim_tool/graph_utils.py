"""Small onnx_ir helpers shared by passes: constants, attributes, safe rewiring."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant-produced value, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def attr(node: ir.Node, name: str, default=None):
    """An attribute's Python value (int, float, str, list), or `default` when absent."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def add_initializer(graph: ir.Graph, array: np.ndarray, name_hint: str) -> ir.Value:
    """A new initializer with a name unique in `graph`."""
    name = unique_name(graph, name_hint)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype))
    )
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, hint: str) -> str:
    taken = _names(graph)
    if hint not in taken:
        return hint
    i = 1
    while f"{hint}_{i}" in taken:
        i += 1
    return f"{hint}_{i}"


def _names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.update(o.name for o in node.outputs if o.name)
    return names


def bypass(old: ir.Value, new: ir.Value) -> bool:
    """Make every consumer of `old` read `new`, keeping public output names intact.

    Returns False (and changes nothing) when `old` is a graph output and `new` cannot take
    its name: `new` is itself a graph input, initializer or output, or it comes from an
    outer scope (onnxruntime refuses a subgraph that returns an outer value directly).
    """
    graph = old.graph
    if old.is_graph_output():
        if graph is None or new.is_graph_input() or new.is_graph_output() or new.is_initializer():
            return False
        producer = new.producer()
        if producer is None or producer.graph is not graph:
            return False
        public_name, public_type, public_shape = old.name, old.type, old.shape
        old.name = None  # free the name before `new` takes it
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name = public_name
        new.type = public_type or new.type
        new.shape = public_shape or new.shape
        return True
    old.replace_all_uses_with(new)
    return True


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The one node reading `value`, when it has exactly one use and is not a graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node
