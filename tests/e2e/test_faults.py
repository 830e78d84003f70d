"""Faults against real processes: each ends with the ranking reflecting every annotation."""

import time
from collections import Counter

import pytest

from tests.conftest import RedisServer
from tests.e2e.fixtures import annotate, start_backend

pytestmark = pytest.mark.e2e
FAST_RECOVERY = {"RECONCILE_INTERVAL": "3", "RERANK_LOCK_TIMEOUT": "8"}


def live_ranking_is_whole(ls, project_id: int, expected: int) -> None:
    """The version Label Studio serves from carries a complete ranking, never part of one."""
    version = ls.get_project(project_id)["model_version"]
    counts = Counter(p["model_version"] for p in ls.predictions(project_id))
    assert counts[version] == expected, f"live version {version!r} has {counts[version]} of {expected} predictions"


@pytest.mark.parametrize("backend", [FAST_RECOVERY], indirect=True)
def test_worker_killed_mid_round(backend, project):
    ls, project_id, truth = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    cold = backend.wait_for_round(project_id, annotations=0)
    top = cold["top_task"]
    annotate(ls, top, truth[top])
    time.sleep(0.4)  # the round for this annotation is under way
    backend.kill_worker(0)
    live_ranking_is_whole(ls, project_id, cold["ranked"])

    backend.start_worker()  # the lost round is redone: reconciliation notices the unreflected annotation
    last = backend.wait_for_round(project_id, annotations=1, timeout=120)
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
        for task_id in task_ids[:5]:
            annotate(ls, task_id, truth[task_id])
        redis_server.stop(kill=True)
        for task_id in task_ids[5:]:  # webhooks now fail: the backend answers 503, Label Studio drops them
            annotate(ls, task_id, truth[task_id])
        time.sleep(2)
        redis_server.start()
        last = backend.wait_for_round(project_id, annotations=10, timeout=180)
        assert last["top_task"] not in task_ids
        assert ls.get_project(project_id)["model_version"] == last["model_version"]
        assert all(worker.poll() is None for worker in backend.workers), "a worker died with Redis"
    finally:
        backend.stop()
        redis_server.stop()
