"""Query strategies: small configuration classes around the pure scores of `uncertainty` and `diversity`.

Every class has a `name` (its key in the registry), checks its parameters in `__init__`, shows them in its repr and
implements `select(pool, n_instances, rng)` per `base.Strategy`: up to `n_instances` distinct unlabelled row
indices, best first. Ties are broken at random from `rng`, so equal scores do not favour low row numbers.
Multi-label pools score uncertainty per label (`per_label`) and average over labels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from backend.scoring.base import Pool
from backend.scoring.diversity import cluster_picks, greedy_coreset, knn_density, max_similarity, normalize_rows
from backend.scoring.gradient import gradient_kmeanspp, gradient_norms_squared, hypothetical_residuals
from backend.scoring.uncertainty import bald, entropy, least_confidence, margin, per_label, vote_entropy

NORM_ROWS = 65_536
"""Rows whose gradient norms BADGE computes at a time when it pre-filters a large pool (a 100 MB float32 chunk)."""

UNCERTAINTY_MEASURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
}


def uncertainty_scores(probs: np.ndarray, multi_label: bool, measure: Callable = margin) -> np.ndarray:
    """`measure` on single-label rows, or its per-label mean on multi-label rows. (n, k) -> (n,)"""
    return per_label(measure, probs) if multi_label else measure(probs)


def committee_scores(committee_probs: np.ndarray, multi_label: bool, measure: Callable) -> np.ndarray:
    """A committee measure (vote_entropy, bald); multi-label: per label on (p, 1 - p), averaged. (m, n, k) -> (n,)"""
    committee_probs = np.asarray(committee_probs, dtype=np.float64)
    if not multi_label:
        return measure(committee_probs)
    total = np.zeros(committee_probs.shape[1])
    for column in np.moveaxis(committee_probs, 2, 0):  # one label at a time: memory O(m·n), not O(m·n·k)
        total += measure(np.stack([column, 1.0 - column], axis=-1))
    return total / committee_probs.shape[2]


def row_norms(embeddings: np.ndarray) -> np.ndarray:
    """Euclidean norm of every row, without copying the matrix. (n, d) -> (n,) float64"""
    return np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings).astype(np.float64))


def expected_gradient_length(probs: np.ndarray, embedding_norms: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Expected norm of the loss gradient w.r.t. a linear head's weights, were the row labelled. (n, k), (n,) -> (n,)

    Softmax: the gradient for label y is (p - e_y) ⊗ x, so E_{y~p} ||.|| = ||x|| · sum_y p_y ||p - e_y||, with
    ||p - e_y||² = ||p||² - 2 p_y + 1. Sigmoid (multi-label, labels independent): the gradient is (p - y) ⊗ x,
    and E||p - y|| has no closed form over the 2^k label sets, so this is its root-mean-square,
    sqrt(E||p - y||²) = sqrt(sum_j p_j (1 - p_j)), times ||x||. The head's weights do not enter: the gradient
    only depends on p and x.
    """
    probs = np.asarray(probs, dtype=np.float64)
    x_norm = np.asarray(embedding_norms, dtype=np.float64)
    if multi_label:
        return x_norm * np.sqrt((probs * (1.0 - probs)).sum(axis=1))
    squared = (probs**2).sum(axis=1, keepdims=True) - 2.0 * probs + 1.0
    return x_norm * (probs * np.sqrt(np.maximum(squared, 0.0))).sum(axis=1)


def top_indices(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the n highest scores, best first; equal scores in random order. (c,) -> (min(n, c),)

    O(c) with argpartition, so it is cheap on a million rows.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = min(int(n), len(scores))
    if n <= 0:
        return np.empty(0, dtype=np.intp)
    shuffled = rng.permutation(len(scores))
    negated = -scores[shuffled]
    best = np.argpartition(negated, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    return shuffled[best[np.lexsort((best, negated[best]))]]


def check_choice(name: str, value: object, allowed: Sequence) -> None:
    """Raise ValueError naming `name`, quoting `value` and listing `allowed`, unless value is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_range(name: str, value: object, low: float, high: float, integer: bool = False) -> None:
    """Raise ValueError unless `value` is a number (an int when `integer`) with low <= value <= high."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} in [{low}, {high}]; got {value!r}")


class QueryStrategy:
    """Shared plumbing: the n_instances check, the empty cases, and a repr of the `__init__` parameters."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        """No parameters; subclasses with options store them here, unchanged, after checking them."""

    def select(self, pool: Pool, n_instances: int, rng: np.random.Generator) -> np.ndarray:
        """Up to `n_instances` distinct unlabelled row indices of `pool`, best first. -> (min(n, n_unlabelled),)"""
        check_range("n_instances", n_instances, 0, np.iinfo(np.int64).max, integer=True)
        unlabeled = pool.indices_unlabeled
        n = min(int(n_instances), len(unlabeled))
        if n == 0:
            return np.empty(0, dtype=np.intp)
        return np.asarray(self._select(pool, unlabeled, n, rng), dtype=np.intp)

    def _select(self, pool: Pool, unlabeled: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def get_params(self) -> dict:
        """The `__init__` parameters and their current values."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items())
        return f"{type(self).__name__}({params})"


class RandomSampling(QueryStrategy):
    """Uniformly random unlabelled rows: the baseline every other strategy must beat."""

    name = "random"

    def _select(self, pool, unlabeled, n, rng):
        return rng.choice(unlabeled, size=n, replace=False)


class UncertaintySampling(QueryStrategy):
    """The n most uncertain rows under `measure`; O(n·k) on the whole pool."""

    measure: ClassVar[Callable[[np.ndarray], np.ndarray]] = staticmethod(margin)

    def _select(self, pool, unlabeled, n, rng):
        scores = uncertainty_scores(pool.probs[unlabeled], pool.multi_label, type(self).measure)
        return unlabeled[top_indices(scores, n, rng)]


class LeastConfidence(UncertaintySampling):
    """Lowest top-class probability first."""

    name = "least_confidence"
    measure = staticmethod(least_confidence)


class MarginSampling(UncertaintySampling):
    """Smallest gap between the two best classes first ("breaking ties")."""

    name = "margin"
    measure = staticmethod(margin)


class EntropySampling(UncertaintySampling):
    """Highest predictive entropy first."""

    name = "entropy"
    measure = staticmethod(entropy)


COMMITTEE_BLOCK_ROWS = 32_768
"""Rows a committee measure scores at a time: its float64 copies of the committee's probabilities stay a few tens
of MB (5 heads, 77 labels) whatever the pool, instead of gigabytes for a million tasks."""


class CommitteeSampling(QueryStrategy):
    """Disagreement of the bootstrap heads in `pool.committee_probs`; margin on `pool.probs` without a committee."""

    measure: ClassVar[Callable[[np.ndarray], np.ndarray]] = staticmethod(vote_entropy)

    def _select(self, pool, unlabeled, n, rng):
        if pool.committee_probs is None:
            scores = uncertainty_scores(pool.probs[unlabeled], pool.multi_label, margin)
        else:
            committee = np.asarray(pool.committee_probs)
            if committee.ndim != 3 or committee.shape[1:] != pool.probs.shape:
                raise ValueError(f"committee_probs must have shape (m, {pool.probs.shape}), got {committee.shape}")
            scores = np.concatenate(
                [
                    committee_scores(committee[:, block], pool.multi_label, type(self).measure)
                    for block in np.array_split(unlabeled, max(1, -(-len(unlabeled) // COMMITTEE_BLOCK_ROWS)))
                ]
            )
        return unlabeled[top_indices(scores, n, rng)]


class VoteEntropy(CommitteeSampling):
    """Entropy of the committee's hard votes (query by committee)."""

    name = "vote_entropy"
    measure = staticmethod(vote_entropy)


class Bald(CommitteeSampling):
    """Mutual information between the label and the head (BALD) over the committee."""

    name = "bald"
    measure = staticmethod(bald)


class Coreset(QueryStrategy):
    """Greedy k-center core-set over the embeddings, on at most `max_candidates` random unlabelled rows."""

    name = "coreset"

    def __init__(self, max_candidates: int = 20_000):
        check_range("max_candidates", max_candidates, 1, 10**9, integer=True)
        self.max_candidates = max_candidates

    def _select(self, pool, unlabeled, n, rng):
        limit = max(self.max_candidates, n)  # the cap on candidates never caps the batch
        if len(unlabeled) > limit:
            unlabeled = np.sort(rng.choice(unlabeled, size=limit, replace=False))
        return greedy_coreset(pool.embeddings, unlabeled, pool.indices_labeled, n, rng)


class Cluster(QueryStrategy):
    """k-means over the unlabelled embeddings; the row nearest each centroid, biggest cluster first.

    order_by="uncertainty" weights k-means by margin and orders clusters by their total uncertainty;
    cover_labeled=True skips clusters that already hold a labelled row (TypiClust).
    """

    name = "cluster"
    ORDERS = ("size", "uncertainty")

    def __init__(self, order_by: str = "size", cover_labeled: bool = False, max_fit_rows: int = 10_000):
        check_choice("order_by", order_by, self.ORDERS)
        if not isinstance(cover_labeled, bool):
            raise ValueError(f"cover_labeled must be True or False; got {cover_labeled!r}")
        check_range("max_fit_rows", max_fit_rows, 1, 10**7, integer=True)
        self.order_by, self.cover_labeled, self.max_fit_rows = order_by, cover_labeled, max_fit_rows

    def _select(self, pool, unlabeled, n, rng):
        weights = None
        if self.order_by == "uncertainty":
            weights = uncertainty_scores(pool.probs[unlabeled], pool.multi_label, margin)
        labeled = pool.indices_labeled if self.cover_labeled else None
        return cluster_picks(
            pool.embeddings, unlabeled, n, rng, indices_labeled=labeled, weights=weights, max_fit_rows=self.max_fit_rows
        )


class DensityWeighted(QueryStrategy):
    """Information density (Settles & Craven, 2008): uncertainty x representativeness ** beta.

    Representativeness is `knn_density` against a random reference sample; it is computed only for the
    `max_candidates` most uncertain rows, which bounds the cost on a large pool. That is an approximation: a row
    just outside them can have a higher product than a candidate of low density. Set `max_candidates` to the
    pool size for the exact ranking.
    """

    name = "density_weighted"

    def __init__(
        self,
        measure: str = "margin",
        beta: float = 1.0,
        n_neighbors: int = 10,
        n_reference: int = 2_000,
        max_candidates: int = 5_000,
    ):
        check_choice("measure", measure, tuple(UNCERTAINTY_MEASURES))
        check_range("beta", beta, 0.0, 100.0)
        check_range("n_neighbors", n_neighbors, 1, 10_000, integer=True)
        check_range("n_reference", n_reference, 2, 10**6, integer=True)
        check_range("max_candidates", max_candidates, 1, 10**9, integer=True)
        self.measure, self.beta, self.n_neighbors = measure, beta, n_neighbors
        self.n_reference, self.max_candidates = n_reference, max_candidates

    def _select(self, pool, unlabeled, n, rng):
        uncertainty = uncertainty_scores(pool.probs[unlabeled], pool.multi_label, UNCERTAINTY_MEASURES[self.measure])
        candidates = top_indices(uncertainty, max(n, self.max_candidates), rng)
        density = knn_density(
            pool.embeddings, unlabeled[candidates], rng, n_neighbors=self.n_neighbors, n_reference=self.n_reference
        )
        scores = uncertainty[candidates] * density**self.beta
        return unlabeled[candidates[top_indices(scores, n, rng)]]


class ErrorPrediction(QueryStrategy):
    """Rows that look like past mistakes: (1 - mix) x margin + mix x cosine similarity to the nearest mistake.

    A mistake is a labelled row flagged in `pool.mistakes`. Only the `max_candidates` highest-margin rows are
    compared with (at most `max_mistakes` of) the mistakes, which bounds the cost on a large pool (an
    approximation: a row outside them, close to a mistake, may score higher); plain margin when there are none.
    """

    name = "error_prediction"

    def __init__(self, mix: float = 0.5, max_candidates: int = 5_000, max_mistakes: int = 2_000):
        check_range("mix", mix, 0.0, 1.0)
        check_range("max_candidates", max_candidates, 1, 10**9, integer=True)
        check_range("max_mistakes", max_mistakes, 1, 10**9, integer=True)
        self.mix, self.max_candidates, self.max_mistakes = mix, max_candidates, max_mistakes

    def _select(self, pool, unlabeled, n, rng):
        uncertainty = uncertainty_scores(pool.probs[unlabeled], pool.multi_label, margin)
        mistakes = np.zeros(len(pool.labeled), bool) if pool.mistakes is None else np.asarray(pool.mistakes, bool)
        mistakes = np.flatnonzero(mistakes & pool.labeled)
        if len(mistakes) == 0:
            return unlabeled[top_indices(uncertainty, n, rng)]
        if len(mistakes) > self.max_mistakes:
            mistakes = rng.choice(mistakes, size=self.max_mistakes, replace=False)
        candidates = top_indices(uncertainty, max(n, self.max_candidates), rng)
        references = normalize_rows(pool.embeddings[mistakes])
        proximity = np.clip(max_similarity(normalize_rows(pool.embeddings[unlabeled[candidates]]), references), 0, 1)
        scores = (1.0 - self.mix) * uncertainty[candidates] + self.mix * proximity
        return unlabeled[candidates[top_indices(scores, n, rng)]]


class ExpectedGradientLength(QueryStrategy):
    """Largest expected gradient of a linear head's loss, in closed form (see `expected_gradient_length`)."""

    name = "expected_gradient_length"

    def _select(self, pool, unlabeled, n, rng):
        norms = row_norms(pool.embeddings)[unlabeled]
        scores = expected_gradient_length(pool.probs[unlabeled], norms, pool.multi_label)
        return unlabeled[top_indices(scores, n, rng)]


class Badge(QueryStrategy):
    """BADGE: k-means++ seeding on the linear head's gradient embeddings (see `scoring.gradient`).

    Args:
        max_candidates: on larger pools, seeding runs on this many rows with the largest gradients.
    """

    name = "badge"

    def __init__(self, max_candidates: int = 20_000):
        check_range("max_candidates", max_candidates, 1, 10**9, integer=True)
        self.max_candidates = max_candidates

    def _select(self, pool, unlabeled, n, rng):
        residuals = hypothetical_residuals(pool.probs[unlabeled], pool.multi_label)
        candidates = np.arange(len(unlabeled))
        limit = max(self.max_candidates, n)  # the cap on candidates never caps the batch
        if len(unlabeled) > limit:
            norms = np.concatenate(  # chunk by chunk: no copy of every unlabelled row's embedding at once
                [
                    gradient_norms_squared(
                        pool.embeddings[unlabeled[start : start + NORM_ROWS]], residuals[start : start + NORM_ROWS]
                    )
                    for start in range(0, len(unlabeled), NORM_ROWS)
                ]
            )
            candidates = top_indices(norms, limit, rng)
        picks = gradient_kmeanspp(pool.embeddings[unlabeled[candidates]], residuals[candidates], n, rng)
        return unlabeled[candidates[picks]]
