"""Rank selection: from a params budget, an energy fraction or VBMF, and whether it pays.

Every rule answers either a rank (tuple) or a string saying why the layer is left alone, so
skip reasons reach the pass record unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

RULES = ("ratio", "energy", "vbmf")

Cost = Callable[[int], tuple[int, int]]  # rank -> (params, MACs)


def choose_rank(
    cost: Cost,
    full: tuple[int, int],
    max_rank: int,
    budget: int | None,
    rank: int | None,
) -> tuple[int, str | None]:
    """The rank to use (from a params budget, or given) and, when it does not pay, why."""
    if rank is None:
        fits = [r for r in range(1, max_rank + 1) if cost(r)[0] <= budget]
        if not fits:
            return 0, f"even rank 1 keeps {cost(1)[0]:,} of {full[0]:,} weights (over the ratio)"
        rank = fits[-1]
    return rank, no_gain(cost(rank), full, f"rank {rank}")


def no_gain(after: tuple[int, int], before: tuple[int, int], what: str) -> str | None:
    """Why (params, MACs) `after` is no saving over `before`, or None when both drop."""
    if after[0] >= before[0]:
        return f"{what} would not lower params ({after[0]:,} >= {before[0]:,})"
    if after[1] >= before[1]:
        return f"{what} would not lower MACs ({after[1]:,} >= {before[1]:,})"
    return None


def largest_paying(cost: Cost, full: tuple[int, int], max_rank: int) -> int:
    """The largest rank that still lowers both params and MACs (0 when none does)."""
    paying = [r for r in range(1, max_rank + 1) if no_gain(cost(r), full, "") is None]
    return paying[-1] if paying else 0
