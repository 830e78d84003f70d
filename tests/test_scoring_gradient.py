"""BADGE's gradient embeddings: hand-computed residuals and distances, and the seeding's picks."""

import numpy as np
import pytest

from backend.scoring.base import Pool
from backend.scoring.gradient import (
    gradient_kmeanspp,
    gradient_norms_squared,
    hypothetical_residuals,
)
from backend.scoring.registry import get_strategy


def test_residuals_subtract_the_predicted_label():
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    np.testing.assert_allclose(hypothetical_residuals(probs), [[-0.3, 0.2, 0.1], [0.3, 0.3, -0.6]], atol=1e-6)
    multi = np.array([[0.9, 0.2], [0.4, 0.6]])
    np.testing.assert_allclose(hypothetical_residuals(multi, multi_label=True), [[-0.1, 0.2], [0.4, -0.4]], atol=1e-6)


def test_implicit_distances_equal_those_of_the_explicit_outer_products():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    r = hypothetical_residuals(rng.dirichlet(np.ones(3), size=7))
    g = np.einsum("ik,id->ikd", r, x).reshape(7, -1)  # the (k·d)-wide gradients, built here only to check
    np.testing.assert_allclose(gradient_norms_squared(x, r), (g**2).sum(axis=1), rtol=1e-5)
    from backend.scoring.gradient import _squared_distances_to

    norms = gradient_norms_squared(x, r)
    for j in range(7):
        np.testing.assert_allclose(_squared_distances_to(j, x, r, norms), ((g - g[j]) ** 2).sum(axis=1), atol=1e-5)


def test_seeding_starts_at_the_largest_gradient_then_samples_by_squared_distance():
    # rows 0 and 1: the same uncertain row; row 2: a certain row (zero gradient); row 3: uncertain, elsewhere
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    r = hypothetical_residuals(np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.6, 0.4]]))
    # |g|² = |r|²|x|²: 0.5, 0.5, 0, 0.32. From the first pick (row 0 or 1), squared distances are
    # twin 0, row 2: 0.5 + 0 = 0.5, row 3: 0.5 + 0.32 - 2 (r0·r3)(x0·x3) = 0.82 since x0·x3 = 0
    seconds = []
    for seed in range(2000):
        picks = gradient_kmeanspp(x, r, 2, np.random.default_rng(seed))
        assert picks[0] in (0, 1) and picks[1] in (2, 3)  # the twin of the first pick is at distance 0
        seconds.append(picks[1])
    assert abs(np.mean(np.array(seconds) == 3) - 0.82 / 1.32) < 0.04  # 3.7 standard errors
    picks = gradient_kmeanspp(x, r, 4, np.random.default_rng(0))
    assert sorted(picks) == [0, 1, 2, 3]  # once every distance is 0 the rest are drawn uniformly


def test_a_row_with_nan_probabilities_is_never_drawn_and_leaves_the_draws_weighted():
    # one NaN made the sum of distances NaN, and every later pick of the batch uniform
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    probs = np.array([[0.5, 0.5], [np.nan, np.nan], [1.0, 0.0], [0.6, 0.4]])
    seconds = [gradient_kmeanspp(x, hypothetical_residuals(probs), 2, np.random.default_rng(s))[1] for s in range(400)]
    assert 1 not in seconds  # as in the test above, without the twin: row 3 at 0.82, row 2 at 0.5
    assert abs(np.mean(np.array(seconds) == 3) - 0.82 / 1.32) < 0.09  # 3.7 standard errors


def test_seeding_breaks_a_tie_for_the_first_pick_at_random():
    x = np.tile([[1.0, 0.0]], (6, 1))  # six identical, equally uncertain rows
    r = hypothetical_residuals(np.full((6, 2), 0.5))
    firsts = {int(gradient_kmeanspp(x, r, 1, np.random.default_rng(seed))[0]) for seed in range(60)}
    assert firsts == set(range(6))


def test_badge_prefers_uncertain_rows_far_from_its_first_pick():
    x = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.71, 0.71]], dtype=np.float32)
    probs = np.array([[0.5, 0.5], [0.52, 0.48], [0.55, 0.45], [0.99, 0.01]])
    pool = Pool(embeddings=x, probs=probs, labeled=np.zeros(4, bool))
    # |g|²: 0.5, 0.461, 0.405, 0.0002; from row 0, squared distances: row 1 (its near twin) 0.010,
    # row 2 (uncertain, orthogonal) 0.905, row 3 (confident, near the origin of gradient space) 0.486
    seconds = []
    for seed in range(300):
        picks = get_strategy("badge").select(pool, 2, np.random.default_rng(seed))
        assert picks[0] == 0
        seconds.append(picks[1])
    share = {row: np.mean(np.array(seconds) == row) for row in (1, 2, 3)}
    assert share[2] > share[3] > share[1]
    assert abs(share[2] - 0.905 / 1.401) < 0.08


def test_badge_prefilters_a_large_pool_by_gradient_norm():
    rng = np.random.default_rng(1)
    n = 500
    probs = rng.dirichlet(np.ones(3), size=n)
    pool = Pool(embeddings=rng.normal(size=(n, 4)).astype(np.float32), probs=probs, labeled=np.zeros(n, bool))
    norms = gradient_norms_squared(pool.embeddings, hypothetical_residuals(probs))
    picks = get_strategy("badge", max_candidates=50).select(pool, 10, rng)
    assert set(picks) <= set(np.argsort(-norms)[:50])


@pytest.mark.parametrize("uncertainty", ["margin", "badge"])
def test_hybrid_accepts_both_uncertainty_parts(uncertainty):
    rng = np.random.default_rng(0)
    n, k = 200, 3
    labels = rng.integers(0, k, n)
    labeled = np.zeros(n, bool)
    labeled[:30] = True
    pool = Pool(
        embeddings=rng.normal(size=(n, 6)).astype(np.float32),
        probs=rng.dirichlet(np.ones(k), size=n),
        labeled=labeled,
        targets=np.eye(k)[labels],
    )
    picks = get_strategy("hybrid", uncertainty=uncertainty).select(pool, 10, rng)
    assert len(set(picks)) == 10 and not labeled[picks].any()


@pytest.mark.parametrize("uncertainty, expected", [("margin", 30), ("badge", 31)])
def test_hybrid_takes_its_uncertainty_picks_by_margin_or_by_badge(uncertainty, expected):
    # 30 labelled rows (10 per class: no diversity or rare-class picks), then row 30: the smallest margin (0) but a
    # short embedding, |g|² = 0.5 · 0.01; row 31: margin 0.1, |g|² = 0.405 · 1, the largest gradient; then 20
    # confident rows, |g|² = 0.0006. Margin takes row 30; BADGE's first pick is the largest gradient, row 31.
    x = np.vstack([np.eye(3)[np.arange(30) % 3], [[0.1, 0, 0], [0, 1, 0]], np.eye(3)[np.arange(20) % 3]])
    probs = np.vstack(
        [np.full((30, 3), 1 / 3), [[0.5, 0.5, 0.0], [0.55, 0.45, 0.0]], np.tile([0.98, 0.01, 0.01], (20, 1))]
    )
    pool = Pool(
        embeddings=x.astype(np.float32),
        probs=probs,
        labeled=np.arange(52) < 30,
        targets=np.eye(3)[np.arange(52) % 3],
    )
    for seed in range(5):
        assert get_strategy("hybrid", uncertainty=uncertainty).select(
            pool, 1, np.random.default_rng(seed)
        ).tolist() == [expected]


def test_hybrid_names_the_allowed_uncertainty_parts():
    with pytest.raises(ValueError, match="'margin', 'badge'"):
        get_strategy("hybrid", uncertainty="entropy")
