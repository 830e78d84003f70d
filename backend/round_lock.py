"""The per-project round lock: one re-rank of a project at a time, across every worker on every machine.

A Redis lock, renewed while its round runs (a long round keeps it; only a dead worker's lock expires), that a
waiting job gives up as soon as a newer re-rank of the project has started.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from backend.runtime import Runtime

log = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 1.0
"""How often a re-rank waiting for its project's lock checks whether a newer re-rank has started."""
LOCK_WAIT_SHARE = 0.5
"""The share of JOB_TIMEOUT a re-rank waits for its project's lock before it fails (and rq retries it later): rq
counts the timeout from the job's start, so a job that waited it all out would be killed in the middle of its round."""


@contextlib.contextmanager
def round_lock(rt: Runtime, project: str, generation: int) -> Iterator[Lock | None]:
    """Hold the project's round lock (renewed while held) and yield it; or yield None, without the lock, as soon
    as a newer generation has started while this one waited. So a busy project ties up two workers at most (the
    round running and the newest follower), not every worker, each waiting on the lock.

    Raises LockError when the lock is not free within half of JOB_TIMEOUT (rq then retries the job).
    """
    lock = rt.redis.lock(
        f"al:rerank:lock:{project}",
        timeout=rt.settings.rerank_lock_timeout,
        blocking_timeout=LOCK_POLL_SECONDS,
        thread_local=False,  # `kept_alive` renews it from another thread
    )
    deadline = time.monotonic() + rt.settings.job_timeout * LOCK_WAIT_SHARE
    while not lock.acquire():
        if rt.queue.latest_generation(project) > generation:
            yield None
            return
        if time.monotonic() >= deadline:
            raise LockError(f"{lock.name} not free within half of JOB_TIMEOUT={rt.settings.job_timeout} s")
    try:
        with kept_alive(lock):
            yield lock
    finally:
        try:
            lock.release()
        except LockNotOwnedError:  # it expired (Redis away longer than its timeout): the round's work stands
            log.warning("project %s: round lock had expired before the round released it", project)


@contextlib.contextmanager
def kept_alive(lock: Lock) -> Iterator[None]:
    """Renew `lock` every third of its timeout while the block runs.

    A round on a large project (a first task list of a million tasks, say) can outlast the timeout; a live worker
    keeps its lock, and only a dead worker's lock expires.
    """
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lock.timeout / 3):
            try:
                lock.reacquire()
            except LockError as exc:  # lost it (expired while Redis was away): the publishing fence holds
                log.warning("%s: lost the lock, no longer renewing it (%s)", lock.name, type(exc).__name__)
                return
            except redis.RedisError as exc:  # Redis away for a moment: the next tick tries again, in time
                log.warning("%s: could not renew the lock, trying again (%s)", lock.name, type(exc).__name__)

    renewer = threading.Thread(target=renew, name=f"renew {lock.name}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
