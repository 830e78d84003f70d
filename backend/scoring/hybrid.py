"""The default strategy: uncertainty and diversity in one batch, with a schedule driven by labels per class.

A batch of n is split three ways:

* diversity picks, share `diversity_share(...)`: one row per k-means cluster of the embeddings that holds no
  labelled row yet (TypiClust-style). They lead at cold start, when the head's probabilities mean little, and
  fade out linearly between `cold_start_labels_per_class` and `warm_labels_per_class` labels per class;
* rare-class picks, up to `rare_share` of the batch: for each class with fewer than `rare_min_labels` labelled
  rows (fewest first), the most uncertain unlabelled row the head predicts as that class;
* uncertainty picks, the rest: margin, de-duplicated. The `candidate_factor` x n highest-margin rows are
  clustered (margin-weighted k-means) into as many clusters as picks are needed, and the highest-margin row of
  each cluster is taken (cluster-margin). With factor 1 this is plain margin, so the uncertainty term stays
  faithful to margin; the clustering only keeps near-duplicates out of one batch. With `uncertainty="badge"`
  they are BADGE picks instead (see `scoring.gradient`), among the highest-margin rows.

Cost on a pool of N unlabelled rows: margin is O(N·k) and the candidate pick O(N); embeddings are only read for
at most `max_candidates` rows (a random sample at cold start, the top-margin rows later), where k-means runs.
"""

from __future__ import annotations

import math

import numpy as np

from backend.scoring.diversity import cluster_picks
from backend.scoring.gradient import gradient_kmeanspp, hypothetical_residuals
from backend.scoring.strategies import QueryStrategy, check_choice, check_range, top_indices, uncertainty_scores
from backend.scoring.uncertainty import labels_predicted, margin


def diversity_share(n_labeled: int, n_classes: int, cold_start: float, warm: float) -> float:
    """Share of a batch given to diversity: 1 up to `cold_start` labels per class, 0 from `warm` on, linear between."""
    labels_per_class = n_labeled / max(n_classes, 1)
    if labels_per_class <= cold_start:
        return 1.0
    if labels_per_class >= warm:
        return 0.0
    return (warm - labels_per_class) / (warm - cold_start)


def class_counts(targets: np.ndarray, labeled: np.ndarray) -> np.ndarray:
    """Labelled rows per class (or per label, multi-label). (n, k) 0/1 targets, (n,) bool -> (k,)"""
    return np.asarray(targets)[labeled].sum(axis=0, dtype=np.float64)


def rare_class_picks(
    probs: np.ndarray,
    uncertainty: np.ndarray,
    counts: np.ndarray,
    min_labels: int,
    n: int,
    rng: np.random.Generator,
    multi_label: bool = False,
    excluded: np.ndarray | None = None,
) -> np.ndarray:
    """Rows predicted to belong to under-represented classes, one per class, rarest class first.

    Args:
        probs: (c, k) probabilities of the candidate rows.
        uncertainty: (c,) their uncertainty; within a class the most uncertain predicted member is taken.
        counts: (k,) labelled rows per class; classes with fewer than `min_labels` are rare.
        n: the most rows to return.
        multi_label: a row is "predicted as" label j when p_j >= 0.5 (else: when j is its argmax).
        excluded: positions never to return (already picked by something else).

    Returns:
        (<= n,) distinct positions into the candidate rows. Rare classes the head never predicts are skipped.
    """
    rare = np.flatnonzero(counts < min_labels)
    rare = rare[np.lexsort((rng.random(len(rare)), counts[rare]))]
    predicted = None if multi_label else probs.argmax(axis=1)
    taken = np.empty(0, dtype=np.intp) if excluded is None else np.asarray(excluded, dtype=np.intp)
    picks: list[int] = []
    for label in rare:
        if len(picks) >= n:
            break
        members = np.flatnonzero(labels_predicted(probs[:, label]) if multi_label else predicted == label)
        members = members[~np.isin(members, np.concatenate([taken, picks]))]
        if len(members):
            picks.append(int(members[top_indices(uncertainty[members], 1, rng)[0]]))
    return np.asarray(picks, dtype=np.intp)


class Hybrid(QueryStrategy):
    """Cold-start diversity, rare-class picks and de-duplicated margin, scheduled by labels per class.

    Args:
        cold_start_labels_per_class: up to this many labels per class, the whole batch is diversity picks.
        warm_labels_per_class: from this many labels per class on, no diversity picks are made.
        candidate_factor: the uncertainty picks come from the top `candidate_factor` x n rows by margin;
            1 is plain margin, larger trades margin for less redundancy. Unused with `uncertainty="badge"`.
        rare_share: the largest share of a batch spent on classes with fewer than `rare_min_labels` labels.
        rare_min_labels: a class with fewer labelled rows is rare; 0 turns rare-class picks off.
        max_candidates: the most rows whose embeddings are read (k-means runs on these).
        uncertainty: how the uncertainty picks are made: "margin" (de-duplicated, as above) or "badge"
            (BADGE's k-means++ on gradient embeddings, among the `max_candidates` highest-margin rows).
    """

    name = "hybrid"

    def __init__(
        self,
        cold_start_labels_per_class: float = 1.0,
        warm_labels_per_class: float = 3.0,
        candidate_factor: float = 3.0,
        rare_share: float = 0.2,
        rare_min_labels: int = 3,
        max_candidates: int = 5_000,
        uncertainty: str = "margin",
    ):
        check_range("cold_start_labels_per_class", cold_start_labels_per_class, 0.0, 1e6)
        check_range("warm_labels_per_class", warm_labels_per_class, cold_start_labels_per_class, 1e6)
        check_range("candidate_factor", candidate_factor, 1.0, 1e6)
        check_range("rare_share", rare_share, 0.0, 1.0)
        check_range("rare_min_labels", rare_min_labels, 0, 10**6, integer=True)
        check_range("max_candidates", max_candidates, 1, 10**9, integer=True)
        self.cold_start_labels_per_class = cold_start_labels_per_class
        self.warm_labels_per_class = warm_labels_per_class
        self.candidate_factor = candidate_factor
        self.rare_share = rare_share
        self.rare_min_labels = rare_min_labels
        self.max_candidates = max_candidates
        check_choice("uncertainty", uncertainty, ("margin", "badge"))
        self.uncertainty = uncertainty

    def _select(self, pool, unlabeled, n, rng):
        labeled = pool.indices_labeled
        probs = pool.probs[unlabeled]
        uncertainty = uncertainty_scores(probs, pool.multi_label, margin)
        share = diversity_share(
            len(labeled), probs.shape[1], self.cold_start_labels_per_class, self.warm_labels_per_class
        )
        available = np.ones(len(unlabeled), dtype=bool)
        diverse = self._diversity_picks(pool, unlabeled, round(n * share), rng)
        available[diverse] = False
        n_rare = min(n - len(diverse), math.floor(self.rare_share * n))
        rare = self._rare_picks(pool, probs, uncertainty, n_rare, available, rng)
        available[rare] = False
        uncertain = self._uncertainty_picks(pool, unlabeled, uncertainty, n - len(diverse) - len(rare), available, rng)
        blocks = [uncertain, rare, diverse] if share < 0.5 else [diverse, rare, uncertain]
        return unlabeled[np.concatenate(blocks).astype(np.intp)]

    def _diversity_picks(self, pool, unlabeled, n, rng):
        """Positions into `unlabeled`: centres of k-means clusters no labelled row covers, in a random sample."""
        if n == 0:
            return np.empty(0, dtype=np.intp)
        sample = np.arange(len(unlabeled))
        limit = max(self.max_candidates, n)  # the cap on candidates never caps the batch
        if len(sample) > limit:
            sample = np.sort(rng.choice(len(unlabeled), size=limit, replace=False))
        rows = cluster_picks(
            pool.embeddings, unlabeled[sample], n, rng, indices_labeled=pool.indices_labeled, max_fit_rows=len(sample)
        )
        return sample[np.searchsorted(unlabeled[sample], rows)]

    def _rare_picks(self, pool, probs, uncertainty, n, available, rng):
        """Positions into `unlabeled` of up to n available rows predicted as rare classes."""
        if n == 0 or pool.targets is None or self.rare_min_labels == 0 or not pool.labeled.any():
            return np.empty(0, dtype=np.intp)
        counts = class_counts(pool.targets, pool.labeled)
        taken = np.flatnonzero(~available)
        return rare_class_picks(probs, uncertainty, counts, self.rare_min_labels, n, rng, pool.multi_label, taken)

    def _uncertainty_picks(self, pool, unlabeled, uncertainty, n, available, rng):
        """Positions into `unlabeled`: the highest-margin row of each cluster of the top-margin candidates."""
        if n == 0:
            return np.empty(0, dtype=np.intp)
        positions = np.flatnonzero(available)
        if self.uncertainty == "badge":
            candidates = positions[top_indices(uncertainty[positions], max(self.max_candidates, n), rng)]
            residuals = hypothetical_residuals(pool.probs[unlabeled[candidates]], pool.multi_label)
            return candidates[gradient_kmeanspp(pool.embeddings[unlabeled[candidates]], residuals, n, rng)]
        n_candidates = min(max(n, math.ceil(self.candidate_factor * n)), max(n, self.max_candidates))
        candidates = positions[top_indices(uncertainty[positions], n_candidates, rng)]
        if len(candidates) <= n:
            return candidates
        embeddings = pool.embeddings[unlabeled[candidates]]
        weights = uncertainty[candidates]
        within = cluster_picks(
            embeddings,
            np.arange(len(candidates)),
            n,
            rng,
            weights=weights,
            pick="max_weight",
            max_fit_rows=n_candidates,
        )
        picked = candidates[within]
        return picked[top_indices(uncertainty[picked], n, rng)]
