"""When do more labels stop paying off? "Stabilising predictions" (Bloodgood & Vijay-Shanker, 2009):
stop once successive models agree almost perfectly on the unlabelled pool for a few rounds in a row.

Pure functions on arrays; the round reports them in /metrics, the evaluation at every budget.
"""

from __future__ import annotations

import numpy as np

from backend.scoring.uncertainty import labels_predicted

KAPPA_THRESHOLD = 0.99
PATIENCE = 3
STOP_SET_ROWS = 10_000
"""The most unlabelled rows the stability kappa is computed on: its error is ~1/sqrt(rows) however large the pool."""


def stop_set_rows(unlabelled: np.ndarray, limit: int = STOP_SET_ROWS) -> np.ndarray:
    """Up to `limit` unlabelled row positions, evenly spread, so successive rounds compare nearly the same rows.

    Labelled rows are left out: they are training rows of both models, so they agree. (n,) bool -> (<= limit,)
    """
    rows = np.flatnonzero(unlabelled)
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, limit).astype(np.intp)]


def cohen_kappa(labels_a: np.ndarray, labels_b: np.ndarray, n_classes: int) -> float:
    """Agreement of two label vectors beyond chance: 1 = identical, 0 = chance. (n,), (n,) -> float"""
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    if len(labels_a) == 0:
        return 1.0
    observed = float(np.mean(labels_a == labels_b))
    expected = float(np.sum(np.bincount(labels_a, minlength=n_classes) * np.bincount(labels_b, minlength=n_classes)))
    expected /= len(labels_a) ** 2
    return 1.0 if expected == 1.0 else (observed - expected) / (1.0 - expected)


def prediction_stability(previous_probs: np.ndarray, current_probs: np.ndarray, multi_label: bool) -> float:
    """Kappa between two models' predictions on the same rows. (n,k),(n,k)->float

    Multi-label: one kappa over every (row, label) tick of the labels either model ticks on some rows and not on
    others. A label both models tick everywhere, or nowhere (one no annotation has used yet), agrees trivially
    and would lift the figure as if predictions had settled; with no other label, the models agree fully. (A
    mean of per-label kappas would let a label ticked on a single row drop to 0 when that row flips, and the
    signal would hardly ever fire on a project with a rare label.)"""
    if multi_label:
        previous, current = labels_predicted(previous_probs), labels_predicted(current_probs)
        informative = [j for j in range(previous.shape[1]) if not _same_constant(previous[:, j], current[:, j])]
        if not informative:
            return 1.0
        return cohen_kappa(previous[:, informative].ravel(), current[:, informative].ravel(), 2)
    return cohen_kappa(previous_probs.argmax(axis=1), current_probs.argmax(axis=1), previous_probs.shape[1])


def _same_constant(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label vectors hold one and the same value on every row."""
    return len(np.unique(np.concatenate([a, b]))) <= 1


def should_stop(stabilities: list[float], threshold: float = KAPPA_THRESHOLD, patience: int = PATIENCE) -> bool:
    """True when the last `patience` rounds all reached `threshold` agreement with their predecessor."""
    return len(stabilities) >= patience and all(value >= threshold for value in stabilities[-patience:])
