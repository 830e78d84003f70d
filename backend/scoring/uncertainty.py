"""Uncertainty measures: pure functions on probability arrays. Higher always means more uncertain.

Shapes: `probs` is (n, k), rows are distributions over k classes (single-label) or k independent
label probabilities (multi-label, see `per_label`). `committee_probs` is (m, n, k): m heads, n tasks.
Every function returns (n,) float64 scores in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EPS = 1e-12


def labels_predicted(probs: np.ndarray) -> np.ndarray:
    """The labels a multi-label head predicts: those with p >= 0.5. (n, k) -> (n, k) bool

    The one decision rule for pre-annotations, rare-class picks, BADGE's hypothetical labels, the stopping signal
    and the head's validation errors, so that they all mean the same by "predicted"."""
    return np.asarray(probs) >= 0.5


def _as_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, k>=2), got {probs.shape}")
    return probs


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """1 - max_j p_j, rescaled by k/(k-1) so a uniform row scores 1. (n, k) -> (n,)"""
    probs = _as_probs(probs)
    k = probs.shape[1]
    return (1.0 - probs.max(axis=1)) * k / (k - 1)


def margin(probs: np.ndarray) -> np.ndarray:
    """1 - (p_top1 - p_top2): "breaking ties"; 1 when the two best classes tie. (n, k) -> (n,)"""
    probs = _as_probs(probs)
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy divided by log k, so a uniform row scores 1. (n, k) -> (n,)"""
    probs = _as_probs(probs)
    return _entropy_rows(probs) / np.log(probs.shape[1])


def vote_entropy(committee_probs: np.ndarray) -> np.ndarray:
    """Entropy of the committee's hard votes, divided by log k. (m, n, k) -> (n,)"""
    committee_probs = np.asarray(committee_probs, dtype=np.float64)
    m, n, k = committee_probs.shape
    votes = committee_probs.argmax(axis=2)  # (m, n)
    counts = np.bincount((np.arange(n) * k + votes).ravel(), minlength=n * k).reshape(n, k)
    return _entropy_rows(counts / m) / np.log(k)


def bald(committee_probs: np.ndarray) -> np.ndarray:
    """Mutual information between prediction and model (BALD), divided by log k. (m, n, k) -> (n,)

    H(mean of the heads) - mean of H(head): high where heads are individually confident but disagree.
    """
    committee_probs = np.asarray(committee_probs, dtype=np.float64)
    k = committee_probs.shape[2]
    mean_entropy = np.mean([_entropy_rows(head) for head in committee_probs], axis=0)
    total = _entropy_rows(committee_probs.mean(axis=0))
    return np.clip((total - mean_entropy) / np.log(k), 0.0, 1.0)


def per_label(measure: Callable[[np.ndarray], np.ndarray], probs: np.ndarray) -> np.ndarray:
    """Apply a single-label `measure` to each label of a multi-label matrix and average. (n, k) -> (n,)

    Each column p_j is read as the binary distribution (p_j, 1 - p_j), one column at a time, so that memory beyond
    `probs` stays O(n) (a million rows of 40 labels: 61 MiB at peak, where stacking every column's scores took 923 MiB).
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must have shape (n, k>=1), got {probs.shape}")
    total = np.zeros(len(probs))
    for j in range(probs.shape[1]):
        column = probs[:, j].astype(np.float64)
        total += measure(np.stack([column, 1.0 - column], axis=1))
    return total / probs.shape[1]


def confidence(probs: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """The confidence reported as a prediction's `score`: 1 - least confidence, unscaled. (n, k) -> (n,)

    Single-label: the top class's probability. Multi-label: mean over labels of max(p_j, 1 - p_j).
    """
    probs = _as_probs(probs)
    if multi_label:
        return np.maximum(probs, 1.0 - probs).mean(axis=1)
    return probs.max(axis=1)


def _entropy_rows(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, EPS, 1.0))).sum(axis=1)
