"""Reconciliation: the periodic RQ jobs that repair what lost webhooks did not tell, and the worker maintenance
that keeps them running.

Label Studio sends each webhook once, with a 1 s timeout; every connected project's reconciliation compares
Label Studio's state with what the last round saw and queues a round when they differ. Each run schedules the
next; workers restart a chain that ended (`revive_reconciliations`), and sweep the records of disconnected
projects deleted since.
"""

from __future__ import annotations

import logging
import time

from rq import get_current_job

from backend.adapters.queue import reconcile_delay, reconcile_slot
from backend.errors import LabelStudioNotFound, LabelStudioRejected, LabelStudioUnavailable
from backend.jobs import configure_project, needs_label_studio, runtime, secure_webhooks_or_warn, stop_working_on
from backend.round_lock import round_lock
from backend.runtime import Runtime
from backend.services.project_state import ProjectDisconnected, read_connected_project

log = logging.getLogger(__name__)


def revive_reconciliations(rt: Runtime) -> list[str]:
    """Restart the chain of reconciliations of every connected project that lost it -> those projects.

    Each reconciliation schedules the next; one that fails before it does (Redis away, its worker killed) ends the
    chain, and lost webhooks would go unrepaired until Label Studio calls `/setup` again. Workers call this at
    every maintenance pass of rq (once a minute).

    A project with head versions under MODEL_DIR that Redis knows nothing of (neither connected nor disconnected:
    Redis came back without its data) is revived too: its reconciliation finds it connected in Label Studio and
    queues a round, which records the connection again; or finds it deleted or its backend removed, and records
    that. Label Studio would call `/setup` again only when someone opens the project's Model settings.
    """
    if rt.without_label_studio:  # a reconciliation would only be skipped (`needs_label_studio`)
        return []
    interval = rt.settings.reconcile_interval
    known = rt.registry.projects()
    unknown = set(rt.artifacts.projects()) - set(known) - set(rt.registry.disconnected())
    revived = [p for p in [*known, *sorted(unknown, key=int)] if rt.queue.restart_reconcile_if_ended(p, interval)]
    for project in revived:
        log.info("project %s: its reconciliation was not scheduled; restarted it", project)
    return revived


SWEEP_SECONDS = 3600
"""How often workers look for disconnected projects deleted since in Label Studio."""


def sweep_disconnected_projects(rt: Runtime) -> bool:
    """Queue `forget_deleted_projects`, at most once per `SWEEP_SECONDS` across workers, while the backend keeps
    records of disconnected projects. Workers call this at every maintenance pass of rq."""
    if rt.without_label_studio:
        return False
    return bool(rt.registry.disconnected_with_records()) and rt.queue.enqueue_sweep_once_per(SWEEP_SECONDS)


@needs_label_studio
def forget_deleted_projects() -> list[str]:
    """Delete what the backend kept about disconnected projects that Label Studio has deleted since -> those.

    A disconnected project gets no rounds or reconciliations, so the round that deletes a deleted project's files
    (`stop_working_on`) never comes for one whose backend was removed before the project was deleted; without
    this, its matrix file (733 MB per million tasks), head versions and records would stay for good.
    """
    rt = runtime()
    forgotten = []
    for project in rt.registry.disconnected_with_records():
        setups_seen = rt.registry.setups(project)
        try:
            rt.label_studio.get_project(int(project))
            continue  # still there: kept for connecting the backend again
        except LabelStudioNotFound:
            rt.label_studio.confirm_project_deleted(int(project))  # a wrong LABEL_STUDIO_URL raises instead
        except LabelStudioUnavailable as unanswered:  # a timeout, the API key lost access: the next sweep asks again
            log.warning("project %s: cannot tell whether it was deleted: %s", project, unanswered)
            continue
        with round_lock(rt, project, rt.queue.latest_generation(project)) as held:
            if held is None:  # connected again meanwhile, and a round started: that round finds it deleted
                continue
            gone = ProjectDisconnected(f"project {project} no longer exists in Label Studio", project_deleted=True)
            stop_working_on(rt, project, gone, setups_seen)
            forgotten.append(project)
    return forgotten


@needs_label_studio
def reconcile_project(project: str) -> dict:
    """Periodic repair: re-rank when Label Studio's state differs from what the last round saw.

    Catches what lost webhooks did not tell: annotations added, changed or deleted; tasks imported or
    deleted; the model version reset from the UI; the project deleted or the backend removed from it (which
    ends the chain of reconciliations).
    """
    rt = runtime()
    if rt.registry.is_disconnected(project):
        return {"rerank": "not needed", "disconnected": True}  # and the chain ends here
    interval = rt.settings.reconcile_interval
    if interval > 0:
        current = get_current_job()
        after_slot = current and reconcile_slot(project, current.id)
        newest = rt.queue.newest_reconcile_slot(project)
        if after_slot is None or newest is None or newest == after_slot:  # else a newer chain replaced this one's
            delay = reconcile_delay(interval, rt.registry.reconcile_read_seconds(project))
            rt.queue.schedule_reconcile(project, interval, after_slot=after_slot, delay=delay)
    setups_seen = rt.registry.setups(project)
    live_before_reading = rt.registry.live_version(project)
    started = time.monotonic()
    try:
        reading = read_connected_project(rt.label_studio, project, rt.settings.model_version_prefix)
        rt.registry.record_reconcile_read(project, time.monotonic() - started)
    except ProjectDisconnected as gone:
        if gone.project_deleted:  # its files go under the round lock, so that no round still running rewrites them
            return {"rerank": rt.queue.request_rerank(project, f"reconcile: {gone}"), "reasons": [str(gone)]}
        return {"rerank": "not needed", **stop_working_on(rt, project, gone, setups_seen)}
    # Repairs, each on its own, that must not keep the comparison below from running when Label Studio refuses them.
    if rt.registry.settings_before_connect(project) is None:  # the connect job failed for good (no API key?)
        try:
            configure_project(rt, project)
            rt.registry.end_failed_connection(project)
        except LabelStudioRejected as refused:
            log.warning("project %s: Label Studio refused to switch it to Uncertainty sampling: %s", project, refused)
    secure_webhooks_or_warn(rt, project)
    last = rt.registry.last_round(project) or {}
    reasons = []
    if reading.fingerprint != last.get("fingerprint"):
        reasons.append("annotations, tasks or the label config changed")
    ranks_something = last.get("ranked", 1) > 0  # a round with nothing to rank (all labelled) switches nothing
    # a round may have switched versions between the reading and now: Label Studio then showed the one live before
    live = rt.registry.live_version(project)
    if ranks_something and (reading.info.get("model_version") or "") not in {live_before_reading or "", live or ""}:
        reasons.append(f"model version is {reading.info.get('model_version')!r}")
    if ranks_something and not reasons and (deleted := deleted_ranking_predictions(rt, project, live, last)):
        reasons.append(f"{deleted} of the live ranking's {last['ranked']} predictions were deleted")
    if not reasons:
        return {"rerank": "not needed"}
    refusal = rt.registry.refusal(project)
    if refusal and (refusal["fingerprint"], refusal["params"]) == (reading.fingerprint, rt.registry.params(project)):
        return {"rerank": "not needed", "refused": refusal["reason"]}  # a round would refuse it again, until it changes
    failing = rt.registry.failing(project)
    if (
        failing
        and failing.get("params") == rt.registry.params(project)  # new parameters: try them at once
        and time.time() < failing["at"] + failed_round_backoff(failing["rounds"], interval)
    ):
        return {"rerank": "not needed", "failing": failing["reason"]}  # webhooks still queue rounds meanwhile
    log.info("project %s: reconciliation found %s", project, "; ".join(reasons))
    return {"rerank": rt.queue.request_rerank(project, "reconcile: " + "; ".join(reasons)), "reasons": reasons}


MAX_FAILED_ROUND_BACKOFF = 3600
"""The longest reconciliation waits before it queues a round again for a project whose rounds keep failing."""


def failed_round_backoff(failed_rounds: int, interval: int) -> float:
    """Seconds reconciliation waits after the `failed_rounds`-th round in a row failed for good (all retries
    spent): twice the reconcile interval, doubling with each failure, at most an hour. A round that fails the same
    way every time (one that outlasts JOB_TIMEOUT, say) is then tried a few times an hour, not at every pass."""
    return min(MAX_FAILED_ROUND_BACKOFF, max(interval, 1) * 2.0**failed_rounds)


def deleted_ranking_predictions(rt: Runtime, project: str, live: str | None, last: dict) -> int:
    """How many of the live ranking's predictions (of version `live`) Label Studio no longer holds.

    The Data Manager's "Delete predictions" sends no webhook and leaves `project.model_version` as it was, so
    Uncertainty sampling would serve those tasks like any unranked one until the next annotation's round.
    """
    if not live or live != last.get("model_version"):
        return 0
    counts = rt.label_studio.model_versions(int(project))  # {version: predictions}, one grouped query
    return max(0, int(last.get("ranked", 0)) - int(counts.get(live, 0)))
