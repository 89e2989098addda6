"""Channel importance criteria: which channels of a dependency group matter least.

Every function here is plain numpy on arrays the pass extracted from the model (weight rows,
BatchNorm scales, calibration activations, next-layer contributions) and returns one score
per channel, **higher = more important**. Criteria that rank by a greedy search (ThiNet,
DPP) return scores derived from their order, so all criteria plug into one allocation.

A group has several members (residual adds: several producers; concats: producers covering
different channel ranges). `combine` averages the members' scores after normalising each
member to mean 1, so no member dominates by its scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.distance import pdist, squareform

from onnxslim_tool.errors import OnnxSlimError

DATA_FREE = ("l1", "l2", "bn_gamma", "random")
DATA_DRIVEN = ("apoz", "energy", "thinet", "dpp")
CRITERIA = DATA_FREE + DATA_DRIVEN

# Criteria users ask for that cannot work here, and what to use instead.
_UNAVAILABLE = {
    "taylor": "criterion 'taylor' needs gradients, which onnxruntime inference cannot give; "
    "the nearest available criterion is 'thinet' (next-layer reconstruction error)",
}


def check_criterion(name: str) -> str:
    """`name` when it is a known criterion, else an OnnxSlimError naming the valid ones."""
    if name in _UNAVAILABLE:
        raise OnnxSlimError(_UNAVAILABLE[name])
    if name not in CRITERIA:
        raise OnnxSlimError(f"unknown pruning criterion '{name}'; valid: {', '.join(CRITERIA)}")
    return name


def needs_data(name: str) -> bool:
    return name in DATA_DRIVEN


# ----- data-free criteria -----------------------------------------------------------------------


def weight_norm(rows: np.ndarray, order: int = 1) -> np.ndarray:
    """L1 or L2 norm of each channel's weights; `rows` has the channel axis first (Li et al. 2017)."""
    flat = np.abs(np.asarray(rows, dtype=np.float64).reshape(rows.shape[0], -1))
    return flat.sum(axis=1) if order == 1 else np.sqrt((flat**2).sum(axis=1))


def bn_gamma(gamma: np.ndarray) -> np.ndarray:
    """|gamma| of a BatchNorm: a channel scaled to ~0 carries nothing (Network Slimming)."""
    return np.abs(np.asarray(gamma, dtype=np.float64).ravel())


def random_scores(size: int, seed: int) -> np.ndarray:
    """Seeded random scores: the baseline every criterion must beat."""
    return np.random.default_rng(seed).random(size)


# ----- activation statistics --------------------------------------------------------------------


def apoz(acts: np.ndarray) -> np.ndarray:
    """1 - APoZ: the fraction of non-zero (positive) activations per channel (Hu et al. 2016).

    `acts` is [rows, channels] or [rows, channels, span]; a channel that is almost always zero
    after its ReLU contributes almost nothing downstream.
    """
    per_channel = _channels_first(acts)
    return (per_channel > 0).mean(axis=1)


def energy(acts: np.ndarray) -> np.ndarray:
    """Mean squared activation per channel."""
    per_channel = _channels_first(acts).astype(np.float64)
    return (per_channel**2).mean(axis=1)


def _channels_first(acts: np.ndarray) -> np.ndarray:
    """[rows, channels(, span)] -> [channels, rows*span]."""
    acts = np.asarray(acts)
    return np.moveaxis(acts, 1, 0).reshape(acts.shape[1], -1)


# ----- greedy searches --------------------------------------------------------------------------


def channel_contributions(inputs: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Each input channel's additive share of every output: [rows * outputs, channels].

    `inputs` is [rows, channels, taps] (convolution patches, or taps = 1 for a matrix
    product), `weight` is [outputs, channels, taps]; summing the result over channels gives
    the layer's output (without bias) at each sampled row and output.
    """
    shares = np.einsum(
        "rct,oct->roc", np.asarray(inputs, dtype=np.float64), np.asarray(weight, dtype=np.float64)
    )
    return shares.reshape(-1, shares.shape[2])


def thinet_removal_order(contributions: np.ndarray) -> list[int]:
    """Channels in the order ThiNet removes them (Luo et al. 2017).

    `contributions[m, c]` is channel c's additive share of the next layer's output at sampled
    entry m. Greedy: repeatedly remove the channel that keeps the summed contribution of all
    removed channels smallest, i.e. whose removal changes the next layer's output least.
    """
    z = np.asarray(contributions, dtype=np.float64)
    channels = z.shape[1]
    squared = (z**2).sum(axis=0)
    removed_sum = np.zeros(z.shape[0])
    remaining = np.ones(channels, dtype=bool)
    order: list[int] = []
    for _ in range(channels):
        # ||s + z_c||^2 - ||s||^2 = 2 s.z_c + ||z_c||^2
        growth = 2.0 * (removed_sum @ z) + squared
        growth[~remaining] = np.inf
        pick = int(np.argmin(growth))
        order.append(pick)
        remaining[pick] = False
        removed_sum += z[:, pick]
    return order


def dpp_selection_order(acts: np.ndarray, *, min_gain: float = 1e-10) -> list[int]:
    """Channels in the order a greedy-MAP DPP keeps them (Mariet & Sra 2016, "Diversity Networks").

    The kernel is a Gaussian RBF on the channels' activation vectors (bandwidth: median
    pairwise distance). Each step adds the channel that most increases log det of the kept
    set's kernel: the channel least explained by those already kept. The first pick is a tie
    (the RBF diagonal is constant): it goes to the most energetic channel. Channels left once
    the gain vanishes (near-duplicates of kept ones) follow by decreasing energy.
    """
    vectors = _channels_first(acts).astype(np.float64)
    channels = vectors.shape[0]
    power = (vectors**2).mean(axis=1)
    if channels == 1:
        return [0]
    kernel = _rbf_kernel(vectors)
    # Fast greedy MAP inference with incremental Cholesky rows (Chen et al. 2018).
    rows = np.zeros((channels, channels))
    gains = np.diag(kernel).copy()
    order = [int(np.argmax(power))]
    while len(order) < channels:
        last, k = order[-1], len(order) - 1
        if gains[last] <= min_gain:
            break
        row = (kernel[last] - rows[:k].T @ rows[:k, last]) / np.sqrt(gains[last])
        rows[k] = row
        gains = gains - row**2
        gains[order] = -np.inf
        order.append(int(np.argmax(gains)))
    if gains[order[-1]] <= min_gain:
        order.pop()
    rest = [c for c in np.argsort(-power, kind="stable") if c not in set(order)]
    return order + [int(c) for c in rest]


def _rbf_kernel(vectors: np.ndarray) -> np.ndarray:
    distances = squareform(pdist(vectors, "sqeuclidean"))
    off_diagonal = distances[~np.eye(len(vectors), dtype=bool)]
    bandwidth = float(np.median(off_diagonal))
    if bandwidth <= 0:
        bandwidth = float(off_diagonal.mean()) or 1.0
    return np.exp(-distances / bandwidth) + 1e-9 * np.eye(len(vectors))


def scores_from_order(order: Sequence[int], size: int, *, most_important_first: bool) -> np.ndarray:
    """Scores in (0, 1] from a ranking, so order-based criteria share the score interface."""
    scores = np.zeros(size)
    ranks = np.arange(1, len(order) + 1) / len(order)
    scores[np.asarray(order, dtype=int)] = ranks[::-1] if most_important_first else ranks
    return scores


# ----- combining members ------------------------------------------------------------------------


def normalise(scores: np.ndarray) -> np.ndarray:
    """Scores divided by their mean over the finite entries (NaN = channel not covered)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    mean = scores[finite].mean() if finite.any() else 0.0
    return scores / mean if mean > 0 else np.where(finite, 1.0, np.nan)


def combine(member_scores: Sequence[np.ndarray]) -> np.ndarray:
    """One score per group channel: the mean of the members' normalised scores.

    Each entry of `member_scores` has one score per group channel, NaN where that member
    does not cover the channel (e.g. the other branch of a Concat). A channel no member
    covers scores 0, so it goes first.
    """
    stacked = np.stack([normalise(s) for s in member_scores])
    covered = np.isfinite(stacked)
    total = np.where(covered, stacked, 0.0).sum(axis=0)
    counts = covered.sum(axis=0)
    return np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
