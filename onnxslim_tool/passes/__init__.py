"""Pass registry: name -> pass class."""

from __future__ import annotations

from onnxslim_tool.passes.base import CompressionPass, CompressionResult, PassRecord
from onnxslim_tool.passes.normalize import (
    Cleanup,
    DeduplicateInitializers,
    FoldBatchNorm,
    FoldConstants,
    LiftConstants,
    RemoveDeadCode,
    RemoveIdentity,
)

REGISTRY: dict[str, type[CompressionPass]] = {
    cls.name: cls
    for cls in (
        Cleanup,
        LiftConstants,
        FoldConstants,
        FoldBatchNorm,
        RemoveIdentity,
        RemoveDeadCode,
        DeduplicateInitializers,
    )
}


def available() -> list[str]:
    return sorted(REGISTRY)


__all__ = [
    "REGISTRY",
    "Cleanup",
    "CompressionPass",
    "CompressionResult",
    "DeduplicateInitializers",
    "FoldBatchNorm",
    "FoldConstants",
    "LiftConstants",
    "PassRecord",
    "RemoveDeadCode",
    "RemoveIdentity",
    "available",
]
