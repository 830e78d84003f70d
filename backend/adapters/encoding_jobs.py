"""Encoding a project's pool as chunk jobs that every worker shares, and the round that waits for them.

When a round finds many texts without cached embeddings (a new project, a large import), it splits them into
chunks and queues one `backend.jobs.encode_chunk` job per chunk, with an id made from the chunk's texts, so that
a chunk is encoded once however many rounds ask; then one re-rank (the "follow-up") that depends on all of them.

Chunk jobs have a queue of their own, which workers take from only when the backend's queue is empty: a big
import into one project (an hour of chunks on a CPU for a million texts) never holds up the rounds, connections and
reconciliations of any project. The follow-up round goes on the backend's queue once its chunks are done.

Progress, shown in /metrics, is kept as two sets of chunk ids, the encoding's and the ones done, so that a chunk
that finishes while others are queued, runs twice, or belongs to a project forgotten since is counted right.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid

from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backend.adapters.queue import DEAD_STATUSES, RETRY, WAITING_OR_RUNNING, WAITING_STATUSES, JobQueue, OrderedQueue


def encoding_queue_name(queue_name: str) -> str:
    """The RQ queue of chunk jobs, beside the backend's queue `queue_name`."""
    return f"{queue_name}-encoding"


def encoding_key(project: str) -> str:
    """How many texts the project's current encoding holds (`texts`; shown in /metrics)."""
    return f"al:encoding:{project}"


def encoding_chunks_key(project: str) -> str:
    """The ids of the chunk jobs of the project's current encoding."""
    return f"al:encoding:{project}:chunks"


def encoding_done_key(project: str) -> str:
    """The ids of the chunk jobs of the current encoding that are done."""
    return f"al:encoding:{project}:done"


def encoding_follow_up_key(project: str) -> str:
    """The id of the round queued to run once a project's chunk jobs are done."""
    return f"al:encoding:{project}:follow_up"


def encoding_runs_key(project: str) -> str:
    """How many times each chunk job of a project ran (tests and operators check: once per chunk)."""
    return f"al:encoding:{project}:runs"


def chunk_job_id(project: str, chunk: list[str]) -> str:
    digest = hashlib.sha1("\0".join(chunk).encode("utf-8", errors="replace")).hexdigest()[:16]
    return f"encode-{project}-{digest}"


# A chunk done counts only while it belongs to the project's current encoding: one whose project was forgotten
# meanwhile leaves no progress behind.
CHUNK_DONE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
return 1
"""


def last_error(job: Job) -> str:
    """The last line of a failed job's traceback (e.g. "OutOfMemoryError: ..."), or a pointer to where it is."""
    result = job.latest_result()
    lines = [line for line in ((result and result.exc_string) or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "its error is in rq's failed registry"


class EncodingJobs:
    """Chunk jobs, on the encoding queue, and their follow-up round, on the backend's queue."""

    def __init__(self, jobs: JobQueue):
        self.jobs = jobs
        self.client = jobs.client
        self.queue = OrderedQueue(encoding_queue_name(jobs.queue.name), connection=jobs.client)
        self._chunk_done = self.client.register_script(CHUNK_DONE)

    def enqueue(self, project: str, chunks: list[list[str]], then_rerank: bool = True) -> list[str]:
        """One job per chunk of texts, so each chunk is encoded once even when several rounds ask; then
        (optionally) one re-rank that depends on them and on every chunk still under way. Returns the chunk job ids.

        A chunk whose job failed for good is requeued from rq's failed registry (else its id would block it
        for as long as failures are kept), and one whose job ended otherwise is run again: finished (its vectors
        are missing all the same: a new encoder, or the cache lost them), or stopped or cancelled by an operator
        (rq would keep a round that depends on it waiting for good). A chunk whose job waits or runs is left to
        it. Progress restarts when no chunk of the last encoding waits or runs, before any chunk is queued (a fast
        worker's chunk is counted); else these chunks join it.
        """
        job_ids = [chunk_job_id(project, chunk) for chunk in chunks]
        counted = sorted(job_id.decode() for job_id in self.client.smembers(encoding_chunks_key(project)))
        under_way = self._under_way(counted)
        statuses = self._statuses(job_ids)
        to_run = [
            (job_id, chunk)
            for job_id, chunk, status in zip(job_ids, chunks, statuses, strict=True)
            if status not in WAITING_OR_RUNNING
        ]
        texts_per_chunk = dict(zip(job_ids, map(len, chunks), strict=True))
        again = [job_id for job_id, _ in to_run]
        self._count_in(project, texts_per_chunk, again, restart=not under_way, counted=set(counted))
        for job_id, chunk in to_run:
            if not self._enqueue_chunk(job_id, project, chunk):
                self._run_again(job_id, project, chunk)
        if then_rerank:
            self._enqueue_follow_up(project, sorted(set(job_ids) | under_way), queued_again=bool(to_run))
        return job_ids

    def failures(self, project: str, chunks: list[list[str]], since: float) -> dict[str, str]:
        """{job id: the last line of its error} for each of these chunks whose job failed for good (its retries
        spent; in rq's failed registry) after `since` (a timestamp): what `enqueue` would queue again. Not one
        that failed before: the same texts make the same job id, and rq keeps a failed job for a week."""
        job_ids = [chunk_job_id(project, chunk) for chunk in chunks]
        statuses = self._statuses(job_ids)
        failed = [job_id for job_id, status in zip(job_ids, statuses, strict=True) if status == JobStatus.FAILED]
        jobs = Job.fetch_many(failed, connection=self.client)
        return {
            job.id: last_error(job)
            for job in jobs
            if job is not None and (job.ended_at is None or job.ended_at.timestamp() > since)
        }

    def _under_way(self, job_ids: list[str]) -> set[str]:
        """The chunks whose jobs wait or run (retries included; and one that counted itself done, an instant
        before rq marks it finished)."""
        statuses = self._statuses(job_ids)
        return {job_id for job_id, status in zip(job_ids, statuses, strict=True) if status in WAITING_OR_RUNNING}

    def _not_done(self, project: str) -> list[str]:
        not_done = self.client.sdiff(encoding_chunks_key(project), encoding_done_key(project))
        return sorted(job_id.decode() for job_id in not_done)

    def _statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        """Per job, its status (one pipelined HGET each, without loading the jobs); None for one with no record."""
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "status")
            return [JobStatus(status.decode()) if status else None for status in pipe.execute()]

    def _count_in(
        self, project: str, texts_per_chunk: dict[str, int], again: list[str], restart: bool, counted: set[str]
    ) -> None:
        """Add these chunks to the project's encoding progress (which `counted` already), those to run `again` as
        not done; `restart`: to a new encoding, in place of the last."""
        chunks_key, done_key = encoding_chunks_key(project), encoding_done_key(project)
        new = dict(texts_per_chunk)
        if not restart:
            new = {job_id: n for job_id, n in new.items() if job_id not in counted}
        with self.client.pipeline(transaction=True) as pipe:
            if restart:
                pipe.delete(encoding_key(project), chunks_key, done_key, encoding_runs_key(project))
            elif again:  # their jobs ended, and their vectors are missing: to be done again
                pipe.srem(done_key, *again)
            if new:
                pipe.sadd(chunks_key, *new)
                pipe.hincrby(encoding_key(project), "texts", sum(new.values()))
            pipe.execute()

    def _run_again(self, job_id: str, project: str, chunk: list[str]) -> None:
        """Requeue a chunk whose job exists and is not waiting or running (one that failed for good with its retries
        back: rq's requeue keeps the spent count, and one more fault would fail it for good at once)."""
        status = self.jobs.status(job_id)
        if status == JobStatus.FAILED and job_id in self.queue.failed_job_registry:
            job = Job.fetch(job_id, connection=self.client)
            job.retries_left = RETRY.max
            self.queue.failed_job_registry.requeue(job)
            return
        if status in WAITING_OR_RUNNING:
            return
        with contextlib.suppress(NoSuchJobError):
            Job.fetch(job_id, connection=self.client).delete()
        self._enqueue_chunk(job_id, project, chunk)

    def _enqueue_chunk(self, job_id: str, project: str, chunk: list[str]) -> bool:
        """Queue a chunk's job on the encoding queue; False when a job with its id exists."""
        return self.jobs.enqueue_unique("backend.jobs.encode_chunk", job_id, project, job_id, chunk, queue=self.queue)

    def _enqueue_follow_up(self, project: str, job_ids: list[str], queued_again: bool) -> None:
        """Queue the round that ranks the pool once all these chunks are encoded, unless it already waits."""
        after = hashlib.sha1("\0".join(job_ids).encode()).hexdigest()[:16]
        follow_up = f"rerank-{project}-after-{after}"
        if self.jobs.status(follow_up) == JobStatus.STARTED:  # that round runs, and found these vectors missing
            follow_up += f"-{uuid.uuid4().hex[:8]}"  # a new id: rq would overwrite the running job's record
        self._drop_follow_up(project, unless=follow_up)  # this one ranks the whole pool too, after its chunks
        self.client.set(encoding_follow_up_key(project), follow_up)
        status = self.jobs.status(follow_up)
        # A chunk's job deleted (finished, run again) or expired took its list of dependents with it: the chunk
        # queued afresh would never release a follow-up waiting for it, and every round would wait for it. And
        # one that ended keeps its record's expiry (RESULT_TTL) through rq's writing a new job under its id: the
        # new one would vanish with it, mid-encoding, and no round would follow. Either is queued afresh.
        stale = queued_again and status == JobStatus.DEFERRED
        if stale or status not in WAITING_STATUSES:  # (rq's unique=True refuses dependencies)
            with contextlib.suppress(NoSuchJobError):
                Job.fetch(follow_up, connection=self.client).delete()
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
        statuses = self._statuses(job.dependency_ids)
        running = any(status in WAITING_OR_RUNNING for status in statuses)
        ended_badly = any(status in DEAD_STATUSES for status in statuses)
        if running and not ended_badly:
            return True
        job.delete()
        self.client.delete(encoding_follow_up_key(project))
        return False

    def length(self) -> int:
        """How many chunk jobs wait in the encoding queue (all projects)."""
        return len(self.queue)

    def chunk_done(self, project: str, job_id: str) -> None:
        """Count a chunk of the current encoding done: in the progress /metrics shows, and in its run count."""
        keys = [encoding_chunks_key(project), encoding_done_key(project), encoding_runs_key(project)]
        self._chunk_done(keys=keys, args=[job_id])

    def forget(self, project: str) -> None:
        """Drop the project's encoding (it was deleted in Label Studio): its deferred round, the chunk jobs still
        waiting (a million tasks' chunks would take the workers' next hour, for vectors nothing reads), and its
        progress. A chunk already running ends on its own."""
        self._drop_follow_up(project)
        chunks = sorted(job_id.decode() for job_id in self.client.smembers(encoding_chunks_key(project)))
        statuses = self._statuses(chunks)
        waiting = [job_id for job_id, status in zip(chunks, statuses, strict=True) if status in WAITING_STATUSES]
        for job in Job.fetch_many(waiting, connection=self.client):
            if job is not None:
                job.delete()  # out of the queue (or the scheduled registry, between retries) too
        self.client.delete(
            encoding_key(project),
            encoding_chunks_key(project),
            encoding_done_key(project),
            encoding_runs_key(project),
            encoding_follow_up_key(project),
        )

    def _drop_follow_up(self, project: str, unless: str | None = None) -> None:
        """Delete the round still deferred until the project's chunks are encoded, unless it is `unless`: once its
        key forgets it, nothing else would (rq keeps a deferred job for good, also one whose chunk failed)."""
        follow_up = (self.client.get(encoding_follow_up_key(project)) or b"").decode()
        if follow_up and follow_up != unless and self.jobs.status(follow_up) == JobStatus.DEFERRED:
            with contextlib.suppress(NoSuchJobError):
                Job.fetch(follow_up, connection=self.client).delete()

    def progress(self, project: str) -> dict:
        """The current encoding's chunks, chunks done, chunks whose jobs failed for good (or were stopped or
        cancelled: a round encodes their texts itself, or queues them again) and texts; {} before the first."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.scard(encoding_chunks_key(project))
            pipe.scard(encoding_done_key(project))
            pipe.hget(encoding_key(project), "texts")
            chunks, done, texts = pipe.execute()
        if not chunks:
            return {}
        not_done = self._statuses(self._not_done(project)) if done < chunks else []
        failed = sum(status not in WAITING_OR_RUNNING for status in not_done)
        return {"chunks": chunks, "done": done, "failed": failed, "texts": int(texts or 0)}
