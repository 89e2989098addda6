"""Which nodes low-rank can factorize: a Gemm/MatMul or Conv layer, or the reason it cannot."""

from __future__ import annotations

import onnx_ir as ir

from onnxslim_tool.lowrank.conv import ConvLayer, conv_layer
from onnxslim_tool.lowrank.dense import MatrixLayer, matrix_layer
from onnxslim_tool.lowrank.graph import STANDARD_DOMAINS, Shapes

OPS = ("Gemm", "MatMul", "Conv")
Layer = MatrixLayer | ConvLayer


def layer_of(node: ir.Node, shapes: Shapes) -> Layer | str:
    if node.domain not in STANDARD_DOMAINS:
        return f"{node.op_type} in domain '{node.domain}'"
    if node.op_type == "Conv":
        return conv_layer(node, shapes)
    return matrix_layer(node, shapes)
