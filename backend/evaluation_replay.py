"""One replay of annotation, as the backend's rounds run it: what `backend.evaluate` repeats per strategy and seed.

Round 0 has no labels: the head is the zero-shot head built from the label names, as at a project's cold start,
and the strategy picks the first batch. Every later round retrains the production head (and committee) on the
labels so far, scores the test set, and lets the strategy pick the next batch (`run_one`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from backend.config import Settings
from backend.evaluation_data import Dataset
from backend.ml.head import (
    LinearHead,
    fit_committee,
    fit_head,
    l2_for,
    proba_of_heads,
    tells_labels_apart,
    zero_shot_head,
)
from backend.scoring.base import Pool
from backend.scoring.registry import get_strategy
from backend.scoring.stopping import prediction_stability, should_stop, stop_set_rows

COMMITTEE_SIZE = Settings().committee_size
"""The committee of production's default settings (COMMITTEE_SIZE), seeded per replay: its strategies vary by seed."""
MIN_ANNOTATIONS_TO_TRAIN = Settings().min_annotations_to_train
"""Below this many labels the backend keeps the zero-shot head, and so does the replay."""


def strategy_from_spec(spec: str):
    """`NAME` or `NAME:KEY=VALUE[:KEY=VALUE...]` -> the strategy; values are JSON when they parse, else strings.

    e.g. `hybrid:uncertainty=badge:candidate_factor=1`. Raises ValueError naming a bad name or parameter.
    """
    name, *pairs = spec.split(":")
    params = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"strategy parameter {pair!r} in {spec!r} is not KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return get_strategy(name, **params)


def one_hot_indices(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[labels]


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean F1 over the classes of the test set (`truth`): a fixed set, so the curve does not jump when the head
    starts or stops predicting a class the test set lacks (its wrong predictions still cost the true class)."""
    scores = []
    for c in np.unique(truth):
        tp = np.sum((predicted == c) & (truth == c))
        fp = np.sum((predicted == c) & (truth != c))
        fn = np.sum((predicted != c) & (truth == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def replay_budgets(budget: int, batch_size: int, pool_size: int) -> list[int]:
    """Labels after each round: multiples of `batch_size` up to `budget`, capped at the pool, the last one partial
    when the cap is not a multiple (e.g. budget 50, batches of 20 -> 20, 40, 50)."""
    cap = min(budget, pool_size)
    budgets = list(range(batch_size, cap + 1, batch_size))
    return budgets + [cap] if cap % batch_size else budgets


def baseline_replay_budgets(budgets: list[int], baseline_budget: int, batch_size: int, pool_size: int) -> list[int]:
    """Random's budgets: the strategies' `budgets`, then on in batches up to `baseline_budget`, so that its curve
    is scored at the same budgets as theirs (budget 50, batches of 20, baseline 100 -> 20, 40, 50, 60, 80, 100)."""
    further = replay_budgets(baseline_budget, batch_size, pool_size)
    return budgets + [budget for budget in further if budget > budgets[-1]]


def run_one(
    strategy_name: str,  # a spec: NAME or NAME:KEY=VALUE:...
    pool: Dataset,
    test: Dataset,
    label_embeddings: np.ndarray,
    budgets: list[int],
    seed: int,
    progress: tqdm,
    finetune: Callable[[np.ndarray, LinearHead, int], float] | None = None,
    finetune_at: frozenset[int] = frozenset(),
    random_start: int = 0,
    rank_top_k: int = 20,
) -> dict:
    """One replay: accuracy and macro-F1 on the test set after each budget.

    Each round ranks `rank_top_k` rows (or the batch, if larger) as a round in the backend ranks RANK_TOP_K
    tasks, and the annotators label the first `budget - labelled` of them: with batches of 1, one annotator who
    is served the top of a fresh ranking after every annotation.

    `finetune(labeled, probe, seed)`, when given, is called at the budgets in `finetune_at` and returns the test
    accuracy of an encoder fine-tuned on the labelled rows; the replay goes on with the frozen encoder.
    The rounds up to the budget `random_start` pick at random (seeded) whatever the strategy.
    """
    rng = np.random.default_rng(seed)
    strategy = strategy_from_spec(strategy_name)
    start_strategy = get_strategy("random")
    labeled = np.zeros(len(pool.labels), dtype=bool)
    shown = np.full(len(pool.labels), -1)  # the class predicted for each row when it was picked, as Label Studio shows
    heads, trained = [zero_shot_head(label_embeddings, False)], False
    l2: tuple[float, int] | None = None  # the penalty and the labels it was chosen on, kept as rounds keep it
    accuracy, f1, stability, stop_budget = [], [], [], None
    finetuned: dict[int, float] = {}
    for budget in budgets:
        all_probs = proba_of_heads(heads, pool.embeddings)
        picker = start_strategy if budget <= random_start else strategy
        batch = budget - int(labeled.sum())
        picks = picker.select(round_pool(pool, all_probs, heads, labeled, shown), max(batch, rank_top_k), rng)[:batch]
        shown[picks] = all_probs[0][picks].argmax(axis=1)
        labeled = labeled.copy()
        labeled[picks] = True
        was_trained = trained
        heads, trained, l2 = retrained(pool, labeled, heads, l2, rng)
        if was_trained:  # stability of the new model against the previous one, both trained, as in rounds
            stop_set = stop_set_rows(~labeled)
            previous, current = all_probs[0][stop_set], heads[0].predict_proba(pool.embeddings[stop_set])
            stability.append(prediction_stability(previous, current, False))
            if stop_budget is None and should_stop(stability):
                stop_budget = budget  # the labels the stable model was trained on
        predicted = heads[0].predict_proba(test.embeddings).argmax(axis=1)
        accuracy.append(float(np.mean(predicted == test.labels)))
        f1.append(macro_f1(test.labels, predicted))
        if finetune is not None and budget in finetune_at:
            finetuned[budget] = finetune(labeled, heads[0], seed)
        progress.update(1)
    return {
        "accuracy": accuracy,
        "macro_f1": f1,
        "stability": stability,
        "stop_budget": stop_budget,
        "finetuned_accuracy": finetuned,
    }


def round_pool(
    pool: Dataset, all_probs: np.ndarray, heads: list[LinearHead], labeled: np.ndarray, shown: np.ndarray
) -> Pool:
    """What a strategy sees in a round: the head's and the committee's probabilities (`all_probs`, head first),
    the labels so far, and which annotations corrected the class shown to the annotator."""
    targets = np.zeros((len(labeled), len(pool.classes)), dtype=np.float32)
    targets[labeled] = one_hot_indices(pool.labels[labeled], len(pool.classes))
    return Pool(
        pool.embeddings,
        all_probs[0],
        labeled,
        all_probs[1:] if len(heads) > 1 else None,
        False,
        targets,
        heads[0].weights,
        labeled & (shown != pool.labels),
    )


def retrained(
    pool: Dataset,
    labeled: np.ndarray,
    heads: list[LinearHead],
    l2: tuple[float, int] | None,
    rng: np.random.Generator,
) -> tuple[list[LinearHead], bool, tuple[float, int] | None]:
    """(heads, trained, l2) after a round's labels: the head and committee retrained as rounds decide
    (services.train: enough labels, and more than one class among them), else the `heads` so far."""
    y = one_hot_indices(pool.labels[labeled], len(pool.classes))
    if len(y) < MIN_ANNOTATIONS_TO_TRAIN or not tells_labels_apart(y):
        return heads, False, l2
    x = pool.embeddings[labeled]
    l2 = l2_for(x, y, False, l2)
    return [fit_head(x, y, False, l2=l2[0]), *fit_committee(x, y, False, COMMITTEE_SIZE, rng, l2=l2[0])], True, l2


def finetuned_accuracy_on(pool: Dataset, test: Dataset, model_name: str, max_length: int, config_overrides: dict):
    """A `finetune` callable for `run_one`: fine-tune the encoder on the labelled pool rows, score the test set."""
    from backend.ml.encoder import Encoder
    from backend.ml.finetune import FineTuneConfig, finetune_encoder

    encoder = Encoder(model_name, max_length=max_length)

    def finetune(labeled: np.ndarray, probe: LinearHead, seed: int) -> float:
        rows = np.flatnonzero(labeled)
        config = FineTuneConfig(seed=seed, **config_overrides)
        targets = one_hot_indices(pool.labels[rows], len(pool.classes))
        started = time.perf_counter()
        tuned, head = finetune_encoder(encoder, [pool.texts[i] for i in rows], targets, probe, config)
        tuned_at = time.perf_counter()
        predicted = head.predict_proba(tuned.encode(test.texts)).argmax(axis=1)
        tqdm.write(
            f"seed {seed}: fine-tuned on {len(rows)} labels in {tuned_at - started:.1f} s on {encoder.device}, "
            f"encoded the {len(test.texts)} test texts in {time.perf_counter() - tuned_at:.1f} s"
        )
        return float(np.mean(predicted == test.labels))

    return finetune
