"""The worker process starts over, rather than exiting, when Redis goes away or stops answering in time."""

import redis

from backend import jobs, worker


def test_the_worker_starts_over_when_redis_times_out_or_drops_the_connection(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    failures = [redis.TimeoutError("Timeout reading from socket"), redis.ConnectionError("Connection reset")]
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
