"""The contract every registered strategy keeps, property tests of it, and the registry's errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.scoring.base import Pool
from backend.scoring.registry import DEFAULT_STRATEGY, STRATEGIES, STRATEGY_NAMES, get_strategy

NAMES = sorted(STRATEGIES)


def make_pool(
    n: int = 60,
    k: int = 3,
    n_labeled: int = 12,
    *,
    multi_label: bool = False,
    committee: bool = True,
    seed: int = 0,
    d: int = 8,
) -> Pool:
    """A random pool with every optional field filled (targets, mistakes, head weights, committee)."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, d)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labeled = np.zeros(n, bool)
    labeled[rng.choice(n, size=min(n_labeled, n), replace=False)] = True
    if multi_label:
        probs = rng.uniform(size=(n, k))
        heads = rng.uniform(size=(4, n, k))
        targets = (rng.uniform(size=(n, k)) < 0.4).astype(float)
    else:
        probs = rng.dirichlet(np.ones(k), size=n)
        heads = rng.dirichlet(np.ones(k), size=(4, n))
        targets = np.eye(k)[rng.integers(0, k, size=n)]
    return Pool(
        embeddings=embeddings,
        probs=probs,
        labeled=labeled,
        committee_probs=heads if committee else None,
        multi_label=multi_label,
        targets=targets,
        head_weights=rng.normal(size=(d, k)),
        mistakes=labeled & (rng.uniform(size=n) < 0.5),
    )


POOLS = {
    "single": dict(),
    "multi_label": dict(multi_label=True),
    "no_committee": dict(committee=False),
    "multi_label_no_committee": dict(multi_label=True, committee=False),
    "cold_start": dict(n_labeled=0),
    "many_labels": dict(n=80, n_labeled=60),
}


class StrategyContract:
    """Checks every strategy must pass; a test class per strategy sets `name`."""

    name: str

    def select(self, pool: Pool, n_instances: int, seed: int = 0) -> np.ndarray:
        return get_strategy(self.name).select(pool, n_instances, np.random.default_rng(seed))

    @pytest.mark.parametrize("pool_kind", list(POOLS))
    def test_distinct_unlabelled_and_as_many_as_asked(self, pool_kind):
        pool = make_pool(**POOLS[pool_kind])
        for n_instances in (1, 5, 13):
            picks = self.select(pool, n_instances)
            assert picks.dtype.kind == "i"
            assert len(picks) == min(n_instances, len(pool.indices_unlabeled))
            assert len(np.unique(picks)) == len(picks)
            assert not pool.labeled[picks].any()

    def test_asking_for_more_than_exists_returns_every_unlabelled_row(self):
        pool = make_pool(n=20, n_labeled=8)
        assert sorted(self.select(pool, 50).tolist()) == pool.indices_unlabeled.tolist()

    def test_same_seed_same_picks(self):
        pool = make_pool()
        assert self.select(pool, 7, seed=4).tolist() == self.select(pool, 7, seed=4).tolist()

    def test_nothing_to_pick(self):
        assert len(self.select(make_pool(), 0)) == 0
        assert len(self.select(make_pool(n=10, n_labeled=10), 5)) == 0

    @pytest.mark.parametrize("bad", [-1, 2.5, "3", True])
    def test_rejects_a_bad_n_instances(self, bad):
        with pytest.raises(ValueError, match="n_instances"):
            self.select(make_pool(), bad)

    def test_repr_names_the_class(self):
        assert repr(get_strategy(self.name)).startswith(type(get_strategy(self.name)).__name__ + "(")


# One test class per registered strategy, so a failure names the strategy and new ones cannot be skipped.
for _name in NAMES:
    globals()[f"TestContract_{_name}"] = type(f"TestContract_{_name}", (StrategyContract,), {"name": _name})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    n=st.integers(1, 40),
    k=st.integers(2, 5),
    labeled_share=st.floats(0.0, 1.0),
    n_instances=st.integers(0, 45),
    multi_label=st.booleans(),
    committee=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_properties_hold_for_any_pool(name, n, k, labeled_share, n_instances, multi_label, committee, seed):
    pool = make_pool(n, k, round(labeled_share * n), multi_label=multi_label, committee=committee, seed=seed, d=3)
    strategy = get_strategy(name)
    picks = strategy.select(pool, n_instances, np.random.default_rng(seed))
    assert len(picks) == min(n_instances, len(pool.indices_unlabeled))
    assert len(set(picks.tolist())) == len(picks), "a task was picked twice"
    assert not pool.labeled[picks].any(), "a labelled task was picked"
    assert picks.tolist() == strategy.select(pool, n_instances, np.random.default_rng(seed)).tolist()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n_instances=st.integers(1, 10))
def test_duplicate_embeddings_never_yield_duplicate_picks(seed, n_instances):
    pool = make_pool(30, 3, 5, seed=seed)
    duplicated = Pool(np.ones_like(pool.embeddings), pool.probs, pool.labeled, targets=pool.targets)
    for name in ("coreset", "cluster", "density_weighted", "hybrid"):
        picks = get_strategy(name).select(duplicated, n_instances, np.random.default_rng(seed))
        assert len(set(picks.tolist())) == len(picks) == n_instances


def test_random_picks_every_unlabelled_task_about_equally_often():
    # the baseline every labels-saved figure divides by: a "random" that took the first rows would flatter them all
    pool = make_pool(n=30, n_labeled=10)
    counts = np.zeros(30, dtype=int)
    for seed in range(600):
        counts[get_strategy("random").select(pool, 1, np.random.default_rng(seed))] += 1
    unlabelled = counts[pool.indices_unlabeled]
    assert counts[pool.labeled].sum() == 0
    assert unlabelled.min() >= 10 and unlabelled.max() <= 55  # 30 expected each (binomial sd 5.3)


def test_random_tie_breaks_depend_on_the_seed():
    pool = Pool(np.ones((50, 2), np.float32), np.full((50, 2), 0.5), np.zeros(50, bool))
    picks = {tuple(get_strategy("margin").select(pool, 3, np.random.default_rng(seed))) for seed in range(5)}
    assert len(picks) > 1


def test_committee_strategies_fall_back_to_margin():
    pool = make_pool(committee=False)
    margin_picks = get_strategy("margin").select(pool, 6, np.random.default_rng(1))
    for name in ("vote_entropy", "bald"):
        assert get_strategy(name).select(pool, 6, np.random.default_rng(1)).tolist() == margin_picks.tolist()


@pytest.mark.parametrize("multi_label", [False, True])
def test_committee_strategies_score_in_blocks_as_in_one_piece(monkeypatch, multi_label):
    from backend.scoring import strategies

    pool = make_pool(n=200, multi_label=multi_label)
    for name in ("vote_entropy", "bald"):
        whole = get_strategy(name).select(pool, 20, np.random.default_rng(1))  # 188 unlabelled rows: one block
        monkeypatch.setattr(strategies, "COMMITTEE_BLOCK_ROWS", 7)  # many blocks, the last one partial
        blocks = get_strategy(name).select(pool, 20, np.random.default_rng(1))
        monkeypatch.undo()
        assert blocks.tolist() == whole.tolist()  # the same scores, so the same picks and ties broken alike


def test_committee_of_the_wrong_shape_is_refused():
    pool = make_pool()
    bad = Pool(pool.embeddings, pool.probs, pool.labeled, committee_probs=np.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="committee_probs"):
        get_strategy("bald").select(bad, 3, np.random.default_rng(0))


def test_error_prediction_prefers_rows_near_a_mistake():
    angles = np.deg2rad([0, 1, 90, 180])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.7, 0.3]])  # rows 2 and 3 have the best margin
    labeled = np.array([True, False, False, False])
    pool = Pool(embeddings, probs, labeled, mistakes=labeled)
    # row 1: 0.5 * 0.4 + 0.5 * cos(1 deg) = 0.70 beats rows 2 and 3: 0.5 * 0.6 + 0.5 * 0 = 0.30
    assert get_strategy("error_prediction").select(pool, 1, np.random.default_rng(0)).tolist() == [1]
    no_mistakes = Pool(embeddings, probs, labeled)
    assert get_strategy("error_prediction").select(no_mistakes, 1, np.random.default_rng(0)).tolist() in ([2], [3])


def test_density_weighting_prefers_the_crowd_at_equal_uncertainty():
    angles = np.deg2rad([0, 2, 4, 6, 120, 240])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    probs = np.full((6, 2), 0.5)
    pool = Pool(embeddings, probs, np.zeros(6, bool))
    picks = get_strategy("density_weighted", n_neighbors=2).select(pool, 2, np.random.default_rng(0))
    assert set(picks.tolist()) == {1, 2}  # the two rows inside the 0-6 deg crowd


def test_cluster_ordered_by_uncertainty_starts_with_the_uncertain_cluster():
    angles = np.deg2rad([0, 1, 2, 3, 90, 91])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    probs = np.array([[0.99, 0.01]] * 4 + [[0.5, 0.5]] * 2)
    pool = Pool(embeddings, probs, np.zeros(6, bool))
    assert get_strategy("cluster").select(pool, 2, np.random.default_rng(0))[0] in (1, 2)  # the big cluster
    assert get_strategy("cluster", order_by="uncertainty").select(pool, 2, np.random.default_rng(0))[0] in (4, 5)


def test_registry_lists_names_and_params_in_its_errors():
    assert DEFAULT_STRATEGY == "hybrid" and DEFAULT_STRATEGY in STRATEGIES
    assert (
        {
            "random",
            "least_confidence",
            "margin",
            "entropy",
            "vote_entropy",
            "bald",
            "coreset",
            "cluster",
            "density_weighted",
            "error_prediction",
            "expected_gradient_length",
            "badge",
            "hybrid",
        }
        == set(STRATEGIES)
        == set(STRATEGY_NAMES)
    )  # the config checks STRATEGY against the light list of names
    with pytest.raises(ValueError, match="'nope'.*bald.*hybrid.*random"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="'candidate_factr'.*candidate_factor"):
        get_strategy("hybrid", candidate_factr=2)
    with pytest.raises(ValueError, match="'margin'.*no parameters"):
        get_strategy("margin", beta=1)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("density_weighted", {"measure": "variance"}, "'least_confidence', 'margin', 'entropy'; got 'variance'"),
        ("density_weighted", {"beta": -1}, r"beta must be a number in \[0.0, 100.0\]; got -1"),
        ("cluster", {"order_by": "age"}, "'size', 'uncertainty'; got 'age'"),
        ("cluster", {"cover_labeled": 1}, "cover_labeled must be True or False; got 1"),
        ("error_prediction", {"mix": 1.5}, "mix .* got 1.5"),
        ("hybrid", {"warm_labels_per_class": 0.5}, "warm_labels_per_class .* got 0.5"),
        ("hybrid", {"rare_min_labels": 2.5}, "rare_min_labels must be an integer"),
        ("coreset", {"max_candidates": 0}, "max_candidates .* got 0"),
    ],
)
def test_bad_params_are_quoted(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_strategy(name, **params)


def test_repr_lists_the_params():
    assert repr(get_strategy("density_weighted", beta=2.0)) == (
        "DensityWeighted(measure='margin', beta=2.0, n_neighbors=10, n_reference=2000, max_candidates=5000)"
    )
    assert repr(get_strategy("random")) == "RandomSampling()"


CAPPED = {
    "coreset": {"max_candidates": 2},
    "badge": {"max_candidates": 2},
    "hybrid": {"max_candidates": 2},
    "cluster": {"max_fit_rows": 2},
    "density_weighted": {"max_candidates": 2},
    "error_prediction": {"max_candidates": 2},
}


@pytest.mark.parametrize(("name", "params"), list(CAPPED.items()))
@pytest.mark.parametrize("pool_kind", ["cold_start", "single"])
def test_a_cap_on_candidates_never_caps_the_batch(name, params, pool_kind):
    pool = make_pool(**POOLS[pool_kind])
    picks = get_strategy(name, **params).select(pool, 30, np.random.default_rng(0))
    assert len(picks) == 30 and len(set(picks.tolist())) == 30 and not pool.labeled[picks].any()
