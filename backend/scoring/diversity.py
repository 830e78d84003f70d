"""Diversity and representativeness: pure functions on embeddings.

Shapes: `embeddings` is (n, d) over all tasks of a pool; index arrays hold row positions into it. Distances are
cosine distances, 1 - <a, b>, on L2-normalised rows (rows are normalised here, so any encoder output will do).
Work on the whole pool is at most O(n·c·d) for a small c (a batch, a few centroids); anything quadratic runs on a
random sample or on a candidate set the caller has already pre-filtered.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

BLOCK_ELEMENTS = 1 << 23
"""Largest block of pairwise similarities held at once: 8M float32 values, 32 MiB."""

PICK_MODES = ("center", "max_weight")


def normalize_rows(embeddings: np.ndarray) -> np.ndarray:
    """L2-normalise every row as float32; all-zero rows stay zero, and a row holding a NaN or an infinity becomes
    zero too (it would otherwise spread into every distance to it). (n, d) -> (n, d)"""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (n, d), got {embeddings.shape}")
    with np.errstate(invalid="ignore"):  # inf * 0: such rows are zeroed below
        normalized = embeddings * _inverse_norms(embeddings)[:, None]
    normalized[~np.isfinite(normalized.sum(axis=1))] = 0.0  # (a NaN or infinite norm leaves such rows non-finite)
    return normalized


def _inverse_norms(rows: np.ndarray) -> np.ndarray:
    """1 / ||row|| for every row (0 for all-zero rows), without a temporary copy of the rows. (n, d) -> (n,)"""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)


def max_similarity(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Largest dot product of each query row with any reference row, in blocks. (q, d), (r, d) -> (q,)

    -inf for every query when there are no references. Cost O(q·r·d), memory O(BLOCK_ELEMENTS).
    """
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    if len(references) == 0:
        return best
    step = max(1, BLOCK_ELEMENTS // len(references))
    for start in range(0, len(queries), step):
        best[start : start + step] = (queries[start : start + step] @ references.T).max(axis=1)
    return best


def argmax_tie_random(values: np.ndarray, rng: np.random.Generator | None = None) -> int:
    """Position of the largest value; ties broken by `rng` (None: the first), so duplicates never favour low ids."""
    values = np.where(np.isnan(values), -np.inf, values)  # a NaN (a broken embedding) is never the best
    if rng is None:
        return int(np.argmax(values))
    best = np.flatnonzero(values == values.max())
    return int(best[0]) if len(best) == 1 else int(rng.choice(best))


BLANK_DISTANCE = -1.0
"""What greedy k-center takes a zero row's distance for: below every cosine distance (they lie in [0, 2]), above
the -inf of the rows already picked."""


def greedy_coreset(
    embeddings: np.ndarray,
    indices_unlabeled: np.ndarray,
    indices_labeled: np.ndarray,
    n: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Greedy k-center core-set (Sener & Savarese, 2018): pick the candidate farthest from all that is covered.

    "Covered" is the labelled rows and the picks made earlier in the same batch, so one batch never clusters.

    Args:
        embeddings: (n_rows, d) embeddings of the whole pool.
        indices_unlabeled: (c,) candidate rows.
        indices_labeled: (l,) rows already annotated; may be empty, then the first pick is the candidate
            most similar to the candidates' mean direction (the most central one).
        n: how many rows to pick.
        rng: breaks ties between equally far candidates (None: the first one).

    Returns:
        (min(n, c),) distinct entries of `indices_unlabeled`, in pick order.

    Cost: O(c·l·d) once for the distances to the labelled rows, then O(c·d) per pick: a min-distance
    vector over the candidates is updated with each pick; no c x c matrix is ever built.
    """
    indices_unlabeled = np.asarray(indices_unlabeled, dtype=np.intp)
    indices_labeled = np.asarray(indices_labeled, dtype=np.intp)
    n = min(int(n), len(indices_unlabeled))
    if n <= 0:
        return np.empty(0, dtype=np.intp)
    candidates = normalize_rows(embeddings[indices_unlabeled])
    blank = ~candidates.any(axis=1)  # a zero vector (a text the model encoded to NaN is cached as one) is no
    if len(indices_labeled):  # farther from anything than from the rest: picked last, not first
        min_distance = 1.0 - max_similarity(candidates, normalize_rows(embeddings[indices_labeled]))
        min_distance[blank] = BLANK_DISTANCE
        first = argmax_tie_random(min_distance, rng)
    else:
        min_distance = np.where(blank, BLANK_DISTANCE, np.inf).astype(np.float32)
        first = argmax_tie_random(np.where(blank, BLANK_DISTANCE, candidates @ candidates.mean(axis=0)), rng)
    picks = [first]
    while len(picks) < n:
        min_distance = np.minimum(min_distance, 1.0 - candidates @ candidates[picks[-1]])
        min_distance[picks[-1]] = -np.inf  # picked rows never come back, even among exact duplicates
        picks.append(argmax_tie_random(min_distance, rng))
    return indices_unlabeled[picks]


def kmeans(points: np.ndarray, n_clusters: int, rng: np.random.Generator, sample_weight: np.ndarray | None = None):
    """k-means (greedy k-means++ seeding, one run) seeded from `rng`. (m, d) -> labels (m,), centers (n_clusters, d)

    Runs in float64: scikit-learn's k-means++ seeding is several times slower on float32 input.
    Fewer distinct points than clusters is allowed: some clusters then stay empty.
    """
    points = np.asarray(points, dtype=np.float64)
    model = KMeans(n_clusters=n_clusters, n_init=1, max_iter=100, random_state=int(rng.integers(2**31 - 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(points, sample_weight=sample_weight)
    return model.labels_, model.cluster_centers_.astype(np.float32)


def nearest_centers(embeddings: np.ndarray, indices: np.ndarray, centers: np.ndarray):
    """Nearest center (Euclidean, on normalised rows) of each row in `indices`, in blocks.

    (c,) indices, (k, d) centers -> labels (c,) int, squared distances (c,) float32. Cost O(c·k·d).
    A zero row (what a text the model encoded to NaN is cached as), or one holding a NaN or an infinity, is at an
    infinite distance from every center, so it is never the one nearest a center: a zero row would be |c|² away,
    nearer than most members of a loose cluster.
    """
    labels = np.empty(len(indices), dtype=np.intp)
    distances = np.empty(len(indices), dtype=np.float32)
    center_norms = (centers**2).sum(axis=1)
    step = max(1, BLOCK_ELEMENTS // max(centers.shape[0], embeddings.shape[1]))
    for start in range(0, len(indices), step):
        rows = np.asarray(embeddings[indices[start : start + step]], dtype=np.float32)
        inverse_norms = _inverse_norms(rows)
        with np.errstate(invalid="ignore"):  # a broken row (NaN, inf) has no norm either: infinitely far, below
            squared = center_norms - 2.0 * (rows @ centers.T) * inverse_norms[:, None]  # rows normalised on the fly
        labels[start : start + step] = squared.argmin(axis=1)
        distances[start : start + step] = np.where(inverse_norms > 0, squared.min(axis=1) + 1.0, np.inf)
    return labels, distances


def cluster_picks(
    embeddings: np.ndarray,
    indices_unlabeled: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    indices_labeled: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    pick: str = "center",
    max_fit_rows: int = 10_000,
    max_clusters: int = 500,
) -> np.ndarray:
    """One pick per k-means cluster of the embeddings, the heaviest clusters first.

    With `indices_labeled`, the labelled rows are clustered too, into up to n + l clusters, and clusters that
    already hold a labelled row are skipped (TypiClust, Hacohen et al. 2022): picks go where no annotation is.
    k-means is fit on at most `max_fit_rows` rows (a random sample of the candidates); every candidate is
    then assigned to its nearest centroid, O(c·clusters·d).

    Args:
        embeddings: (n_rows, d) embeddings of the whole pool.
        indices_unlabeled: (c,) candidate rows.
        n: how many rows to pick.
        rng: seeds the sample and k-means.
        indices_labeled: (l,) annotated rows, or None to ignore them.
        weights: (c,) non-negative weight per candidate (e.g. an uncertainty): k-means is weighted by it and
            clusters are ordered by total weight. None: unweighted, clusters ordered by size.
        pick: "center" takes each cluster's member nearest its centroid, "max_weight" its heaviest member.
        max_fit_rows: the most candidate rows k-means is fit on.
        max_clusters: cap on n + l; once labelled rows cover every cluster the rest are k-center picks.

    Returns:
        (min(n, c),) distinct entries of `indices_unlabeled`, best cluster first; when fewer than n clusters
        are uncovered, the remainder are greedy k-center picks among the fitted candidates.
    """
    if pick not in PICK_MODES:
        raise ValueError(f"pick must be one of {PICK_MODES}, got {pick!r}")
    indices_unlabeled = np.asarray(indices_unlabeled, dtype=np.intp)
    indices_labeled = np.empty(0, dtype=np.intp) if indices_labeled is None else np.asarray(indices_labeled, np.intp)
    n = min(int(n), len(indices_unlabeled))
    if n <= 0:
        return np.empty(0, dtype=np.intp)
    weights = np.ones(len(indices_unlabeled)) if weights is None else np.asarray(weights, dtype=np.float64)
    fitted = _sample_positions(len(indices_unlabeled), max(max_fit_rows, n), rng)  # never fewer rows than picks
    labeled = indices_labeled[_sample_positions(len(indices_labeled), max_fit_rows // 2, rng)]
    points = normalize_rows(embeddings[np.concatenate([indices_unlabeled[fitted], labeled])])
    point_weights = np.concatenate([weights[fitted], np.full(len(labeled), weights.mean())])
    n_clusters = min(max(n, min(n + len(labeled), max_clusters)), len(points))
    fit_labels, centers = kmeans(points, n_clusters, rng, sample_weight=np.maximum(point_weights, 1e-12))
    covered = np.zeros(n_clusters, dtype=bool)
    covered[fit_labels[len(fitted) :]] = True
    labels, distances = nearest_centers(embeddings, indices_unlabeled, centers)
    key = distances if pick == "center" else -weights
    picks = _best_of_each_cluster(labels, key, weights, eligible=~covered[labels])[:n]
    if len(picks) < n:
        rest = np.setdiff1d(fitted, picks, assume_unique=True)
        covered_rows = np.concatenate([labeled, indices_unlabeled[picks]])
        more = greedy_coreset(embeddings, indices_unlabeled[rest], covered_rows, n - len(picks), rng)
        return np.concatenate([indices_unlabeled[picks], more])
    return indices_unlabeled[picks]


def knn_density(
    embeddings: np.ndarray,
    indices: np.ndarray,
    rng: np.random.Generator,
    *,
    n_neighbors: int = 10,
    n_reference: int = 2_000,
) -> np.ndarray:
    """Representativeness: mean cosine similarity to the `n_neighbors` most similar rows of a reference sample.

    The reference is a random sample of `n_reference` rows of the whole pool (a row is never its own
    neighbour); similarities are clipped to [0, 1]. (c,) indices -> (c,) float64 in [0, 1].
    Cost O(c·n_reference·d) time and O(BLOCK_ELEMENTS) memory, never O(n²).
    """
    indices = np.asarray(indices, dtype=np.intp)
    reference_rows = np.sort(rng.choice(len(embeddings), size=min(n_reference, len(embeddings)), replace=False))
    k = min(n_neighbors, len(reference_rows) - 1)
    if k < 1:
        return np.ones(len(indices))
    reference = normalize_rows(embeddings[reference_rows])
    position_in_reference = np.full(len(embeddings), -1, dtype=np.intp)
    position_in_reference[reference_rows] = np.arange(len(reference_rows))
    density = np.empty(len(indices))
    step = max(1, BLOCK_ELEMENTS // len(reference_rows))
    for start in range(0, len(indices), step):
        block = indices[start : start + step]
        similarity = normalize_rows(embeddings[block]) @ reference.T
        own = position_in_reference[block]
        similarity[np.flatnonzero(own >= 0), own[own >= 0]] = -np.inf
        top = np.partition(similarity, -k, axis=1)[:, -k:]
        density[start : start + step] = np.clip(top, 0.0, 1.0).mean(axis=1)
    return density


def _sample_positions(size: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """All of range(size) when it fits in `limit`, else a sorted random sample of `limit` of them."""
    if size <= limit:
        return np.arange(size)
    return np.sort(rng.choice(size, size=limit, replace=False))


def _best_of_each_cluster(labels: np.ndarray, key: np.ndarray, weights: np.ndarray, eligible: np.ndarray):
    """Position of the lowest-`key` eligible member of each cluster, heaviest cluster (sum of weights) first."""
    positions = np.flatnonzero(eligible)
    if len(positions) == 0:
        return positions
    order = positions[np.lexsort((key[positions], labels[positions]))]
    clusters, first = np.unique(labels[order], return_index=True)
    mass = np.bincount(labels[positions], weights=weights[positions], minlength=clusters.max() + 1)[clusters]
    return order[first][np.argsort(-mass, kind="stable")]
