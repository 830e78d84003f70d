"""Faults against real processes: each ends with the ranking reflecting every annotation."""

import os
import signal
import time
from collections import Counter

import pytest
import redis
import requests
from rq import Queue
from rq.registry import StartedJobRegistry

from tests.conftest import AG_NEWS_CONFIG, AG_NEWS_LABELS, RedisServer
from tests.e2e.fixtures import annotate, start_backend, wait_until

pytestmark = pytest.mark.e2e
FAST_RECOVERY = {"RECONCILE_INTERVAL": "3", "RERANK_LOCK_TIMEOUT": "8"}


def live_ranking_is_whole(ls, project_id: int, expected: int) -> None:
    """The version Label Studio serves from carries a complete ranking, never part of one."""
    version = ls.get_project(project_id)["model_version"]
    counts = Counter(p["model_version"] for p in ls.predictions(project_id))
    assert counts[version] == expected, f"live version {version!r} has {counts[version]} of {expected} predictions"


@pytest.mark.parametrize("backend", [FAST_RECOVERY], indirect=True)
def test_worker_killed_mid_round(backend, project, redis_url):
    ls, project_id, truth = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    cold = backend.wait_for_round(project_id, annotations=0)
    top = cold["top_task"]
    started = StartedJobRegistry(backend.env["QUEUE_NAME"], connection=redis.Redis.from_url(redis_url))
    annotate(ls, top, truth[top])
    deadline = time.time() + 30
    while not any(job_id.startswith(f"rerank-{project_id}-") for job_id in started.get_job_ids()):
        assert time.time() < deadline, "the round for the annotation never started"
        time.sleep(0.01)
    os.killpg(backend.workers[0].pid, signal.SIGSTOP)  # hold it mid-round, so the round cannot finish meanwhile
    backend.kill_worker(0)  # while that round runs (SIGKILL ends stopped processes too)
    assert backend.last_round(project_id)["annotations"] == 0, "the round finished before the kill"
    live_ranking_is_whole(ls, project_id, cold["ranked"])

    # The lost round is redone: once the new worker holds rq's scheduler lock (the dead one's expires after
    # 61 s; workers retry each minute), reconciliation notices the unreflected annotation, and the stalled job
    # no longer swallows the request.
    backend.start_worker()
    last = backend.wait_for_round(project_id, annotations=1, timeout=360)  # ~80-125 s seen: slack for a slow CI
    assert ls.get_project(project_id)["model_version"] == last["model_version"]
    live_ranking_is_whole(ls, project_id, last["ranked"])
    assert ls.next_task(project_id)["id"] == last["top_task"]


def test_redis_killed_and_restarted_during_a_burst(label_studio, project, tmp_path):
    ls, project_id, truth = project
    (tmp_path / "redis").mkdir()
    redis_server = RedisServer(tmp_path / "redis")  # appendonly: what Redis had survives the restart
    redis_server.start()
    backend = start_backend(label_studio, redis_server.url, tmp_path, **FAST_RECOVERY)
    try:
        ls.connect_ml_backend(project_id, backend.url, "al-backend")
        backend.wait_for_round(project_id, annotations=0)
        task_ids = [t for t in truth if t != backend.last_round(project_id)["top_task"]][:10]
        worker = backend.workers[0]
        os.killpg(worker.pid, signal.SIGSTOP)  # hold the worker: the round for the first five is queued, not done
        try:
            for task_id in task_ids[:5]:
                annotate(ls, task_id, truth[task_id])
            assert backend.last_round(project_id)["annotations"] == 0
            redis_server.stop(kill=True)
        finally:
            os.killpg(worker.pid, signal.SIGCONT)  # it wakes to a Redis that is gone
        for task_id in task_ids[5:]:  # webhooks now fail: the backend answers 503, Label Studio drops them
            annotate(ls, task_id, truth[task_id])
        outage_began = time.monotonic()
        # /predict answers without Redis: the model files are on disk, a text not in the cache is encoded here
        predicted = requests.post(backend.url + "/predict", json=predict_body(project_id, "Rates rose."), timeout=30)
        assert predicted.status_code == 200, predicted.text
        (result,) = predicted.json()["results"]
        assert result["result"][0]["value"]["choices"][0] in AG_NEWS_LABELS and 0 <= result["score"] <= 1
        time.sleep(max(0.0, 2 - (time.monotonic() - outage_began)))  # an outage of 2 s at least
        redis_server.start()
        last = backend.wait_for_round(project_id, annotations=10, timeout=180)
        assert last["top_task"] not in task_ids
        assert ls.get_project(project_id)["model_version"] == last["model_version"]
        assert all(worker.poll() is None for worker in backend.workers), "a worker died with Redis"
    finally:
        backend.stop()
        redis_server.stop()


def test_label_studio_stopped_and_started(backend, project, label_studio, redis_url):
    """The round for an annotation starts while Label Studio is down: it fails, rq retries it with back-off, the
    earlier ranking stays live, and once Label Studio is back the retry publishes a ranking with the annotation.
    Reconciliation is off here (RECONCILE_INTERVAL=3600), so only rq's retries can recover the round."""
    ls, project_id, truth = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    cold = backend.wait_for_round(project_id, annotations=0)
    queue = Queue(backend.env["QUEUE_NAME"], connection=redis.Redis.from_url(redis_url))

    worker = backend.workers[0]
    os.killpg(worker.pid, signal.SIGSTOP)  # hold the worker, so the round below starts with Label Studio down
    try:
        annotate(ls, cold["top_task"], truth[cold["top_task"]])  # the webhook queues the round
        label_studio.stop()
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    try:
        # the reconciliation scheduled at connection sits in the same registry: only the round's own id counts
        rerank_retry = f"rerank-{project_id}-"
        wait_until(
            lambda: any(job_id.startswith(rerank_retry) for job_id in queue.scheduled_job_registry.get_job_ids()),
            "a re-rank scheduled for a retry",
            60,
        )
        health = requests.get(backend.url + "/health", timeout=5)
        predicted = requests.post(backend.url + "/predict", json=predict_body(project_id, "Stocks fell."), timeout=30)
        assert health.status_code == 200 and predicted.status_code == 200, (health.text, predicted.text)
        (result,) = predicted.json()["results"]
        assert result["result"][0]["value"]["choices"][0] in AG_NEWS_LABELS and 0 <= result["score"] <= 1
    finally:
        label_studio.restart()

    live = ls.get_project(project_id)["model_version"]
    assert live.startswith("al-"), f"the project's model version was reset while Label Studio was down: {live!r}"
    last = backend.wait_for_round(project_id, annotations=1, timeout=180)
    assert ls.get_project(project_id)["model_version"] == last["model_version"]
    live_ranking_is_whole(ls, project_id, last["ranked"])
    assert ls.next_task(project_id)["id"] == last["top_task"] != cold["top_task"]
    assert len(queue.failed_job_registry) == 0, "the retried round should have succeeded, not failed for good"


def predict_body(project_id: int, text: str) -> dict:
    """A /predict request as Label Studio 1.23 posts it, for one task."""
    task = {"id": 1, "data": {"text": text}, "annotations": [], "predictions": []}
    return {"tasks": [task], "project": f"{project_id}.0", "label_config": AG_NEWS_CONFIG, "params": {"context": None}}
