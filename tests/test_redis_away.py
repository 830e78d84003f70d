"""With Redis away: /predict and /setup keep answering, /webhook says 503 with the reason, nothing crashes."""

from dataclasses import replace

import pytest

from backend.api import create_app
from backend.runtime import Runtime
from tests.conftest import AG_NEWS_LABELS
from tests.helpers import free_port
from tests.test_api import ls_task, predict_payload, setup_payload


@pytest.fixture()
def client_without_redis(settings):
    runtime = Runtime(replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens
    return create_app(runtime).test_client()


def test_predict_keeps_answering_with_the_answers_it_gives_with_redis(client_without_redis, client):
    # encoded in the process instead of read from the cache: the same answers, not zero vectors' uniform ones
    tasks = [ls_task(1, "Stocks rallied as the central bank cut rates"), ls_task(2, "The striker scored twice")]
    response = client_without_redis.post("/predict", json=predict_payload(tasks))
    assert response.status_code == 200
    away = response.json["results"]
    with_redis = client.post("/predict", json=predict_payload(tasks)).json["results"]
    choices = [result["result"][0]["value"]["choices"] for result in away]
    assert choices == [result["result"][0]["value"]["choices"] for result in with_redis]
    assert all(choice in AG_NEWS_LABELS for (choice,) in choices)
    assert [result["score"] for result in away] == pytest.approx([r["score"] for r in with_redis], abs=2e-3)
    assert len({result["score"] for result in away}) == 2  # two texts, two confidences: not the same zero vector


def test_setup_keeps_answering(client_without_redis):
    response = client_without_redis.post("/setup", json=setup_payload())
    assert response.status_code == 200
    # Label Studio reads the model version from the answer (it is what "Retrieve Predictions" compares against)
    assert response.json["model_version"].startswith("al-") and response.json["model_version"].endswith("-predict")


def test_webhook_is_a_503_that_names_redis(client_without_redis):
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}}
    response = client_without_redis.post("/webhook", json=event)
    assert response.status_code == 503
    assert "Redis is unavailable" in response.json["message"]
    assert "reconciliation" in response.json["message"]  # the event is not lost
    assert "Start Training" in response.json["message"]  # except a click on it: it changes nothing to see
    # Label Studio shows its user only the reason phrase of the answer to a Start Training click
    assert response.status == "503 " + response.json["message"]


def test_webhook_without_reconciliation_says_the_event_is_lost(settings):
    runtime = Runtime(replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0", reconcile_interval=0))
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}}
    response = create_app(runtime).test_client().post("/webhook", json=event)
    assert response.status_code == 503
    assert "reconciliation is off (RECONCILE_INTERVAL=0): this event is lost" in response.json["message"]


def test_metrics_is_a_503_that_promises_nothing_about_events(client_without_redis):
    response = client_without_redis.get("/metrics")
    assert response.status_code == 503
    assert response.json["message"] == "Redis is unavailable; try again once Redis is back"
