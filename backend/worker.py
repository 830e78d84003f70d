"""`python -m backend.worker`: an RQ worker, with rq's scheduler, on REDIS_URL: it takes jobs from QUEUE_NAME, and
chunk jobs (encoding a pool) from QUEUE_NAME-encoding when none waits there.

Run as many as you like, on one machine or many: a project is re-ranked by one worker at a time, and an
older round never publishes over a newer one (see backend.adapters.queue).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import time
from collections.abc import Callable

import redis
import torch
from rq import SimpleWorker, Worker
from rq.exceptions import AbandonedJobError, StopRequested

from backend import jobs, reconciliation
from backend.adapters.queue import OrderedQueue
from backend.config import Settings, url_without_password, writable_model_dir
from backend.errors import LabelStudioUnavailable, ModelUnavailable
from backend.local_stack import stop_with_parent
from backend.logs import configure_logging
from backend.ml.encoder import pick_device

log = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 60
WORKER_TTL_SECONDS = 30
"""rq waits for a job at most this less 15 s at a time, and checks whether maintenance is due between waits:
after Redis comes back, the scheduler and the reconciliations restart within about a minute, not two."""

RESTART_SECONDS = 5
"""A worker whose loop ended starts again this long after it started at the earliest: an error that ends it at
once is logged every few seconds, not thousands of times a second."""

REDIS_GONE = (redis.ConnectionError, redis.TimeoutError)
"""Redis restarted, unreachable, or too slow to answer (a failover, a save under memory pressure)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty (tests, batch runs)")
    parser.add_argument("--no-preload", action="store_true", help="do not load the encoder before the first job")
    args = parser.parse_args(argv)
    register_fork_hooks()
    settings = Settings.from_env_or_exit()
    configure_logging(settings)
    writable_model_dir(settings)
    runtime = jobs.runtime()
    worker_class = worker_class_for(pick_device(settings.device))
    if not args.no_preload:
        try:
            preload(runtime)
        except ModelUnavailable as exc:  # MODEL_NAME wrong, or a hub name without the network: its message alone
            raise SystemExit(str(exc)) from None
    names = " then ".join(repr(queue.name) for queue in runtime.queues)
    log.info("worker listening on %s (queues %s)", url_without_password(settings.redis_url), names)
    if settings.reranking_unavailable:  # jobs that need Label Studio end at once (jobs.needs_label_studio)
        log.warning("%s; jobs that need Label Studio are skipped", settings.reranking_unavailable)
    while True:
        # Maintenance every minute, not rq's ten, and a wait for jobs short enough to get to it on time: a dead
        # worker's scheduler lock and abandoned jobs are taken over that much sooner.
        started, worker = time.monotonic(), None
        try:
            worker = worker_class(  # rq's Worker asks Redis already here: down at the start counts as lost too
                runtime.queues,
                connection=runtime.redis,
                maintenance_interval=MAINTENANCE_SECONDS,
                worker_ttl=WORKER_TTL_SECONDS,
            )
            worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level)
            if args.burst or stop_requested(worker):
                return  # burst finished, or stopped by a signal
            # rq's loop also quits, logging why, on a Redis timeout or on any error outside a job (a connection
            # lost during its maintenance), and returns once its teardown gets through: that is no stop
            log.warning("the worker's loop ended without being told to stop; starting it again")
        except redis.RedisError as exc:  # gone, or refusing writes (a replica after a failover, out of memory)
            if stop_requested(worker):  # a SIGINT/SIGTERM came first: a stop, no outage
                log.warning("lost Redis (%s) while stopping; stopped", type(exc).__name__)
                return
            # rq retries a lost connection while it waits for jobs, not while it watches one run, and registers
            # the worker's birth and death outside its loop: start over
            log.warning("lost Redis (%s: %s); restarting the worker once it answers", type(exc).__name__, exc)
        try:
            until_stopped = functools.partial(stop_requested, worker)
            if sleep_unless(started + RESTART_SECONDS - time.monotonic(), until_stopped) and wait_for_redis(
                runtime.redis, until_stopped
            ):
                continue
        except StopRequested:  # rq's handler raises it when the signal finds the worker idle
            pass
        except redis.RedisError:  # or, finding it still busy with the job Redis went away in, records the stop there
            if not stop_requested(worker):
                raise
        log.warning("told to stop while waiting to start again; stopped")
        return


_forking_pid = 0
_fork_hooks_registered = False


def register_fork_hooks() -> None:
    """Once per process: every process the worker forks (rq's scheduler, the work-horse of a job) gets SIGTERM
    when the worker dies, even by SIGKILL. Otherwise a killed worker's scheduler lives on, holding the scheduler
    lock and the worker's Redis connection, on which a job waited for may still be handed over and then never run
    (until reconciliation queues the round again, a minute later). rq forks both from the worker's main thread,
    whose end is what the kernel's parent-death signal watches."""
    global _fork_hooks_registered
    if not _fork_hooks_registered:
        os.register_at_fork(before=_remember_forking_process, after_in_child=_stop_with_forking_process)
        _fork_hooks_registered = True


def _remember_forking_process() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _stop_with_forking_process() -> None:
    # Until the child installs its own handlers (rq's scheduler: a stop request it reads; a work-horse: the
    # defaults), SIGTERM and SIGINT end it. The worker's handlers it inherits would only flag a stop on the
    # worker's copy, which nothing in the child reads: a scheduler that the worker stops right after starting it
    # (rq's loop quitting at once, on a Redis timeout) would then run on, and rq's teardown waits for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    stop_with_parent()
    if os.getppid() != _forking_pid:  # the worker died before the line above: nothing would send the signal
        os._exit(1)


def stop_requested(worker: Worker | None) -> bool:
    """Whether a SIGINT/SIGTERM asked `worker` to stop: rq sets `_stop_requested` only when it comes during a job,
    and the date of the request in either case (an idle worker stops at once, and its teardown needs Redis). None:
    no worker yet (Redis was away when it was to be made)."""
    return bool(getattr(worker, "_stop_requested", False) or getattr(worker, "_shutdown_requested_date", None))


class RevivesReconciliations:
    """rq's maintenance pass (registries cleaned, the scheduler taken over from a dead worker), plus restarting
    every connected project's chain of reconciliations that a failed reconciliation ended, and, once an hour,
    a job that looks for disconnected projects deleted since."""

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            reconciliation.revive_reconciliations(jobs.runtime())
            reconciliation.sweep_disconnected_projects(jobs.runtime())
        except REDIS_GONE:
            raise  # the loop in main() waits for Redis and starts over
        except StopRequested:  # a SIGTERM or SIGINT while idle here: rq's loop stops on it (it records no stop
            raise  # for an idle worker, so swallowed it would go on waiting for jobs, also for a Redis gone for good)
        except Exception:  # noqa: BLE001 - a bug here must not stop the worker from taking jobs
            log.exception("could not restart the reconciliations of connected projects")


class TakesQueuesInOrder:
    """A worker that takes jobs from its queues in order, each with rq's reliable dequeue (`OrderedQueue`): the job
    waits in its queue's intermediate list until it is marked started, and leaves that list in the same
    transaction, as rq does for a worker on one queue only. A worker that dies before that step leaves the job in
    the list, from which rq's maintenance retries or fails it; one that dies after, a started job, which rq's
    started registry answers for. (Taken out of the list any earlier, while the job is still marked queued, a job
    whose worker died would be in no list or registry: rq drops a not-started job from the started registry.)"""

    queue_class = OrderedQueue

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)
        self.forget_stuck_mark(job)

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        """A job that failed before it was marked started (its work-horse died first) is still in the intermediate
        list: taken out here, before rq retries it, or the copy left there would have rq's maintenance fail the
        retry, or enqueue the dependents of a failed job a second time."""
        try:
            self.connection.lrem(queue.intermediate_queue_key, 0, job.id)
        except redis.RedisError as exc:  # rq's handling goes on; its maintenance clears the list in time
            log.warning("could not take %s out of its intermediate list: Redis unavailable (%s)", job.id, exc)
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def forget_stuck_mark(self, job) -> None:
        """rq's maintenance marks a job it finds in an intermediate list and fails it when it finds it there again
        a minute later, by id; the mark outlives a job that recovered (24 h). Job ids come back here (a chunk's, a
        connection's, a retried job's): without this, the next time one is taken, a maintenance pass in the instant
        between taking and starting it would fail it at once."""
        origin = self.queue_class(job.origin, connection=self.connection)
        self.connection.delete(origin.intermediate_queue.get_first_seen_key(job.id))


class RecordsAbandonedRounds:
    """A round whose whole worker process died (an in-process worker on a GPU, or a forking worker's parent) is
    found by rq's maintenance, in any worker, as abandoned: on its last try it is recorded as a failed round too,
    as `ForkingWorker` records one whose work-horse died."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.push_exc_handler(record_abandoned_round)


def record_abandoned_round(job, exc_type, exc_value, traceback) -> None:
    """rq's exception handler: it runs for every failed job; a job that raised has recorded itself already
    (`jobs.rerank_project`), so only the ones rq's maintenance found abandoned are recorded here."""
    if exc_type is AbandonedJobError:
        record_killed_round_or_log(job, "the worker running it died (rq's maintenance found it abandoned)")


def record_killed_round_or_log(job, reason: str) -> None:
    """`jobs.record_killed_round`, whose failure is logged and goes no further: rq hands the job on to its
    retries or its failure all the same, and an error here would end the worker's loop or rq's maintenance."""
    try:
        jobs.record_killed_round(job, reason)
    except redis.RedisError as exc:
        log.warning("could not record that %s's process died: Redis unavailable (%s)", job.id, exc)
    except Exception:
        log.exception("could not record that %s's process died", job.id)


class ForkingWorker(TakesQueuesInOrder, RevivesReconciliations, RecordsAbandonedRounds, Worker):
    def handle_work_horse_killed(self, job, retpid, ret_val, rusage) -> None:
        """A work-horse that died without raising (the OOM killer, a job past its timeout stuck in C code) never
        got to record a failed round: record it here, where rq hands the job on to its retries or its failure."""
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        how = f"signal {os.WTERMSIG(ret_val)}" if ret_val and os.WIFSIGNALED(ret_val) else f"status {ret_val}"
        record_killed_round_or_log(job, f"the work-horse running it died ({how})")


class InProcessWorker(TakesQueuesInOrder, RevivesReconciliations, RecordsAbandonedRounds, SimpleWorker):
    pass


def worker_class_for(device: torch.device) -> type[Worker]:
    """rq's Worker forks a work-horse per job, which inherits the encoder loaded here; but CUDA cannot be used
    again in a forked child once the parent has used it, so on a GPU jobs run in the worker process itself
    (SimpleWorker: the model stays on the GPU between jobs; a job that crashes the process takes the worker
    down, and the supervisor, e.g. docker's restart policy, brings it back while rq retries the job)."""
    return InProcessWorker if device.type == "cuda" else ForkingWorker


def preload(runtime) -> None:
    """Load once in the worker what every job needs; rq forks a work-horse per job, which inherits it.

    Without this each round pays the encoder load and the Label Studio SDK import (~1 s) again.
    """
    runtime.encoder  # noqa: B018
    if runtime.settings.reranking_unavailable:  # (`main` says so)
        return
    try:
        runtime.label_studio  # noqa: B018 - imports the SDK and builds the client (no connection is opened)
    except LabelStudioUnavailable as exc:  # e.g. an expired personal access token
        log.warning("%s", exc)


def wait_for_redis(client: redis.Redis, stop_requested: Callable[[], bool], longest_wait: float = 30.0) -> bool:
    """Block until Redis answers PING (True) or a stop is requested (False: rq's signal handlers, still installed,
    only record it), backing off from 0.5 s to `longest_wait` between tries."""
    delay = 0.5
    while not stop_requested():
        try:
            client.ping()
            return True
        except REDIS_GONE:
            sleep_unless(delay, stop_requested)
            delay = min(delay * 2, longest_wait)
    return False


def sleep_unless(seconds: float, stop_requested: Callable[[], bool]) -> bool:
    """Sleep `seconds` (none when not positive), waking every 0.1 s to check for a stop: True unless one came."""
    until = time.monotonic() + seconds
    while time.monotonic() < until and not stop_requested():
        time.sleep(0.1)
    return not stop_requested()


if __name__ == "__main__":
    main()
