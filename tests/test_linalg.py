"""Dense linear algebra: truncated SVD, energy ranks, streamed least squares, CP and unfoldings."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_tool import linalg

RNG = np.random.default_rng(0)


def _with_spectrum(m: int, n: int, values) -> np.ndarray:
    u, _ = np.linalg.qr(RNG.standard_normal((m, len(values))))
    v, _ = np.linalg.qr(RNG.standard_normal((n, len(values))))
    return (u * np.asarray(values)) @ v.T


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_low_rank_is_the_eckart_young_approximation(shape):
    a = RNG.standard_normal(shape)
    left, right = linalg.low_rank(a, 5)
    assert left.shape == (shape[0], 5) and right.shape == (5, shape[1])
    s = np.linalg.svd(a, compute_uv=False)
    assert np.linalg.norm(a - left @ right) == pytest.approx(np.sqrt(np.sum(s[5:] ** 2)), rel=1e-9)
    np.testing.assert_allclose(right @ right.T, np.eye(5), atol=1e-12)  # orthonormal rows
    full_left, full_right = linalg.low_rank(a, min(shape))
    np.testing.assert_allclose(full_left @ full_right, a, atol=1e-12)


def test_large_matrices_take_the_gram_path_and_agree_with_lapack(monkeypatch):
    a = _with_spectrum(60, 40, [9.0, 5.0, 3.0, 1.0, 0.5]).astype(np.float32)
    exact = linalg.low_rank(a, 3)
    monkeypatch.setattr(linalg, "EXACT_SVD_MAX_DIM", 10)
    for matrix in (a, a.T):
        left, right = linalg.low_rank(matrix, 3)
        want = exact[0] @ exact[1] if matrix is a else (exact[0] @ exact[1]).T
        np.testing.assert_allclose(left @ right, want, atol=1e-4)
    np.testing.assert_allclose(linalg.singular_values(a)[:5], [9, 5, 3, 1, 0.5], rtol=1e-4)
    assert linalg.leading_subspace(a, 2).shape == (60, 2)


def test_rank_for_energy():
    values = np.array([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert linalg.rank_for_energy(values, 0.7) == 1
    assert linalg.rank_for_energy(values, 0.9) == 2
    assert linalg.rank_for_energy(values, 1.0) == 4
    assert linalg.rank_for_energy(np.zeros(3), 0.9) == 1


def _stats(x: np.ndarray, y: np.ndarray, chunks: int = 3) -> linalg.LinearStats:
    stats = linalg.LinearStats(x.shape[1], y.shape[1])
    for part_x, part_y in zip(np.array_split(x, chunks), np.array_split(y, chunks), strict=True):
        stats.add(part_x, part_y)
    return stats


def test_streamed_statistics_score_any_candidate_exactly():
    x, w, b = RNG.standard_normal((50, 6)), RNG.standard_normal((6, 4)), RNG.standard_normal(4)
    y = x @ RNG.standard_normal((6, 4))
    stats = _stats(x, y)
    assert stats.rows == 50
    assert stats.error(w, b) == pytest.approx(float(np.sum((y - x @ w - b) ** 2)), rel=1e-10)
    assert stats.relative_error(w) == pytest.approx(np.linalg.norm(y - x @ w) / np.linalg.norm(y), rel=1e-10)


def test_ridge_fit_recovers_weights_and_offset_and_keeps_the_prior_where_data_is_silent():
    x = RNG.standard_normal((200, 5))
    x[:, 4] = 0.0  # a feature the data never excites
    w_true, prior = RNG.standard_normal((5, 3)), RNG.standard_normal((5, 3))
    w_true[4] = prior[4]
    y = x @ w_true + np.array([1.0, -2.0, 0.5])
    weight, offset = linalg.ridge_fit(_stats(x, y), prior, ridge=1e-9)
    np.testing.assert_allclose(weight, w_true, atol=1e-6)
    np.testing.assert_allclose(offset, [1.0, -2.0, 0.5], atol=1e-6)
    weight, offset = linalg.ridge_fit(_stats(x, y - [1.0, -2.0, 0.5]), prior, ridge=1e-9, intercept=False)
    np.testing.assert_allclose(offset, 0.0)
    np.testing.assert_allclose(weight[4], prior[4])


def test_reduced_rank_fit_beats_truncating_the_weight_on_the_data():
    # Inputs in a 3-D subspace: the best rank-2 map on the data is not the weight's own SVD.
    x = RNG.standard_normal((400, 3)) @ RNG.standard_normal((3, 8))
    w = RNG.standard_normal((8, 6))
    stats = _stats(x, x @ w)
    left, right, offset = linalg.reduced_rank_fit(stats, w, 2, ridge=1e-9)
    weight_only = linalg.low_rank(w, 2)
    assert left.shape == (8, 2) and right.shape == (2, 6)
    fitted = stats.relative_error(left @ right, offset)
    truncated = stats.relative_error(weight_only[0] @ weight_only[1])
    assert fitted < 0.5 * truncated
    # Eckart-Young on the fitted outputs: nothing of rank 2 does better on these rows.
    s = np.linalg.svd(x @ w - (x @ w).mean(0), compute_uv=False)
    assert fitted == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)) / np.linalg.norm(x @ w), rel=1e-5)
    left, right, _ = linalg.reduced_rank_fit(stats, w, 3, ridge=1e-9)
    assert stats.relative_error(left @ right, _) < 1e-6  # rank 3 covers the data exactly


def test_unfold_and_exact_cp():
    t = RNG.standard_normal((4, 3, 2, 5))
    assert linalg.unfold(t, 2).shape == (2, 60)
    np.testing.assert_allclose(linalg.unfold(t, 1)[:, 0], t[0, :, 0, 0])
    factors = linalg.cp_exact(t)
    assert linalg.cp_full_rank(t.shape) == 24 and all(f.shape[1] == 24 for f in factors)
    np.testing.assert_allclose(linalg.cp_reconstruct(factors), t, atol=1e-12)


def test_cp_als_recovers_a_low_rank_tensor_and_is_seeded():
    truth = [RNG.standard_normal((d, 4)) for d in (8, 6, 3, 3)]
    t = linalg.cp_reconstruct(truth)
    factors = linalg.cp_als(t, 4, iterations=500, tol=1e-12, seed=1)
    assert np.linalg.norm(linalg.cp_reconstruct(factors) - t) < 1e-4 * np.linalg.norm(t)
    for k in range(1, 4):  # the scale lives in the first factor
        np.testing.assert_allclose(np.linalg.norm(factors[k], axis=0), 1.0)
    again = linalg.cp_als(t, 4, iterations=500, tol=1e-12, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(factors, again, strict=True))


def test_cp_als_error_falls_with_rank():
    t = RNG.standard_normal((6, 5, 3, 3))
    errors = [np.linalg.norm(linalg.cp_reconstruct(linalg.cp_als(t, r)) - t) for r in (2, 8, 20)]
    assert errors[0] > errors[1] > errors[2]
