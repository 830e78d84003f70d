"""Enqueueing re-rank and reconciliation jobs on RQ, with bursts coalesced by rq's own unique job ids.

A project's re-rank job id is `rerank-<project>-<generation>`. The generation is a Redis counter that a
re-rank job increments as the first thing it does, before it reads Label Studio. So:
- while a re-rank is queued, further events try the same id and rq's `unique=True` turns them away;
- once it runs, the next event queues exactly one follower (the next id), and later events join that one;
- an event can only be turned away by a job that reads Label Studio after the event's annotation was saved.
The same counter is the fencing token that keeps an older, slower job from publishing over a newer ranking.
Encoding a pool in chunk jobs, and the round that waits for them, is `backend.adapters.encoding_jobs`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime, timedelta

import redis
from rq import Queue, Retry
from rq.exceptions import DequeueTimeout, DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.utils import now, str_to_date

log = logging.getLogger(__name__)

RETRY = Retry(max=5, interval=[5, 15, 30, 60, 120])
"""Label Studio down or slow: retry with back-off; the previous ranking stays live meanwhile."""
FAILURE_TTL = 7 * 24 * 3600
"""Failed jobs stay in RQ's failed registry for a week, for inspection and requeueing."""
RESULT_TTL = 3600
DEAD_STATUSES = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
STALLED_AFTER_SECONDS = 30
WAITING_STATUSES = (JobStatus.DEFERRED, JobStatus.QUEUED, JobStatus.SCHEDULED)
WAITING_OR_RUNNING = (*WAITING_STATUSES, JobStatus.STARTED)

RECONCILE_FAILURES_KEPT_SECONDS = 3600
SWEEP_KEY = "al:sweep:disconnected"
"""Set (with an expiry) while a sweep of disconnected projects is recent: see `enqueue_sweep_once_per`."""


def reconcile_failure_ttl(interval: int) -> int:
    """How long a failed reconciliation stays in the failed registry: the next one supersedes it, so an hour's
    worth (at least ten intervals) shows an outage without piling up one job a minute for a week."""
    return max(RECONCILE_FAILURES_KEPT_SECONDS, 10 * interval)


RECONCILE_SHARE = 0.2
"""The most of a worker's time, and of Label Studio's, that one project's reconciliations take when nothing
changed: each pass reads every annotation's id and update time (about 13 s for 10,000 annotated tasks, see the
README), so a pass that took longer than this share of RECONCILE_INTERVAL spaces out the ones after it."""


def reconcile_delay(interval: int, read_seconds: float) -> float:
    """Seconds until the next reconciliation: `interval`, or longer when the last pass's read was long."""
    return max(float(interval), read_seconds / RECONCILE_SHARE)


# A generation above the counter it was taken from was taken before Redis lost its latest writes (restarted from
# an older snapshot, or empty): rounds started since may hold newer data under lower numbers, so it may not publish.
PUBLISH_IF_NEWER = """
local counter = redis.call('GET', KEYS[2])
if counter and tonumber(ARGV[1]) > tonumber(counter) then return 0 end
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
"""

# A new generation is above every generation that published, also after the counter itself was lost (evicted
# by an allkeys-* maxmemory policy): else every round would find itself overtaken until the counter caught up.
NEXT_GENERATION = """
local generation = redis.call('INCR', KEYS[1])
local published = tonumber(redis.call('GET', KEYS[2]) or '0')
if generation <= published then generation = published + 1 redis.call('SET', KEYS[1], generation) end
return generation
"""

# The generation after a dead job's, only if no one moved on from it yet: a burst of requests that all found the
# same job dead advance once, and queue one follower between them (the others find its id taken and coalesce).
ADVANCE_FROM = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
return 1
"""


def generation_key(project: str) -> str:
    return f"al:rerank:generation:{project}"


def reconcile_alive_key(project: str) -> str:
    return f"al:reconcile:alive:{project}"


def reconcile_job_id(project: str, slot: int) -> str:
    return f"reconcile-{project}-{slot}"


def reconcile_slot(project: str, job_id: str) -> int | None:
    """The slot in a reconciliation job's id, or None for any other job id."""
    prefix = reconcile_job_id(project, 0)[:-1]
    suffix = job_id[len(prefix) :] if job_id.startswith(prefix) else ""
    return int(suffix) if suffix.isdigit() else None


def published_key(project: str) -> str:
    return f"al:rerank:published:{project}"


class OrderedQueue(Queue):
    """rq's Queue, whose workers (`backend.worker`) take from several queues in order, each job with rq's
    reliable dequeue, as rq does for a worker on one queue only (on several it pops with BLPOP, and a job
    popped by a worker that dies before the job starts is in no list or registry: lost, waited for by whatever
    depends on it). The job is moved to its queue's intermediate list, from which rq's maintenance recovers it.

    Idle, a worker waits on the first queue and looks at the others every `POLL_SECONDS`.
    """

    POLL_SECONDS = 1

    @classmethod
    def dequeue_any(cls, queues, timeout, connection, **options):
        """The first job of the first queue that has one, as (job, queue); None at once when all are empty and
        `timeout` is None, else DequeueTimeout once `timeout` seconds have passed (rq's contract)."""
        queues = list(queues)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for queue in queues:
                if (taken := super().dequeue_any([queue], None, connection, **options)) is not None:
                    return taken
            if deadline is None:
                return None
            wait = min(cls.POLL_SECONDS, deadline - time.monotonic())
            if wait <= 0:
                raise DequeueTimeout(timeout, [queue.key for queue in queues])
            with contextlib.suppress(DequeueTimeout):
                if (taken := super().dequeue_any(queues[:1], max(1, int(wait)), connection, **options)) is not None:
                    return taken


class JobQueue:
    """The backend's RQ queue, and the rules for what may be queued at the same time."""

    def __init__(self, client: redis.Redis, name: str, job_timeout: int = 600):
        self.client = client
        self.queue = OrderedQueue(name, connection=client)
        self.job_timeout = job_timeout
        self._publish_if_newer = client.register_script(PUBLISH_IF_NEWER)
        self._next_generation = client.register_script(NEXT_GENERATION)
        self._advance_from = client.register_script(ADVANCE_FROM)

    def request_rerank(self, project: str, reason: str) -> str:
        """Make sure a re-rank of `project` will start after now. Returns "enqueued" or "coalesced"."""
        while True:
            generation = self._current_generation(project)
            job_id = f"rerank-{project}-{generation}"
            status, enqueued_at = self._status_and_enqueued_at(job_id)
            if status in WAITING_STATUSES and not self._lost_in_transit(job_id, status, enqueued_at):
                return "coalesced"  # a burst's usual path: two Redis reads
            if status is None and self.enqueue_unique("backend.jobs.rerank_project", job_id, project, reason):
                return "enqueued"
            status = self.status(job_id)
            dead = status in (*DEAD_STATUSES, JobStatus.FINISHED)
            if not dead and not (status == JobStatus.STARTED and self._stalled(job_id)):
                return "coalesced"
            # it died before it took its generation (failed, or its worker was killed), or it finished and the
            # generation counter was lost since (a job takes a new generation as it starts): try the next one
            self.advance_generation(project, generation)

    def _current_generation(self, project: str) -> int:
        """The project's generation counter; one that Redis lost (evicted) starts again past the newest generation
        that published, not from 0, below which every job id may still be kept as finished (for an hour), and not
        at the job of a round that may be running (which took its generation, one past its job's, as it started).
        """
        generation = self.client.get(generation_key(project))
        if generation is None:
            published = self.published_generation(project)
            self.client.set(generation_key(project), published + 1 if published else 0, nx=True)
            generation = self.client.get(generation_key(project))
        return int(generation or 0)

    def advance_generation(self, project: str, dead: int) -> bool:
        """Move the project's generation past `dead`, unless another request already did: True if this one did."""
        return bool(self._advance_from(keys=[generation_key(project)], args=[dead]))

    def _lost_in_transit(self, job_id: str, status: JobStatus | None, enqueued_at: datetime | None) -> bool:
        """A re-rank queued `STALLED_AFTER_SECONDS` ago that is neither in the queue nor started: Redis went away
        as a worker took it (rq had moved it to its intermediate list, for a worker that never heard back), and
        rq would give it up only after its maintenance passes (minutes), while events coalesced into it. It is
        cancelled (left in rq's canceled registry) so that the caller queues the next generation. A job taken
        that same instant is cancelled too, and runs anyway: one round more, never one less."""
        if status != JobStatus.QUEUED or enqueued_at is None:
            return False
        if (now() - enqueued_at).total_seconds() <= STALLED_AFTER_SECONDS:
            return False
        if self.client.lpos(self.queue.key, job_id) is not None or job_id in self.queue.started_job_registry:
            return False  # waiting behind other jobs, or running
        log.warning("%s was queued %s and is neither in the queue nor started: queueing the next", job_id, enqueued_at)
        IntermediateQueue(self.queue.key, connection=self.client).remove(job_id)
        with contextlib.suppress(InvalidJobOperation, NoSuchJobError):
            Job.fetch(job_id, connection=self.client).cancel()
        return True

    def _status_and_enqueued_at(self, job_id: str) -> tuple[JobStatus | None, datetime | None]:
        """The job's status and when it was queued, in one HMGET; (None, None) if there is no such job."""
        status, enqueued_at = self.client.hmget(Job.key_for(job_id), "status", "enqueued_at")
        if status is None:
            return None, None
        return JobStatus(status.decode()), str_to_date(enqueued_at) if enqueued_at else None

    def _stalled(self, job_id: str) -> bool:
        """A started re-rank that has not taken its generation within `STALLED_AFTER_SECONDS` lost its worker.

        Taking the generation is the job's first step. rq itself notices a dead worker's job only after its
        heartbeat expires and a worker's next maintenance pass (minutes); until then, events would coalesce
        into a job that never runs.
        """
        try:
            started_at = Job.fetch(job_id, connection=self.client).started_at
        except NoSuchJobError:
            return False
        return started_at is not None and (now() - started_at).total_seconds() > STALLED_AFTER_SECONDS

    def start_rerank(self, project: str) -> int:
        """Called first by a re-rank job: take a new generation, so later events queue a follower."""
        return int(self._next_generation(keys=[generation_key(project), published_key(project)]))

    def may_publish(self, project: str, generation: int) -> bool:
        """Atomically claim the right to publish; False if a newer generation already published, or if this one
        was taken before Redis lost data (see `taken_before_data_loss`)."""
        return bool(self._publish_if_newer(keys=[published_key(project), generation_key(project)], args=[generation]))

    def taken_before_data_loss(self, project: str, generation: int) -> bool:
        """True if `generation` is above the project's counter: Redis lost the writes that counted up to it."""
        counter = self.client.get(generation_key(project))
        return counter is not None and generation > int(counter)

    def latest_generation(self, project: str) -> int:
        """The generation the newest started re-rank of `project` took."""
        return int(self.client.get(generation_key(project)) or 0)

    def published_generation(self, project: str) -> int:
        """The newest generation that claimed the right to publish (0: none yet)."""
        return int(self.client.get(published_key(project)) or 0)

    def overtaken(self, project: str, generation: int) -> bool:
        """True once a newer generation has published: a round of `generation` could no longer publish."""
        return self.published_generation(project) > generation

    def still_publisher(self, project: str, generation: int) -> bool:
        """True while no newer generation has claimed the right to publish since `may_publish` gave it to us."""
        return self.published_generation(project) == generation

    def schedule_reconcile(
        self, project: str, interval: int, after_slot: int | None = None, delay: float | None = None
    ) -> None:
        """Schedule the project's next reconciliation in `delay` s (at least `interval`, the default); one job per
        (project, slot).

        The slot is the interval-long period of the clock the job is due in, so callers in the same period share
        one; a reconciliation scheduling its successor passes its own slot, and the successor's is always later,
        even when this machine's clock is behind the one that scheduled it (else it would find its own id taken
        and the chain would end). With `interval` 0 (the one pass at a connection) the slot is the second it is due
        in: a pass of an earlier connection, finished and kept by rq for an hour, must not take the new one's id.
        """
        delay = interval if delay is None else max(delay, interval)
        slot = int((time.time() + delay) // interval) if interval > 0 else int(time.time() + delay)
        if after_slot is not None:
            slot = max(slot, after_slot + 1)
        job = self.queue.create_job(
            "backend.reconciliation.reconcile_project",
            args=(project,),
            job_id=reconcile_job_id(project, slot),
            **self.job_options(retry=None, failure_ttl=reconcile_failure_ttl(interval)),
        )
        try:
            self.queue.schedule_job(job, _in(delay), unique=True)
        except DuplicateJobError:
            pass
        self.client.set(reconcile_alive_key(project), slot, ex=int(2 * delay) + 60)

    def restart_reconcile_if_ended(self, project: str, interval: int) -> bool:
        """Schedule the project's reconciliation unless its chain is alive (or `interval` is 0) -> whether it did."""
        if interval <= 0 or self.reconcile_scheduled(project):
            return False
        self.schedule_reconcile(project, interval)
        return True

    def reconcile_scheduled(self, project: str) -> bool:
        """Whether the project's chain of reconciliations is alive (scheduled within the last two intervals)."""
        return bool(self.client.exists(reconcile_alive_key(project)))

    def newest_reconcile_slot(self, project: str) -> int | None:
        """The slot of the project's reconciliation scheduled last (None when the chain is not alive): a pass of
        another slot belongs to a chain that a newer one replaced (a connection, a chain restarted while this one's
        job waited behind others) and ends it, or both would go on, each reading every annotation."""
        slot = self.client.get(reconcile_alive_key(project))
        return int(slot) if slot is not None else None

    def enqueue_connect(self, project: str) -> None:
        """First `/setup` of a project: configure it in Label Studio and build the cold-start ranking.

        One connect job per project at a time; one kept from an earlier connection (finished or failed) gives way.
        """
        self._enqueue_one_at_a_time("backend.jobs.connect_project", f"connect-{project}", project)

    def enqueue_start_anew(self, project: str, created: str) -> bool:
        """Another project now has `project`'s id (`backend.jobs.start_anew`); True unless one such job is already
        waiting or running. One that ended (failed for good, or done and asked for again) gives way."""
        return self._enqueue_one_at_a_time("backend.jobs.start_anew", f"anew-{project}-{created}", project, created)

    def _enqueue_one_at_a_time(self, func: str, job_id: str, *args) -> bool:
        if self.enqueue_unique(func, job_id, *args):
            return True
        if self.status(job_id) in WAITING_OR_RUNNING:
            return False
        with contextlib.suppress(NoSuchJobError):
            Job.fetch(job_id, connection=self.client).delete()
        return self.enqueue_unique(func, job_id, *args)

    def enqueue_cleanup(self, project: str, keep_version: str) -> None:
        self.queue.enqueue_call(
            "backend.jobs.cleanup_versions",
            args=(project, keep_version),
            **self.job_options(),
        )

    def enqueue_sweep_once_per(self, seconds: int) -> bool:
        """Queue `backend.reconciliation.forget_deleted_projects` unless any worker did so in the last `seconds`."""
        if not self.client.set(SWEEP_KEY, "1", nx=True, ex=seconds):
            return False
        self.queue.enqueue_call("backend.reconciliation.forget_deleted_projects", **self.job_options())
        return True

    def length(self) -> int:
        return len(self.queue)

    def job_options(self, retry: Retry | None = RETRY, failure_ttl: int = FAILURE_TTL) -> dict:
        """What every job of the backend gets: its timeout, how long results and failures are kept, retries."""
        return {"timeout": self.job_timeout, "result_ttl": RESULT_TTL, "failure_ttl": failure_ttl, "retry": retry}

    def enqueue_unique(self, func: str, job_id: str, *args, queue: Queue | None = None) -> bool:
        """Queue `func(*args)` as `job_id` on `queue` (default: the backend's); False when a job with that id exists."""
        try:
            (queue or self.queue).enqueue_call(
                func,
                args=args,
                job_id=job_id,
                unique=True,
                **self.job_options(),
            )
            return True
        except DuplicateJobError:
            return False

    def status(self, job_id: str) -> JobStatus | None:
        """The job's status (one HGET, without loading the job), or None if there is no such job."""
        try:
            return Job(job_id, connection=self.client).get_status()
        except InvalidJobOperation:
            return None


def _in(seconds: float):
    return now() + timedelta(seconds=seconds)
