"""SmoothQuant (Xiao et al., ICML 2023) for LayerNorm -> MatMul/Gemm, on the float model.

Transformer activations have a few outlier channels that set the int8 scale of the whole
tensor. Dividing activation channel k by s_k = max|X_k|^a / max|W_k|^(1-a) and multiplying
weight row k by s_k leaves the product unchanged and moves the difficulty into the weights
(which have per-channel scales). The division is folded into the producing LayerNormalization
(its scale and bias), so no node is added; producers that cannot absorb it are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool.graph_utils import attr, const_array
from onnxslim_tool.quantization.layers import (
    Layer,
    as_layer,
    channel_max,
    private_input,
    scale_axis,
    set_array,
)
from onnxslim_tool.quantization.stats import channel_absmax

ALPHA = 0.5
_SCALE_LIMITS = (1e-4, 1e4)


@dataclass
class Site:
    norm: ir.Node
    consumers: list[Layer]


@dataclass
class Smoothed:
    site: str
    layers: list[str]
    activation_spread_before: float  # max/median channel |x|
    activation_spread_after: float


def find_sites(graph: ir.Graph) -> tuple[list[Site], list[tuple[str, str]]]:
    """LayerNormalizations whose output only feeds weighted layers, and skip reasons."""
    sites, skipped = [], []
    for node in graph:
        if node.op_type != "LayerNormalization":
            continue
        reason = _unsuitable(node)
        if reason:
            skipped.append((node.name or "LayerNormalization", reason))
            continue
        out = node.outputs[0]
        layers = [as_layer(use.node) if use.idx == 0 else None for use in out.uses()]
        if out.is_graph_output() or not layers or any(_not_dense(layer) for layer in layers):
            skipped.append((node.name or "LayerNormalization", "output feeds more than MatMul/Gemm weights"))
            continue
        sites.append(Site(node, layers))
    return sites, skipped


def smooth(graph: ir.Graph, model: ir.Model, feeds: Iterable[dict], alpha: float = ALPHA) -> list[Smoothed]:
    """Apply SmoothQuant at every site, with activation maxima measured on `feeds`."""
    sites, _skipped = find_sites(graph)
    if not sites:
        return []
    peaks = channel_absmax(model, {site.norm.outputs[0].name: -1 for site in sites}, feeds)
    done = []
    for site in sites:
        x_max = peaks[site.norm.outputs[0].name].astype(np.float64)
        w_max = np.max([channel_max(layer.weight_array(), layer.in_axis) for layer in site.consumers], axis=0)
        if x_max.shape != w_max.shape:
            continue
        scale = np.ones_like(x_max)
        usable = (x_max > 0) & (w_max > 0)
        scale[usable] = x_max[usable] ** alpha / w_max[usable] ** (1 - alpha)
        scale = np.clip(scale, *_SCALE_LIMITS)
        _apply(graph, site, scale)
        smoothed_max = x_max / scale
        done.append(
            Smoothed(
                site.norm.name or "LayerNormalization",
                [layer.name for layer in site.consumers],
                float(x_max.max() / max(np.median(x_max), 1e-12)),
                float(smoothed_max.max() / max(np.median(smoothed_max), 1e-12)),
            )
        )
    return done


def _apply(graph: ir.Graph, site: Site, scale: np.ndarray) -> None:
    for index in (1, 2):
        if len(site.norm.inputs) > index and site.norm.inputs[index] is not None:
            value = private_input(graph, site.norm, index)
            set_array(value, const_array(value) / scale.astype(np.float32))
    for layer in site.consumers:
        private_input(graph, layer.node, 1)
        layer.set_weight(scale_axis(layer.weight_array(), scale, layer.in_axis))


def _not_dense(layer: Layer | None) -> bool:
    return layer is None or layer.node.op_type not in ("MatMul", "Gemm")


def _unsuitable(norm: ir.Node) -> str | None:
    if attr(norm, "axis", -1) not in (-1,) and not _is_last_axis(norm):
        return "normalizes over more than the last axis"
    for index in (1, 2):
        if len(norm.inputs) > index and norm.inputs[index] is not None:
            array = const_array(norm.inputs[index])
            if array is None or array.ndim != 1:
                return "scale/bias are not constant per-channel vectors"
    if len(norm.inputs) < 2 or norm.inputs[1] is None:
        return "no scale input to fold into"
    return None


def _is_last_axis(norm: ir.Node) -> bool:
    shape = norm.inputs[0].shape if norm.inputs[0] is not None else None
    axis = attr(norm, "axis", -1)
    return shape is not None and axis == len(shape) - 1
