"""The contract every query strategy follows: a `Pool` of arrays in, task indices in priority order out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Pool:
    """Everything a strategy may look at, as arrays over all n tasks of a project (labelled and not).

    Nothing here knows about Label Studio: row i is task i of whatever list the caller built.
    """

    embeddings: np.ndarray
    """(n, d) float16 (as cached, for large pools) or float32, L2-normalised encoder embeddings."""
    probs: np.ndarray
    """(n, k) the main head's probabilities (softmax rows, or independent sigmoids when multi_label)."""
    labeled: np.ndarray
    """(n,) bool, True where the task already has an annotation."""
    committee_probs: np.ndarray | None = None
    """(m, n, k) probabilities of the m bootstrap heads, when a committee was trained."""
    multi_label: bool = False
    """True when rows of `probs` are independent label probabilities."""
    targets: np.ndarray | None = None
    """(n, k) 0/1 annotated labels; only rows where `labeled` is True are meaningful."""
    head_weights: np.ndarray | None = None
    """(d, k) weights of the main linear head (for expected gradient length)."""
    mistakes: np.ndarray | None = None
    """(n,) bool, labelled tasks whose annotation disagreed with the prediction shown at the time."""

    @property
    def indices_unlabeled(self) -> np.ndarray:
        return np.flatnonzero(~self.labeled)

    @property
    def indices_labeled(self) -> np.ndarray:
        return np.flatnonzero(self.labeled)


class Strategy(Protocol):
    """A query strategy. `select` returns up to `n_instances` distinct unlabelled indices, best first."""

    name: str

    def select(self, pool: Pool, n_instances: int, rng: np.random.Generator) -> np.ndarray: ...
