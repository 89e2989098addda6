"""Gemm with a constant weight rewritten as MatMul (+ Add): the form MatMulNBits replaces."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxslim_tool.graph_utils import add_initializer, attr, const_array


def gemm_to_matmul(graph: ir.Graph, skip: set[str]) -> int:
    """Rewrite every eligible Gemm in place; returns how many were rewritten."""
    count = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.name in skip or not _eligible(node):
            continue
        _rewrite(graph, node)
        count += 1
    return count


def _eligible(node: ir.Node) -> bool:
    weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2 or attr(node, "transA", 0):
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return bias is None or const_array(bias) is not None or attr(node, "beta", 1.0) == 1.0


def _rewrite(graph: ir.Graph, gemm: ir.Node) -> None:
    base = gemm.name or "gemm"
    weight = const_array(gemm.inputs[1]).astype(np.float32)
    if attr(gemm, "transB", 0):
        weight = weight.T
    weight = np.ascontiguousarray(weight * np.float32(attr(gemm, "alpha", 1.0)))
    w_value = add_initializer(graph, weight, f"{base}_weight_kn")
    matmul = ir.node("MatMul", [gemm.inputs[0], w_value], name=base)
    new_nodes = [matmul]
    result = matmul.outputs[0]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    if bias is not None:
        array = const_array(bias)
        beta = attr(gemm, "beta", 1.0)
        if array is not None and beta != 1.0:
            bias = add_initializer(
                graph, (array * np.float32(beta)).astype(array.dtype), f"{base}_bias_scaled"
            )
        add = ir.node("Add", [result, bias], name=f"{base}_bias")
        new_nodes.append(add)
        result = add.outputs[0]
    old = gemm.outputs[0]
    result.name, result.type, result.shape = f"{old.name}_mm", old.type, old.shape
    graph.insert_before(gemm, new_nodes)
    if old.is_graph_output():
        public = old.name
        old.name = None
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        result.name = public
    else:
        old.replace_all_uses_with(result)
    gemm.name = None
    graph.remove(gemm, safe=True)
