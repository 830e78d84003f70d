"""Light classifier heads on frozen embeddings: a linear layer, softmax (single choice) or sigmoid (multiple).

The head is the only part retrained after each annotation: on a few hundred cached embeddings a full-batch
L-BFGS fit takes milliseconds. A committee of heads fit on bootstrap resamples gives disagreement scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from backend.scoring.uncertainty import labels_predicted

DEFAULT_L2 = 1e-3
"""The l2 penalty the strategies were developed with, and the one `choose_l2` keeps unless a weaker one is clearly
better (and when there are too few labels to tell)."""
L2_GRID = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
"""Penalties `choose_l2` tries, strongest first. Few-class sets do well with 1e-3; fine-grained many-class ones
(77 banking intents) need 1e-5: at 500 random labels, 0.60 test accuracy with 1e-3 against 0.76."""
CV_FOLDS = 3
RECHOOSE_GROWTH = 1.25
"""`l2_for` keeps the previous choice until the number of labels has changed by this factor since it was made."""
CHUNK_ROWS = 4096
"""Rows per matrix product when scoring a large pool: each chunk's fp32 copy (6 MB at d=384) stays in the CPU's
caches. On 1M x 384 fp16 rows, 6 heads of 4 labels, 2 cores: `proba_of_heads` (torch) takes 0.86 s for logits and
probabilities, where numpy took 1.5 s for the logits alone in chunks of 65,536 rows (its fp16 -> fp32 conversion
is the slow part; `python -m benchmarks.head_logits`)."""
ZERO_SHOT_SCALE = 30.0
"""Logit scale for cosine similarities in the zero-shot head (cosines of related texts differ by ~0.1)."""


@dataclass(frozen=True)
class LinearHead:
    """probs = softmax(x @ weights + bias) or sigmoid(x @ weights + bias). Columns follow the config's labels."""

    weights: np.ndarray
    """(d, k) float32."""
    bias: np.ndarray
    """(k,) float32."""
    multi_label: bool

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, d) float16 or float32 -> (n, k) float32, in chunks so an fp16 matrix is never copied whole."""
        logits = torch.empty((len(embeddings), self.weights.shape[1]), dtype=torch.float32)
        for rows, chunk in _logits_in_chunks(embeddings, self.weights, self.bias):
            logits[rows] = chunk
        return logits.numpy()

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, k) float32 probabilities."""
        return self.probs_from_logits(self.logits(embeddings), self.multi_label)

    @staticmethod
    def probs_from_logits(logits: np.ndarray, multi_label: bool) -> np.ndarray:
        """(n, k) logits -> probabilities: sigmoid per label, or softmax per row."""
        return _probabilities(torch.from_numpy(np.ascontiguousarray(logits)), multi_label).numpy()


def _logits_in_chunks(
    embeddings: np.ndarray, weights: np.ndarray, bias: np.ndarray
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, their fp32 logits) for each chunk of `CHUNK_ROWS` rows of (n, d) `embeddings`, fp16 or fp32."""
    weights_tensor = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    bias_tensor = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    for start in range(0, len(embeddings), CHUNK_ROWS):
        chunk = _tensor_of(embeddings[start : start + CHUNK_ROWS]).float()
        yield slice(start, start + len(chunk)), torch.addmm(bias_tensor, chunk, weights_tensor)


def _tensor_of(rows: np.ndarray) -> torch.Tensor:
    """A tensor over `rows` (no copy when they are contiguous and writable, as a pool's matrix is)."""
    rows = np.ascontiguousarray(rows)
    return torch.from_numpy(rows if rows.flags.writeable else rows.copy())


def fit_head(
    embeddings: np.ndarray, targets: np.ndarray, multi_label: bool, l2: float = DEFAULT_L2, max_iter: int = 200
) -> LinearHead:
    """Fit a linear head by full-batch L-BFGS on mean cross-entropy + l2/2 * ||W||^2.

    Args:
        embeddings: (n, d) training embeddings.
        targets: (n, k) 0/1 label matrix (one 1 per row when single-label).
        multi_label: sigmoid + binary cross-entropy when True, softmax + cross-entropy otherwise.
    """
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    y = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need matching, non-empty embeddings and targets, got {tuple(x.shape)} and {tuple(y.shape)}")
    weights = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    bias = torch.zeros(y.shape[1], requires_grad=True)
    # tolerances looser than torch's defaults: same test accuracy on AG News (0.8364 at 200 labels), 2-13x faster
    optimizer = torch.optim.LBFGS(
        [weights, bias],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-5,
        tolerance_change=1e-7,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weights + bias
        if multi_label:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        else:
            loss = torch.nn.functional.cross_entropy(logits, y.argmax(dim=1))
        loss = loss + 0.5 * l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from threads, and lose a lot on a busy CPU
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return LinearHead(weights.detach().numpy().copy(), bias.detach().numpy().copy(), multi_label)


def choose_l2(
    embeddings: np.ndarray, targets: np.ndarray, multi_label: bool, grid: tuple[float, ...] = L2_GRID
) -> float:
    """The strongest penalty of `grid` whose held-out error rate in `CV_FOLDS`-fold cross-validation is within one
    standard error of the lowest (the "one-standard-error rule").

    With a few dozen labels the standard error is wide, so the first, strongest penalty stays unless a weaker
    one is clearly better; a stronger penalty also keeps the probabilities the strategies rank by less extreme.
    Folds are a fixed shuffle of the rows, so the same labels give the same choice. With fewer than two rows
    per fold: `DEFAULT_L2`.
    """
    n = len(embeddings)
    if n < 2 * CV_FOLDS:
        return DEFAULT_L2
    fold_of = np.empty(n, dtype=int)
    fold_of[np.random.default_rng(n).permutation(n)] = np.arange(n) % CV_FOLDS
    row_errors = np.zeros((len(grid), n))
    for fold in range(CV_FOLDS):
        train, held = fold_of != fold, fold_of == fold
        for j, l2 in enumerate(grid):
            probs = fit_head(embeddings[train], targets[train], multi_label, l2=l2).predict_proba(embeddings[held])
            row_errors[j, held] = _row_errors(probs, targets[held], multi_label)
    return grid[one_standard_error_choice(row_errors)]


def one_standard_error_choice(row_errors: np.ndarray) -> int:
    """The first option whose mean held-out error is within one standard error of the lowest mean.

    `row_errors` is (options, rows). The standard error is that of the best option's mean over rows: the rows are
    the independent units, also when multi-label rows hold several correlated label decisions each (for 0/1
    errors it is the binomial sqrt(p (1 - p) / n)).
    """
    rate = row_errors.mean(axis=1)
    best = int(np.argmin(rate))
    standard_error = row_errors[best].std() / np.sqrt(row_errors.shape[1])
    return int(np.flatnonzero(rate <= rate[best] + standard_error)[0])


def l2_for(
    embeddings: np.ndarray, targets: np.ndarray, multi_label: bool, previous: tuple[float, int] | None
) -> tuple[float, int]:
    """(penalty, labels it was chosen on): `previous` while the labels have changed by less than a factor of
    `RECHOOSE_GROWTH` since, so that cross-validation (15 fits) runs in a few rounds only, not after every one."""
    if previous is not None and previous[1] / RECHOOSE_GROWTH < len(embeddings) < previous[1] * RECHOOSE_GROWTH:
        return previous
    return choose_l2(embeddings, targets, multi_label), len(embeddings)


def _row_errors(probs: np.ndarray, targets: np.ndarray, multi_label: bool) -> np.ndarray:
    """(n,) per row: 1 if its top choice is wrong (single choice), or the share of its labels on the wrong side of
    0.5 (multiple)."""
    if multi_label:
        return np.mean(labels_predicted(probs) != (targets >= 0.5), axis=1)
    return (probs.argmax(axis=1) != targets.argmax(axis=1)).astype(np.float64)


def fit_committee(
    embeddings: np.ndarray,
    targets: np.ndarray,
    multi_label: bool,
    size: int,
    rng: np.random.Generator,
    l2: float = DEFAULT_L2,
) -> list[LinearHead]:
    """`size` heads, each fit on a bootstrap resample of the training rows (for disagreement scores)."""
    n = len(embeddings)
    heads = []
    for _ in range(size):
        rows = rng.integers(0, n, size=n)
        heads.append(fit_head(embeddings[rows], targets[rows], multi_label, l2=l2, max_iter=50))
    return heads


def zero_shot_head(label_embeddings: np.ndarray, multi_label: bool, scale: float = ZERO_SHOT_SCALE) -> LinearHead:
    """A head that scores texts by cosine similarity to each label's embedding. (k, d) -> LinearHead.

    Multi-label: a label is predicted when its similarity is above the mean over labels,
    sigmoid(scale * (cos_j - mean_j cos)), which is still linear in the text embedding.
    """
    label_embeddings = np.asarray(label_embeddings, dtype=np.float32)
    if multi_label:
        label_embeddings = label_embeddings - label_embeddings.mean(axis=0, keepdims=True)
    weights = (scale * label_embeddings.T).astype(np.float32)
    return LinearHead(weights, np.zeros(weights.shape[1], dtype=np.float32), multi_label)


def committee_proba(heads: list[LinearHead], embeddings: np.ndarray) -> np.ndarray | None:
    """(m, n, k) probabilities of every head, or None for an empty committee."""
    if not heads:
        return None
    return proba_of_heads(heads, embeddings)


def proba_of_heads(heads: list[LinearHead], embeddings: np.ndarray) -> np.ndarray:
    """(m, n, k) probabilities of m heads in ONE pass over `embeddings`: their weights are stacked side by side, so
    a large fp16 matrix is read and converted once, not once per head, and each chunk of rows becomes probabilities
    while it is in the CPU's caches (see `CHUNK_ROWS`)."""
    m, k = len(heads), heads[0].weights.shape[1]
    weights = np.concatenate([head.weights for head in heads], axis=1)
    bias = np.concatenate([head.bias for head in heads])
    probs = torch.empty((m, len(embeddings), k), dtype=torch.float32)
    for rows, logits in _logits_in_chunks(embeddings, weights, bias):
        per_head = logits.view(-1, m, k)
        for j, head in enumerate(heads):
            probs[j, rows] = _probabilities(per_head[:, j], head.multi_label)
    return probs.numpy()


def _probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """(n, k) logits -> sigmoid per label, or softmax per row (both stable for any logit, without warnings)."""
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def tells_labels_apart(targets: np.ndarray) -> bool:
    """Whether (n, k) 0/1 targets hold two different rows. A head fit on one class (or one label set) alone answers
    it for any text, with a confidence of 1: a flat ranking, and successive heads that agree as if labels had
    stopped paying off. Until then the zero-shot head serves."""
    return len(np.unique(np.asarray(targets), axis=0)) > 1


def one_hot(label_lists: list[list[str]], labels: tuple[str, ...]) -> np.ndarray:
    """Label names per row -> (n, k) 0/1 matrix in the column order of `labels` (unknown names ignored)."""
    column = {label: j for j, label in enumerate(labels)}
    targets = np.zeros((len(label_lists), len(labels)), dtype=np.float32)
    for row, names in enumerate(label_lists):
        for name in names:
            if name in column:
                targets[row, column[name]] = 1.0
    return targets
