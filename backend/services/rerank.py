"""One ranking round: read Label Studio, retrain, score the pool, publish the new order.

Label Studio's Uncertainty sampling serves, among tasks with a prediction of `project.model_version`, the one
with the lowest `score`. A round therefore writes one prediction per top-K task under a fresh model version,
score = rank / K (0 = serve first), each carrying the predicted choice as a pre-annotation, then switches the
project to that version. Old versions are deleted afterwards by a separate job, never the current one.
The predictions go in with one bulk import on small projects and one POST each on large ones
(`write_predictions`), whichever costs Label Studio less.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from backend.adapters.embedding_cache import text_key
from backend.adapters.label_studio import LabelStudioNotFound, LabelStudioRejected
from backend.adapters.task_snapshot import TaskSnapshot
from backend.label_config import ClassificationConfig, parse_label_config
from backend.ml.artifacts import HeadArtifact
from backend.ml.head import one_hot, proba_of_heads
from backend.scoring.base import Pool
from backend.scoring.registry import get_strategy
from backend.scoring.stopping import prediction_stability, should_stop, stop_set_rows
from backend.scoring.strategies import uncertainty_scores
from backend.services.embeddings import embed_texts
from backend.services.predict import model_version, predicted_labels
from backend.services.train import LabelledTask, labelled_tasks, save_version, train_artifact

log = logging.getLogger(__name__)

SINGLE_WRITES_ABOVE_TASKS_PER_PREDICTION = 1_800
"""Above this many project tasks per prediction written, K single POSTs cost Label Studio less than a bulk import.

Measured with `python -m benchmarks.label_studio_writes` (Label Studio 1.23.2 on SQLite, 2-core CPU): the bulk
import recounts every task of the project, ~0.13 s + 61 µs per task (0.74 s at 10k tasks, 6.2 s at 100k, for 20
predictions), while a single POST costs ~0.11 s per prediction (4 at a time) whatever the project's size. With
Label Studio's `FAST_PREDICTION_IMPORT_FLAG` on there is no recount (0.08 s at 100k): PREDICTION_WRITES=bulk.
"""


@dataclass
class ProjectState:
    """What a round knows about a project: config, the unlabelled tasks (ids, text keys), the annotated ones."""

    config: ClassificationConfig
    task_ids: list[int]
    text_keys: list[bytes]
    labelled: list[LabelledTask]
    fingerprint: str
    snapshot_keys: list[bytes]
    """The text keys of every task of the task list, annotated or not (the project's matrix file is in this
    order)."""
    unlabelled_rows: np.ndarray
    """Where the unlabelled tasks are in the task list, ascending (`text_keys` = those of `snapshot_keys`)."""


@dataclass
class Stopwatch:
    """Seconds per named stage, in order."""

    stages: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(now - self._last, 4)
        self._last = now


def annotation_fingerprint(annotated_tasks: list[dict], task_stamp: tuple[int, int]) -> str:
    """A digest of the task list stamp and every annotation's id and update time: changes whenever labels or
    the task list do."""
    digest = hashlib.sha1(repr(tuple(task_stamp)).encode())
    for task in sorted(annotated_tasks, key=lambda t: t["id"]):
        stamps = sorted(
            (a.get("id") or 0, str(a.get("updated_at") or ""), bool(a.get("was_cancelled")))
            for a in task.get("annotations") or []
        )
        digest.update(repr((task["id"], stamps)).encode())
    return digest.hexdigest()


ENCODE_CHUNK = 2000
"""Texts per encoding job: above this many uncached texts, a round hands encoding to the workers in chunks."""


class EncodingQueued(Exception):
    """The round found too many uncached texts: chunk jobs and a follow-up round were queued instead."""


class TaskListOutdated(Exception):
    """Label Studio refused the round's predictions, most likely for a task deleted since the task list was read.

    The snapshot is marked stale before this is raised, so the job's retry re-reads the task list.
    """


class ProjectDisconnected(Exception):
    """Label Studio no longer has the project, or the project no longer has an ML backend: stop working on it."""

    def __init__(self, message: str, project_deleted: bool = False):
        super().__init__(message)
        self.project_deleted = project_deleted


@dataclass(frozen=True)
class ProjectReading:
    """What one round (or reconciliation) reads from Label Studio about a connected project."""

    info: dict
    """The project (label_config, model_version, ...)."""
    annotated: list[dict]
    """Tasks with annotations, with their annotations."""
    task_stamp: tuple[int, int]
    """(number of tasks, newest task id): when it changes, the task list snapshot is re-read."""

    @property
    def fingerprint(self) -> str:
        return annotation_fingerprint(self.annotated, self.task_stamp)


def may_be_this_backend(ml_backend: dict, version_prefix: str) -> bool:
    """Whether a project's ML backend (as Label Studio lists it) may be this one.

    Label Studio stores on the ML backend the `model_version` its `/setup` answered, and ours all start with
    `<MODEL_VERSION_PREFIX>-`; one that has not answered yet (empty) is given the benefit of the doubt.
    """
    version = ml_backend.get("model_version") or ""
    return not version or version.startswith(f"{version_prefix}-")


def read_connected_project(label_studio, project: str, version_prefix: str) -> ProjectReading:
    """The project, its annotated tasks and its task list stamp from Label Studio, after checking that the project
    still exists and still has this ML backend. The four calls run side by side (~0.1 s less per round than one
    after another).

    Removing the backend in the project's Model settings leaves its webhook behind, so events keep coming; without
    this check the backend would go on rewriting the order of a project it was disconnected from, and, were
    another ML backend connected instead, fight it over the project's model version.
    """
    with concurrent.futures.ThreadPoolExecutor(4) as calls:
        info = calls.submit(label_studio.get_project, int(project))
        backends = calls.submit(label_studio.ml_backends, int(project))
        annotated = calls.submit(label_studio.annotated_tasks, int(project))
        stamp = calls.submit(label_studio.task_list_stamp, int(project))
        try:
            project_info = info.result()
        except LabelStudioNotFound:
            gone = f"project {project} no longer exists in Label Studio"
            raise ProjectDisconnected(gone, project_deleted=True) from None
        ml_backends = backends.result()
        if not ml_backends:
            raise ProjectDisconnected(f"project {project} has no ML backend connected any more")
        if not any(may_be_this_backend(ml_backend, version_prefix) for ml_backend in ml_backends):
            others = ", ".join(f"{b.get('url')} ({b.get('model_version')})" for b in ml_backends)
            raise ProjectDisconnected(f"project {project} has only other ML backends connected: {others}")
        return ProjectReading(project_info, annotated.result(), stamp.result())


def refresh_snapshot(runtime, project: str, config: ClassificationConfig, stamp: tuple[int, int]) -> TaskSnapshot:
    """Read every task (paged) and make sure each text is in the embedding cache.

    A few missing texts are encoded here; many (a new project, a large import) are split into chunk jobs
    that all workers share, followed by a new round; the snapshot is saved either way.
    """
    task_ids, texts = [], []
    for task in runtime.label_studio.iter_tasks(int(project), fields="task_only"):
        try:
            texts.append(config.text_of(task))
            task_ids.append(int(task["id"]))
        except KeyError as exc:
            log.warning("project %s: task left out of the ranking: %s", project, exc)
    keys = [text_key(text) for text in texts]
    snapshot = TaskSnapshot(np.array(task_ids, dtype=np.int64), keys, stamp, config.text_source)
    runtime.snapshots.save(project, snapshot)
    absent = set(runtime.embedding_cache.missing(list(dict.fromkeys(keys))))
    missing = list(dict.fromkeys(text for key, text in zip(keys, texts, strict=True) if key in absent))
    if len(missing) > ENCODE_CHUNK:
        chunks = [missing[i : i + ENCODE_CHUNK] for i in range(0, len(missing), ENCODE_CHUNK)]
        runtime.queue.enqueue_encoding(project, chunks)
        raise EncodingQueued(f"{len(missing)} texts to encode in {len(chunks)} chunk jobs")
    embed_texts(missing, runtime.encoder, runtime.embedding_cache)
    return snapshot


def read_project_state(runtime, project: str, watch: Stopwatch) -> ProjectState:
    """Project header and annotated tasks from Label Studio (~0.2 s); the task list from the snapshot."""
    reading = read_connected_project(runtime.label_studio, project, runtime.settings.model_version_prefix)
    runtime.registry.confirm_connected(project)
    config = parse_label_config(reading.info["label_config"])
    watch.lap("read_label_studio")
    snapshot = runtime.snapshots.load(project)
    if snapshot is None or snapshot.stamp != reading.task_stamp or snapshot.text_source != config.text_source:
        snapshot = refresh_snapshot(runtime, project, config, reading.task_stamp)
        watch.lap("refresh_task_list")
    annotated = reading.annotated
    annotated_ids = {task["id"] for task in annotated if task.get("annotations")}
    rows = [row for row, task_id in enumerate(snapshot.task_ids.tolist()) if task_id not in annotated_ids]
    return ProjectState(
        config,
        [int(snapshot.task_ids[row]) for row in rows],
        [snapshot.text_keys[row] for row in rows],
        with_shown_predictions(runtime.registry, project, labelled_tasks(annotated, config)),
        reading.fingerprint,
        snapshot.text_keys,
        np.array(rows, dtype=np.int64),
    )


def with_shown_predictions(registry, project: str, labelled: list[LabelledTask]) -> list[LabelledTask]:
    """`labelled` with `shown`: the pre-annotation recorded when a round last ranked the task (annotated tasks
    are never ranked again, so it is the one the annotator saw; the error-prediction strategy needs it)."""
    shown = registry.shown(project, [example.task_id for example in labelled])
    return [replace(example, shown=shown.get(example.task_id)) for example in labelled]


def build_pool(
    state: ProjectState, artifact: HeadArtifact, embeddings: np.ndarray, labelled_embeddings: np.ndarray
) -> Pool:
    """The arrays strategies work on: `embeddings` holds the unlabelled rows first and spare rows for the
    labelled ones (see `cached_matrix`), which are written in place: one copy of the matrix."""
    n_unlabelled = len(state.text_keys)
    embeddings[n_unlabelled:] = labelled_embeddings
    labeled = np.zeros(len(embeddings), dtype=bool)
    labeled[n_unlabelled:] = True
    targets = np.zeros((len(embeddings), len(state.config.labels)), dtype=np.float32)
    if state.labelled:
        targets[n_unlabelled:] = one_hot([list(example.choices) for example in state.labelled], state.config.labels)
    all_probs = proba_of_heads([artifact.head, *artifact.committee], embeddings)  # one pass over the matrix
    return Pool(
        embeddings=embeddings,
        probs=all_probs[0],
        labeled=labeled,
        committee_probs=all_probs[1:] if artifact.committee else None,
        multi_label=state.config.multi_label,
        targets=targets,
        head_weights=artifact.head.weights,
        mistakes=np.concatenate([np.zeros(n_unlabelled, bool), np.array([e.corrected for e in state.labelled], bool)]),
    )


def cached_matrix(cache, keys: list[bytes], spare_rows: int = 0) -> np.ndarray:
    """(n + spare_rows, d) float16 matrix: the cached embeddings of `keys`, then `spare_rows` zero rows (for the
    labelled tasks); a missing embedding means the snapshot is stale."""
    matrix, missing = cache.fill_matrix(keys, spare_rows)
    if missing:
        raise LookupError(f"{missing} task embeddings missing from the cache; refresh needed")
    return matrix


def pool_matrix(runtime, project: str, state: ProjectState) -> tuple[np.ndarray, str]:
    """`cached_matrix` of the unlabelled tasks, read from the project's matrix file (`MatrixFiles`), which is
    written from the embedding cache first when the task list changed since it was last written; and where the
    vectors came from: "file", "cache, then file" or, when the file cannot be written or read, "cache"."""
    files, cache, spare_rows = runtime.matrix_files, runtime.embedding_cache, len(state.labelled)
    try:
        matrix = files.read(project, cache, state.snapshot_keys, state.unlabelled_rows, spare_rows)
        if matrix is not None:
            return matrix, "file"
        files.write(project, cache, state.snapshot_keys)  # LookupError when vectors are missing
        matrix = files.read(project, cache, state.snapshot_keys, state.unlabelled_rows, spare_rows)
        if matrix is not None:
            return matrix, "cache, then file"
    except OSError as exc:
        log.warning("project %s: matrix file unusable, reading the embeddings from Redis: %s", project, exc)
    return cached_matrix(cache, state.text_keys, spare_rows), "cache"


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


def stopping_signal(runtime, project: str, artifact: HeadArtifact, pool: Pool) -> dict:
    """Kappa between this version's and the previous version's predictions on the unlabelled rows (both trained:
    zero-shot heads before `MIN_ANNOTATIONS_TO_TRAIN` say nothing about labels paying off), their mean
    uncertainty, and whether the last rounds were stable enough to suggest that more labels pay off little."""
    versions = runtime.artifacts.versions(project)
    history = ((runtime.registry.last_round(project) or {}).get("stopping") or {}).get("history", [])
    stability = None
    unlabelled = ~pool.labeled
    stop_set = stop_set_rows(unlabelled)
    if len(versions) >= 2 and versions[-1] == artifact.version and len(stop_set):
        try:
            previous = runtime.artifacts.load(project, versions[-2])
            both_trained = previous.meta.get("kind") == artifact.meta.get("kind") == "trained"
            if previous.labels == artifact.labels and both_trained:  # zero-shot twice agrees with itself
                previous_probs = previous.head.predict_proba(pool.embeddings[stop_set])
                current_probs = pool.probs[stop_set]
                stability = round(prediction_stability(previous_probs, current_probs, pool.multi_label), 5)
        except (OSError, ValueError, KeyError):
            stability = None
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
    project size with its default bulk import); returns which way they went."""
    if how == "auto":
        single = project_tasks > SINGLE_WRITES_ABOVE_TASKS_PER_PREDICTION * len(predictions)
        how = "single" if single else "bulk"
    if how == "single":
        label_studio.create_predictions(predictions)
    else:
        label_studio.import_predictions(project, predictions)
    return how


def publish(runtime, project: str, generation: int, version: str, state, pool, picks, summary: dict) -> bool:
    """Write the ranking under `version` and switch the project to it, unless a newer round overtook this one."""
    predictions = priority_predictions(state, pool, picks, version)
    project_tasks = len(state.task_ids) + len(state.labelled)
    how = runtime.settings.prediction_writes
    try:
        summary["writes"] = write_predictions(runtime.label_studio, int(project), predictions, project_tasks, how)
    except LabelStudioRejected as rejected:  # e.g. "Invalid pk": a task deleted with no TASKS_DELETED heard
        runtime.snapshots.mark_stale(project)
        message = f"project {project}: Label Studio refused the predictions; the retry re-reads the task list"
        raise TaskListOutdated(message) from rejected
    if not runtime.queue.still_publisher(project, generation):
        log.warning("project %s: a newer round published while %s was being written; not switching", project, version)
        return False
    # Before the switch: Label Studio posts PROJECT_UPDATED from inside the PATCH, and /webhook must see this
    # version as ours, not as a change from the UI (which would queue another round, for ever). If the PATCH
    # fails, reconciliation sees Label Studio's version differ from this one and re-ranks.
    runtime.registry.set_live_version(project, version)
    # (a multi-label prediction with no label above 0.5 has no region at all: it shows no choice)
    shown = {p["task"]: state.config.choices_in(p["result"]) for p in predictions}
    runtime.registry.record_shown(project, shown)  # the pre-annotations annotators are about to see
    runtime.label_studio.set_model_version(int(project), version)
    runtime.queue.enqueue_cleanup(project, version)
    return True


def rerank(project: str, runtime, generation: int, timing: dict | None = None) -> dict:
    """Run one round for `project` and return its summary (also recorded for /metrics).

    `timing` carries what the job measured before the round (seconds queued, seconds waiting for the lock).
    """
    settings = runtime.settings
    watch = Stopwatch()
    encoder, cache = runtime.encoder, runtime.embedding_cache
    try:
        state = read_project_state(runtime, project, watch)
        try:
            matrix, matrix_source = pool_matrix(runtime, project, state)
        except LookupError as exc:  # vectors missing (still being encoded, or Redis lost them): re-read, re-encode
            if runtime.queue.encoding_pending(project):  # unless the round queued after the chunk jobs will
                log.info("project %s: %s; encoding under way, the round after it ranks", project, exc)
                return {"generation": generation, "published": False, "encoding": "under way"}
            log.warning("project %s: %s", project, exc)
            runtime.snapshots.mark_stale(project)
            state = read_project_state(runtime, project, watch)
            matrix, matrix_source = pool_matrix(runtime, project, state)
    except EncodingQueued as queued:
        log.info("project %s: %s; a new round follows them", project, queued)
        return {"generation": generation, "published": False, "encoding": str(queued)}
    labelled_embeddings = embed_texts([example.text for example in state.labelled], encoder, cache)
    watch.lap("load_embeddings")
    params = runtime.registry.params(project)  # before training: a bad strategy fails without saving a version
    strategy = get_strategy(params.get("strategy", settings.strategy), **params.get("strategy_params", {}))
    artifact = train_artifact(
        state.labelled, state.config, encoder, cache, settings.committee_size, settings.min_annotations_to_train
    )
    artifact = save_version(project, artifact, runtime.artifacts)
    version = model_version(settings.model_version_prefix, artifact)
    watch.lap("train")
    pool = build_pool(state, artifact, matrix, labelled_embeddings)
    top_k = int(params.get("rank_top_k", settings.rank_top_k))
    picks = strategy.select(pool, min(top_k, len(state.task_ids)), np.random.default_rng(generation))
    watch.lap("score")
    stopping = stopping_signal(runtime, project, artifact, pool)
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
    if len(picks) and runtime.queue.may_publish(project, generation):
        summary["published"] = publish(runtime, project, generation, version, state, pool, picks, summary)
        watch.lap("publish")
    summary["seconds"] = watch.stages
    summary["job"] = timing or {}
    summary["seconds_total"] = round(sum(watch.stages.values()), 4)
    if len(picks) and not summary["published"]:  # overtaken: a newer round claimed the right to publish, so the
        # live ranking is its: keep its record, whose fingerprint reconciliation compares with Label Studio
        summary["overtaken"] = True
    else:
        runtime.registry.record_round(project, summary)
    log.info(
        "project %s: round %s %s",
        project,
        version,
        {k: summary[k] for k in ("annotations", "unlabelled", "top_task", "published", "seconds_total")}
        | {"stages": watch.stages},
    )
    return summary
