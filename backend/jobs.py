"""RQ job functions: plain functions with JSON-serialisable arguments, run by `python -m backend.worker`.

Each builds nothing itself: it takes the worker process's `Runtime` (adapters and services built once).
A job that raises lands in RQ's failed registry after its retries; the previous ranking stays live.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable

from rq import get_current_job
from rq.utils import now

from backend.adapters.label_studio import ACTIVE_LEARNING_SETTINGS
from backend.config import Settings
from backend.errors import LabelStudioNotFound, LabelStudioUnavailable
from backend.round_lock import round_lock
from backend.runtime import Runtime
from backend.services.embeddings import embed_texts
from backend.services.predict import INTERACTIVE_SUFFIX, is_our_version, version_number
from backend.services.project_state import ProjectDisconnected, RoundRefused, may_be_this_backend
from backend.services.rerank import rerank

log = logging.getLogger(__name__)

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The worker process's runtime, built from the environment on first use."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(Settings.from_env())
    return _runtime


def needs_label_studio(job_function: Callable) -> Callable:
    """A job that reads or writes Label Studio ends at once, with one warning line and no retries, in a worker
    that has no LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (the backend only predicts then). Nothing is lost: its
    maintenance restarts no reconciliation meanwhile (`backend.reconciliation.revive_reconciliations`), and once
    a worker runs with them, it restarts every connected project's, which configures the project and ranks what
    changed."""

    @functools.wraps(job_function)
    def unless_predict_only(*args, **kwargs):
        unavailable = runtime().without_label_studio
        if unavailable:
            log.warning("%s%r skipped: %s", job_function.__name__, args, unavailable)
            return {"skipped": unavailable}
        return job_function(*args, **kwargs)

    return unless_predict_only


@needs_label_studio
def rerank_project(project: str, reason: str = "") -> dict:
    """Retrain, rescore and publish a new order for `project`; one at a time per project."""
    rt = runtime()
    setups_seen = rt.registry.setups(project)  # before Label Studio is read: see stop_working_on
    generation = rt.queue.start_rerank(project)  # first: later events now queue a follower
    job = get_current_job()
    queued_seconds = (now() - job.enqueued_at).total_seconds() if job and job.enqueued_at else None
    log.info(
        "project %s: re-rank generation %d (%s), queued %.3f s",
        project,
        generation,
        reason or "requested",
        queued_seconds or 0.0,
    )
    waited = time.perf_counter()
    try:
        with round_lock(rt, project, generation) as held:
            timing = {"queued": queued_seconds, "lock_wait": round(time.perf_counter() - waited, 4)}
            if held is None:  # a newer re-rank started while this one waited: it does the work, with fresher data
                log.info("project %s: generation %d yields to a newer re-rank", project, generation)
                return {"generation": generation, "published": False, "superseded": True, "timing": timing}
            if rt.queue.overtaken(project, generation):  # with several workers, a newer round got the lock first
                log.info("project %s: generation %d skipped, a newer round already published", project, generation)
                return {"generation": generation, "published": False, "overtaken": True, "timing": timing}
            forget_an_older_project(rt, project)  # before start_anew got the lock: this round ranks the new project
            try:
                return rerank(project, rt, generation, timing, held)
            except ProjectDisconnected as gone:
                return {"generation": generation, "published": False, **stop_working_on(rt, project, gone, setups_seen)}
    except RoundRefused as refused:
        rt.registry.record_refusal(project, str(refused), refused.fingerprint)
        log.error("project %s: cannot rank it: %s; the previous ranking stays", project, refused)
        if job is not None:  # the same project gives the same refusal: to the failed registry, no retries
            job.retries_left = 0
        raise
    except Exception as failed:  # the round, or its lock that never came free (LockError)
        if job is None or not job.retries_left:  # its last try: recorded, and reconciliation backs off
            rt.registry.record_failed_round(project, f"{type(failed).__name__}: {failed}")
        raise


def record_killed_round(job, reason: str) -> None:
    """A re-rank job whose process died on its last try: recorded as a failed round (see `rerank_project`)."""
    if job.func_name == f"{__name__}.{rerank_project.__name__}" and not job.should_retry:
        runtime().registry.record_failed_round(str(job.args[0]), reason)


def stop_working_on(rt: Runtime, project: str, gone: ProjectDisconnected, setups_seen: int) -> dict:
    """Mark `project` disconnected: its webhooks are acknowledged and ignored, and reconciliation stops.

    A new `/setup` (connecting the backend to the project again) undoes this; one that came while this job read
    Label Studio (`setups_seen`, read before) wins over it, and a round follows. For a project deleted in Label
    Studio, what the backend kept about it goes too (its task list, head versions, last round, event counts), so
    nothing grows with projects that are gone, and a new project given the same id (by a Label Studio started
    on a new database) starts clean. The generation counters stay: they fence off any job of the old project
    still queued.
    """
    if gone.project_deleted:  # (a project connected meanwhile under the same id is another one: it starts clean)
        forget_project_files(rt, project)
    if not rt.registry.disconnect(project, str(gone), setups_seen, forgotten=gone.project_deleted):
        log.info("project %s: connected again while this job found that %s; a round follows", project, gone)
        if gone.project_deleted:  # the project now under this id connected: its first connection, set up anew
            rt.registry.forget_all_but_setup(project)
            rt.queue.enqueue_connect(project)
            return {"connected_again": str(gone), "connect": "enqueued"}
        return {"connected_again": str(gone), "rerank": rt.queue.request_rerank(project, "connected again")}
    log.warning("project %s: stopped working on it: %s; connecting the backend again resumes", project, gone)
    return {"disconnected": str(gone)}


def forget_project_files(rt: Runtime, project: str, why: str = "deleted in Label Studio") -> None:
    """Delete the project's task list snapshot, matrix file, head versions and encoding progress (its records in
    the registry go with its disconnection, unless it was connected again meanwhile). Only a job holding the
    project's round lock calls it (a round, start_anew, or the sweep of deleted projects): no round is writing
    them."""
    rt.snapshots.delete(project)
    rt.matrix_files.delete_project(project)
    rt.artifacts.delete_project(project)
    rt.encoding.forget(project)
    log.info("project %s: %s; its task list, matrix file and head versions are deleted", project, why)


def forget_an_older_project(rt: Runtime, project: str) -> bool:
    """When the latest `/setup` came from another project than the one whose records the backend keeps under this
    id (see `start_anew`), forget the old one's files and records and keep the new one's creation time -> whether
    it did. Under the project's round lock: `start_anew`, and every round, so that a round that gets the lock
    first never ranks the new project with the old one's task list or heads. Done once: the creation times then
    agree, and a second call (a retried job) keeps what the new project has gained since."""
    created = rt.registry.another_project_set_up(project)
    if created is None:
        return False
    forget_project_files(rt, project, why=f"another project, created at {created}, has this id now")
    rt.registry.forget_all_but_setup(project)
    rt.registry.set_created(project, created)
    return True


def secure_webhooks(rt: Runtime, project: str) -> int:
    """With basic auth on, add our credentials to the webhooks Label Studio created for this backend.

    Only the webhooks of ML backends that may be this one (`may_be_this_backend`): another vendor's backend in the
    same project must never receive our credentials.

    Label Studio creates `<backend url>/webhook` without auth headers, so until this runs its events get a
    401 (and reconciliation recovers what they said). Returns the number of webhooks updated.
    """
    settings = rt.settings
    if not settings.basic_auth_enabled:
        return 0
    header = "Basic " + settings.basic_auth_token
    backends = rt.label_studio.ml_backends(int(project))
    ours = [b for b in backends if may_be_this_backend(b, settings.model_version_prefix)]
    backend_urls = {b["url"].rstrip("/") + "/webhook" for b in ours}
    updated = 0
    for webhook in rt.label_studio.webhooks(int(project)):
        if webhook["url"].rstrip("/") in backend_urls and (webhook.get("headers") or {}).get("Authorization") != header:
            rt.label_studio.update_webhook(
                webhook["id"], headers={**(webhook.get("headers") or {}), "Authorization": header}
            )
            updated += 1
    if updated:
        log.info("project %s: added basic-auth credentials to %d webhook(s)", project, updated)
    return updated


def secure_webhooks_or_warn(rt: Runtime, project: str) -> None:
    """`secure_webhooks`, where a refusal or a timeout is only logged: reconciliation tries again, and recovers the
    events that the unsecured webhook's 401s lost meanwhile. It never holds up the project's set-up or its ranking."""
    try:
        secure_webhooks(rt, project)
    except LabelStudioUnavailable as refused:
        log.warning(
            "project %s: could not add the backend's credentials to its webhook in Label Studio: %s", project, refused
        )


@needs_label_studio
def connect_project(project: str) -> dict:
    """First connection: switch the project to Uncertainty sampling with visible predictions, then rank it.

    A connection that fails for good (its retries spent: Label Studio refusing LABEL_STUDIO_API_KEY, say) is shown
    in /metrics as the project's `failing`, as a failed round is, until reconciliation configures the project
    (once Label Studio lets it) or a round runs."""
    rt = runtime()
    try:
        previous = configure_project(rt, project)
    except Exception as failed:
        job = get_current_job()
        if job is None or not job.retries_left:
            rt.registry.record_failed_connection(project, f"{type(failed).__name__}: {failed}")
        raise
    secure_webhooks_or_warn(rt, project)
    return {"previous": previous, "rerank": rt.queue.request_rerank(project, "connected")}


@needs_label_studio
def start_anew(project: str, created: str) -> dict:
    """Another project, created at `created`, has this id now (Label Studio on a new database, and the backend's
    Redis and MODEL_DIR kept): forget the old project's task list, head versions, rounds and the settings from
    before connecting, record the new creation time (`forget_an_older_project`; a round that got the lock first
    has done it already), then connect the new one as at a first `/setup`.

    Under the project's round lock, as every deletion of its files, and without giving way to newer rounds (their
    generation is ignored); a lock held past half of JOB_TIMEOUT fails the job, and rq retries it. `created` names
    the job (one per new project).
    """
    rt = runtime()
    with round_lock(rt, project, generation=sys.maxsize) as held:
        assert held is not None  # no generation is newer than sys.maxsize
        forget_an_older_project(rt, project)
    return connect_project(project)


def configure_project(rt: Runtime, project: str) -> dict:
    """Switch the project to Uncertainty sampling with visible predictions; keep the values from before the first
    time (a reconnection finds the backend's own values, which must not replace the ones a user undoes to)."""
    previous = rt.label_studio.configure_for_active_learning(int(project))
    rt.registry.record_settings_before_connect(project, previous, ours=ACTIVE_LEARNING_SETTINGS)
    log.info("project %s: configured for active learning (was %s)", project, previous)
    return previous


def encode_chunk(project: str, job_id: str, texts: list[str]) -> int:
    """Encode one chunk of a project's texts into the shared embedding cache (see EncodingJobs.enqueue)."""
    rt = runtime()
    embed_texts(texts, rt.encoder, rt.embedding_cache, must_store=True)  # a failed store fails the job: retried
    rt.encoding.chunk_done(project, job_id)
    return len(texts)


@needs_label_studio
def cleanup_versions(project: str, keep_version: str) -> list[str]:
    """Delete this backend's model versions of `project` that nothing serves or shows any more: rankings older
    than `keep_version`, and sets of `/predict` answers (Retrieve Predictions) other than the newest such set.
    Never the current version.

    Only older rankings: a newer round may be writing its predictions right now (cleanup takes no lock), and
    deleting its version would leave Label Studio switching to, or serving, an empty ranking. The newest set of
    `/predict` answers (by when Label Studio stored them: a zero-shot set, after the labels changed, may be newer
    than numbered ones) stays whatever the rounds since: a user who retrieved predictions keeps seeing them in the
    Data Manager until they retrieve again.
    """
    rt = runtime()
    try:
        current = rt.label_studio.get_project(int(project)).get("model_version")
    except LabelStudioNotFound:
        return []  # the project was deleted, and its versions with it
    prefix = rt.settings.model_version_prefix
    keep_number = version_number(keep_version, prefix)
    ours = [v for v in rt.label_studio.model_versions(int(project)) if is_our_version(v, prefix)]  # newest first
    answered = [version for version in ours if version.endswith(INTERACTIVE_SUFFIX)]
    rankings = [version for version in ours if not version.endswith(INTERACTIVE_SUFFIX)]
    stale = answered[1:] + [
        version
        for version in rankings
        if keep_number is not None and (version_number(version, prefix) or 0) < keep_number
    ]
    deleted = []
    for version in stale:
        if version != current:
            rt.label_studio.delete_model_version(int(project), version)
            deleted.append(version)
    rt.artifacts.prune(project)
    return deleted
