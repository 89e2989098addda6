"""What the pass decided for a layer (`Plan`) and the factors it computed (`Factors`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnxslim_tool.lowrank.conv import ConvLayer
    from onnxslim_tool.lowrank.dense import MatrixLayer


@dataclass
class Factors:
    """One layer's factorization, split where the refit can reach it.

    `front` are the fixed leading factors (method specific); `project` maps the layer's
    input rows (matrix rows, or conv patches [rows, C_in, taps]) to the features the last
    stage reads. The last stage is `left @ right` (rank-constrained, `rank` set) or `left`
    alone, approximating `prior` [features, outputs]; `offset` is added to the bias.
    """

    front: list[np.ndarray]
    project: Callable[[np.ndarray], np.ndarray]
    prior: np.ndarray
    rank: int | None
    left: np.ndarray
    right: np.ndarray | None = None
    offset: np.ndarray | None = None

    @property
    def stage(self) -> np.ndarray:
        """The last stage as one [features, outputs] matrix."""
        return self.left if self.right is None else self.left @ self.right

    def last_factor(self) -> Factors:
        """A view whose fitted stage is `right` alone, reading features through `left`."""
        left, project = self.left, self.project

        def through_left(rows: np.ndarray) -> np.ndarray:
            features = project(rows)
            return features @ left.astype(features.dtype)

        return Factors(self.front, through_left, self.right, None, self.right)


@dataclass
class Plan:
    """What the pass decided for one layer: method, ranks and the resulting cost."""

    layer: MatrixLayer | ConvLayer
    method: str
    ranks: tuple[int, ...]
    params: tuple[int, int]
    macs: tuple[int, int]
    note: str = ""

    def factorize(self, seed: int) -> list[Factors]:
        """One Factors per independent part of the layer (per group of a grouped conv)."""
        return self.layer.factorize(self.method, self.ranks, seed)

    def detail(self) -> str:
        ranks = "x".join(str(r) for r in self.ranks)
        text = f"{self.method} rank {ranks}; MACs {self.macs[0]:,} -> {self.macs[1]:,}"
        return f"{text} ({self.note})" if self.note else text


def identity(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(rows.shape[0], -1)
