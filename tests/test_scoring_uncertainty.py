"""Hand-computed values of every uncertainty measure, and the picks the matching strategies make from them."""

from __future__ import annotations

import numpy as np
import pytest

from backend.scoring.base import Pool
from backend.scoring.registry import get_strategy
from backend.scoring.strategies import committee_scores, expected_gradient_length, uncertainty_scores
from backend.scoring.uncertainty import bald, confidence, entropy, least_confidence, margin, per_label, vote_entropy

# 4x2: binary rows. Every measure ranks them 0 > 2 > 3 > 1.
PROBS_4X2 = np.array([[0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
# 3x3: row 0 is uniform; margin and least confidence prefer row 2 (0.5 vs 0.45), entropy prefers row 1 (0.6/0.3/0.1).
PROBS_3X3 = np.array([[1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1], [0.5, 0.45, 0.05]])

EXPECTED = {
    # least confidence: (1 - max) * k / (k - 1)
    (least_confidence, "4x2"): [1.0, 0.2, 0.6, 0.4],
    (least_confidence, "3x3"): [1.0, 0.6, 0.75],
    # margin: 1 - (top1 - top2)
    (margin, "4x2"): [1.0, 0.2, 0.6, 0.4],
    (margin, "3x3"): [1.0, 0.7, 0.95],
    # entropy / log k, e.g. H(0.9, 0.1) = 0.325083 nats / 0.693147 = 0.468996
    (entropy, "4x2"): [1.0, 0.468996, 0.881291, 0.721928],
    (entropy, "3x3"): [1.0, 0.817345, 0.778881],
}
MATRICES = {"4x2": PROBS_4X2, "3x3": PROBS_3X3}


@pytest.mark.parametrize(("measure", "matrix"), list(EXPECTED))
def test_measure_hand_computed(measure, matrix):
    np.testing.assert_allclose(measure(MATRICES[matrix]), EXPECTED[measure, matrix], atol=1e-6)


@pytest.mark.parametrize(
    ("name", "matrix", "expected_picks"),
    [
        ("least_confidence", "4x2", [0, 2]),
        ("margin", "4x2", [0, 2]),
        ("entropy", "4x2", [0, 2]),
        ("least_confidence", "3x3", [0, 2]),
        ("margin", "3x3", [0, 2]),
        ("entropy", "3x3", [0, 1]),
        # EGL: row 1 scores 0.6 * 0.5099 + 0.3 * 0.9274 + 0.1 * 1.1225 = 0.6964, row 2 scores 0.7307
        ("expected_gradient_length", "3x3", [0, 2]),
    ],
)
def test_strategy_picks_the_hand_computed_rows(name, matrix, expected_picks):
    probs = MATRICES[matrix]
    pool = Pool(np.ones((len(probs), 2), np.float32) / np.sqrt(2), probs, np.zeros(len(probs), bool))
    picks = get_strategy(name).select(pool, 2, np.random.default_rng(0))
    assert picks.tolist() == expected_picks


def test_labelled_best_row_is_skipped():
    labeled = np.array([True, False, False, False])
    pool = Pool(np.ones((4, 2), np.float32), PROBS_4X2, labeled)
    assert get_strategy("margin").select(pool, 2, np.random.default_rng(0)).tolist() == [2, 3]


def test_vote_entropy_and_bald_hand_computed():
    # 3 heads, 2 tasks. Task 0: votes 0, 0, 1; task 1: all heads vote 0.
    committee = np.array([[[0.9, 0.1], [0.5, 0.5]], [[0.8, 0.2], [0.6, 0.4]], [[0.1, 0.9], [0.7, 0.3]]])
    # H(2/3, 1/3) / log 2 = 0.918296; unanimous votes have entropy 0.
    np.testing.assert_allclose(vote_entropy(committee), [0.918296, 0.0], atol=1e-6)
    # Task 0: H(mean = 0.6, 0.4) = 0.673012 nats, mean head entropy 0.383523 -> 0.289489 / log 2 = 0.417644.
    np.testing.assert_allclose(bald(committee), [0.417644, 0.020203], atol=1e-6)


def test_committee_strategies_pick_the_disagreement():
    committee = np.array([[[0.9, 0.1], [0.5, 0.5]], [[0.8, 0.2], [0.6, 0.4]], [[0.1, 0.9], [0.7, 0.3]]])
    probs = committee.mean(axis=0)  # (0.6, 0.4), (0.6, 0.4): margin alone cannot tell them apart
    pool = Pool(np.ones((2, 2), np.float32), probs, np.zeros(2, bool), committee_probs=committee)
    for name in ("vote_entropy", "bald"):
        assert get_strategy(name).select(pool, 1, np.random.default_rng(0)).tolist() == [0]


def test_per_label_averages_binary_margins():
    multi = np.array([[0.5, 0.9], [0.7, 0.4]])
    # label margins 1 - |2p - 1|: row 0 (1.0 + 0.2) / 2, row 1 (0.6 + 0.8) / 2
    np.testing.assert_allclose(per_label(margin, multi), [0.6, 0.7])
    np.testing.assert_allclose(uncertainty_scores(multi, multi_label=True), [0.6, 0.7])
    np.testing.assert_allclose(uncertainty_scores(PROBS_3X3, multi_label=False), [1.0, 0.7, 0.95])


def test_per_label_reads_float32_and_a_single_label_as_the_head_gives_them():
    # a multi-label head's probabilities come as float32; one label is a yes/no question of its own
    np.testing.assert_allclose(per_label(entropy, np.array([[0.5], [1.0]], dtype=np.float32)), [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(per_label(margin, np.array([[0.5, 0.9]], dtype=np.float32)), [0.6], rtol=1e-6)


def test_multi_label_committee_scores_per_label():
    # 2 heads, 1 task, 2 labels: label 0 split (0.9 vs 0.1 -> votes 1:1), label 1 unanimous.
    committee = np.array([[[0.9, 0.8]], [[0.1, 0.7]]])
    np.testing.assert_allclose(committee_scores(committee, True, vote_entropy), [0.5])


def test_confidence():
    np.testing.assert_allclose(confidence(PROBS_3X3), [1 / 3, 0.6, 0.5])
    np.testing.assert_allclose(confidence(np.array([[0.5, 0.9], [0.7, 0.4]]), multi_label=True), [0.7, 0.65])


def test_expected_gradient_length_hand_computed():
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1], [0.9, 0.1]])
    norms = np.array([1.0, 1.0, 1.0, 2.0])
    # [0.9, 0.1]: 0.9 * ||(-0.1, 0.1)|| + 0.1 * ||(0.9, -0.9)|| = 0.9 * 0.141421 + 0.1 * 1.272792 = 0.254558
    np.testing.assert_allclose(expected_gradient_length(probs, norms), [0.707107, 0.0, 0.254558, 0.509117], atol=1e-6)
    # multi-label: root-mean-square length, ||x|| sqrt(sum_j p_j (1 - p_j)) = 2 sqrt(0.25 + 0.09)
    multi = expected_gradient_length(np.array([[0.5, 0.9]]), np.array([2.0]), multi_label=True)
    np.testing.assert_allclose(multi, [1.166190], atol=1e-6)
    # a length, not a per-label mean: four labels at 0.1 give sqrt(4 x 0.09) = 0.6, one at 0.5 and three certain
    # give sqrt(0.25) = 0.5 (the mean of 2 p (1 - p) over labels gave 0.18 and 0.125, shrinking as labels are added)
    lengths = expected_gradient_length(np.array([[0.1, 0.1, 0.1, 0.1], [0.5, 0.0, 0.0, 0.0]]), np.ones(2), True)
    np.testing.assert_allclose(lengths, [0.6, 0.5])


def test_measures_reject_a_single_column():
    with pytest.raises(ValueError, match=r"\(n, k>=2\)"):
        margin(np.ones((3, 1)))
