"""Two real RQ workers share one project's encoding job; every chunk is encoded exactly once."""

import threading
import time

import numpy as np
import pytest
import redis
from rq import SimpleWorker, Worker
from rq.exceptions import DequeueTimeout
from rq.job import Job, JobStatus
from rq.worker import WorkerStatus

from backend.adapters.embedding_cache import text_key
from backend.adapters.queue import RETRY, OrderedQueue
from tests.conftest import read_csv
from tests.helpers import chunk_encoded
from tests.processes import BackendProcesses


def test_two_workers_encode_each_chunk_once(runtime, settings, tmp_path):
    texts = [row["text"] for row in read_csv("ag_news/pool.csv", 800)]
    chunks = [texts[i : i + 100] for i in range(0, len(texts), 100)]
    env = {
        "MODEL_NAME": settings.model_name,
        "REDIS_URL": settings.redis_url,
        "QUEUE_NAME": settings.queue_name,
        "MAX_LENGTH": str(settings.max_length),
        "MODEL_DIR": settings.model_dir,
    }
    processes = BackendProcesses(env, tmp_path, port=0)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        for _ in range(2):
            processes.start_worker()
        # both listening (rq marks a worker idle as it starts waiting for jobs, after its scheduler has started)
        # before any chunk is queued, so a worker that starts sooner cannot take every chunk
        deadline = time.time() + 120
        while sum(w.get_state() == WorkerStatus.IDLE for w in Worker.all(queue=runtime.queue.queue)) < 2:
            assert time.time() < deadline, "the workers did not start"
            time.sleep(0.2)
        first = runtime.encoding.enqueue("5", chunks, then_rerank=False)
        second = runtime.encoding.enqueue("5", chunks, then_rerank=False)  # a racing round asks again
        assert first == second and len(set(first)) == 8
        deadline = time.time() + 120
        while runtime.encoding.progress("5")["done"] < len(chunks):
            assert time.time() < deadline, f"{runtime.encoding.progress('5')} of {len(chunks)} chunks done"
            time.sleep(0.2)
    finally:
        processes.stop()
    runs = {k.decode(): int(v) for k, v in client.hgetall("al:encoding:5:runs").items()}
    assert runs == {job_id: 1 for job_id in first}
    completed = {
        f"worker{i}": [
            line.rsplit("(", 1)[1].rstrip(")")
            for line in processes.logs(f"worker{i}", 10**6).splitlines()
            if "Job OK" in line
        ]
        for i in range(2)
    }
    assert sorted(completed["worker0"] + completed["worker1"]) == sorted(first)  # each chunk once, in all
    assert completed["worker0"] and completed["worker1"]  # and the two workers shared the work
    assert runtime.encoding.progress("5") == {"chunks": 8, "done": 8, "failed": 0, "texts": 800}
    cached = runtime.embedding_cache.get_many([text_key(text) for text in texts])
    expected = runtime.encoder.encode(texts)  # the workers stored what this encoder makes of each text
    assert np.allclose(np.stack(cached).astype(np.float32), expected, atol=5e-3)


def test_workers_take_every_other_job_before_a_chunk_job(runtime):
    # a big import into one project queues an hour of chunks on a CPU: rounds of other projects must not wait for it
    runtime.encoding.enqueue("1", [["a"], ["b"]])
    runtime.queue.request_rerank("2", "ANNOTATION_CREATED")
    runtime.queue.enqueue_cleanup("3", "al-v000002")
    taken = [OrderedQueue.dequeue_any(runtime.queues, None, connection=runtime.redis)[0] for _ in range(4)]
    assert [job.func_name for job in taken] == [
        "backend.jobs.rerank_project",
        "backend.jobs.cleanup_versions",
        "backend.jobs.encode_chunk",  # the chunks only when nothing else waits
        "backend.jobs.encode_chunk",
    ]
    assert taken[0].args[0] == "2" and taken[2].args[0] == taken[3].args[0] == "1"
    # each taken as rq takes a job for a worker on one queue: into the queue's intermediate list, from which rq's
    # maintenance recovers a job whose worker died before starting it (popped, it would be in no list: lost)
    assert runtime.queue.queue.intermediate_queue.get_job_ids() == [job.id for job in taken[:2]]
    assert runtime.encoding.queue.intermediate_queue.get_job_ids() == [job.id for job in taken[2:]]


def test_an_idle_worker_takes_a_chunk_job_queued_while_it_waits(runtime):
    with pytest.raises(DequeueTimeout):  # rq's contract: nothing within the timeout
        OrderedQueue.dequeue_any(runtime.queues, 1, connection=runtime.redis)
    queued = threading.Timer(0.3, runtime.encoding.enqueue, args=("1", [["a"]]), kwargs={"then_rerank": False})
    queued.start()
    started = time.monotonic()
    job, queue = OrderedQueue.dequeue_any(runtime.queues, 30, connection=runtime.redis)
    queued.join()
    assert job.func_name == "backend.jobs.encode_chunk" and queue.name == runtime.encoding.queue.name
    assert time.monotonic() - started < 10  # within a poll or two, not at the end of the wait


def test_a_chunk_whose_vectors_could_not_be_stored_fails_so_rq_retries_it(runtime, monkeypatch):
    from backend import jobs

    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.redis.config_set("maxmemory", 1)  # the real fault: Redis full (noeviction) refuses every write
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            jobs.encode_chunk("1", "encode-1-0", ["a text no one encoded yet"])
    finally:
        runtime.redis.config_set("maxmemory", 0)
    assert runtime.encoding.progress("1").get("done", 0) == 0
    assert runtime.embedding_cache.missing([text_key("a text no one encoded yet")])

    def redis_out_of_memory(keys, vectors):  # only the store refused: rq's own writes must go through here
        raise redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(runtime.embedding_cache, "put_many", redis_out_of_memory)
    # run as a job: it fails, and rq schedules it again (5 s later) rather than filing it as failed
    [job_id] = runtime.encoding.enqueue("1", [["a text no one encoded yet"]], then_rerank=False)
    SimpleWorker(runtime.queues, connection=runtime.redis).work(burst=True)
    job = Job.fetch(job_id, connection=runtime.redis)
    assert job.get_status() == JobStatus.SCHEDULED and job.retries_left == RETRY.max - 1
    assert job_id not in runtime.encoding.queue.failed_job_registry.get_job_ids()


def test_gpu_workers_run_jobs_in_process_because_cuda_does_not_survive_a_fork():
    import torch
    from rq import SimpleWorker, Worker

    from backend.worker import worker_class_for

    on_cpu, on_gpu = worker_class_for(torch.device("cpu")), worker_class_for(torch.device("cuda", 0))
    assert issubclass(on_cpu, Worker) and not issubclass(on_cpu, SimpleWorker)  # a work-horse per job, inherited
    assert issubclass(on_gpu, SimpleWorker)


def test_a_round_waiting_for_chunks_is_deleted_once_another_replaces_it_or_the_project_is_forgotten(runtime):
    # rq keeps a deferred job for good: one the project's records no longer name would never be deleted
    from backend.adapters.encoding_jobs import encoding_follow_up_key

    def waiting_round() -> str:
        return runtime.redis.get(encoding_follow_up_key("1")).decode()

    deferred = runtime.queue.queue.deferred_job_registry
    runtime.encoding.enqueue("1", [["a text"], ["another text"]])
    first = waiting_round()
    runtime.encoding.enqueue("1", [["a text"], ["another text"]])  # the same chunks: the same round waits
    assert waiting_round() == first and first in deferred.get_job_ids()
    runtime.encoding.enqueue("1", [["a text"], ["another text"], ["a text imported since"]])
    second = waiting_round()
    assert second != first and deferred.get_job_ids() == [second]
    assert runtime.queue.status(first) is None  # deleted, not only out of the registry
    runtime.encoding.forget("1")  # the project deleted in Label Studio
    assert deferred.get_job_ids() == [] and runtime.queue.status(second) is None


def test_a_chunk_a_worker_finishes_while_the_others_are_queued_is_counted(runtime, monkeypatch):
    queued = runtime.encoding._enqueue_chunk

    def taken_and_done_at_once(job_id, project, chunk):  # an idle GPU worker, faster than the queueing loop
        taken = queued(job_id, project, chunk)
        runtime.encoding.chunk_done(project, job_id)
        return taken

    monkeypatch.setattr(runtime.encoding, "_enqueue_chunk", taken_and_done_at_once)
    runtime.encoding.enqueue("1", [["a text"], ["another", "two"]], then_rerank=False)
    assert runtime.encoding.progress("1") == {"chunks": 2, "done": 2, "failed": 0, "texts": 3}


def test_chunks_queued_during_an_encoding_join_it_and_its_round_waits_for_all(runtime):
    from rq.job import Job

    from backend.adapters.encoding_jobs import encoding_follow_up_key

    first = runtime.encoding.enqueue("1", [["a"], ["b"], ["c"]])
    chunk_encoded(runtime, "1", first[0])
    imported = runtime.encoding.enqueue("1", [["d", "d2"], ["e"]])  # tasks imported meanwhile
    assert runtime.encoding.progress("1") == {"chunks": 5, "done": 1, "failed": 0, "texts": 6}
    follow_up = Job.fetch(runtime.redis.get(encoding_follow_up_key("1")).decode(), connection=runtime.redis)
    # the round waits for the first encoding's chunks still to run too: else it would find their vectors missing,
    # read every task again and encode what those chunks are encoding
    assert sorted(follow_up.dependency_ids) == sorted(first[1:] + imported)


def test_progress_says_when_an_encoding_ended_with_a_chunk_failed_and_starts_again_after_it(runtime):
    from rq.job import Job, JobStatus

    done, failed = runtime.encoding.enqueue("1", [["a"], ["b"]], then_rerank=False)
    chunk_encoded(runtime, "1", done)
    job = Job.fetch(failed, connection=runtime.redis)
    runtime.encoding.queue.remove(job)
    job.set_status(JobStatus.FAILED)  # its texts are encoded by the next round itself (fewer than a chunk)
    assert runtime.encoding.progress("1") == {"chunks": 2, "done": 1, "failed": 1, "texts": 2}
    runtime.encoding.enqueue("1", [["c", "c2"]], then_rerank=False)  # a later import: a new encoding
    assert runtime.encoding.progress("1") == {"chunks": 1, "done": 0, "failed": 0, "texts": 2}


def test_a_forgotten_projects_chunks_still_waiting_are_dropped_and_another_projects_kept(runtime):
    from rq.job import Job

    dropped = runtime.encoding.enqueue("1", [["a"], ["b"]], then_rerank=False)
    kept = runtime.encoding.enqueue("2", [["a"]], then_rerank=False)
    runtime.encoding.forget("1")  # deleted in Label Studio: its chunks would take workers' time for nothing
    assert runtime.encoding.queue.get_job_ids() == kept
    assert not any(Job.exists(job_id, connection=runtime.redis) for job_id in dropped)


def test_a_forgotten_projects_chunk_that_still_runs_leaves_no_progress_behind(runtime):
    (chunk,) = runtime.encoding.enqueue("1", [["a"]])
    runtime.encoding.forget("1")  # deleted in Label Studio while its chunk waits in the queue
    runtime.encoding.chunk_done("1", chunk)
    assert runtime.encoding.progress("1") == {} and runtime.redis.keys("al:encoding:1*") == []


def test_a_chunk_asked_for_again_after_its_job_record_expired_is_waited_for_and_counted_again(runtime, monkeypatch):
    from rq.job import Job, JobStatus

    from backend import jobs
    from backend.adapters.encoding_jobs import encoding_follow_up_key

    monkeypatch.setattr(jobs, "_runtime", runtime)
    a, b = runtime.encoding.enqueue("1", [["a"], ["b"]])
    chunk_encoded(runtime, "1", a)
    # an hour later its record expires (with its list of the jobs waiting for it), and its vectors are evicted
    Job.fetch(a, connection=runtime.redis).delete()
    runtime.encoding.enqueue("1", [["a"]])  # while b still waits
    assert runtime.encoding.progress("1") == {"chunks": 2, "done": 0, "failed": 0, "texts": 2}
    follow_up = runtime.redis.get(encoding_follow_up_key("1")).decode()
    assert sorted(Job.fetch(follow_up, connection=runtime.redis).dependency_ids) == sorted([a, b])
    SimpleWorker(runtime.queues, connection=runtime.redis).work(burst=True, max_jobs=2)  # b, then a
    assert runtime.encoding.progress("1") == {"chunks": 2, "done": 2, "failed": 0, "texts": 2}
    assert runtime.queue.status(follow_up) == JobStatus.QUEUED  # released by the last of its chunks


def test_the_round_after_an_encoding_that_asks_for_the_same_chunks_again_gets_a_new_follow_up(runtime):
    from rq.job import Job, JobStatus

    from backend.adapters.encoding_jobs import encoding_follow_up_key

    (chunk,) = runtime.encoding.enqueue("1", [["a"]])
    running = Job.fetch(runtime.redis.get(encoding_follow_up_key("1")).decode(), connection=runtime.redis)
    running.set_status(JobStatus.STARTED)  # the follow-up runs, and finds the chunk's vectors evicted meanwhile
    runtime.encoding.enqueue("1", [["a"]])
    follow_up = runtime.redis.get(encoding_follow_up_key("1")).decode()
    assert follow_up.startswith(running.id + "-") and Job.fetch(follow_up, connection=runtime.redis).dependency_ids == [
        chunk
    ]
    assert runtime.queue.status(running.id) == JobStatus.STARTED  # its record is not overwritten by the new one


def test_a_follow_up_asked_for_again_after_it_ran_does_not_expire_with_its_finished_record(runtime):
    from backend.adapters.encoding_jobs import encoding_follow_up_key

    (chunk,) = runtime.encoding.enqueue("1", [["a"]])
    follow_up = runtime.redis.get(encoding_follow_up_key("1")).decode()
    runtime.encoding.queue.remove(chunk)
    for job_id in (chunk, follow_up):  # both ran, and rq keeps their records for an hour (RESULT_TTL)
        Job.fetch(job_id, connection=runtime.redis).set_status(JobStatus.FINISHED)
        runtime.redis.expire(Job.key_for(job_id), 3600)
    runtime.encoding.enqueue("1", [["a"]])  # a new encoder: the same texts, the same chunk, the same follow-up
    assert runtime.redis.get(encoding_follow_up_key("1")).decode() == follow_up
    assert runtime.queue.status(follow_up) == JobStatus.DEFERRED
    assert runtime.redis.ttl(Job.key_for(follow_up)) == -1  # an encoding longer than an hour still ends in a round
    assert Job.fetch(follow_up, connection=runtime.redis).dependency_ids == [chunk]


def test_a_chunk_that_counted_itself_done_as_a_round_asks_for_it_again_stays_done_and_runs_once(runtime):
    from rq.job import Job, JobStatus

    (chunk,) = runtime.encoding.enqueue("1", [["a"]], then_rerank=False)
    job = Job.fetch(chunk, connection=runtime.redis)
    runtime.encoding.queue.remove(job)
    job.set_status(JobStatus.STARTED)
    runtime.encoding.chunk_done("1", chunk)  # its vectors stored, an instant before rq marks it finished
    runtime.encoding.enqueue("1", [["a"]], then_rerank=False)  # a round that read the cache an instant before
    assert runtime.encoding.progress("1") == {"chunks": 1, "done": 1, "failed": 0, "texts": 1}
    assert runtime.encoding.queue.get_job_ids() == []  # not queued a second time


def test_a_chunk_that_failed_before_the_given_time_is_not_reported_as_failing_now(runtime):
    # the same texts make the same job id, and rq keeps a failed job for a week: a failure from before the last
    # round that ranked (which encoded those texts itself) is not this encoding's
    from datetime import UTC, datetime, timedelta

    (chunk,) = runtime.encoding.enqueue("1", [["a"]], then_rerank=False)
    job = Job.fetch(chunk, connection=runtime.redis)
    runtime.encoding.queue.remove(job)
    failed_at = datetime.now(UTC) - timedelta(days=3)
    job.ended_at = failed_at
    job.save()
    job.set_status(JobStatus.FAILED)
    assert list(runtime.encoding.failures("1", [["a"], ["b"]], since=failed_at.timestamp() - 1)) == [chunk]
    assert runtime.encoding.failures("1", [["a"], ["b"]], since=failed_at.timestamp() + 1) == {}
