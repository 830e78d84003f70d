"""Gradient embeddings of a linear head, and BADGE's k-means++ seeding on them, without building them.

For a linear head, the loss gradient of a row with respect to the head's weights, were its label the one the head
predicts (Ash et al. 2020, "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower Bounds"), is the outer
product g = r ⊗ x of the residual r = p - ŷ (k values) and the embedding x (d values). Its norm grows with the
head's uncertainty; distances between such gradients mix that with diversity in embedding space. The (k·d)-wide
vectors are never materialised: ||g_i - g_j||² = |r_i|²|x_i|² + |r_j|²|x_j|² - 2 (r_i·r_j)(x_i·x_j), so each
k-means++ step costs O(c·(k + d)) over c candidates.
"""

from __future__ import annotations

import numpy as np

from backend.scoring.diversity import argmax_tie_random
from backend.scoring.uncertainty import labels_predicted


def hypothetical_residuals(probs: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """p - ŷ with ŷ the head's own prediction (argmax one-hot, or p >= 0.5 per label, as predictions do).
    (n, k) -> (n, k) float32"""
    probs = np.asarray(probs, dtype=np.float32)
    if multi_label:
        return probs - labels_predicted(probs)
    residuals = probs.copy()
    residuals[np.arange(len(probs)), probs.argmax(axis=1)] -= 1.0
    return residuals


def gradient_norms_squared(embeddings: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """||r_i ⊗ x_i||² = |r_i|² |x_i|². (c, d), (c, k) -> (c,) float64"""
    x = np.asarray(embeddings, dtype=np.float32)
    r = np.asarray(residuals, dtype=np.float32)
    return np.einsum("ij,ij->i", r, r).astype(np.float64) * np.einsum("ij,ij->i", x, x).astype(np.float64)


def gradient_kmeanspp(embeddings: np.ndarray, residuals: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """BADGE: k-means++ seeding on the gradient embeddings r_i ⊗ x_i of c candidates.

    The first pick is the largest gradient; each next one is drawn with probability proportional to its squared
    distance to the nearest pick so far (D² sampling), so picks are uncertain and spread out.

    Args:
        embeddings: (c, d) candidate embeddings.
        residuals: (c, k) their residuals, `hypothetical_residuals(probs)`.
        n: how many to pick.

    Returns:
        (min(n, c),) distinct positions into the candidates, in pick order. When every remaining distance is 0
        (duplicates, or a head certain of everything) the rest are drawn uniformly.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    r = np.asarray(residuals, dtype=np.float32)
    n = min(int(n), len(x))
    if n <= 0:
        return np.empty(0, dtype=np.intp)
    norms = gradient_norms_squared(x, r)
    picks = [argmax_tie_random(norms, rng)]
    nearest = _squared_distances_to(picks[0], x, r, norms)
    nearest[picks[0]] = 0.0
    while len(picks) < n:
        total = nearest.sum()
        if total > 0:
            pick = int(rng.choice(len(x), p=nearest / total))
        else:
            pick = int(rng.choice(np.setdiff1d(np.arange(len(x)), picks)))
        picks.append(pick)
        np.minimum(nearest, _squared_distances_to(pick, x, r, norms), out=nearest)
        nearest[picks] = 0.0
    return np.asarray(picks, dtype=np.intp)


def _squared_distances_to(j: int, x: np.ndarray, r: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """||g_i - g_j||² for every candidate i. -> (c,) float64, clipped at 0 against rounding; 0 for a row
    holding a NaN or infinity, so it is never drawn and does not turn every later draw uniform."""
    cross = (r @ r[j]).astype(np.float64) * (x @ x[j]).astype(np.float64)
    squared = norms + norms[j] - 2.0 * cross
    squared[~np.isfinite(squared)] = 0.0
    return np.maximum(squared, 0.0)
