"""Graph reading and editing the low-rank factorizations share: constants, names, rewiring."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxslim_tool.cost import value_shapes as _inferred_shapes
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.graph_utils import add_initializer, bypass, const_array, unique_name

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})
STANDARD_DOMAINS = ("", "ai.onnx")

Shapes = dict[str, tuple]


def layer_name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type) or node.op_type


def value_shapes(model: ir.Model, notes: list[str]) -> Shapes:
    """Inferred dims by value name; what inference could not do is added to `notes`."""
    found: list[str] = []
    table = _inferred_shapes(model, found)
    notes.extend(found)
    return table


def spatial(shape: tuple | None, nd: int) -> tuple[int, ...] | None:
    """The trailing `nd` dims of an NC... shape when they are all known."""
    if shape is None or len(shape) != nd + 2 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return tuple(shape[2:])


# ----- weights -----------------------------------------------------------------------------------


def weight_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a constant (initializer or Constant node), else None."""
    if value is None or value.is_graph_input():
        return None
    try:
        return const_array(value)
    except Exception:  # noqa: BLE001 - unreadable tensors (bad external data) are not constants
        return None


def working_copy(array: np.ndarray) -> np.ndarray:
    """A float32 (float64 for double weights) copy: a VGG classifier in float64 alone is 0.8 GB,
    and the decompositions move to float64 where precision matters."""
    return array.astype(np.float64 if array.dtype == np.float64 else np.float32)


def weight_problem(weight: ir.Value, array: np.ndarray) -> str | None:
    """Why this constant cannot be replaced by factors, or None."""
    if weight.dtype not in FLOAT_TYPES:
        return f"weight type {weight.dtype} is not a float type"
    if not np.all(np.isfinite(array)):
        return "weight has NaN/Inf values"
    users = {id(use.node) for use in weight.uses()}
    if len(users) > 1:
        return f"weight shared by {len(users)} nodes (factorizing one would add params)"
    if weight.is_graph_output():
        return "weight is a graph output"
    return None


# ----- editing -------------------------------------------------------------------------------------


def const(graph: ir.Graph, array: np.ndarray, dtype: np.dtype, hint: str) -> ir.Value:
    return add_initializer(graph, np.ascontiguousarray(array.astype(dtype)), hint)


def new_node(graph: ir.Graph, op: str, inputs: list, attrs: dict, base: str, index: int) -> ir.Node:
    out = ir.Value(name=unique_name(graph, f"{base}_lr{index}"))
    return ir.node(op, inputs, attrs, outputs=[out], name=f"{base}/lowrank_{index}")


def replace(graph: ir.Graph, old: ir.Node, chain: list[ir.Node]) -> None:
    """Put `chain` where `old` was; its last output takes over old's output name and type."""
    old_out, chain_out = old.outputs[0], chain[-1].outputs[0]
    chain_out.type, chain_out.shape = old_out.type, old_out.shape
    graph.insert_before(old, chain)
    name = old_out.name
    if not bypass(old_out, chain_out):
        raise OnnxSlimError(f"cannot rewire the output of {old.name}")
    graph.remove(old, safe=True)
    if chain_out.name != name:
        old_out.name = None
        chain_out.name = name


def params_of(nodes: list[ir.Node]) -> int:
    """Elements of the distinct constant inputs of `nodes` (weights, biases)."""
    constants = {
        id(v): v for node in nodes for v in node.inputs if v is not None and v.const_value is not None
    }
    return sum(v.const_value.size for v in constants.values())


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.is_initializer() and not list(value.uses()) and not value.is_graph_output():
        graph.initializers.pop(value.name, None)


def add_to_const(value: ir.Value, delta: np.ndarray) -> None:
    current = const_array(value)
    updated = (current.astype(np.float64) + delta).astype(current.dtype)
    value.const_value = ir.tensor(np.ascontiguousarray(updated), name=value.name)
    value.shape = ir.Shape(updated.shape)


def opset(graph: ir.Graph) -> int:
    imports = graph.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 1)))
