"""Connected projects: what `/setup`, `/webhook` and `/metrics` do, in milliseconds, without Label Studio calls.

Anything slow (reading Label Studio, training, writing predictions) is queued as an RQ job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from backend.adapters.encoding_jobs import EncodingJobs
from backend.adapters.project_registry import ProjectRegistry
from backend.adapters.queue import JobQueue
from backend.adapters.task_snapshot import TaskSnapshots
from backend.errors import MalformedRequest
from backend.label_config import parse_label_config
from backend.protocol import IGNORED_WEBHOOK_ACTIONS, PROJECT_PARAMS, PredictRequest, SetupRequest, WebhookEvent

log = logging.getLogger(__name__)

TASK_LIST_REREAD_ACTIONS = ("TASKS_DELETED", "START_TRAINING")
"""Events after which the next round reads the whole task list again instead of its snapshot: a deletion, which
the task list stamp can miss, and "Start Training", the user's way to have every task's data read afresh (an edit
of a task's data sends no webhook). An import needs neither: it always changes the stamp, and the round then reads
the imported tasks alone (see extend_snapshot)."""


@dataclass
class ProjectService:
    registry: ProjectRegistry
    queue: JobQueue
    encoding: EncodingJobs
    snapshots: TaskSnapshots
    reconcile_interval: int = 60
    reranking_unavailable: str = ""
    """Why the workers cannot re-rank (`Settings.reranking_unavailable`), shown in /metrics; "" when they can."""

    def setup(self, request: SetupRequest) -> bool:
        """Remember the project's config; on first connection queue its set-up and cold-start ranking, and when the
        parameters it ranks by change, a round. True when the records kept under the project's id are another
        project's (`keeps_another_projects_files`).

        Label Studio calls /setup before every /predict, so this must stay cheap and idempotent. With Redis
        away it still answers: the next /setup, the reconciliation pass or, for a first connection, the first round
        catches up.
        """
        try:
            stored_config, stored_params, owed = self.registry.last_setup(request.project)
            new_config = stored_config != request.label_config
            new_params = _ranking_params(stored_params) != _ranking_params(request.extra_params)
            first = self.registry.save_setup(
                request.project, request.label_config, request.extra_params, request.created, new_params
            )
            if new_config:
                self._warn_of_other_choices(request)
            known = self.registry.created(request.project)
            if known and request.created and known != request.created:
                self._start_anew(request, known, first)
                return True
            # owed as read, plus this change: one another /setup stored meanwhile stays owed, for the next /setup
            owed += new_params
            if first:
                log.info("project %s connected: queueing set-up and cold-start ranking", request.project)
                self.queue.enqueue_connect(request.project)
                self.queue.schedule_reconcile(request.project, self.reconcile_interval)
            elif owed:
                # the strategy or how many tasks it ranks changed (the model edited in Label Studio): rank anew
                log.info("project %s: ranking parameters changed; queueing a round", request.project)
                self.queue.request_rerank(request.project, "ranking parameters changed")
            if owed:  # (the connection's cold-start round ranks by them too)
                self.registry.rounds_requested_for_params(request.project, owed)
            if not first and self.queue.restart_reconcile_if_ended(request.project, self.reconcile_interval):
                # each reconciliation schedules the next; if one could not (Redis away then), restart the chain
                log.info("project %s: reconciliation was not scheduled; restarted it", request.project)
        except redis.RedisError as exc:
            log.warning(
                "project %s: /setup not recorded, Redis unavailable (%s: %s)", request.project, type(exc).__name__, exc
            )
        return False

    def _start_anew(self, request: SetupRequest, known_created: str, first: bool) -> None:
        """Another project has this id now (Label Studio started on a new database): a job forgets the old one
        and connects the new one. Until it has, every `/setup` sees the old creation time and asks again (a job
        that failed for good is queued anew)."""
        if self.queue.enqueue_start_anew(request.project, request.created):
            log.warning(
                "project %s: Label Studio has another project under this id (created at %s, not %s): forgetting "
                "the old one's files and records, setting the new one up",
                request.project,
                request.created,
                known_created,
            )
        if first:  # it had been disconnected
            self.queue.schedule_reconcile(request.project, self.reconcile_interval)

    def keeps_another_projects_files(self, request: PredictRequest) -> bool:
        """Whether the head versions kept under the request's project id are another project's: the request names
        a project created at another time than the one they were trained for (Label Studio on a new database), and
        `start_anew` has not forgotten them yet. False when either time is unknown, or Redis is away."""
        if not (request.project and request.created):
            return False
        try:
            known = self.registry.created(request.project)
        except redis.RedisError:
            return False
        return known is not None and known != request.created

    def label_config(self, project: str) -> str:
        """The config stored at /setup, for /predict requests that do not carry one."""
        if not project:
            raise MalformedRequest("/predict needs 'label_config', or the 'project' of a project set up by /setup")
        config = self.registry.label_config(project)
        if not config:
            raise MalformedRequest(f"/predict has no 'label_config' and project {project!r} was never set up")
        return config

    def on_event(self, event: WebhookEvent) -> dict:
        """Acknowledge a webhook: count it and make sure a re-rank follows. Never calls Label Studio."""
        self.registry.count_event(event.project, event.action)
        if self.registry.is_disconnected(event.project):
            # Label Studio keeps the webhook of a removed ML backend: its events must not bring the backend back
            return {"rerank": "not needed", "disconnected": True}
        if event.action in TASK_LIST_REREAD_ACTIONS and self.registry.is_connected(event.project):
            self.snapshots.mark_stale(event.project)  # (a project never set up has no task list to re-read)
        if event.action in IGNORED_WEBHOOK_ACTIONS or not self._changes_ranking(event):
            return {"rerank": "not needed"}
        return {"rerank": self.queue.request_rerank(event.project, event.action)}

    def _changes_ranking(self, event: WebhookEvent) -> bool:
        """PROJECT_UPDATED also follows our own model-version switch: only a change we did not make counts."""
        if event.action != "PROJECT_UPDATED":
            return True
        project = event.payload.get("project") if isinstance(event.payload.get("project"), dict) else {}
        # null too: Label Studio clears the version when the live one is deleted (Settings -> Predictions); it posts
        # no event then, so reconciliation repairs that first, or any later edit of the project's settings
        changed_version = "model_version" in project and (project["model_version"] or None) != (
            self.registry.live_version(event.project) or None
        )
        changed_config = "label_config" in project and project["label_config"] != self.registry.label_config(
            event.project
        )
        return changed_version or changed_config

    @staticmethod
    def _warn_of_other_choices(request: SetupRequest) -> None:
        """A config with several <Choices>: say which one the backend predicts and ranks by, once per config."""
        config = parse_label_config(request.label_config)
        if config.other_choices:
            others = ", ".join(f"<Choices name={name!r}>" for name in config.other_choices)
            log.warning(
                "project %s: predicting and ranking by <Choices name=%r> only; %s get(s) no predictions (this "
                "backend serves one <Choices> per project: the first that labels the whole text)",
                request.project,
                config.from_name,
                others,
            )

    def metrics(self) -> dict:
        """Per project: the last round (model version, annotations used, seconds per stage) and event counts;
        and the projects the backend stopped working on, with the reason."""
        projects = {}
        for project in self.registry.projects():
            projects[project] = {
                "last_round": self.registry.last_round(project),
                "refused": self.registry.refusal(project),
                "failing": self.registry.failing(project),
                "events": self.registry.event_counts(project),
                "encoding": self.encoding.progress(project),
                "reconcile_read_seconds": self.registry.reconcile_read_seconds(project),
            }
        return {
            "reranking": f"off: {self.reranking_unavailable}" if self.reranking_unavailable else "on",
            "queue_length": self.queue.length(),
            "encoding_queue_length": self.encoding.length(),
            "projects": projects,
            "disconnected": self.registry.disconnected(),
            "time": time.time(),
        }


def _ranking_params(params: dict) -> dict:
    """The extra params a round ranks by; the other keys (a user's notes) change nothing."""
    return {key: params[key] for key in PROJECT_PARAMS if key in params}
