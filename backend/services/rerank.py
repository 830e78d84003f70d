"""One ranking round: read Label Studio, retrain, score the pool, publish the new order.

Label Studio's Uncertainty sampling serves, among tasks with a prediction of `project.model_version`, the one
with the lowest `score`. A round therefore writes one prediction per top-K task under a fresh model version,
score = rank / K (0 = serve first), each carrying the predicted choice as a pre-annotation, then switches the
project to that version. Old versions are deleted afterwards by a separate job, never the current one.
The predictions go in with one bulk import on small projects and one POST each on large ones
(`write_predictions`), whichever costs Label Studio less.

What a round reads about the project is `project_state`'s; the arrays it ranks are built by `pool`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from backend.adapters.embedding_cache import EmbeddingsMissing
from backend.errors import LabelStudioForbidden, LabelStudioRejected
from backend.ml.artifacts import HeadArtifact
from backend.scoring.base import Pool
from backend.scoring.registry import get_strategy
from backend.scoring.stopping import prediction_stability, should_stop, stop_set_rows
from backend.scoring.strategies import uncertainty_scores
from backend.services.embeddings import embed_texts
from backend.services.pool import build_pool, pool_matrix
from backend.services.predict import model_version, predicted_labels
from backend.services.project_state import EncodingQueued, ProjectState, RoundRefused, Stopwatch, read_project_state
from backend.services.train import save_version, train_artifact

if TYPE_CHECKING:
    from redis.lock import Lock

log = logging.getLogger(__name__)

SINGLE_WRITES_ABOVE_TASKS_PER_PREDICTION = 1_800
"""Above this many project tasks per prediction written, K single POSTs cost Label Studio less than a bulk import.

Measured with `python -m benchmarks.label_studio_writes` (Label Studio 1.23.2 on SQLite, 2-core CPU): the bulk
import recounts every task of the project, ~0.13 s + 61 µs per task (0.74 s at 10k tasks, 6.2 s at 100k, for 20
predictions), while a single POST costs ~0.11 s per prediction (4 at a time) whatever the project's size. With
Label Studio's `FAST_PREDICTION_IMPORT_FLAG` on there is no recount (0.08 s at 100k): PREDICTION_WRITES=bulk.
"""


class TaskListOutdated(Exception):
    """Label Studio refused the round's predictions, most likely for a task deleted since the task list was read.

    The snapshot is marked stale before this is raised, so the job's retry re-reads the task list.
    """


class PredictionsDropped(Exception):
    """Label Studio stored fewer of the round's predictions than were sent: its bulk import (1.23, by default)
    leaves out, with only a line in its own log, those that do not fit the label config, e.g. one edited while the
    round ran. The round does not switch to the partial ranking; the job's retry reads the project again."""


def priority_predictions(state: ProjectState, pool: Pool, picks: np.ndarray, version: str) -> list[dict]:
    """Label Studio predictions for the picked rows: score = rank / K, so the first pick is served first."""
    chosen = predicted_labels(pool.probs[picks], state.config.labels, state.config.multi_label)
    return [
        {
            "task": state.task_ids[row],
            "result": state.config.result(labels),
            "score": round(rank / len(picks), 6),
            "model_version": version,
        }
        for rank, (row, labels) in enumerate(zip(picks, chosen, strict=True))
    ]


def stopping_signal(runtime, project: str, artifact: HeadArtifact, pool: Pool, previous: HeadArtifact | None) -> dict:
    """Kappa between this version's and `previous`'s predictions on the unlabelled rows (both trained: zero-shot
    heads, before `MIN_ANNOTATIONS_TO_TRAIN` or while the labels hold one class, say nothing about labels paying
    off), their mean uncertainty, and whether the last rounds were stable enough to suggest that more labels pay
    off little. A zero-shot round (annotations deleted down to one class) ends the run of stable rounds.

    `previous` is the version the round trained after (the newest readable one for the same labels and encoder),
    or None: then the run starts over, as the labels, the encoder or single/multi-label changed. Only successive
    label sets are compared: a round that retrained on the same labels (after an import, a deletion, "Start
    Training") would agree with its predecessor by construction, and leaves the run as it was."""
    history = ((runtime.registry.last_round(project) or {}).get("stopping") or {}).get("history", [])
    if artifact.meta.get("kind") != "trained" or previous is None:
        history = []
    stability = None
    unlabelled = ~pool.labeled
    stop_set = stop_set_rows(unlabelled)
    both_trained = previous is not None and previous.meta.get("kind") == artifact.meta.get("kind") == "trained"
    digest = artifact.meta.get("labels_digest")
    same_labels = both_trained and digest is not None and previous.meta.get("labels_digest") == digest
    if both_trained and not same_labels and len(stop_set):  # zero-shot twice agrees with itself
        previous_probs = previous.head.predict_proba(pool.embeddings[stop_set])
        current_probs = pool.probs[stop_set]
        stability = round(prediction_stability(previous_probs, current_probs, pool.multi_label), 5)
    history = ([*history, stability] if stability is not None else history)[-10:]
    mean_uncertainty = (
        float(uncertainty_scores(pool.probs[unlabelled], pool.multi_label).mean()) if unlabelled.any() else 0.0
    )
    return {
        "stability_kappa": stability,
        "history": history,
        "mean_uncertainty": round(mean_uncertainty, 5),
        "suggest_stop": should_stop(history),
    }


def write_predictions(label_studio, project: int, predictions: list[dict], project_tasks: int, how: str) -> str:
    """Write a round's predictions `how` ("bulk", "single", or "auto": whichever costs Label Studio less at this
    project size with its default bulk import); returns which way they went. Raises `PredictionsDropped` when
    Label Studio says it stored fewer."""
    if how == "auto":
        single = project_tasks > SINGLE_WRITES_ABOVE_TASKS_PER_PREDICTION * len(predictions)
        how = "single" if single else "bulk"
    if how == "single":
        label_studio.create_predictions(predictions)  # each POST is refused (4xx) or stored
        return how
    stored = (label_studio.import_predictions(project, predictions) or {}).get("created", len(predictions))
    if stored < len(predictions):
        raise PredictionsDropped(
            f"project {project}: Label Studio stored {stored} of the round's {len(predictions)} predictions (its "
            "import leaves out those that do not fit the label config: was it edited meanwhile?); not switching "
            "to the partial ranking, the retry reads the project again"
        )
    return how


def publish(runtime, project: str, generation: int, version: str, state, pool, picks, summary: dict) -> bool:
    """Write the ranking under `version` and switch the project to it, unless a newer round overtook this one."""
    predictions = priority_predictions(state, pool, picks, version)
    project_tasks = len(state.task_ids) + len(state.labelled)
    how = runtime.settings.prediction_writes
    try:
        summary["writes"] = write_predictions(runtime.label_studio, int(project), predictions, project_tasks, how)
    except LabelStudioForbidden:  # the key may not write: re-reading the task list would not help
        raise
    except LabelStudioRejected as rejected:  # e.g. "Invalid pk": a task deleted with no TASKS_DELETED heard
        runtime.snapshots.mark_stale(project)
        message = f"project {project}: Label Studio refused the predictions; the retry re-reads the task list"
        raise TaskListOutdated(message) from rejected
    if not runtime.queue.still_publisher(project, generation):
        if runtime.queue.overtaken(project, generation):
            log.warning(
                "project %s: a newer round published while %s was being written; not switching", project, version
            )
        else:  # Redis lost the claim (back from an older snapshot, or evicted): no newer round ranks what it read
            log.warning(
                "project %s: Redis lost %s's claim to publish; not switching, queueing a round", project, version
            )
            runtime.queue.request_rerank(project, "a round whose claim Redis lost")
        return False
    # Before the switch: Label Studio posts PROJECT_UPDATED from inside the PATCH, and /webhook must see this
    # version as ours, not as a change from the UI (which would queue another round, for ever). If the PATCH
    # fails, reconciliation sees Label Studio's version differ from this one and re-ranks.
    runtime.registry.set_live_version(project, version)
    runtime.label_studio.set_model_version(int(project), version)
    if not runtime.queue.still_publisher(project, generation):
        # a newer round claimed the right while this one switched: it ran beside this one (this one's lock was
        # lost: its worker stalled past RERANK_LOCK_TIMEOUT, or Redis lost the key), which switch Label Studio
        # applied last is unknown, and the newer round's cleanup may delete this version; a round settles it
        log.warning("project %s: a newer round published while switching to %s; queueing one more", project, version)
        runtime.queue.request_rerank(project, "overtaken while switching")
        return False
    # the pre-annotations annotators see from now on (not before the switch: if it fails, they still see the old
    # ones); a multi-label prediction with no label above 0.5 has no region at all, it shows no choice
    shown = {p["task"]: state.config.choices_in(p["result"]) for p in predictions}
    runtime.registry.record_shown(project, shown)
    runtime.queue.enqueue_cleanup(project, version)
    return True


def lost_its_lock(runtime, project: str, generation: int, lock: Lock | None) -> bool:
    """True when the round no longer holds its project's lock and no newer round has published: rounds may have
    run beside it (Redis came back from an older snapshot, and those rounds' generations may have counted past this
    one's with newer data; or its worker stalled past RERANK_LOCK_TIMEOUT), so it may not publish what it read,
    and one more round must (queued by the caller). A round overtaken already just ends, as any overtaken round."""
    return lock is not None and not lock.owned() and not runtime.queue.overtaken(project, generation)


def state_and_matrix(runtime, project: str, watch: Stopwatch):
    """(state, matrix, matrix source) for a round, or None when chunk jobs are still encoding the pool (the round
    queued after them ranks it). Embeddings missing otherwise (Redis lost them) make it re-read and re-encode.
    Raises EncodingQueued when this round queued the chunk jobs."""
    state = read_project_state(runtime, project, watch)
    try:
        return state, *pool_matrix(runtime, project, state)
    except EmbeddingsMissing as exc:
        if runtime.encoding.pending(project):
            log.info("project %s: %s; encoding under way, the round after it ranks", project, exc)
            return None
        log.warning("project %s: %s", project, exc)
    # read again after the `except` block: inside it, the exception's traceback would keep the matrix that came
    # up short alive (1M tasks: 0.7 GB) beside the one read now
    runtime.snapshots.mark_stale(project)
    state = read_project_state(runtime, project, watch)
    return state, *pool_matrix(runtime, project, state)


def project_strategy(params: dict, default: str, fingerprint: str):
    """The strategy the project's parameters (from /setup) name, else `default` (STRATEGY). Read before training,
    so that a bad one refuses the round (RoundRefused) without saving a version."""
    try:
        return get_strategy(params.get("strategy", default), **(params.get("strategy_params") or {}))
    except (ValueError, TypeError) as unfit:  # e.g. parameters given for another STRATEGY than the one now set
        raise RoundRefused(f"the project's strategy parameters {params}: {unfit}", fingerprint) from None


def trained_version(runtime, project: str, state: ProjectState) -> tuple[HeadArtifact, HeadArtifact | None]:
    """(new, previous): the head trained on the state's labels, saved as the project's newest version, and the
    newest readable version before it for the same labels and encoder (None at first), which the stopping signal
    compares it with."""
    settings, encoder, config = runtime.settings, runtime.encoder, state.config
    previous = runtime.artifacts.load_latest(project, config.labels, encoder.encoder_id, config.multi_label)
    artifact = train_artifact(
        state.labelled,
        config,
        encoder,
        runtime.embedding_cache,
        settings.committee_size,
        settings.min_annotations_to_train,
        previous,
    )
    return save_version(project, artifact, runtime.artifacts), previous


def record(runtime, project: str, summary: dict, ranked: bool) -> None:
    """Keep the round's summary for /metrics and reconciliation, and log it. A round that ranked but did not
    publish was overtaken: a newer round claimed the right to publish, so the live ranking is that round's, and
    so is the record (whose fingerprint reconciliation compares with Label Studio)."""
    if ranked and not summary["published"]:
        summary["overtaken"] = True
    else:
        runtime.registry.record_round(project, summary)
    log.info(
        "project %s: round %s %s",
        project,
        summary["model_version"],
        {k: summary[k] for k in ("annotations", "unlabelled", "top_task", "published", "seconds_total")}
        | {"stages": summary["seconds"]},
    )


def rerank(project: str, runtime, generation: int, timing: dict | None = None, lock: Lock | None = None) -> dict:
    """Run one round for `project` and return its summary (also recorded for /metrics).

    `timing` carries what the job measured before the round (seconds queued, seconds waiting for the lock);
    `lock` is the project's round lock the job holds (see `lost_its_lock`).
    """
    settings = runtime.settings
    watch = Stopwatch()
    encoder, cache = runtime.encoder, runtime.embedding_cache
    cache.touch()  # in use: it does not expire while rounds rank from it
    try:
        reading = state_and_matrix(runtime, project, watch)
    except EncodingQueued as queued:
        log.info("project %s: %s; a new round follows them", project, queued)
        return {"generation": generation, "published": False, "encoding": str(queued)}
    if reading is None:
        return {"generation": generation, "published": False, "encoding": "under way"}
    state, matrix, matrix_source = reading
    labelled_embeddings = embed_texts([example.text for example in state.labelled], encoder, cache)
    watch.lap("load_embeddings")
    params = runtime.registry.params(project)
    strategy = project_strategy(params, settings.strategy, state.fingerprint)
    artifact, previous = trained_version(runtime, project, state)
    version = model_version(settings.model_version_prefix, artifact)
    watch.lap("train")
    pool = build_pool(state, artifact, matrix, labelled_embeddings)
    top_k = int(params.get("rank_top_k", settings.rank_top_k))
    picks = strategy.select(pool, min(top_k, len(state.task_ids)), np.random.default_rng(generation))
    watch.lap("score")
    stopping = stopping_signal(runtime, project, artifact, pool, previous)
    watch.lap("stopping_signal")
    summary = {
        "stopping": stopping,
        "model_version": version,
        "generation": generation,
        "annotations": len(state.labelled),
        "unlabelled": len(state.task_ids),
        "ranked": int(len(picks)),
        "strategy": repr(strategy),
        "matrix": matrix_source,
        "top_task": state.task_ids[picks[0]] if len(picks) else None,
        "fingerprint": state.fingerprint,
        "published": False,
        "finished_at": time.time(),
    }
    if len(picks) and lost_its_lock(runtime, project, generation, lock):
        log.warning("project %s: generation %d lost its round lock; queueing a round", project, generation)
        summary["lost_lock"] = True
        runtime.queue.request_rerank(project, "a round that lost its lock")
    elif len(picks) and runtime.queue.may_publish(project, generation):
        summary["published"] = publish(runtime, project, generation, version, state, pool, picks, summary)
        watch.lap("publish")
    elif len(picks) and runtime.queue.taken_before_data_loss(project, generation):
        # the rounds after the loss count again from below this one's generation: one of them ranks what this
        # round read, and newer rounds' rankings are never replaced by this older one's
        log.warning("project %s: generation %d predates a loss of Redis data; queueing a round", project, generation)
        runtime.queue.request_rerank(project, "a round from before Redis lost data")
    summary["seconds"] = watch.stages
    summary["job"] = timing or {}
    summary["seconds_total"] = round(sum(watch.stages.values()), 4)
    record(runtime, project, summary, ranked=bool(len(picks)))
    return summary
