"""Shrink what a quantized graph spends on bookkeeping rather than weights.

onnxruntime's quantizer names every new tensor after the one it quantizes plus a suffix
("..._QuantizeLinear_Output", "..._zero_point"), gives every scale its own initializer and
keeps inferred value_info. On small models those bytes outweigh the int8 weights. Here:
identical initializers (the zero points, shared scales) are stored once, internal tensors get
short names (graph inputs and outputs are kept), nodes the quantizer created lose their
generated names while the model's own node names are kept (layers stay recognisable; a
quantized replacement such as MatMulInteger takes the name of the layer it replaced), and
intermediate value_info is dropped (onnxruntime infers it at load), and so are opset imports
of domains no node uses and attributes that restate their default.
"""

from __future__ import annotations

import string
from collections.abc import Iterator

import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateInitializersPass, RemoveUnusedNodesPass

from onnxslim_tool.quantization.default_attributes import drop_default_attributes

_ALPHABET = string.digits + string.ascii_letters


# Operators that stand for a whole layer after quantization (not its helper Mul/Cast nodes).
_LAYER_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "MatMulInteger",
        "ConvInteger",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
    }
)


def restore_layer_names(model: ir.Model, original: set[str]) -> None:
    """A layer node named '<layer>_MatMul_quant' (or similar) that replaced <layer> takes its name back."""
    present = {node.name for node in model.graph if node.name}
    missing = sorted(original - present, key=len, reverse=True)
    for node in model.graph:
        if not node.name or node.name in original or node.op_type not in _LAYER_OPS:
            continue
        match = next((name for name in missing if node.name.startswith(name)), None)
        if match is not None:
            node.name = match
            missing.remove(match)


def compact(model: ir.Model, keep_node_names: set[str]) -> None:
    """Apply every size-only cleanup in place; the model computes exactly what it did."""
    RemoveUnusedNodesPass()(model)
    DeduplicateInitializersPass()(model)
    _drop_unused_opsets(model)
    drop_default_attributes(model)
    public = {v.name for g in model.graphs() for v in (*g.inputs, *g.outputs) if v.name}
    names = _short_names(public)
    for graph in model.graphs():
        public_values = {id(v) for v in (*graph.inputs, *graph.outputs)}
        for value in list(graph.initializers.values()):
            if id(value) not in public_values:
                value.name = next(names)  # onnx_ir re-keys the initializer table itself
        for node in graph:
            if node.name not in keep_node_names:
                node.name = None
            for value in node.outputs:
                if id(value) in public_values:
                    continue
                value.name = next(names)
                value.type = None
                value.shape = None


def _drop_unused_opsets(model: ir.Model) -> None:
    """onnxruntime's optimizer writes every domain it knows into the opset imports; keep the used."""
    used = {node.domain for graph in model.graphs() for node in graph}
    used |= {node.domain for function in model.functions.values() for node in function}
    for domain in list(model.opset_imports):
        if domain not in ("", "ai.onnx") and domain not in used:
            del model.opset_imports[domain]


def _short_names(reserved: set[str]) -> Iterator[str]:
    """'0', '1', ..., 'Z', '00', ...: base-62 names that avoid `reserved`."""
    length = 1
    while True:
        for index in range(len(_ALPHABET) ** length):
            digits = []
            for _ in range(length):
                index, rest = divmod(index, len(_ALPHABET))
                digits.append(_ALPHABET[rest])
            name = "".join(reversed(digits))
            if name not in reserved:
                yield name
        length += 1
