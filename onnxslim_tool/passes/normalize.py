"""Lossless cleanup: what every model gets before (and after) compression.

Constant lifting, constant folding (onnxscript's folder, same IR), BatchNorm folding into
the preceding Conv/ConvTranspose/Gemm, Identity/Dropout removal, reshape-transpose-reshape
axis swaps as one Transpose (axis_swap.py), dead code and duplicate initializer removal,
topological order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    DeduplicateInitializersPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)

from onnxslim_tool.graph_utils import add_initializer, attr, bypass, const_array, single_consumer
from onnxslim_tool.passes.axis_swap import SimplifyAxisSwap
from onnxslim_tool.passes.base import CompressionPass, PassRecord

# Folding these turns a few bytes of shape into a full tensor: the file would grow.
_EXPANDING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "RandomNormal", "RandomUniform"})


class LiftConstants(CompressionPass):
    """Constant nodes become initializers (Paddle exports keep all weights as Constants)."""

    name = "lift-constants"
    lossless = True

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        before = sum(
            1 for g in model.graphs() for n in g if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
        )
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        after = sum(
            1 for g in model.graphs() for n in g if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
        )
        if after < before:
            record.changed("*", "Constant", f"{before - after} Constant node(s) lifted to initializers")


class FoldConstants(CompressionPass):
    """Evaluate subgraphs whose inputs are all constant (onnxscript's folder on our IR)."""

    name = "fold-constants"
    lossless = True

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        import onnxscript.optimizer as optimizer  # heavy import, only when folding

        before = _node_count(model)

        def should_fold(node: ir.Node) -> bool | None:
            return False if node.op_type in _EXPANDING_OPS else None

        try:
            optimizer.fold_constants_ir(model, onnx_shape_inference=False, should_fold=should_fold)
        except Exception as exc:  # the folder is best effort; a model it cannot handle stays as is
            record.notes.append(f"constant folding skipped: {type(exc).__name__}: {str(exc)[:160]}")
            return
        RemoveUnusedNodesPass()(model)
        after = _node_count(model)
        if after != before:
            record.changed("*", "*", f"constant folding: {before} -> {after} nodes")


class FoldBatchNorm(CompressionPass):
    """Fold inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm before it."""

    name = "fold-batchnorm"
    lossless = True

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        graph = model.graph
        for bn in [n for n in graph if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
            reason = self._fold(graph, bn)
            if reason:
                record.skip(bn.name or bn.outputs[0].name, reason)
            else:
                record.changed(
                    bn.name or bn.outputs[0].name, "BatchNormalization", "folded into preceding layer"
                )

    def _fold(self, graph: ir.Graph, bn: ir.Node) -> str | None:
        ok, why = self.selects(bn)
        if not ok:
            return why
        if attr(bn, "training_mode", 0) or any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
            return "training-mode BatchNormalization (running stats are outputs)"
        x = bn.inputs[0]
        producer = x.producer() if x is not None else None
        if producer is None or producer.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            return "not preceded by Conv/ConvTranspose/Gemm"
        if single_consumer(x) is not bn:
            return f"{producer.op_type} output has other consumers"
        gamma, beta, mean, var = (const_array(v) for v in bn.inputs[1:5])
        if any(a is None for a in (gamma, beta, mean, var)):
            return "BatchNormalization parameters are not constant"
        weight = const_array(producer.inputs[1])
        if weight is None:
            return f"{producer.op_type} weight is not constant"
        eps = attr(bn, "epsilon", 1e-5)
        scale = (gamma / np.sqrt(var.astype(np.float64) + eps)).astype(np.float64)
        shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
        folded = _fold_into(producer, weight.astype(np.float64), scale)
        if folded is None:
            return f"{producer.op_type} layout not foldable"
        new_weight, bias_in = folded
        if bias_in is None:
            return f"{producer.op_type} bias cannot be expressed per channel"
        new_bias = bias_in * scale + shift
        dtype = weight.dtype
        base = producer.name or producer.outputs[0].name or "layer"
        w_val = add_initializer(graph, new_weight.astype(dtype), f"{base}_bnfolded_weight")
        b_val = add_initializer(graph, new_bias.astype(dtype), f"{base}_bnfolded_bias")
        producer.replace_input_with(1, w_val)
        if len(producer.inputs) > 2:
            producer.replace_input_with(2, b_val)
        else:
            producer.resize_inputs(3)
            producer.replace_input_with(2, b_val)
        if producer.op_type == "Gemm":
            producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if not bypass(bn.outputs[0], x):
            return "BatchNormalization output is a graph output that cannot be renamed"
        graph.remove(bn, safe=True)
        return None


def _fold_into(
    layer: ir.Node, weight: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Weight scaled per output channel, and the existing bias as a per-channel vector."""
    c_out = scale.shape[0]
    bias = const_array(layer.inputs[2]) if len(layer.inputs) > 2 and layer.inputs[2] is not None else None
    if layer.op_type == "Conv":
        if weight.shape[0] != c_out:
            return None
        new_w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    elif layer.op_type == "ConvTranspose":
        groups = attr(layer, "group", 1)
        c_in, per_group = weight.shape[0], weight.shape[1]
        if per_group * groups != c_out:
            return None
        # Output channel g*per_group + j lives at W[rows of group g, j].
        group_of_row = np.arange(c_in) // (c_in // groups)
        col_scale = scale.reshape(groups, per_group)[group_of_row]
        new_w = weight * col_scale.reshape(c_in, per_group, *([1] * (weight.ndim - 2)))
    else:  # Gemm: Y = alpha * A @ B' + beta * C, features on B' columns
        trans_b = attr(layer, "transB", 0)
        if weight.ndim != 2:
            return None
        if trans_b:
            if weight.shape[0] != c_out:
                return None
            new_w = weight * scale[:, None]
        else:
            if weight.shape[1] != c_out:
                return None
            new_w = weight * scale[None, :]
        if bias is not None:
            bias = bias.astype(np.float64) * attr(layer, "beta", 1.0)
    if bias is None:
        if len(layer.inputs) > 2 and layer.inputs[2] is not None:
            return new_w, None  # bias exists but is not constant
        return new_w, np.zeros(c_out)
    bias = np.asarray(bias, dtype=np.float64)
    if bias.size == 1:
        return new_w, np.full(c_out, float(bias.ravel()[0]))
    if bias.size != c_out:
        return new_w, None
    return new_w, bias.reshape(c_out)


class RemoveIdentity(CompressionPass):
    """Identity and inference-mode Dropout nodes are wires: connect around them."""

    name = "remove-identity"
    lossless = True

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        for graph in model.graphs():
            for node in list(graph):
                if node.domain not in ("", "ai.onnx") or node.op_type not in ("Identity", "Dropout"):
                    continue
                if node.op_type == "Dropout" and not _dropout_is_identity(node):
                    record.skip(
                        node.name or node.outputs[0].name, "Dropout in training mode or its mask is used"
                    )
                    continue
                src = node.inputs[0]
                if src is None:
                    continue
                if bypass(node.outputs[0], src):
                    graph.remove(node, safe=True)
                    record.changed(node.name or src.name or "?", node.op_type, "removed")


def _dropout_is_identity(node: ir.Node) -> bool:
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return False
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is None:
        return True
    value = const_array(training)
    return value is not None and not bool(value)


class RemoveDeadCode(CompressionPass):
    """Nodes whose outputs nobody reads, and initializers nobody uses."""

    name = "remove-dead-code"
    lossless = True

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        nodes_before, inits_before = _node_count(model), _initializer_count(model)
        RemoveUnusedNodesPass()(model)
        for graph in model.graphs():
            for name, value in list(graph.initializers.items()):
                if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                    del graph.initializers[name]
        removed_nodes = nodes_before - _node_count(model)
        removed_inits = inits_before - _initializer_count(model)
        if removed_nodes or removed_inits:
            record.changed(
                "*", "*", f"removed {removed_nodes} dead node(s), {removed_inits} unused initializer(s)"
            )


class DeduplicateInitializers(CompressionPass):
    """Initializers with identical dtype, shape and bytes are stored once."""

    name = "dedup-initializers"
    lossless = True

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        before = _initializer_count(model)
        with _quiet_logger("onnx_ir"):  # it logs every graph-input initializer it leaves alone
            DeduplicateInitializersPass()(model)
        after = _initializer_count(model)
        if after < before:
            record.changed("*", "initializer", f"{before - after} duplicate initializer(s) merged")


class Cleanup(CompressionPass):
    """All lossless cleanups in a sensible order, validated once by the pipeline."""

    name = "cleanup"
    lossless = True

    def __init__(self, *, fold_constants: bool = True, fold_batchnorm: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fold_constants = fold_constants
        self.fold_batchnorm = fold_batchnorm

    def steps(self) -> list[CompressionPass]:
        steps: list[CompressionPass] = [LiftConstants(), RemoveIdentity()]
        if self.fold_constants:
            steps.append(FoldConstants())
        if self.fold_batchnorm:
            steps.append(FoldBatchNorm(include=self.include, exclude=self.exclude))
        steps += [SimplifyAxisSwap(), RemoveDeadCode(), DeduplicateInitializers()]
        return steps

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        for step in self.steps():
            sub = step.call(model).record
            record.changes.extend(sub.changes)
            record.skipped.extend(sub.skipped)
            record.notes.extend(sub.notes)
        TopologicalSortPass()(model)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _node_count(model: ir.Model) -> int:
    return sum(1 for g in model.graphs() for _ in g)


def _initializer_count(model: ir.Model) -> int:
    return sum(len(g.initializers) for g in model.graphs())
