"""Fixtures of the loop, auth and fault tests: the backend's processes, a project, secrets checks.

Kept apart from conftest.py (which provides the session's `label_studio`); test modules import them.
"""

import time

import pytest

from backend.adapters.label_studio import LabelStudio
from tests.conftest import AG_NEWS_CONFIG, read_csv
from tests.helpers import choices_result, free_port
from tests.processes import BackendProcesses

N_TASKS = 300


def start_backend(label_studio, redis_url: str, tmp_path, **overrides) -> BackendProcesses:
    """Backend server + one worker, on the real default model, talking to `label_studio`."""
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(tmp_path / "models"),
        "RECONCILE_INTERVAL": "3600",
        "QUEUE_NAME": f"e2e-{free_port()}",
        "LOG_LEVEL": "DEBUG",
        **overrides,
    }
    processes = BackendProcesses(env, tmp_path, free_port())
    processes.start_server()
    processes.start_worker()
    return processes


@pytest.fixture()
def backend(request, label_studio, redis_url, tmp_path):
    """Parametrize indirectly with a dict of environment overrides (default: reconciliation effectively off)."""
    processes = start_backend(label_studio, redis_url, tmp_path, **getattr(request, "param", {}))
    yield processes
    processes.stop()


@pytest.fixture()
def project(label_studio):
    """A project of N_TASKS AG News pool texts, with the true label kept per task id for annotating."""
    ls = LabelStudio(label_studio.url, label_studio.token)
    created = ls.create_project(f"loop-{time.time():.0f}", AG_NEWS_CONFIG)
    rows = read_csv("ag_news/pool.csv", N_TASKS)
    ls.import_tasks(created["id"], [{"text": row["text"]} for row in rows])
    truth = {
        task["id"]: rows[i]["label"]
        for i, task in enumerate(sorted(ls.iter_tasks(created["id"]), key=lambda t: t["id"]))
    }
    return ls, created["id"], truth


def annotate(ls: LabelStudio, task_id: int, label: str) -> None:
    ls.create_annotation(task_id, choices_result(label))


@pytest.fixture()
def secrets_never_logged(backend, label_studio):
    """After the test: neither the API key nor the basic-auth password appears in any backend log."""
    yield
    logs = backend.all_logs()
    assert logs, "no logs to check"
    for secret in (label_studio.token, backend.env.get("BASIC_AUTH_PASS")):
        if secret:
            assert secret not in logs


def wait_until(condition, what: str, timeout: float) -> None:
    """Poll `condition` every 0.2 s until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
