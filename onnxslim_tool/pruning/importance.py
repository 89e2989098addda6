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

from collections.abc import Callable, Sequence

import numpy as np
from scipy.spatial.distance import pdist, squareform

from onnxslim_tool.errors import OnnxSlimError

# nisp is data-free: its final-layer importance is uniform (every output of the model counts
# the same, as every class of a classifier does), so it ranks without calibration data.
DATA_FREE = ("l1", "l2", "bn_gamma", "random", "nisp")
DATA_DRIVEN = ("apoz", "energy", "thinet", "dpp", "entropy", "random-search")
CRITERIA = DATA_FREE + DATA_DRIVEN
# Criteria whose scores are comparable across groups: one global ranking decides how many
# channels each group loses, instead of one ratio for every group.
GLOBAL = ("nisp",)
# Criteria that choose a whole mask for a known kept count rather than scoring channels.
MASK_SEARCH = ("random-search",)

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


def entropy(pooled: np.ndarray, bins: int = 16) -> np.ndarray:
    """Entropy (nats) of each channel's response distribution over calibration samples (Luo &
    Wu 2017): a channel whose response barely varies from input to input carries little
    information, so it scores low.

    `pooled` is [samples, channels] (one spatially averaged response per sample) or
    [samples, channels, span] (averaged over the span). All channels share one set of bin
    edges, spanning the 0.5-99.5 percentiles of the pooled responses: with per-channel
    ranges, a channel that jitters by 1e-6 would look as informative as one spanning the
    whole range.
    """
    x = np.asarray(pooled, dtype=np.float64)
    if x.ndim == 3:
        x = x.mean(axis=2)
    low, high = np.percentile(x, [0.5, 99.5])
    if not high > low:
        return np.zeros(x.shape[1])
    edges = np.linspace(low, high, bins + 1)
    # Clip so outliers fall in the end bins instead of vanishing from the histogram.
    index = np.clip(np.searchsorted(edges, np.clip(x, low, high), side="right") - 1, 0, bins - 1)
    out = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        p = np.bincount(index[:, c], minlength=bins) / x.shape[0]
        p = p[p > 0]
        out[c] = float(-(p * np.log(p)).sum())
    return out


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
    # ||s + z_c||^2 - ||s||^2 = 2 s.z_c + ||z_c||^2, and s.z_c sums Gram entries of the removed
    # channels: one matrix product up front instead of a pass over all samples per step
    # (AlexNet's 4096-wide layers took minutes that way).
    gram = z.T @ z
    squared = np.diag(gram).copy()
    removed_dot = np.zeros(channels)
    remaining = np.ones(channels, dtype=bool)
    order: list[int] = []
    for _ in range(channels):
        growth = 2.0 * removed_dot + squared
        growth[~remaining] = np.inf
        pick = int(np.argmin(growth))
        order.append(pick)
        remaining[pick] = False
        removed_dot += gram[pick]
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


def nisp_through_weight(out_scores: np.ndarray, weight: np.ndarray, groups: int = 1) -> np.ndarray:
    """Importance of a layer's inputs from its outputs' (NISP, Yu et al. 2018): s_in = |W|^T s_out.

    `weight` is [outputs, inputs / groups, taps] (a Conv's kernel flattened; taps = 1 for a
    matrix product), so |W| is summed over the kernel's spatial taps. With `groups` > 1,
    input channel c only reaches the outputs of its own group.
    """
    magnitude = np.abs(np.asarray(weight, dtype=np.float64)).sum(axis=2)  # [outputs, inputs/groups]
    s = np.asarray(out_scores, dtype=np.float64)
    per_out = magnitude.shape[0] // groups
    parts = [
        magnitude[j * per_out : (j + 1) * per_out].T @ s[j * per_out : (j + 1) * per_out]
        for j in range(groups)
    ]
    return np.concatenate(parts)


def refit_residual(
    gram: np.ndarray, cross: np.ndarray, target_sq: float, kept: np.ndarray, ridge: float = 1e-3
) -> float:
    """||X_S W + b - Y||^2 after the least-squares fit of W and b on the kept columns S only.

    `gram` = [X 1]^T [X 1] and `cross` = [X 1]^T Y (ones column last, as `FitStats` keeps
    them), `target_sq` = ||Y||^2. The ridge (relative to the mean diagonal, the same
    form as the refit's) keeps nearly collinear columns from making the solve unstable; the
    bias column is not penalised.
    """
    index = np.append(np.asarray(kept, dtype=int), gram.shape[0] - 1)
    g = gram[np.ix_(index, index)]
    c = cross[index]
    penalty = ridge * float(np.mean(np.diag(gram)[:-1])) if gram.shape[0] > 1 else 0.0
    regular = g + penalty * np.diag(np.append(np.ones(len(index) - 1), 0.0))
    solution = np.linalg.lstsq(regular, c, rcond=None)[0]
    value = target_sq - 2.0 * float((solution * c).sum()) + float((solution * (g @ solution)).sum())
    return max(value, 0.0)


def random_mask_search(
    error: Callable[[np.ndarray], float], size: int, keep: int, trials: int, seed: int, blocks: int = 1
) -> tuple[np.ndarray, list[float]]:
    """The best of `trials` seeded random masks keeping `keep` of `size` channels (Anwar et al.
    2017): the kept channels (sorted) with the lowest `error`, and every trial's error.

    With `blocks` > 1 each of the equal contiguous blocks keeps `keep // blocks` channels, as
    grouped convolutions require.
    """
    rng = np.random.default_rng(seed)
    width, per_block = size // blocks, keep // blocks
    best, errors = np.arange(keep), []
    for _ in range(max(1, trials)):
        kept = np.sort(
            np.concatenate([b * width + rng.choice(width, per_block, replace=False) for b in range(blocks)])
        )
        errors.append(float(error(kept)))
        if errors[-1] < min(errors[:-1], default=np.inf):  # ties keep the earlier mask
            best = kept
    return best, errors


def scores_from_mask(kept: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Scores that rank the `kept` channels above all others, each side ordered by `base`:
    keeping the top `len(kept)` returns the mask, and other counts still keep sensible sets."""
    ranks = np.empty(len(base))
    ranks[np.argsort(np.asarray(base), kind="stable")] = np.arange(1, len(base) + 1) / (len(base) + 1)
    ranks[np.asarray(kept, dtype=int)] += 1.0
    return ranks


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
