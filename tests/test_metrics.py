"""Fidelity numbers against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxslim_tool import metrics


def test_cosine_snr_and_errors_by_hand():
    a = np.array([1.0, 0.0, 0.0], np.float32)
    b = np.array([1.0, 1.0, 0.0], np.float32)
    assert metrics.cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert metrics.snr_db(a, b) == pytest.approx(0.0)  # noise power equals signal power
    assert metrics.snr_db(a, a) == math.inf
    assert metrics.max_abs_error(a, b) == 1.0
    assert metrics.cosine(np.zeros(3), np.zeros(3)) == 1.0


def test_top1_agreement_and_accuracy():
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    cand = np.array([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]], np.float32)
    assert metrics.top1_agreement(ref, cand) == pytest.approx(2 / 3)
    assert metrics.accuracy(ref, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert metrics.task_accuracy({"scores": ref}, np.array([1, 0, 1])) == 1.0
    assert metrics.task_accuracy({"scores": ref}, None) is None


def test_compare_output_flags_nonfinite_and_shape_change():
    ref = np.ones((2, 3), np.float32)
    bad = ref.copy()
    bad[0, 0] = np.nan
    assert not metrics.compare_output("y", ref, bad).finite
    with pytest.raises(ValueError, match="changed shape"):
        metrics.compare_output("y", ref, np.ones((3, 2), np.float32))
    fid = metrics.compare_output("y", ref, ref * 1.01)
    assert fid.max_rel_error == pytest.approx(0.01, rel=1e-3)
    assert fid.top1_agreement is None  # every row of ones picks class 0: agreement says nothing


def test_nonfinite_values_the_reference_already_had_are_not_blamed():
    ref = np.array([[1.0, np.nan, 2.0]], np.float32)
    same = ref.copy()
    fid = metrics.compare_output("y", ref, same)
    assert fid.finite and fid.cosine == pytest.approx(1.0) and fid.max_abs_error == 0.0
    worse = np.array([[1.0, np.nan, np.inf]], np.float32)
    assert not metrics.compare_output("y", ref, worse).finite


def test_unit_norm_rows_are_embeddings_not_class_scores():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10)).astype(np.float32)
    assert metrics.looks_like_class_scores(logits)
    embeddings = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert not metrics.looks_like_class_scores(embeddings)
    # no top-1 agreement for embeddings: the gate falls back to output cosine
    fid = metrics.compare_output("e", embeddings, embeddings + 0.01)
    assert fid.top1_agreement is None and fid.cosine > 0.99
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # rows sum to 1, not unit L2
    assert metrics.looks_like_class_scores(probabilities)


def test_top1_agreement_is_not_claimed_where_the_reference_always_picks_one_class():
    rng = np.random.default_rng(0)
    saturated = rng.standard_normal((8, 10)).astype(np.float32)
    saturated[:, 3] += 100.0  # every sample's top-1 is class 3, whatever the input
    scrambled = saturated.copy()
    scrambled[:, :3] = rng.standard_normal((8, 3)) * 30  # far off, but class 3 still wins
    fid = metrics.compare_output("p", saturated, scrambled)
    assert fid.top1_agreement is None  # 100% agreement here would say nothing
    varied = rng.standard_normal((8, 10)).astype(np.float32)
    assert metrics.compare_output("p", varied, varied).top1_agreement == 1.0
