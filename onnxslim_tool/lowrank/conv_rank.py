"""Rank choice per conv method: `(method, ranks)` or the reason the layer is left alone.

Ranks are per group (a grouped conv's groups share them: each factor conv has one channel
count per group). By energy or VBMF, a grouped conv takes the largest rank any group needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from onnxslim_tool import linalg
from onnxslim_tool.lowrank.rank import choose_rank, largest_paying
from onnxslim_tool.lowrank.vbmf import vbmf_rank

if TYPE_CHECKING:
    from onnxslim_tool.lowrank.conv import ConvLayer

# CP-ALS sweeps are bounded by this many flops per group (~10 s on one core).
MAX_CP_WORK = 3e11
# Tucker keeps every input channel of a conv with this few (RGB or grey images).
SMALL_INPUT = 4

Chosen = tuple[str, tuple[int, ...]] | str
Matrix = Callable[[np.ndarray], np.ndarray]  # one group's kernel -> the matrix a method factorizes
Planner = Callable[["ConvLayer", "int | None", "float | None", int, str], Chosen]


def channel_matrix(kernel: np.ndarray) -> np.ndarray:
    """[C_out, C_in * taps]: the matrix channel SVD factorizes."""
    return kernel.reshape(kernel.shape[0], -1)


def separable_matrix(kernel: np.ndarray) -> np.ndarray:
    """[C_in * k_h, C_out * k_w]: the matrix spatial SVD factorizes."""
    c_out, c_in, kh, kw = kernel.shape
    return kernel.transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def _rule_rank(
    conv: ConvLayer, matrix: Callable[[np.ndarray], np.ndarray], energy: float | None, rule: str
) -> int:
    """The rank by energy or VBMF: the largest any group needs (at least 1)."""
    if rule == "vbmf":
        return max(1, *(vbmf_rank(matrix(k)) for k in conv.part_kernels()))
    return max(linalg.rank_for_energy(linalg.singular_values(matrix(k)), energy) for k in conv.part_kernels())


def _plan_single_rank(method: str, matrix: Matrix) -> Planner:
    def plan(conv: ConvLayer, budget: int | None, energy: float | None, seed: int, rule: str) -> Chosen:
        rank = None if budget is not None else _rule_rank(conv, matrix, energy, rule)
        full = (conv.kernel.size, conv.macs_full())
        max_rank = min(matrix(conv.part_kernel(0)).shape)
        rank, problem = choose_rank(lambda r: conv.cost(method, (r,)), full, max_rank, budget, rank)
        return problem or (method, (rank,))

    return plan


def _plan_cp(conv: ConvLayer, budget: int | None, energy: float | None, seed: int, rule: str) -> Chosen:
    full = (conv.kernel.size, conv.macs_full())

    def cost(r: int) -> tuple[int, int]:
        return conv.cost("cp", (r,))

    max_rank = linalg.cp_full_rank(conv.group_shape)
    if budget is not None:
        rank, problem = choose_rank(cost, full, max_rank, budget, None)
        return problem or ("cp", (rank,))
    if rule == "vbmf":
        return "VBMF estimates matrix ranks; CP needs a tensor rank"
    worth = largest_paying(cost, full, max_rank)
    if not worth:
        return "no CP rank lowers both params and MACs"
    ranks = [cp_rank_for_energy(k.astype(np.float64), energy, worth, seed) for k in conv.part_kernels()]
    if any(r is None for r in ranks):
        return f"energy {energy} needs a CP rank above {worth}, the largest that still saves"
    return "cp", (max(ranks),)


def cp_iterations(shape: Sequence[int], rank: int) -> int:
    """ALS sweeps within MAX_CP_WORK: 100 for small kernels, about 12 for a 512x512x3x3 one
    at rank 1145 (each sweep costs ~4 products of the kernel with a rank-wide factor)."""
    per_sweep = len(shape) * (2 * math.prod(shape) * rank + rank**3)
    return int(min(100, max(10, MAX_CP_WORK // per_sweep)))


def cp_rank_for_energy(kernel: np.ndarray, energy: float, max_rank: int, seed: int) -> int | None:
    """The smallest CP rank whose reconstruction keeps `energy` of ||K||^2 (bisection)."""
    norm_sq = float(np.sum(kernel * kernel))

    def kept(rank: int) -> float:
        error = kernel - linalg.cp_reconstruct(linalg.cp_als(kernel, rank, iterations=50, seed=seed))
        return 1.0 - float(np.sum(error * error)) / norm_sq if norm_sq > 0 else 1.0

    if kept(max_rank) < energy:
        return None
    low, high = 1, max_rank
    while low < high:
        middle = (low + high) // 2
        if kept(middle) >= energy:
            high = middle
        else:
            low = middle + 1
    return low


def _plan_tucker(conv: ConvLayer, budget: int | None, energy: float | None, seed: int, rule: str) -> Chosen:
    """Ranks (r1 inputs, r2 outputs) by energy or VBMF of the two unfoldings, or the largest pair
    within the params budget that keeps the same fraction of both modes. An input with at
    most SMALL_INPUT channels (RGB) keeps them all: Tucker-1 on the output mode, which is the
    channel SVD (Kim et al. 2015 leave the first layer's input mode alone the same way)."""
    c_out, c_in = conv.group_shape[:2]
    full = (conv.kernel.size, conv.macs_full())
    if budget is None:
        r1 = _rule_rank(conv, lambda k: linalg.unfold(k, 1), energy, rule)
        r2 = _rule_rank(conv, lambda k: linalg.unfold(k, 0), energy, rule)
        return ("svd", (r2,)) if r1 >= c_in or c_in <= SMALL_INPUT else ("tucker", (r1, r2))
    if c_in > SMALL_INPUT:
        for r2 in range(c_out, 0, -1):
            r1 = min(c_in - 1, max(1, round(r2 * c_in / c_out)))
            params, macs = conv.cost("tucker", (r1, r2))
            if params <= budget and macs < full[1]:
                return "tucker", (r1, r2)
    max_rank = min(channel_matrix(conv.part_kernel(0)).shape)
    rank, problem = choose_rank(lambda r: conv.cost("svd", (r,)), full, max_rank, budget, None)
    return problem or ("svd", (rank,))


PLANNERS: dict[str, Planner] = {
    "svd": _plan_single_rank("svd", channel_matrix),
    "spatial-svd": _plan_single_rank("spatial-svd", separable_matrix),
    "cp": _plan_cp,
    "tucker": _plan_tucker,
}
