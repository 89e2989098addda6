"""Recognise models that are already quantized, so they are refused instead of degraded twice."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

# Operators that only appear in quantized graphs (ONNX standard and onnxruntime contrib ops).
_QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "QOrderedMatMul",
        "MatMulNBits",
        "MatMulBnb4",
        "GatherBlockQuantized",
    }
)


_LOW_BIT_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4})


def quantized_ops(model: ir.Model) -> Counter[str]:
    """How often each quantization operator occurs, over all graphs and subgraphs."""
    found: Counter[str] = Counter()
    for graph in model.graphs():
        for node in graph:
            if _unpacks_codes(node):
                continue
            if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear"):
                found[node.op_type] += 1
            elif _casts_low_bit_weights(node):
                found["Cast of int8 weights"] += 1
    return found


def _unpacks_codes(node: ir.Node) -> bool:
    """storage.py's bit-planes of a large code stream, summed by a MatMulInteger whose first
    input is a constant row of powers of two; a quantized MatMulInteger reads activations there."""
    if node.op_type != "MatMulInteger" or not node.inputs or node.inputs[0] is None:
        return False
    row = node.inputs[0]
    if not row.is_initializer() or row.const_value is None:
        return False
    weights = row.const_value.numpy()
    return (
        weights.shape[:1] == (1,)
        and weights.ndim == 2
        and (weights[0] == 1 << np.arange(weights.shape[1])).all()
    )


def _casts_low_bit_weights(node: ir.Node) -> bool:
    """int8 weights stored for onnxruntime to fold back to float at load (Cast * scale)."""
    if node.op_type != "Cast" or not node.inputs or node.inputs[0] is None:
        return False
    source = node.inputs[0]
    to = node.attributes.get("to")
    # A Cast to an integer type is unpacking (storage.py's code streams), not dequantization.
    to_float = to is None or ir.DataType(to.as_int()).is_floating_point()
    return to_float and source.is_initializer() and source.dtype in _LOW_BIT_TYPES


def is_quantized(model: ir.Model) -> str | None:
    """None for a float model; otherwise the one-line refusal naming what was found.

    QLinear* operators, ConvInteger/MatMulInteger, QuantizeLinear/DequantizeLinear pairs,
    4-bit MatMulNBits and int8 initializers cast to float all mean the weights were already
    rounded: quantizing again would only lose accuracy, so the tool refuses such models.
    """
    found = quantized_ops(model)
    if not found:
        return None
    listed = ", ".join(f"{op} x{count}" for op, count in found.most_common(4))
    more = f" and {len(found) - 4} more operator type(s)" if len(found) > 4 else ""
    return f"model is already quantized (found {listed}{more}); give the float model instead"
