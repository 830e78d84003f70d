"""What a round reads about a project: Label Studio's side (the project, its annotated tasks, whether this
backend is still connected) and the backend's task list snapshot, as one `ProjectState`.

The full task list is read from Label Studio only when its stamp changed other than by an import (whose tasks
alone are then read; see `TaskSnapshots`); reading tasks is also when uncached texts are encoded, here for a few
and by chunk jobs on every worker for many.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

import numpy as np

from backend.adapters.embedding_cache import text_key
from backend.adapters.task_snapshot import TaskSnapshot
from backend.errors import LabelStudioNotFound, UnsupportedLabelConfig
from backend.label_config import ClassificationConfig, parse_label_config
from backend.services.embeddings import embed_texts
from backend.services.train import LabelledTask, labelled_tasks

log = logging.getLogger(__name__)


@dataclass
class Stopwatch:
    """Seconds per named stage, in order."""

    stages: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(now - self._last, 4)
        self._last = now


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


def project_fingerprint(annotated_tasks: list[dict], task_stamp: tuple[int, int], label_config: str) -> str:
    """A digest of the label config, the task list stamp and every annotation's id, update time and result:
    changes whenever labels, the task list or the choices do. The result is in it because Label Studio rewrites
    results alone, with no webhook and the same update time (the Data Manager's "Rename Labels",
    `/api/labels/bulk`)."""
    digest = hashlib.sha1(repr((tuple(task_stamp), label_config)).encode())
    for task in sorted(annotated_tasks, key=lambda t: t["id"]):
        stamps = sorted(
            (a.get("id") or 0, str(a.get("updated_at") or ""), bool(a.get("was_cancelled")), repr(a.get("result")))
            for a in task.get("annotations") or []
        )
        digest.update(repr((task["id"], stamps)).encode())
    return digest.hexdigest()


ENCODE_CHUNK = 2000
"""Texts per encoding job: above this many uncached texts, a round hands encoding to the workers in chunks."""


class EncodingQueued(Exception):
    """The round found too many uncached texts: chunk jobs and a follow-up round were queued instead."""


class ProjectDisconnected(Exception):
    """Label Studio no longer has the project, or the project no longer has an ML backend: stop working on it."""

    def __init__(self, message: str, project_deleted: bool = False):
        super().__init__(message)
        self.project_deleted = project_deleted


class RoundRefused(Exception):
    """The project as Label Studio has it cannot be ranked, and trying again would refuse it the same way (a label
    config this backend does not support, a strategy the project's parameters do not fit). `fingerprint` is the
    project state it was refused for: reconciliation waits for it, or the parameters, to change."""

    def __init__(self, message: str, fingerprint: str):
        super().__init__(message)
        self.fingerprint = fingerprint


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
        return project_fingerprint(self.annotated, self.task_stamp, self.info.get("label_config") or "")


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
            label_studio.confirm_project_deleted(int(project))  # what the backend kept about it goes next
            gone = f"project {project} no longer exists in Label Studio"
            raise ProjectDisconnected(gone, project_deleted=True) from None
        ml_backends = backends.result()
        if not ml_backends:
            raise ProjectDisconnected(f"project {project} has no ML backend connected any more")
        if not any(may_be_this_backend(ml_backend, version_prefix) for ml_backend in ml_backends):
            others = ", ".join(f"{b.get('url')} ({b.get('model_version')})" for b in ml_backends)
            raise ProjectDisconnected(f"project {project} has only other ML backends connected: {others}")
        return ProjectReading(project_info, annotated.result(), stamp.result())


def refresh_snapshot(
    runtime, project: str, config: ClassificationConfig, stamp: tuple[int, int], marks_seen: int
) -> TaskSnapshot:
    """Read every task (paged) and make sure each text is in the embedding cache (`encode_uncached`)."""
    tasks = runtime.label_studio.iter_tasks(int(project), fields="task_only")
    return save_snapshot(runtime, project, config, stamp, tasks, marks_seen)


def extend_snapshot(
    runtime,
    project: str,
    config: ClassificationConfig,
    snapshot: TaskSnapshot,
    stamp: tuple[int, int],
    marks_seen: int,
) -> TaskSnapshot | None:
    """`snapshot` with the tasks imported since it was taken, read alone (an import gets ids above every existing
    task), or None when the task list changed otherwise too (fewer new tasks than the count grew by: some were
    deleted), so that the whole list must be read. Reading 1,000 new tasks instead of a whole 1M-task list saves
    minutes per import."""
    (old_count, old_newest), (count, newest) = snapshot.stamp, stamp
    if count <= old_count or newest <= old_newest:
        return None
    added = list(runtime.label_studio.iter_tasks_after(int(project), old_newest))
    if len(added) != count - old_count:
        return None
    # the stamp is read before the pages: tasks imported while a whole list was read are in it already
    known = set(snapshot.task_ids[snapshot.task_ids > old_newest].tolist())
    added = [task for task in added if int(task["id"]) not in known]
    return save_snapshot(runtime, project, config, stamp, added, marks_seen, after=snapshot)


def save_snapshot(
    runtime,
    project: str,
    config: ClassificationConfig,
    stamp: tuple[int, int],
    tasks,
    marks_seen: int,
    after: TaskSnapshot | None = None,
) -> TaskSnapshot:
    """Save the snapshot of `after`'s tasks (if any) then `tasks`, and put the texts of `tasks` into the cache.
    `marks_seen`: the task list's stale marks before Label Studio was read (`TaskSnapshots.marks`)."""
    new_ids, texts = texts_of(tasks, config, project)
    new_keys = [text_key(text) for text in texts]
    old_ids, old_keys = (after.task_ids.tolist(), after.text_keys) if after is not None else ([], [])
    ids = np.array([*old_ids, *new_ids], dtype=np.int64)
    snapshot = TaskSnapshot(ids, [*old_keys, *new_keys], stamp, config.text_source)
    in_chunks = keys_under_encoding(runtime, project) if after is None else set()  # (read before `save`)
    runtime.snapshots.save(project, snapshot, marks_seen)
    encode_uncached(runtime, project, new_keys, texts, in_chunks)
    return snapshot


def texts_of(tasks, config: ClassificationConfig, project: str) -> tuple[list[int], list[str]]:
    """Ids and texts of `tasks` whose text the label config can read; the others are left out, with one warning
    that counts them (a config reading a field the tasks lack would otherwise log a line per task)."""
    task_ids, texts, unreadable = [], [], []
    for task in tasks:
        try:
            texts.append(config.text_of(task))
            task_ids.append(int(task["id"]))
        except KeyError as exc:
            unreadable.append(exc.args[0])
    if unreadable:
        log.warning("project %s: %d tasks left out of the ranking, e.g. %s", project, len(unreadable), unreadable[0])
    return task_ids, texts


def keys_under_encoding(runtime, project: str) -> set[bytes]:
    """While chunk jobs encode the project's pool (a round waits for them), the text keys of the task list read
    before: each of its texts is cached or in one of those chunks, but for rare ones (evicted from the cache since;
    in a chunk that failed for good before an import queued chunks of its own), which the round after the chunks
    finds missing and encodes after reading the list again; {} otherwise."""
    return set(runtime.snapshots.stored_keys(project)) if runtime.encoding.pending(project) else set()


def encode_uncached(
    runtime, project: str, keys: list[bytes], texts: list[str], in_chunks: AbstractSet[bytes] = frozenset()
) -> None:
    """Put the texts not in the embedding cache into it: a few are encoded here; many (a new project, a large
    import) are split into chunk jobs that all workers share, followed by a new round (EncodingQueued).

    `in_chunks`: the keys of texts that chunk jobs still under way will encode (those of the task list read
    before, while its encoding runs), left to them. Queued again, they would be chunked otherwise once tasks were
    deleted meanwhile (chunk ids are made from their texts), and most of a big pool encoded twice."""
    asked = [key for key in dict.fromkeys(keys) if key not in in_chunks]  # (a whole pool's lookups, while pending)
    absent = set(runtime.embedding_cache.missing(asked))
    missing = list(dict.fromkeys(text for key, text in zip(keys, texts, strict=True) if key in absent))
    if len(missing) > ENCODE_CHUNK:
        chunks = [missing[i : i + ENCODE_CHUNK] for i in range(0, len(missing), ENCODE_CHUNK)]
        last_ranked = (runtime.registry.last_round(project) or {}).get("finished_at", 0.0)
        failures = runtime.encoding.failures(project, chunks, since=last_ranked)  # before `enqueue` queues them
        runtime.encoding.enqueue(project, chunks)
        if failures:
            record_failed_encoding(runtime, project, failures)
        raise EncodingQueued(f"{len(missing)} texts to encode in {len(chunks)} chunk jobs")
    embed_texts(missing, runtime.encoder, runtime.embedding_cache)


def record_failed_encoding(runtime, project: str, failures: dict[str, str]) -> None:
    """Chunk jobs that failed for good are queued again, by every round that finds their texts missing: recorded
    as a failed round, so that /metrics shows why the project is not ranked and reconciliation backs off (a chunk
    that fails the same way every time would otherwise be retried, and every task read again, for good)."""
    job_id, error = next(iter(failures.items()))
    reason = f"{len(failures)} encoding chunk job(s) failed for good, e.g. {job_id}: {error}; queued again"
    log.error("project %s: %s", project, reason)
    runtime.registry.record_failed_round(project, reason)


def read_project_state(runtime, project: str, watch: Stopwatch) -> ProjectState:
    """Project header and annotated tasks from Label Studio (~0.2 s); the task list from the snapshot."""
    marks_seen = runtime.snapshots.marks(project)  # before Label Studio is read: see TaskSnapshots.marks
    reading = read_connected_project(runtime.label_studio, project, runtime.settings.model_version_prefix)
    if runtime.registry.confirm_connected(project):
        log.warning(
            "project %s: connected in Label Studio, but no /setup of it was recorded (Redis away then?): setting "
            "it up now, as at a first /setup",
            project,
        )
        runtime.queue.enqueue_connect(project)
        runtime.queue.schedule_reconcile(project, runtime.settings.reconcile_interval)
    # what /webhook compares PROJECT_UPDATED's config with: kept current when Label Studio cannot reach /setup
    if isinstance(reading.info.get("label_config"), str):
        runtime.registry.save_label_config(project, reading.info["label_config"])
    try:
        config = parse_label_config(reading.info["label_config"])
    except UnsupportedLabelConfig as unsupported:
        raise RoundRefused(str(unsupported), reading.fingerprint) from None
    watch.lap("read_label_studio")
    snapshot = runtime.snapshots.load(project)
    if snapshot is not None and snapshot.text_source == config.text_source and snapshot.stamp != reading.task_stamp:
        snapshot = extend_snapshot(runtime, project, config, snapshot, reading.task_stamp, marks_seen)
        watch.lap("read_imported_tasks")
    if snapshot is None or snapshot.stamp != reading.task_stamp or snapshot.text_source != config.text_source:
        snapshot = refresh_snapshot(runtime, project, config, reading.task_stamp, marks_seen)
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
