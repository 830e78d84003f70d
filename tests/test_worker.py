"""The worker process: starts over, rather than exiting, when Redis goes away or stops answering in time; keeps
every connected project's reconciliations going."""

import threading
from dataclasses import replace

import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from backend import jobs, reconciliation, worker
from tests.helpers import free_port


def test_the_worker_starts_over_when_redis_times_out_or_drops_the_connection(runtime, monkeypatch):
    # a timeout or a reset at a chosen moment cannot be had from a real Redis without a proxy: the worker class
    # raises them (refused writes, out of memory or read-only, are real in the tests below)
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(worker, "RESTART_SECONDS", 0)
    failures = [redis.TimeoutError("Timeout reading from socket"), redis.ConnectionError("Connection reset by peer")]
    runs = []

    class FlakyWorker:
        def __init__(self, *args, **kwargs):
            pass

        def work(self, **kwargs):
            runs.append(kwargs)
            if failures:
                raise failures.pop(0)

    monkeypatch.setattr(worker, "worker_class_for", lambda device: FlakyWorker)
    worker.main(["--burst", "--no-preload"])  # returns once a run ends normally
    assert len(runs) == 3 and all(run["with_scheduler"] for run in runs)


def test_the_worker_names_its_redis_without_any_of_the_password(runtime, monkeypatch, capfd):
    # a password in the URL's query may hold an "@": the part after it is no host, and no less the password's
    monkeypatch.setattr(jobs, "_runtime", runtime)
    url = "redis://localhost:6379/0?password=ab@cdefgh"
    monkeypatch.setattr(worker.Settings, "from_env_or_exit", lambda: replace(runtime.settings, redis_url=url))

    class IdleWorker:
        def __init__(self, *args, **kwargs):
            pass

        def work(self, **kwargs):
            pass

    monkeypatch.setattr(worker, "worker_class_for", lambda device: IdleWorker)
    worker.main(["--burst", "--no-preload"])
    err = capfd.readouterr().err
    assert "worker listening on redis://localhost:6379/0?password=*** (queues" in err and "cdefgh" not in err


def test_the_worker_starts_over_when_a_real_redis_is_down_at_its_start_and_comes_back(
    settings, tmp_path, monkeypatch, capfd
):
    # Redis restarted (appendonly: the queued job survives): the worker's first start fails to register, it waits
    # for Redis to answer, starts again and takes the job
    from dataclasses import replace

    from backend.runtime import Runtime
    from tests.conftest import RedisServer

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        runtime = Runtime(replace(settings, redis_url=server.url))
        monkeypatch.setattr(jobs, "_runtime", runtime)
        monkeypatch.setattr(worker, "RESTART_SECONDS", 0.5)
        job = runtime.queue.queue.enqueue("os.getpid")
        server.stop()
        restarted = threading.Timer(2.0, server.start)
        restarted.start()
        try:
            worker.main(["--burst", "--no-preload"])  # returns once a run ends normally
        finally:
            restarted.join()
        assert job.get_status(refresh=True) == "finished"
        assert "lost Redis (ConnectionError" in capfd.readouterr().err
    finally:
        server.stop()


def test_the_worker_starts_over_when_a_real_redis_is_out_of_memory(runtime, monkeypatch, capfd):
    # the real fault: Redis under its maxmemory with the noeviction policy refuses every write, rq's registration
    # of the worker's birth first; once memory is freed, the worker started again takes the job
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(worker, "RESTART_SECONDS", 0.5)
    job = runtime.queue.queue.enqueue("os.getpid")
    assert runtime.redis.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    runtime.redis.config_set("maxmemory", 1)  # below what Redis already holds
    freed = threading.Timer(2.0, runtime.redis.config_set, args=("maxmemory", 0))
    freed.start()
    try:
        worker.main(["--burst", "--no-preload"])  # returns once a run ends normally
    finally:
        freed.join()
        runtime.redis.config_set("maxmemory", 0)
    assert job.get_status(refresh=True) == "finished"
    assert "lost Redis (OutOfMemoryError" in capfd.readouterr().err  # (main's logging writes to stderr)


def test_the_worker_starts_over_when_a_real_redis_turns_read_only_after_a_failover(runtime, monkeypatch, capfd):
    # a replica of an unreachable primary refuses writes (READONLY), rq's registration of the worker's birth first;
    # promoted back (REPLICAOF NO ONE), its data kept, the worker started again takes the job
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(worker, "RESTART_SECONDS", 0.5)
    job = runtime.queue.queue.enqueue("os.getpid")
    runtime.redis.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # nothing listens: it keeps its data
    promoted = threading.Timer(2.0, runtime.redis.execute_command, args=("REPLICAOF", "NO", "ONE"))
    promoted.start()
    try:
        worker.main(["--burst", "--no-preload"])  # returns once a run ends normally
    finally:
        promoted.join()
        runtime.redis.execute_command("REPLICAOF", "NO", "ONE")
    assert job.get_status(refresh=True) == "finished"
    assert "lost Redis (ReadOnlyError" in capfd.readouterr().err


def test_the_worker_starts_over_when_rqs_own_loop_quits_on_a_redis_timeout(runtime, monkeypatch):
    # rq's work() catches a Redis timeout (or any error) outside a job, logs "quitting" and returns normally
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(worker, "RESTART_SECONDS", 0)
    stalls = [redis.TimeoutError("Timeout reading from socket")]

    def revive_reconciliations(rt):
        if stalls:
            raise stalls.pop()

    monkeypatch.setattr(reconciliation, "revive_reconciliations", revive_reconciliations)
    runs = []

    class RealWorker(worker.InProcessWorker):
        def work(self, **kwargs):
            runs.append(kwargs)
            if len(runs) > 1:  # started again: stop there, as a SIGTERM would
                self._stop_requested = True
                return False
            return super().work(**kwargs)  # rq's own loop, not in burst mode

    monkeypatch.setattr(worker, "worker_class_for", lambda device: RealWorker)
    worker.main(["--no-preload"])
    assert not stalls and len(runs) == 2, "the worker exited when rq's loop quit"


def test_a_worker_told_to_stop_stops_when_redis_goes_too(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runs = []

    class StoppingWorker:
        def __init__(self, *args, **kwargs):
            self._stop_requested = False

        def work(self, **kwargs):
            assert not runs, "the worker started over after it was told to stop"
            runs.append(kwargs)
            self._stop_requested = True  # rq's own flag, set by its SIGINT/SIGTERM handler
            raise redis.ConnectionError("Connection refused")  # Redis stopped during the warm shut-down

    monkeypatch.setattr(worker, "worker_class_for", lambda device: StoppingWorker)
    worker.main(["--no-preload"])  # without --burst: only a stop returns
    assert len(runs) == 1


def test_a_workers_maintenance_restarts_reconciliations_that_a_failed_one_ended(runtime, monkeypatch):
    from rq.job import Job
    from rq.registry import FinishedJobRegistry, ScheduledJobRegistry

    from backend.adapters.queue import SWEEP_KEY, reconcile_slot

    name_a_label_studio(runtime, monkeypatch)
    monkeypatch.setattr(jobs, "_runtime", runtime)
    for project in ("1", "2", "3"):
        runtime.registry.save_setup(project, "<View/>", {})
    runtime.queue.schedule_reconcile("2", runtime.settings.reconcile_interval)  # alive
    runtime.registry.disconnect("3", "no ML backend connected", runtime.registry.setups("3"))
    # project 1's chain ended: its last reconciliation failed before scheduling the next (Redis away)
    worker.worker_class_for(torch.device("cpu"))([runtime.queue.queue], connection=runtime.redis).work(burst=True)
    scheduled = ScheduledJobRegistry(queue=runtime.queue.queue).get_job_ids()
    by_project = sorted(p for p in ("1", "2", "3") for job_id in scheduled if reconcile_slot(p, job_id) is not None)
    assert by_project == ["1", "2"]  # restarted, left as it was (not doubled), left alone
    # project 3 keeps its records: the maintenance pass also queued the hourly sweep for deleted projects, which ran
    finished = FinishedJobRegistry(queue=runtime.queue.queue).get_job_ids()
    ran = [Job.fetch(job_id, connection=runtime.redis).func_name for job_id in finished]
    assert ran.count("backend.reconciliation.forget_deleted_projects") == 1 and runtime.redis.exists(SWEEP_KEY)


def test_a_stop_signalled_during_the_maintenance_pass_stops_the_worker(runtime, monkeypatch):
    # rq's handler raises StopRequested wherever the signal finds an idle worker, e.g. in the reconciliations'
    # revival, and records nothing else: caught there, the worker would go on waiting for jobs (seen in CI, with
    # Redis killed at the same moment: for ever)
    from rq.exceptions import StopRequested

    def signalled(rt):
        raise StopRequested()

    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(reconciliation, "revive_reconciliations", signalled)
    job = runtime.queue.queue.enqueue("os.getpid")
    worker.ForkingWorker([runtime.queue.queue], connection=runtime.redis).work(burst=True)
    assert job.get_status() == "queued", "the worker went on taking jobs after the stop"


def test_a_worker_waiting_for_redis_stops_when_told_to(runtime, monkeypatch, capsys):
    # Redis went away during a job: the worker waits for it, and a SIGTERM then (rq's handler, still installed,
    # only records it while the worker counts as busy) must end the wait rather than go unheard
    monkeypatch.setattr(jobs, "_runtime", runtime)
    # no client retries: redis-py's default three, with back-off, make each ping to a closed port take ~3 s
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(runtime, "redis", unreachable)
    runs = []

    class WorkerLosingRedisMidJob:
        def __init__(self, *args, **kwargs):
            self._shutdown_requested_date = None

        def work(self, **kwargs):
            runs.append(kwargs)
            threading.Timer(1.0, self.request_stop).start()
            raise redis.ConnectionError("Connection refused")

        def request_stop(self):
            self._shutdown_requested_date = "now"

    monkeypatch.setattr(worker, "worker_class_for", lambda device: WorkerLosingRedisMidJob)
    ended = []

    def run_worker():
        try:
            worker.main(["--no-preload"])
            ended.append("returned")
        except BaseException as error:  # a crash must fail the test, not only end the thread
            ended.append(error)

    waiting = threading.Thread(target=run_worker, daemon=True)
    waiting.start()
    waiting.join(timeout=20)
    assert not waiting.is_alive(), "the worker went on waiting for Redis after it was told to stop"
    assert ended == ["returned"] and len(runs) == 1
    assert "told to stop while waiting to start again" in capsys.readouterr().err  # the worker's log


def name_a_label_studio(runtime, monkeypatch) -> None:
    """Settings with LABEL_STUDIO_URL and _API_KEY (nothing answers there): jobs that need Label Studio run, as
    they do not in a predict-only worker."""
    from dataclasses import replace

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(runtime, "settings", replace(runtime.settings, label_studio_url=url, label_studio_api_key="k"))


def queued_rerank(runtime, retries_left: int) -> str:
    """Queue project 1's round, as a webhook would, with `retries_left` tries after this one; its job id."""
    from rq.job import Job

    runtime.queue.request_rerank("1", "annotation")
    [job_id] = runtime.queue.queue.get_job_ids()
    job = Job.fetch(job_id, connection=runtime.redis)
    job.retries_left = retries_left
    job.save()
    return job_id


def test_a_rounds_work_horse_killed_on_its_last_try_is_recorded_as_a_failed_round(runtime, monkeypatch):
    import os
    import signal

    name_a_label_studio(runtime, monkeypatch)
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(jobs, "rerank", lambda *args: os.kill(os.getpid(), signal.SIGKILL))  # the OOM killer
    queue = runtime.queue.queue
    for retries_left, recorded in ((3, None), (0, "the work-horse running it died (signal 9)")):
        queue.empty()
        runtime.redis.delete("al:rerank:lock:1")  # the killed round's lock, left to expire (RERANK_LOCK_TIMEOUT)
        job_id = queued_rerank(runtime, retries_left)
        worker.ForkingWorker([queue], connection=runtime.redis).work(burst=True)  # the horse dies mid-round
        assert (runtime.registry.failing("1") or {}).get("reason") == recorded  # retried first: nothing yet
    assert job_id in queue.failed_job_registry.get_job_ids()
    assert runtime.registry.failing("1")["rounds"] == 1  # reconciliation backs off from it (test_rerank)


def test_a_round_whose_whole_worker_died_on_its_last_try_is_recorded_when_rq_finds_it_abandoned(runtime, monkeypatch):
    # on a GPU a round runs in the worker process itself: a crash (out of memory) ends the worker, and no hook of
    # it runs; rq's maintenance, in the next worker, finds the job abandoned, retries it or fails it
    import os
    import signal

    name_a_label_studio(runtime, monkeypatch)
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(jobs, "rerank", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
    queue = runtime.queue.queue
    reason = "the worker running it died (rq's maintenance found it abandoned)"
    for retries_left, recorded in ((3, None), (0, reason)):
        queue.empty()
        runtime.redis.delete("al:rerank:lock:1")
        job_id = queued_rerank(runtime, retries_left)
        pid = os.fork()
        if pid == 0:  # the whole worker, which runs the round in its own process
            try:
                worker.InProcessWorker([queue], connection=runtime.redis).work(burst=True)
            finally:
                os._exit(1)  # not reached: the round kills the process
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        registry = queue.started_job_registry
        assert registry.get_job_ids(cleanup=False) == [job_id]  # abandoned: started, by a worker now gone
        runtime.redis.zadd(registry.key, dict.fromkeys(runtime.redis.zrange(registry.key, 0, -1), 1))  # time out
        worker.InProcessWorker([queue], connection=runtime.redis).clean_registries()  # the next worker's maintenance
        assert (runtime.registry.failing("1") or {}).get("reason") == recorded  # retried first: nothing yet
    assert job_id in queue.failed_job_registry.get_job_ids()
    assert runtime.registry.failing("1")["rounds"] == 1


def test_a_child_the_worker_forks_stops_on_sigterm_before_it_has_its_own_handlers():
    # rq's scheduler installs its handlers once it runs; a SIGTERM before that (the worker stopping the scheduler it
    # has just started) must end it, not run the worker's inherited handler, after which rq would wait forever
    import os
    import signal
    import time

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the worker's: flags a stop, no more
    try:
        worker.register_fork_hooks()
        forked, told = os.pipe()
        pid = os.fork()
        if pid == 0:  # a child that has not installed handlers of its own yet
            try:
                os.write(told, b"!")  # the fork hooks have run (they run before fork() returns)
                time.sleep(20)
            finally:
                os._exit(0)
        os.read(forked, 1)
        os.close(forked)
        os.close(told)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        IndexError("tuple index out of range"),  # a bug in recording it
    ],
)
def test_a_killed_work_horses_job_still_fails_when_recording_it_fails(runtime, monkeypatch, error):
    import os
    import signal

    def refused(job, reason):
        raise error

    name_a_label_studio(runtime, monkeypatch)
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(jobs, "rerank", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
    monkeypatch.setattr(jobs, "record_killed_round", refused)
    queue = runtime.queue.queue
    job_id = queued_rerank(runtime, retries_left=0)
    worker.ForkingWorker([queue], connection=runtime.redis).work(burst=True)  # the hook's error does not escape
    assert job_id in queue.failed_job_registry.get_job_ids()  # rq's failure handling ran after the hook


def test_the_worker_takes_other_jobs_before_chunk_jobs_and_leaves_no_job_in_an_intermediate_list(runtime, monkeypatch):
    # a job left in its queue's intermediate list after it ran would be failed by rq's maintenance as "stuck"
    monkeypatch.setattr(jobs, "_runtime", runtime)
    chunk = runtime.encoding.queue.enqueue("os.getpid")  # the encoding queue: taken when nothing else waits
    other = runtime.queue.queue.enqueue("os.getpid")
    worker.main(["--burst", "--no-preload"])  # returns once both queues are empty
    chunk.refresh()
    other.refresh()
    assert chunk.get_status() == other.get_status() == "finished"
    assert other.started_at < chunk.started_at
    assert runtime.queue.queue.intermediate_queue.get_job_ids() == []
    assert runtime.encoding.queue.intermediate_queue.get_job_ids() == []


def test_a_job_whose_worker_dies_before_marking_it_started_is_failed_by_rqs_maintenance_not_lost(runtime):
    import time

    queue = runtime.queue.queue
    job = queue.enqueue("os.getpid")
    taker = worker.InProcessWorker([queue, runtime.encoding.queue], connection=runtime.redis)
    taken, _ = taker.dequeue_job_and_maintain_ttl(timeout=1)
    taker.prepare_execution(taken)  # in the started registry; the worker dies before the job is marked started
    assert job.id in queue.intermediate_queue.get_job_ids()

    queue.started_job_registry.cleanup(timestamp=time.time() + 3600)  # its heartbeat expired: rq drops the entry
    queue.intermediate_queue.cleanup(taker, queue)  # rq's maintenance sees it stuck a first time...
    first_seen = queue.intermediate_queue.get_first_seen_key(job.id)
    runtime.redis.set(first_seen, time.time() - 120)
    queue.intermediate_queue.cleanup(taker, queue)  # ...and, still there a while later, fails it
    assert job.id in queue.failed_job_registry.get_job_ids()


def test_a_job_id_once_seen_stuck_is_not_failed_as_stuck_when_taken_again(runtime, monkeypatch):
    import time

    monkeypatch.setattr(jobs, "_runtime", runtime)
    queue = runtime.queue.queue
    mark = queue.intermediate_queue.get_first_seen_key("connect-1")
    runtime.redis.set(mark, time.time() - 600)  # rq's maintenance found a job of this id stuck, once, long ago
    queue.enqueue("os.getpid", job_id="connect-1")
    taker = worker.InProcessWorker([queue, runtime.encoding.queue], connection=runtime.redis)
    taker.work(burst=True)
    runtime.redis.lpush(queue.intermediate_queue.key, "connect-1")  # the id taken again, not started yet...
    queue.enqueue("os.getpid", job_id="connect-1")
    queue.intermediate_queue.cleanup(taker, queue)  # ...when a maintenance pass runs
    assert "connect-1" not in queue.failed_job_registry.get_job_ids()


def test_a_job_whose_work_horse_died_before_starting_it_is_retried_and_its_retry_not_failed_as_stuck(
    runtime, monkeypatch
):
    import time

    from rq import Retry

    monkeypatch.setattr(jobs, "_runtime", runtime)
    queue = runtime.queue.queue
    job = queue.enqueue("os.getpid", retry=Retry(max=1))
    taker = worker.InProcessWorker([queue, runtime.encoding.queue], connection=runtime.redis)
    taken, _ = taker.dequeue_job_and_maintain_ttl(timeout=1)
    execution = taker.prepare_execution(taken)
    # the work-horse died before it marked the job started: its worker hands it on, as rq does (a retry here)
    taker.handle_job_failure(taken, queue, exc_string="the work-horse died", execution=execution)
    worker.InProcessWorker([queue], connection=runtime.redis).work(burst=True)  # another worker runs the retry
    assert job.get_status(refresh=True) == "finished"

    queue.intermediate_queue.cleanup(taker, queue)  # rq's maintenance, twice, a while apart
    runtime.redis.set(queue.intermediate_queue.get_first_seen_key(job.id), time.time() - 120)
    queue.intermediate_queue.cleanup(taker, queue)
    assert job.get_status(refresh=True) == "finished"
    assert job.id not in queue.failed_job_registry.get_job_ids()


def test_a_predict_only_worker_ends_jobs_that_need_label_studio_at_once_and_revives_them_once_it_can(
    runtime, monkeypatch, caplog
):
    from backend.adapters.queue import reconcile_alive_key, reconcile_job_id

    assert not runtime.settings.label_studio_url and not runtime.settings.label_studio_api_key  # predict-only
    monkeypatch.setattr(jobs, "_runtime", runtime)
    queue = runtime.queue.queue
    runtime.registry.save_setup("1", "<View/>", {})  # a /setup: connected, its set-up and reconciliation queued
    runtime.queue.enqueue_connect("1")
    reconcile = queue.enqueue("backend.reconciliation.reconcile_project", "1", job_id=reconcile_job_id("1", 0))
    with caplog.at_level("WARNING"):
        worker.InProcessWorker([queue, runtime.encoding.queue], connection=runtime.redis).work(burst=True)
    for job in (queue.fetch_job("connect-1"), reconcile):
        assert job.get_status(refresh=True) == "finished"  # not failed, nor retried for minutes
        assert job.return_value()["skipped"].startswith("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set")
    skipped = [r.getMessage().split(": LABEL_STUDIO_URL")[0] for r in caplog.records if r.name == "backend.jobs"]
    assert skipped == ["connect_project('1',) skipped", "reconcile_project('1',) skipped"]  # a line each
    assert queue.scheduled_job_registry.get_job_ids() == []  # the reconciliation did not schedule the next
    runtime.redis.delete(reconcile_alive_key("1"))  # (minutes later)
    assert reconciliation.revive_reconciliations(runtime) == []  # nor does maintenance revive what would be skipped

    name_a_label_studio(runtime, monkeypatch)  # the worker restarted with Label Studio's URL and key
    assert reconciliation.revive_reconciliations(runtime) == ["1"]  # which configures the project and ranks it
