"""What structured pruning works on: channel references, dependency groups, plans.

A *dependency group* is a set of tensor axes that share one channel index space: removing
channel i from the group removes, from every member, the slice that channel i maps to.
The analysis (`depgraph.py`) builds groups; importance criteria, the pruning plan,
slicing (`apply.py`) and reconstruction all consume them and never re-derive coupling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChannelRef:
    """One tensor axis that carries the group's channels.

    Channel c of the group occupies indices `offset + c*span ... offset + c*span + span - 1`
    of `axis` in `tensor` (span > 1 when a Flatten/Reshape turns one channel into H*W
    features before a Gemm/MatMul). `role` says how the tensor relates to the channels:

    - "out"    : a weight's output-channel axis (Conv W axis 0, Gemm B's N axis ...): the
                 rows that *produce* the channels; importance is read from them.
    - "in"     : a weight's input-channel axis (next Conv W axis 1, Gemm B's K axis ...):
                 the consumer side; reconstruction refits these weights.
    - "param"  : a per-channel vector (bias, BN scale/shift/mean/var, LayerNorm gamma ...).
    - "act"    : an activation tensor's channel axis (no data to slice; shapes only).
    - "shape"  : a constant shape tensor (Reshape target) whose entry `axis` holds the
                 channel count times `span`: rewritten, not sliced.
    """

    tensor: str
    axis: int
    role: str
    node: str = ""
    offset: int = 0
    span: int = 1


@dataclass
class DependencyGroup:
    """Channels that must be removed together, and whether they may be removed at all."""

    id: int
    size: int
    members: list[ChannelRef] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""
    # Every member count must stay a multiple of this (grouped convs: channels per group).
    divisor: int = 1
    # Grouped convs: the channels form `blocks` equal contiguous runs (0..size/blocks-1, ...)
    # and every run must keep the same number of channels (divisor is then set to blocks).
    blocks: int = 1
    # Node names: whose weights produce the channels, and who reads them (for refits).
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)

    def block(self, reason: str) -> None:
        """Mark unprunable; the first reason found is kept (it names the culprit)."""
        if self.prunable:
            self.prunable = False
            self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruningPlan:
    """Which channels each group keeps: the serialisable decision of a pruning run.

    Saved beside a model, it replays the same pruning on the same model exactly.
    """

    keep: dict[int, list[int]] = field(default_factory=dict)
    criterion: str = ""
    scores: dict[int, list[float]] = field(default_factory=dict)

    def removed(self, group: DependencyGroup) -> list[int]:
        kept = set(self.keep.get(group.id, range(group.size)))
        return [c for c in range(group.size) if c not in kept]

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "keep": {str(k): v for k, v in self.keep.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        return cls(
            keep={int(k): list(v) for k, v in data["keep"].items()}, criterion=data.get("criterion", "")
        )
