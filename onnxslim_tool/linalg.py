"""Dense linear algebra the compression passes share: numpy and scipy only, no ONNX.

- Truncated SVD (`low_rank`, `singular_values`, `leading_subspace`) and ranks kept by an
  energy fraction (`rank_for_energy`).
- Least squares from streamed sufficient statistics (`LinearStats`): a ridge fit pulled
  toward a prior weight (`ridge_fit`) and its rank-constrained form (`reduced_rank_fit`,
  the data-aware low-rank fit of Zhang et al. 2016).
- Tensor decompositions of convolution kernels: CP by alternating least squares
  (`cp_als`, `cp_exact`) and the mode unfoldings Tucker-2 / HOSVD is built from (`unfold`).

Everything numeric runs in float64 except where a docstring says otherwise (products of
very large matrices run in their own dtype and are accumulated in float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.linalg

# Up to this smaller dimension an exact LAPACK SVD is fast enough; above it the leading
# singular vectors come from a partial eigensolve of the smaller Gram matrix.
EXACT_SVD_MAX_DIM = 2048
# Above this many input features, per-batch products run in float32 (sums stay float64).
_FLOAT32_PRODUCTS_ABOVE = 512
# Ridge strength relative to the mean diagonal of X^T X (the mean squared input feature).
DEFAULT_RIDGE = 1e-3


# ----- truncated SVD ----------------------------------------------------------------------------


def low_rank(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`(left, right)`, left [m, r] and right [r, n], whose product is the best rank-r
    approximation of `matrix` (Eckart-Young): left = U_r S_r, right = V_r^T.

    The left factor carries the singular values; `right` has orthonormal rows.
    """
    m, n = matrix.shape
    rank = max(1, min(int(rank), m, n))
    if min(m, n) <= EXACT_SVD_MAX_DIM:
        u, s, vt = _svd(matrix)
        return u[:, :rank] * s[:rank], vt[:rank]
    # One BLAS-3 product plus a partial symmetric eigensolve: several times faster than a
    # full SVD of a large layer (VGG's 25088 x 4096 classifier), and the factors are an
    # exact projection of `matrix`, so no singular value is ever divided by.
    if n <= m:
        basis = _top_eigenvectors(_gram(matrix, rows=False), rank).astype(matrix.dtype, copy=False)
        return (matrix @ basis).astype(np.float64), basis.T.astype(np.float64)
    basis = _top_eigenvectors(_gram(matrix, rows=True), rank).astype(matrix.dtype, copy=False)
    return basis.astype(np.float64), (basis.T @ matrix).astype(np.float64)


def leading_subspace(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The `rank` leading left singular vectors of `matrix` as orthonormal columns [m, r]."""
    m, n = matrix.shape
    rank = max(1, min(int(rank), m))
    if rank >= m:
        return np.eye(m)
    if min(m, n) <= EXACT_SVD_MAX_DIM:
        return _svd(matrix)[0][:, :rank]
    return _top_eigenvectors(_gram(matrix, rows=True), rank)


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """All singular values of `matrix`, largest first."""
    if min(matrix.shape) <= EXACT_SVD_MAX_DIM:
        try:
            return scipy.linalg.svdvals(np.asarray(matrix, dtype=np.float64))
        except (np.linalg.LinAlgError, ValueError):
            return _svd(matrix)[1]
    small_side = matrix.shape[0] <= matrix.shape[1]
    eigenvalues = scipy.linalg.eigvalsh(_gram(matrix, rows=small_side))
    return np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))


def rank_for_energy(values: np.ndarray, energy: float) -> int:
    """The smallest rank whose leading `values` (singular values) keep `energy` of the
    total squared sum; at least 1."""
    squares = np.asarray(values, dtype=np.float64) ** 2
    total = float(squares.sum())
    if total <= 0.0:
        return 1
    kept = np.cumsum(squares) / total
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(squares)))


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(matrix, dtype=np.float64)
    try:
        return scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesdd")
    except (np.linalg.LinAlgError, ValueError):
        # gesdd occasionally fails to converge; the slower QR-iteration driver does not.
        return scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesvd")


def _gram(matrix: np.ndarray, rows: bool) -> np.ndarray:
    """A A^T (rows=True) or A^T A, computed in the matrix's dtype, returned as float64."""
    product = matrix @ matrix.T if rows else matrix.T @ matrix
    return np.asarray(product, dtype=np.float64)


def _top_eigenvectors(symmetric: np.ndarray, count: int) -> np.ndarray:
    """Eigenvectors of the `count` largest eigenvalues, largest first.

    The full divide-and-conquer solver: for n = 4096 it took 21 s where the subset solver
    (driver "evr") asked for the top 1760 took 54 s.
    """
    n = symmetric.shape[0]
    count = max(1, min(count, n))
    _, vectors = scipy.linalg.eigh(symmetric, driver="evd")
    return vectors[:, ::-1][:, :count]


# ----- least squares on streamed statistics ------------------------------------------------------


class LinearStats:
    """Running sums of a least-squares problem Y ~ X W + b over rows streamed in batches.

    Keeps X^T X, X^T Y, the column sums and ||Y||^2, so memory is O(d^2 + d m) however
    many rows pass through, and any candidate (W, b) can be scored without the rows.
    """

    def __init__(self, inputs: int, outputs: int) -> None:
        self.rows = 0
        self.sum_x = np.zeros(inputs)
        self.sum_y = np.zeros(outputs)
        self.xx = np.zeros((inputs, inputs))
        self.xy = np.zeros((inputs, outputs))
        self.yy = 0.0

    @property
    def inputs(self) -> int:
        return self.xx.shape[0]

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows `x` [n, d] with targets `y` [n, m]."""
        if x.shape[0] == 0:
            return
        dtype = np.float32 if x.shape[1] > _FLOAT32_PRODUCTS_ABOVE else np.float64
        xs, ys = np.asarray(x, dtype=dtype), np.asarray(y, dtype=dtype)
        self.rows += x.shape[0]
        self.sum_x += xs.sum(axis=0, dtype=np.float64)
        self.sum_y += ys.sum(axis=0, dtype=np.float64)
        self.xx += xs.T @ xs
        self.xy += xs.T @ ys
        self.yy += float(np.sum(np.square(ys, dtype=np.float64)))

    def centered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(X^T X, X^T Y) of the mean-removed rows, and the means of X and Y."""
        n = max(self.rows, 1)
        mean_x, mean_y = self.sum_x / n, self.sum_y / n
        gram = self.xx - n * np.outer(mean_x, mean_x)
        cross = self.xy - n * np.outer(mean_x, mean_y)
        return gram, cross, mean_x, mean_y

    def error(self, weight: np.ndarray, offset: np.ndarray | None = None) -> float:
        """sum ||y - x W - offset||^2 over every row seen."""
        value = self.yy - 2.0 * float(np.sum(weight * self.xy)) + float(np.sum(weight * (self.xx @ weight)))
        if offset is not None:
            value += -2.0 * float(offset @ self.sum_y) + 2.0 * float(offset @ (self.sum_x @ weight))
            value += self.rows * float(offset @ offset)
        return max(value, 0.0)

    def relative_error(self, weight: np.ndarray, offset: np.ndarray | None = None) -> float:
        """||Y - X W - offset|| / ||Y|| (0 when Y is all zeros)."""
        return math.sqrt(self.error(weight, offset) / self.yy) if self.yy > 0 else 0.0


def ridge_fit(
    stats: LinearStats, prior: np.ndarray, *, ridge: float = DEFAULT_RIDGE, intercept: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """argmin ||X W + b - Y||^2 + lam ||W - prior||^2, with b free (zero when not `intercept`).

    lam = ridge x the mean squared input feature. Pulling toward `prior` rather than toward
    zero means directions the data never excites keep their prior weights.
    """
    gram, cross, mean_x, mean_y = _moments(stats, intercept)
    lam = _penalty(gram, ridge)
    weight = _solve_psd(gram + lam * np.eye(len(gram)), cross + lam * prior)
    return weight, _offset(weight, mean_x, mean_y)


def reduced_rank_fit(
    stats: LinearStats, prior: np.ndarray, rank: int, *, ridge: float = DEFAULT_RIDGE, intercept: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(left, right, offset)` minimising ||X left right + offset - Y||^2 + lam ||left right - prior||^2.

    Reduced-rank regression: with X~ = [X; sqrt(lam) I] and Y~ = [Y; sqrt(lam) prior] the
    problem is ordinary rank-constrained least squares, whose solution is the unconstrained
    fit M projected on the leading right singular vectors of X~ M (the principal subspace
    of the fitted outputs; Zhang et al. 2016 choose filters' subspace the same way).
    """
    gram, cross, mean_x, mean_y = _moments(stats, intercept)
    metric = gram + _penalty(gram, ridge) * np.eye(len(gram))
    full = _solve_psd(metric, cross + (metric - gram) @ prior)
    basis = _top_eigenvectors(full.T @ metric @ full, rank)
    left, right = full @ basis, basis.T
    return left, right, _offset(left @ right, mean_x, mean_y)


def _moments(stats: LinearStats, intercept: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if intercept:
        return stats.centered()
    return stats.xx, stats.xy, np.zeros(stats.inputs), np.zeros(stats.xy.shape[1])


def _penalty(gram: np.ndarray, ridge: float) -> float:
    scale = float(np.trace(gram)) / max(len(gram), 1)
    return ridge * scale if scale > 0 else ridge


def _offset(weight: np.ndarray, mean_x: np.ndarray, mean_y: np.ndarray) -> np.ndarray:
    return mean_y - mean_x @ weight


def _solve_psd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.solve(matrix, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


# ----- tensor decompositions ---------------------------------------------------------------------


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-`mode` unfolding: that axis becomes the rows, the others (in order) the columns."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def cp_full_rank(shape: Sequence[int]) -> int:
    """The rank at which `cp_exact` reproduces a tensor of `shape` exactly."""
    return math.prod(shape) // max(shape)


def cp_exact(tensor: np.ndarray) -> list[np.ndarray]:
    """An exact CP decomposition of rank `cp_full_rank(tensor.shape)`.

    One component per entry of every mode but the largest: one-hot factors on those modes,
    and the matching fibre of the tensor on the largest one.
    """
    big = int(np.argmax(tensor.shape))
    others = [k for k in range(tensor.ndim) if k != big]
    rank = cp_full_rank(tensor.shape)
    factors: list[np.ndarray] = [np.empty(0)] * tensor.ndim
    factors[big] = np.moveaxis(tensor, big, -1).reshape(rank, tensor.shape[big]).T.astype(np.float64)
    grids = np.unravel_index(np.arange(rank), [tensor.shape[k] for k in others])
    for k, index in zip(others, grids, strict=True):
        one_hot = np.zeros((tensor.shape[k], rank))
        one_hot[index, np.arange(rank)] = 1.0
        factors[k] = one_hot
    return factors


def cp_reconstruct(factors: Sequence[np.ndarray]) -> np.ndarray:
    """sum_r of the outer products of the factors' r-th columns."""
    operands: list = []
    for k, factor in enumerate(factors):
        operands += [factor, [k, len(factors)]]
    return np.einsum(*operands, list(range(len(factors))), optimize=True)


def cp_als(
    tensor: np.ndarray, rank: int, *, iterations: int = 100, tol: float = 1e-6, seed: int = 0
) -> list[np.ndarray]:
    """A rank-`rank` CP decomposition by alternating least squares (Kolda & Bader 2009).

    Starts from the leading singular vectors of each unfolding (random columns where an
    unfolding has fewer), stops when the relative fit changes by less than `tol`, and folds
    the component weights into the first factor. Returns one [dim_k, rank] factor per mode.
    At `cp_full_rank` or above, returns `cp_exact` instead.
    """
    t = np.asarray(tensor, dtype=np.float64)
    if rank >= cp_full_rank(t.shape):
        return cp_exact(t)
    rng = np.random.default_rng(seed)
    factors = [_cp_init(unfold(t, k), rank, rng) for k in range(t.ndim)]
    norm_sq = float(np.sum(t * t))
    weights = np.ones(rank)
    previous = np.inf
    for _ in range(iterations):
        for k in range(t.ndim):
            grams = np.ones((rank, rank))
            for j, factor in enumerate(factors):
                if j != k:
                    grams *= factor.T @ factor
            product = _mttkrp(t, factors, k)
            # A tiny ridge keeps the normal equations solvable when components align.
            ridge = 1e-12 * max(float(np.trace(grams)), 1e-300) * np.eye(rank)
            updated = _solve_psd(grams + ridge, product.T).T
            weights = np.linalg.norm(updated, axis=0)
            weights[weights == 0] = 1.0
            factors[k] = updated / weights
        residual = _cp_residual(norm_sq, product, factors[-1] * weights, grams)
        if abs(previous - residual) <= tol * max(norm_sq, 1e-300):
            break
        previous = residual
    factors[-1] = factors[-1] * weights
    return _weights_to_first(factors)


def _cp_init(unfolded: np.ndarray, rank: int, rng: np.random.Generator) -> np.ndarray:
    basis = leading_subspace(unfolded, min(rank, unfolded.shape[0]))
    if basis.shape[1] < rank:
        extra = rng.standard_normal((unfolded.shape[0], rank - basis.shape[1]))
        basis = np.hstack([basis, extra / np.linalg.norm(extra, axis=0)])
    return basis


def _mttkrp(tensor: np.ndarray, factors: Sequence[np.ndarray], mode: int) -> np.ndarray:
    """The tensor times the Khatri-Rao product of every factor but `mode`'s: [dim_mode, rank].

    The largest other mode is contracted first by one matrix product, which also shrinks the
    tensor most; the rest are then multiplied in with the rank as a shared index. (A generic
    einsum path may expand a 512x512x3x3 kernel against a rank-1000 factor into gigabytes.)
    """
    n = tensor.ndim
    others = sorted((k for k in range(n) if k != mode), key=lambda k: -tensor.shape[k])
    product = np.tensordot(tensor, factors[others[0]], axes=([others[0]], [0]))
    axes = [k for k in range(n) if k != others[0]]  # product's axes, then the rank
    for k in others[1:]:
        kept = [a for a in axes if a != k]
        product = np.einsum(product, [*axes, n], factors[k], [k, n], [*kept, n], optimize=True)
        axes = kept
    return product


def _cp_residual(norm_sq: float, product: np.ndarray, last: np.ndarray, grams: np.ndarray) -> float:
    """||T - T^||^2 = ||T||^2 - 2 <T, T^> + ||T^||^2, from what the last mode's update computed."""
    inner = float(np.sum(product * last))
    model_sq = float(np.sum(grams * (last.T @ last)))
    return max(norm_sq - 2.0 * inner + model_sq, 0.0)


def _weights_to_first(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Unit-norm columns on every factor but the first, which takes the scale."""
    out = [f.copy() for f in factors]
    for k in range(1, len(out)):
        norms = np.linalg.norm(out[k], axis=0)
        norms[norms == 0] = 1.0
        out[k] /= norms
        out[0] = out[0] * norms
    return out
