"""Importance criteria: each ranks tiny hand-made weights and activations as the paper says."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.pruning import importance as imp

RNG = np.random.default_rng(0)


def test_l1_and_l2_pick_the_smallest_filter():
    filters = RNG.standard_normal((4, 3, 3, 3))
    filters[2] *= 0.01
    assert np.argmin(imp.weight_norm(filters, 1)) == 2
    assert np.argmin(imp.weight_norm(filters, 2)) == 2


def test_l1_and_l2_can_disagree():
    # One large weight vs many medium ones: L2 favours the spike, L1 the spread.
    filters = np.array([[3.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]])
    assert np.argmax(imp.weight_norm(filters, 1)) == 1
    assert np.argmax(imp.weight_norm(filters, 2)) == 0


def test_bn_gamma_ranks_by_magnitude():
    np.testing.assert_array_equal(np.argsort(imp.bn_gamma(np.array([0.5, -2.0, 0.01, 1.0]))), [2, 0, 3, 1])


def test_apoz_flags_the_channel_that_is_mostly_zero():
    acts = np.maximum(RNG.standard_normal((200, 4)), 0)
    acts[:190, 1] = 0.0
    scores = imp.apoz(acts)
    assert np.argmin(scores) == 1
    assert scores[1] == pytest.approx((acts[:, 1] > 0).mean())


def test_energy_flags_the_quiet_channel_and_reads_spans():
    acts = RNG.standard_normal((100, 3, 4))  # [rows, channels, span] as after a Flatten
    acts[:, 0] *= 0.1
    assert np.argmin(imp.energy(acts)) == 0


def test_random_is_seeded():
    np.testing.assert_array_equal(imp.random_scores(10, 3), imp.random_scores(10, 3))
    assert not np.array_equal(imp.random_scores(10, 3), imp.random_scores(10, 4))


def test_contributions_sum_to_the_layer_output():
    patches, weight = RNG.standard_normal((7, 3, 4)), RNG.standard_normal((2, 3, 4))
    shares = imp.channel_contributions(patches, weight)
    want = np.einsum("rct,oct->ro", patches, weight).reshape(-1)
    np.testing.assert_allclose(shares.sum(axis=1), want)


def test_thinet_removes_first_what_changes_the_next_layer_least():
    z = RNG.standard_normal((300, 4))
    z[:, 3] *= 0.05  # barely contributes
    assert imp.thinet_removal_order(z)[0] == 3


def test_thinet_removes_channels_that_cancel_each_other_together():
    # Channels 0 and 1 cancel: once one is gone, removing the other *restores* the next
    # layer's output, so ThiNet takes the partner right after it, before channel 2.
    base = RNG.standard_normal(300)
    z = np.column_stack([base, -base + 0.01 * RNG.standard_normal(300), RNG.standard_normal(300)])
    z[:, 2] *= 1.2 * np.linalg.norm(base) / np.linalg.norm(z[:, 2])
    assert set(imp.thinet_removal_order(z)[:2]) == {0, 1}


def test_dpp_keeps_one_of_two_duplicates():
    a, b, c = RNG.standard_normal((3, 200))
    acts = np.column_stack([a, b, a + 1e-6 * c, c])  # channel 2 duplicates channel 0
    order = imp.dpp_selection_order(acts)
    assert sorted(order) == [0, 1, 2, 3]
    assert order[-1] in (0, 2)  # the duplicate pair's second member comes last
    assert {0, 2} - set(order[:3]) != set()


def test_dpp_is_deterministic_and_starts_with_the_strongest_channel():
    acts = RNG.standard_normal((100, 5)) * np.array([1, 1, 5, 1, 1])
    assert imp.dpp_selection_order(acts)[0] == 2
    assert imp.dpp_selection_order(acts) == imp.dpp_selection_order(acts.copy())


def test_scores_from_order_put_the_most_important_highest():
    scores = imp.scores_from_order([2, 0, 1], 3, most_important_first=True)
    assert list(np.argsort(scores)) == [1, 0, 2]
    scores = imp.scores_from_order([2, 0, 1], 3, most_important_first=False)
    assert list(np.argsort(scores)) == [2, 0, 1]


def test_combine_normalises_members_and_handles_partial_cover():
    big = np.array([100.0, 200.0, np.nan, np.nan])  # one Concat branch, large scale
    small = np.array([np.nan, np.nan, 1.0, 3.0])  # the other branch, small scale
    combined = imp.combine([big, small])
    np.testing.assert_allclose(combined, [2 / 3, 4 / 3, 0.5, 1.5])


def test_combine_averages_producers_of_a_residual_group():
    combined = imp.combine([np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])])
    np.testing.assert_allclose(combined, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", imp.CRITERIA)
def test_every_criterion_is_known(name):
    assert imp.check_criterion(name) == name
    assert imp.needs_data(name) == (name in ("apoz", "energy", "thinet", "dpp", "entropy", "random-search"))


def test_unknown_and_unavailable_criteria_are_refused_with_one_line():
    with pytest.raises(OnnxSlimError, match="valid: l1, l2, bn_gamma") as info:
        imp.check_criterion("l3")
    assert "\n" not in str(info.value)
    with pytest.raises(OnnxSlimError, match="gradients.*'thinet'"):
        imp.check_criterion("taylor")
