"""Hand-computed picks of the diversity functions on a few 2-D points, and a brute-force check of the core-set."""

from __future__ import annotations

import numpy as np
import pytest

from backend.scoring.diversity import cluster_picks, greedy_coreset, knn_density, max_similarity, normalize_rows
from tests.helpers import unit


def test_coreset_breaks_ties_with_the_rng_not_by_row_order():
    points = unit(0, 90, 90, 90, 90)  # four equally far duplicates of one point
    rngs = [np.random.default_rng(seed) for seed in range(40)]
    firsts = {int(greedy_coreset(points, np.arange(1, 5), np.array([0]), 1, rng)[0]) for rng in rngs}
    assert firsts == {1, 2, 3, 4}
    assert greedy_coreset(points, np.arange(1, 5), np.array([0]), 1).tolist() == [1]  # without an rng: the first


def test_coreset_goes_farthest_from_labelled_and_from_its_own_picks():
    points = unit(0, 12, 90, 100, 180, 185)
    # From the labelled 0 deg: 180 is farthest (distance 2). Then 90 (distance 1 to both 0 and 180). Then the
    # nearest covered angle is 12 deg away for row 1, 10 for row 3 (100 vs 90), 5 for row 5 (185 vs 180).
    picks = greedy_coreset(points, np.arange(1, 6), np.array([0]), 5)
    assert picks.tolist() == [4, 2, 1, 3, 5]
    assert greedy_coreset(points, np.arange(1, 6), np.array([0]), 2).tolist() == [4, 2]


def test_coreset_without_labels_starts_from_the_most_central_row():
    points = unit(0, 40, 45, 52, 100)
    # The mean direction is 47 deg, nearest is 45 (row 2); then 100 (55 deg away), 0 (45 away), 52 (7), 40 (5).
    assert greedy_coreset(points, np.arange(5), np.empty(0, int), 5).tolist() == [2, 4, 0, 3, 1]


def test_coreset_uses_cosine_not_euclidean_distance():
    points = unit(0, 90, 170) * np.array([[1.0], [10.0], [1.0]], dtype=np.float32)
    # Euclidean would take the long row 1; by angle, 170 deg is farther from 0 than 90 is.
    assert greedy_coreset(points, np.array([1, 2]), np.array([0]), 1).tolist() == [2]


def test_coreset_never_repeats_duplicates_and_caps_at_the_candidates():
    points = np.ones((4, 3), np.float32)
    picks = greedy_coreset(points, np.array([0, 1, 2]), np.array([3]), 10)
    assert sorted(picks.tolist()) == [0, 1, 2]


def brute_force_coreset(points, unlabeled, labeled, n):
    normed = points / np.linalg.norm(points, axis=1, keepdims=True)
    covered, picks = list(labeled), []
    for _ in range(n):
        distance = 1.0 - (normed[unlabeled] @ normed[covered].T).max(axis=1)
        distance[np.isin(unlabeled, picks)] = -np.inf
        picks.append(int(unlabeled[np.argmax(distance)]))
        covered.append(picks[-1])
    return picks


def test_coreset_matches_brute_force():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(200, 8)).astype(np.float32)
    labeled = rng.choice(200, size=7, replace=False)
    unlabeled = np.setdiff1d(np.arange(200), labeled)
    assert greedy_coreset(points, unlabeled, labeled, 15).tolist() == brute_force_coreset(
        points, unlabeled, labeled, 15
    )


# Three separated blobs: A (5 rows, centred on 0 deg), C (4 rows, on 180), B (3 rows, mean 89.7 deg).
BLOBS = unit(-2, -1, 0, 1, 2, 88, 90, 91, 177, 180, 181, 182)


def test_cluster_picks_take_each_centre_biggest_cluster_first():
    picks = cluster_picks(BLOBS, np.arange(12), 3, np.random.default_rng(0))
    assert picks.tolist() == [2, 9, 6]


def test_cluster_picks_skip_clusters_that_hold_a_labelled_row():
    unlabeled = np.array([0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    picks = cluster_picks(BLOBS, unlabeled, 2, np.random.default_rng(0), indices_labeled=np.array([2]))
    assert picks.tolist() == [9, 6]


def test_cluster_picks_by_weight_order_clusters_and_members():
    weights = np.full(12, 0.01)
    weights[[7, 5, 10, 1]] = [1.0, 0.5, 0.3, 0.2]  # blob B weighs 1.52, blob C 0.33, blob A 0.24
    for seed in range(5):
        picks = cluster_picks(BLOBS, np.arange(12), 3, np.random.default_rng(seed), weights=weights, pick="max_weight")
        assert picks.tolist() == [7, 10, 1]  # the heaviest blob first, each blob's heaviest row


def test_cluster_picks_fill_with_coreset_when_clusters_run_out():
    picks = cluster_picks(np.ones((6, 2), np.float32), np.arange(6), 4, np.random.default_rng(0))
    assert sorted(picks.tolist()) == sorted(set(picks.tolist())) and len(picks) == 4
    # two clusters for two picks: {0° labelled, 1°, 80°}, covered, and {180°, 179°}, which gives one pick (row 3
    # or 4); the second pick is the k-center fill: the row farthest from row 0 and that pick, 80° (row 2)
    points = unit(0, 1, 80, 180, 179)
    for seed in range(10):
        picks = cluster_picks(
            points, np.arange(1, 5), 2, np.random.default_rng(seed), indices_labeled=np.array([0]), max_clusters=2
        )
        assert picks[0] in (3, 4) and picks[1] == 2


def test_cluster_picks_reject_an_unknown_pick_mode():
    with pytest.raises(ValueError, match=r"pick must be one of \('center', 'max_weight'\), got 'middle'"):
        cluster_picks(BLOBS, np.arange(12), 3, np.random.default_rng(0), pick="middle")


def test_knn_density_hand_computed():
    points = unit(0, 10, 20, 90)
    rng = np.random.default_rng(0)
    # every row is in the reference; a row is never its own neighbour
    np.testing.assert_allclose(
        knn_density(points, np.arange(4), rng, n_neighbors=1), np.cos(np.deg2rad([10, 10, 10, 70])), atol=1e-6
    )
    expected = [(np.cos(a) + np.cos(b)) / 2 for a, b in np.deg2rad([(10, 20), (10, 10), (10, 20), (70, 80)])]
    np.testing.assert_allclose(knn_density(points, np.arange(4), rng, n_neighbors=2), expected, atol=1e-6)


def test_knn_density_uses_only_a_sample_of_a_large_pool():
    points = np.random.default_rng(0).normal(size=(5000, 4)).astype(np.float32)
    queries = np.arange(0, 5000, 500)
    density = knn_density(points, queries, np.random.default_rng(1), n_neighbors=3, n_reference=50)
    # the neighbours come from 50 rows the generator draws, and from nowhere else
    reference = np.sort(np.random.default_rng(1).choice(5000, size=50, replace=False))
    rows = normalize_rows(points)
    expected = []
    for query in queries:
        similarity = np.clip(rows[reference[reference != query]] @ rows[query], 0.0, 1.0)
        expected.append(np.sort(similarity)[-3:].mean())
    np.testing.assert_allclose(density, expected, atol=1e-6)
    whole_pool = knn_density(points, queries, np.random.default_rng(1), n_neighbors=3, n_reference=5000)
    assert np.all(whole_pool > density)  # nearer neighbours exist outside the sample


def test_normalize_rows_and_max_similarity():
    rows = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(max_similarity(rows, unit(0, 90)), [0.8, 0.0])
    assert np.all(max_similarity(rows, np.empty((0, 2), np.float32)) == -np.inf)


@pytest.mark.parametrize("broken", [np.nan, np.inf])
def test_a_broken_row_among_the_labelled_or_the_candidates_spoils_no_distance_and_no_pick(broken):
    # one NaN among the labelled rows made every candidate's distance NaN, and the picks repeat
    x = np.random.default_rng(0).normal(size=(40, 8))
    x[2, 0] = x[30, 5] = broken
    rows = normalize_rows(x)
    assert np.isfinite(rows).all() and not rows[2].any() and not rows[30].any()
    picks = greedy_coreset(x, np.arange(5, 40), np.arange(5), 35, np.random.default_rng(1))
    assert sorted(picks.tolist()) == list(range(5, 40))  # every candidate once
    picks = cluster_picks(x, np.arange(5, 40), 10, np.random.default_rng(1))
    assert len(set(picks.tolist())) == 10


def test_a_zero_row_is_never_a_clusters_pick_before_its_members():
    # a text the model encoded to NaN is cached as zeros: |c|² from every center, nearer than most members of a
    # loose cluster (here: random directions in 32 dimensions), which made it the cluster's pick
    x = np.random.default_rng(0).normal(size=(400, 32)).astype(np.float32)
    x[17] = 0.0
    for seed in range(20):
        assert 17 not in cluster_picks(x, np.arange(400), 5, np.random.default_rng(seed)).tolist()


def test_cluster_picks_with_many_clusters():
    points = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    picks = cluster_picks(points, np.arange(300), 70, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 70


def test_a_row_with_nan_is_never_the_farthest_and_fails_no_pick():
    # a broken embedding (NaN) must not end a round: greedy k-center skips it rather than crashing on an empty tie
    x = normalize_rows(np.random.default_rng(0).normal(size=(12, 4)))
    x[3] = np.nan
    picks = greedy_coreset(x, np.arange(1, 12), np.array([0]), 5, np.random.default_rng(1))
    assert len(set(picks.tolist())) == 5 and 3 not in picks.tolist()
