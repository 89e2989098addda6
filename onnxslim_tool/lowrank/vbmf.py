"""Rank from empirical variational Bayesian matrix factorization (EVBMF).

Nakajima, Sugiyama, Babacan & Tomioka (2013, JMLR 14) give the global solution of fully
observed VB matrix factorization with the prior variances set by empirical Bayes: for an
L x M matrix (L <= M, alpha = L / M) with noise variance sigma^2, a singular value gamma is
kept exactly when its normalised square x = gamma^2 / (M sigma^2) exceeds

    x_min = (1 + t) (1 + alpha / t),   t the positive zero of  log(1 + t) + alpha log(1 + t / alpha) - t.

A kept component with x > x_min has "signal" tau(x), the root above sqrt(alpha) of
x = (1 + tau)(1 + alpha / tau). The noise variance, when unknown, minimises the free energy

    F(sigma^2) = sum_pruned (x - log x) + sum_kept (x - tau + log((1 + tau) / x) + alpha log(1 + tau / alpha))

(each kept component changes the pruned term x - log x by log(1 + tau) + alpha log(1 + tau / alpha) - tau,
which is negative exactly above x_min). Kim et al. (2015) choose Tucker-2 ranks this way,
one EVBMF rank per unfolding of the kernel; here it also serves the matrix methods.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize

from onnxslim_tool import linalg


def threshold_signal(alpha: float) -> float:
    """The positive zero of log(1 + t) + alpha log(1 + t / alpha) - t (about 2.513 sqrt(alpha))."""

    def gain(t: float) -> float:
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t

    # gain > 0 just above 0 (slope 1), concave, and negative at 20 + 2 alpha for alpha <= 1.
    return float(scipy.optimize.brentq(gain, 1e-9, 20.0 + 2.0 * alpha))


def _signal(x: np.ndarray, alpha: float) -> np.ndarray:
    """tau(x): the root above sqrt(alpha) of x = (1 + tau)(1 + alpha / tau)."""
    shifted = x - (1.0 + alpha)
    return 0.5 * (shifted + np.sqrt(np.maximum(shifted * shifted - 4.0 * alpha, 0.0)))


def _free_energy(
    sigma2: float, squares: np.ndarray, residual: float, shape: tuple[int, int], x_min: float
) -> float:
    """F(sigma^2) per column, up to a constant; `residual` is the energy not in `squares`."""
    small, large = shape
    alpha = small / large
    x = squares / (large * sigma2)
    kept = x > x_min
    pruned = x[~kept]
    tau = _signal(x[kept], alpha)
    value = float(np.sum(pruned - np.log(pruned)))
    value += float(np.sum(x[kept] - tau + np.log((1.0 + tau) / x[kept]) + alpha * np.log1p(tau / alpha)))
    # Dimensions without a singular value here (when `squares` is truncated) are noise too.
    missing = small - len(squares)
    return value + residual / (large * sigma2) + missing * math.log(sigma2)


def noise_and_rank(
    values: np.ndarray, shape: tuple[int, int], total: float | None = None
) -> tuple[float, int]:
    """(noise variance, rank) EVBMF estimates from a matrix's singular values (largest first).

    `shape` is the matrix's shape; `total` its squared Frobenius norm when `values` are not
    all of its singular values.
    """
    small, large = sorted(int(d) for d in shape)
    alpha = small / large
    squares = np.asarray(values, dtype=np.float64)[:small] ** 2
    energy = float(squares.sum()) if total is None else float(total)
    if energy <= 0.0 or not np.any(squares > 0):
        return 0.0, 0
    residual = max(energy - float(squares.sum()), 0.0)
    t = threshold_signal(alpha)
    x_min = (1.0 + t) * (1.0 + alpha / t)
    # EVBMF keeps at most about small / (1 + alpha) components, so the rest is noise: that
    # bounds sigma^2 from below; all of the energy being noise bounds it from above.
    most = max(0, min(math.ceil(small / (1.0 + alpha)) - 1, len(squares) - 1))
    tail = squares[most:]
    lower = max(tail[0] / (large * x_min), float(tail.mean()) / large, 1e-300)
    upper = energy / (small * large)
    if lower < upper:
        found = scipy.optimize.minimize_scalar(
            lambda log_s2: _free_energy(math.exp(log_s2), squares, residual, (small, large), x_min),
            bounds=(math.log(lower), math.log(upper)),
            method="bounded",
        )
        sigma2 = math.exp(float(found.x))
    else:
        sigma2 = upper
    rank = int(np.sum(squares > large * sigma2 * x_min))
    return sigma2, rank


def vbmf_rank(matrix: np.ndarray) -> int:
    """The EVBMF rank of `matrix` (noise variance estimated from the matrix itself)."""
    values = linalg.singular_values(matrix)
    total = float(np.sum(np.square(matrix, dtype=np.float64)))
    return noise_and_rank(values, matrix.shape, total)[1]
