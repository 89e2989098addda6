"""Drop node attributes that only restate the operator's default.

Exporters write every attribute out (`strides=[1, 1]`, `dilations=[1, 1]`, `group=1`,
`alpha=1.0` ...): 15-20 bytes each, a few hundred bytes per model. On a 60 KB model that is
compressed to a few kilobytes this is several percent of the file. Removing them is exact:
the ONNX spec defines the op's behaviour without the attribute to be the default's.

Two sources of defaults:
- the operator schema's `default_value` (Gemm alpha/beta/transA/transB, Flatten axis, group ...);
- the spec text for convolution and pooling attributes that have no schema default but whose
  absence means "1 along every axis" (strides, dilations) or "no padding" (pads).
Only ops of the standard domain are touched; `kernel_shape` is kept (some consumers of ONNX
files other than onnxruntime insist on it).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import defs

_WINDOW_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "DeformConv",
    }
)
# Ints attributes whose absence means every element takes this value (spec text, not schema).
_ALL_EQUAL_DEFAULTS = {"strides": 1, "dilations": 1, "pads": 0}


def drop_default_attributes(model: ir.Model) -> int:
    """Remove default-valued attributes in place; the number removed."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        return 0
    removed = 0
    for graph in model.graphs():
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            defaults = _schema_defaults(node.op_type, opset)
            for name in list(node.attributes):
                if _is_default(node.op_type, name, node.attributes[name], defaults):
                    del node.attributes[name]
                    removed += 1
    return removed


def _is_default(op_type: str, name: str, attribute: ir.Attr, defaults: dict[str, object]) -> bool:
    if not isinstance(attribute, ir.Attr) or attribute.type == ir.AttributeType.GRAPH:
        return False
    value = attribute.value
    if op_type in _WINDOW_OPS and name in _ALL_EQUAL_DEFAULTS:
        return isinstance(value, list | tuple) and all(v == _ALL_EQUAL_DEFAULTS[name] for v in value)
    if name not in defaults:
        return False
    default = defaults[name]
    if isinstance(value, list | tuple):
        return isinstance(default, list) and list(value) == default
    return type(value) is type(default) and value == default


def _schema_defaults(op_type: str, opset: int) -> dict[str, object]:
    try:
        schema = defs.get_schema(op_type, opset, "")
    except defs.SchemaError:
        return {}
    found = {}
    for name, spec in schema.attributes.items():
        proto = spec.default_value
        if proto is None or not proto.name:  # no default declared
            continue
        value = onnx.helper.get_attribute_value(proto)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        found[name] = list(value) if isinstance(value, list | tuple) else value
    return found
