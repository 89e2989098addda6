"""Pass registry: the names recipes and flags use, mapped to pass classes (imported lazily).

Lazy imports keep `onnxslim-tool inspect` fast: scikit-learn, scipy and onnxruntime's
quantizer load only when a recipe asks for the pass that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from onnxslim_tool.passes.base import CompressionPass, CompressionResult, PassRecord

_REGISTRY: dict[str, str] = {
    "cleanup": "onnxslim_tool.passes.normalize:Cleanup",
    "block-dropping": "onnxslim_tool.passes.block_dropping:BlockDropping",
    "channel-pruning": "onnxslim_tool.passes.channel_pruning:ChannelPruning",
    "layer-merging": "onnxslim_tool.passes.layer_merging:LayerMerging",
    "lowrank": "onnxslim_tool.passes.lowrank:LowRank",
    "weight-pruning": "onnxslim_tool.passes.weight_pruning:WeightPruning",
    "weight-sharing": "onnxslim_tool.passes.weight_sharing:WeightSharing",
    "quantize": "onnxslim_tool.passes.quantization:Quantize",
}

# Class name -> registry name, for `from onnxslim_tool.passes import ChannelPruning`.
_CLASS_NAMES = {target.rsplit(":", 1)[1]: name for name, target in _REGISTRY.items()}
_CLEANUP_PARTS = (
    "LiftConstants",
    "FoldConstants",
    "FoldBatchNorm",
    "RemoveIdentity",
    "RemoveDeadCode",
    "DeduplicateInitializers",
)


def available() -> list[str]:
    """Registry names, in the order a recipe applies them."""
    return list(_REGISTRY)


def pass_class(name: str) -> type[CompressionPass]:
    """The class registered under `name` (KeyError names the valid ones)."""
    try:
        module_name, class_name = _REGISTRY[name].split(":")
    except KeyError:
        raise KeyError(f"unknown pass '{name}'; available: {', '.join(_REGISTRY)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def __getattr__(attribute: str) -> Any:
    if attribute in _CLASS_NAMES:
        return pass_class(_CLASS_NAMES[attribute])
    if attribute in _CLEANUP_PARTS:
        return getattr(importlib.import_module("onnxslim_tool.passes.normalize"), attribute)
    raise AttributeError(f"module 'onnxslim_tool.passes' has no attribute '{attribute}'")


__all__ = ["CompressionPass", "CompressionResult", "PassRecord", "available", "pass_class", *_CLASS_NAMES]
