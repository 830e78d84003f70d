"""The hybrid's schedule, its three kinds of picks, and its faithfulness to margin once labels accumulate."""

from __future__ import annotations

import numpy as np
import pytest

from backend.scoring.base import Pool
from backend.scoring.hybrid import Hybrid, class_counts, diversity_share, rare_class_picks
from backend.scoring.registry import get_strategy
from backend.scoring.uncertainty import margin
from tests.helpers import unit


@pytest.mark.parametrize(
    ("n_labeled", "n_classes", "expected"),
    [(0, 4, 1.0), (4, 4, 1.0), (8, 4, 0.5), (12, 4, 0.0), (40, 4, 0.0), (8, 2, 0.0), (8, 8, 1.0), (154, 77, 0.5)],
)
def test_diversity_share_depends_on_labels_per_class(n_labeled, n_classes, expected):
    assert diversity_share(n_labeled, n_classes, cold_start=1.0, warm=3.0) == expected


def test_cold_start_picks_the_centres_of_the_embedding_clusters():
    embeddings = unit(-2, -1, 0, 1, 2, 88, 90, 91, 177, 180, 181, 182)
    pool = Pool(embeddings, np.full((12, 2), 0.5), np.zeros(12, bool))
    assert get_strategy("hybrid").select(pool, 3, np.random.default_rng(0)).tolist() == [2, 9, 6]


def test_cold_start_avoids_clusters_already_labelled():
    embeddings = unit(-2, -1, 0, 1, 2, 88, 90, 91, 177, 180, 181, 182)
    labeled = np.zeros(12, bool)
    labeled[2] = True  # 1 label, 2 classes: still cold
    pool = Pool(embeddings, np.full((12, 2), 0.5), labeled)
    assert get_strategy("hybrid").select(pool, 2, np.random.default_rng(0)).tolist() == [9, 6]


def warm_pool(seed: int = 0, n: int = 300, k: int = 3) -> Pool:
    """30 labels per class, balanced: no diversity share, no rare class."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, 8)).astype(np.float32)
    labeled = np.zeros(n, bool)
    labeled[: 30 * k] = True
    targets = np.eye(k)[np.arange(n) % k]
    return Pool(embeddings, rng.dirichlet(np.ones(k), size=n), labeled, targets=targets)


def test_with_many_labels_and_factor_one_it_is_plain_margin():
    pool = warm_pool()
    hybrid = get_strategy("hybrid", candidate_factor=1.0)
    expected = get_strategy("margin").select(pool, 10, np.random.default_rng(0))
    assert hybrid.select(pool, 10, np.random.default_rng(0)).tolist() == expected.tolist()


def test_with_many_labels_picks_stay_among_the_top_margin_candidates():
    pool = warm_pool(seed=1)
    top_15 = set(get_strategy("margin").select(pool, 15, np.random.default_rng(0)).tolist())
    picks = get_strategy("hybrid").select(pool, 5, np.random.default_rng(0))
    assert set(picks.tolist()) <= top_15
    scores = margin(pool.probs[picks])
    assert np.all(np.diff(scores) <= 0), "uncertainty picks come best first"


def test_near_duplicates_are_not_picked_together():
    # Rows 0-3: one point, the highest margins. Rows 4-6 and 7-8: two other tight groups, lower margins.
    # Rows 9-29: confident, never candidates.
    embeddings = np.concatenate([unit(0, 0, 0, 0), unit(119, 120, 121), unit(239, 241), unit(*range(300, 321))])
    first = [0.50, 0.51, 0.52, 0.53, 0.60, 0.61, 0.62, 0.65, 0.66] + [0.99] * 21
    probs = np.stack([first, 1 - np.array(first)], axis=1)
    labeled = np.zeros(len(probs), bool)
    labeled[9:21] = True  # 12 labels, 2 classes: warm
    targets = np.eye(2)[np.arange(len(probs)) % 2]
    pool = Pool(embeddings, probs, labeled, targets=targets)
    assert get_strategy("margin").select(pool, 3, np.random.default_rng(0)).tolist() == [0, 1, 2]
    assert get_strategy("hybrid").select(pool, 3, np.random.default_rng(0)).tolist() == [0, 4, 7]


def rare_pool() -> Pool:
    """Classes 0 and 1 have 10 labels each, class 2 one; row 25 is predicted class 2 but confidently so."""
    n = 40
    rng = np.random.default_rng(0)
    probs = np.tile([0.45, 0.45, 0.10], (n, 1))  # uncertain between 0 and 1
    probs[25] = [0.05, 0.05, 0.90]
    probs[26] = [0.02, 0.03, 0.95]
    labeled = np.zeros(n, bool)
    labeled[:21] = True
    targets = np.eye(3)[[0] * 10 + [1] * 10 + [2] + [0] * (n - 21)]
    return Pool(rng.normal(size=(n, 4)).astype(np.float32), probs, labeled, targets=targets)


def test_rare_class_gets_a_reserved_pick():
    pool = rare_pool()
    picks = get_strategy("hybrid").select(pool, 5, np.random.default_rng(0)).tolist()
    assert 25 in picks and 26 not in picks  # one pick (20% of 5), the less confident predicted member
    assert get_strategy("margin").select(pool, 5, np.random.default_rng(0)).tolist().count(25) == 0
    assert 25 not in get_strategy("hybrid", rare_share=0.0).select(pool, 5, np.random.default_rng(0)).tolist()


def test_rare_class_picks_hand_computed():
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.6, 0.3], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    uncertainty = margin(probs)  # [0.3, 0.7, 0.3, 0.6, 0.7]
    counts = np.array([5.0, 1.0, 0.0])  # class 2 rarest, then class 1; class 0 is not rare
    picks = rare_class_picks(probs, uncertainty, counts, 3, 5, np.random.default_rng(0))
    assert picks.tolist() == [3, 1]  # class 2: only row 3; class 1: row 1 (0.7) over row 2 (0.3)
    assert rare_class_picks(probs, uncertainty, counts, 3, 1, np.random.default_rng(0)).tolist() == [3]
    # row 3, already taken, leaves class 2 without a member
    assert rare_class_picks(probs, uncertainty, counts, 3, 5, np.random.default_rng(0), excluded=[3]).tolist() == [1]
    # multi-label: "predicted" means p > 0.5, not the argmax. Class 2's members are rows 0 (0.7) and 2 (0.6), whose
    # argmax is another class; row 2 is the more uncertain. Class 1's are rows 1 and 2, and 2 is taken: row 1.
    # (By argmax class 2 would have no member and the answer would be [1].)
    multi = np.array([[0.9, 0.2, 0.7], [0.1, 0.6, 0.3], [0.1, 0.8, 0.6], [0.45, 0.2, 0.4], [0.6, 0.3, 0.1]])
    given = np.array([0.2, 0.7, 0.3, 0.9, 0.5])
    assert rare_class_picks(multi, given, counts, 3, 5, np.random.default_rng(0), True).tolist() == [2, 1]
    assert rare_class_picks(multi, given, counts, 3, 5, np.random.default_rng(0), False).tolist() == [1]


def test_class_counts():
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 1]])
    labeled = np.array([True, True, False, True])
    assert class_counts(targets, labeled).tolist() == [2.0, 2.0]


def test_repr_and_defaults_are_exposed():
    assert repr(Hybrid()) == (
        "Hybrid(cold_start_labels_per_class=1.0, warm_labels_per_class=3.0, candidate_factor=3.0, "
        "rare_share=0.2, rare_min_labels=3, max_candidates=5000, uncertainty='margin')"
    )


def test_a_batch_leads_with_diversity_while_cold_and_with_uncertainty_once_warm():
    # The batch's order is the ranking annotators see (and what the evaluation cuts at `batch`).
    # Lukewarm: 3 labels, 2 classes (1.5 per class): share 0.75, so 3 diversity picks (centres of the three clusters
    # no label covers) lead, and the one uncertainty pick (row 4, margin far above the rest) comes last.
    embeddings = unit(-2, -1, 0, 1, 2, 88, 90, 91, 177, 180, 181, 182, 270, 271, 272)
    first = np.full(len(embeddings), 0.95)
    first[4] = 0.5
    labeled = np.zeros(len(embeddings), bool)
    labeled[[0, 1, 2]] = True
    targets = np.eye(2)[[0, 1, 0] + [0] * (len(embeddings) - 3)]
    pool = Pool(embeddings, np.stack([first, 1 - first], axis=1), labeled, targets=targets)
    picks = get_strategy("hybrid").select(pool, 4, np.random.default_rng(0)).tolist()
    assert picks[-1] == 4 and sorted(picks[:3]) == [6, 10, 13]
    # Warm (7 labels per class, no diversity share), class 2 rare: the margin picks lead, the rare-class pick follows.
    n = 40
    probs = np.tile([0.45, 0.45, 0.10], (n, 1))
    probs[25] = [0.05, 0.05, 0.90]
    labeled = np.zeros(n, bool)
    labeled[:21] = True
    targets = np.eye(3)[[0] * 10 + [1] * 10 + [2] + [0] * (n - 21)]
    pool = Pool(np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32), probs, labeled, targets=targets)
    picks = get_strategy("hybrid").select(pool, 5, np.random.default_rng(0)).tolist()
    assert picks.index(25) == 4


def test_a_class_with_exactly_min_labels_is_not_rare():
    # "classes with fewer than `min_labels` are rare": class 0 has exactly 3, class 1 has 5, none is rare
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    counts = np.array([3.0, 5.0])
    assert rare_class_picks(probs, margin(probs), counts, 3, 5, np.random.default_rng(0)).tolist() == []
    # one fewer label, and class 0 is rare: its most uncertain predicted member, row 1
    counts = np.array([2.0, 5.0])
    assert rare_class_picks(probs, margin(probs), counts, 3, 5, np.random.default_rng(0)).tolist() == [1]
