"""Encoding a project's pool as chunk jobs that every worker shares, and the round that waits for them.

When a round finds many texts without cached embeddings (a new project, a large import), it splits them into
chunks and queues one `backend.jobs.encode_chunk` job per chunk, with an id made from the chunk's texts, so that
a chunk is encoded once however many rounds ask; then one re-rank (the "follow-up") that depends on all of them.
Progress (chunks, done, texts) is kept in Redis for /metrics.
"""

from __future__ import annotations

import contextlib
import hashlib

from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backend.adapters.queue import WAITING_STATUSES, JobQueue


def encoding_key(project: str) -> str:
    """Progress of a project's chunked encoding: chunks, done, texts (shown in /metrics)."""
    return f"al:encoding:{project}"


def encoding_follow_up_key(project: str) -> str:
    """The id of the round queued to run once a project's chunk jobs are done."""
    return f"al:encoding:{project}:follow_up"


def encoding_runs_key(project: str) -> str:
    """How many times each chunk job of a project ran (tests and operators check: once per chunk)."""
    return f"al:encoding:{project}:runs"


def chunk_job_id(project: str, chunk: list[str]) -> str:
    digest = hashlib.sha1("\0".join(chunk).encode("utf-8", errors="replace")).hexdigest()[:16]
    return f"encode-{project}-{digest}"


class EncodingJobs:
    """Chunk jobs and their follow-up round, on the backend's queue."""

    def __init__(self, jobs: JobQueue):
        self.jobs = jobs
        self.client = jobs.client

    def enqueue(self, project: str, chunks: list[list[str]], then_rerank: bool = True) -> list[str]:
        """One job per chunk of texts, so each chunk is encoded once even when several rounds ask; then
        (optionally) one re-rank that depends on all of them. Returns the chunk job ids.

        A chunk whose job failed for good is requeued from rq's failed registry (else its id would block it
        for as long as failures are kept), and one whose job ended otherwise is run again: finished (its vectors
        are missing all the same: a new encoder, or the cache lost them), or stopped or cancelled by an operator
        (rq would keep a round that depends on it waiting for good). Progress restarts only when no encoding is
        under way.
        """
        job_ids = []
        recreated = False
        for chunk in chunks:
            job_id = chunk_job_id(project, chunk)
            if not self.jobs.enqueue_unique("backend.jobs.encode_chunk", job_id, project, job_id, chunk):
                recreated |= self._run_again(job_id, project, chunk)
            job_ids.append(job_id)
        progress = self.progress(project)
        if progress.get("done", 0) >= progress.get("chunks", 0):
            mapping = {"chunks": len(chunks), "done": 0, "texts": sum(map(len, chunks))}
            self.client.hset(encoding_key(project), mapping=mapping)
        if then_rerank:
            self._enqueue_follow_up(project, job_ids, recreated)
        return job_ids

    def _run_again(self, job_id: str, project: str, chunk: list[str]) -> bool:
        """Requeue a chunk whose job exists and is not waiting or running -> whether its job was recreated."""
        status = self.jobs.status(job_id)
        if status == JobStatus.FAILED and job_id in self.jobs.queue.failed_job_registry:
            self.jobs.queue.failed_job_registry.requeue(job_id)
            return False
        if status in (*WAITING_STATUSES, JobStatus.STARTED):
            return False
        with contextlib.suppress(NoSuchJobError):
            Job.fetch(job_id, connection=self.client).delete()
        self.jobs.enqueue_unique("backend.jobs.encode_chunk", job_id, project, job_id, chunk)
        return True

    def _enqueue_follow_up(self, project: str, job_ids: list[str], recreated: bool) -> None:
        """Queue the round that ranks the pool once every chunk is encoded, unless it already waits."""
        after = hashlib.sha1("\0".join(sorted(job_ids)).encode()).hexdigest()[:16]
        follow_up = f"rerank-{project}-after-{after}"
        self._drop_follow_up(project, unless=follow_up)  # this one ranks the whole pool too
        self.client.set(encoding_follow_up_key(project), follow_up)
        status = self.jobs.status(follow_up)
        if recreated and status == JobStatus.DEFERRED:
            # deleting a finished chunk's job deleted its list of dependents too: the recreated chunk would
            # never release this follow-up, and every round would wait for it. Queue it again.
            with contextlib.suppress(NoSuchJobError):
                Job.fetch(follow_up, connection=self.client).delete()
            status = None
        if status not in WAITING_STATUSES:  # (rq's unique=True refuses dependencies)
            self.jobs.queue.enqueue_call(
                "backend.jobs.rerank_project",
                args=(project, "embeddings ready"),
                job_id=follow_up,
                depends_on=job_ids,
                **self.jobs.job_options(),
            )

    def pending(self, project: str) -> bool:
        """True while a round waits for this project's chunk jobs, some still to run and none failed for good:
        that round will rank the whole pool, so a round that finds vectors missing meanwhile need not re-read every
        task.

        A follow-up that nothing will release any more (a chunk failed, stopped or cancelled; or every chunk ended,
        a failed one's record expired after FAILURE_TTL, which rq counts as met but which releases nothing) would
        wait forever, and every round would wait for it: it is deleted, and the round goes on without it."""
        follow_up = self.client.get(encoding_follow_up_key(project))
        if follow_up is None:
            return False
        try:
            job = Job.fetch(follow_up.decode(), connection=self.client)
        except NoSuchJobError:
            return False
        if job.get_status() not in WAITING_STATUSES:
            return False
        with self.client.pipeline(transaction=False) as pipe:
            for chunk_id in job.dependency_ids:
                pipe.hget(Job.key_for(chunk_id), "status")
            statuses = [status.decode() for status in pipe.execute() if status]
        running = any(status in (*WAITING_STATUSES, JobStatus.STARTED) for status in statuses)
        ended_badly = any(status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED) for status in statuses)
        if running and not ended_badly:
            return True
        job.delete()
        self.client.delete(encoding_follow_up_key(project))
        return False

    def chunk_done(self, project: str, job_id: str) -> None:
        """Count a chunk encoded: in the progress /metrics shows, and in the chunk's own run count."""
        self.client.hincrby(encoding_key(project), "done", 1)
        self.client.hincrby(encoding_runs_key(project), job_id, 1)

    def forget(self, project: str) -> None:
        self._drop_follow_up(project)
        self.client.delete(encoding_key(project), encoding_runs_key(project), encoding_follow_up_key(project))

    def _drop_follow_up(self, project: str, unless: str | None = None) -> None:
        """Delete the round still deferred until the project's chunks are encoded, unless it is `unless`: once its
        key forgets it, nothing else would (rq keeps a deferred job for good, also one whose chunk failed)."""
        follow_up = (self.client.get(encoding_follow_up_key(project)) or b"").decode()
        if follow_up and follow_up != unless and self.jobs.status(follow_up) == JobStatus.DEFERRED:
            with contextlib.suppress(NoSuchJobError):
                Job.fetch(follow_up, connection=self.client).delete()

    def progress(self, project: str) -> dict:
        return {k.decode(): int(v) for k, v in self.client.hgetall(encoding_key(project)).items()}
