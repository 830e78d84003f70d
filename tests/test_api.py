"""Protocol round trips through Flask's test client, with Label Studio 1.23 payload shapes."""

import base64
import io
import json
import re
import time
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
import redis
from rq import Queue
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.utils import now

from backend import reconciliation
from backend.adapters.queue import reconcile_alive_key
from backend.protocol import SetupRequest
from backend.runtime import Runtime
from tests.conftest import AG_NEWS_CONFIG, AG_NEWS_LABELS, ROUTES

TEXTS = ["Stocks fell sharply on Wall Street", "The striker scored twice in the final", "A new chip from Intel"]


def ls_task(task_id: int, text: str) -> dict:
    """A task as Label Studio 1.23 posts it to /predict."""
    return {
        "id": task_id,
        "data": {"text": text},
        "meta": {},
        "created_at": "2026-11-23T10:00:00.000000Z",
        "updated_at": "2026-11-23T10:00:00.000000Z",
        "is_labeled": False,
        "overlap": 1,
        "inner_id": task_id,
        "total_annotations": 0,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "project": 3,
        "annotations": [],
        "predictions": [],
        "drafts": [],
    }


def setup_payload(schema: str = AG_NEWS_CONFIG) -> dict:
    return {
        "project": "3.1732356000",
        "schema": schema,
        "hostname": "http://localhost:8080",
        "access_token": "",
        "model_version": "al-backend",
        "extra_params": "",
    }


def predict_payload(tasks: list[dict], config: str = AG_NEWS_CONFIG) -> dict:
    return {"tasks": tasks, "project": "3.1732356000", "label_config": config, "params": {"context": None}}


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json["status"] == "UP"


def test_setup_records_the_project_and_queues_its_connection(client, redis_url, settings):
    response = client.post("/setup", json=setup_payload())
    assert response.status_code == 200
    assert response.json["model_version"].startswith("al-")
    queue = Queue(settings.queue_name, connection=redis.Redis.from_url(redis_url))
    assert queue.job_ids == ["connect-3"]
    client.post("/setup", json=setup_payload())  # Label Studio calls /setup before every /predict
    assert queue.job_ids == ["connect-3"]
    # another project under id 3 (a Label Studio on a new database): its uid's creation time differs
    client.post("/setup", json=setup_payload() | {"project": "3.1800000000"})
    assert queue.job_ids == ["connect-3", "anew-3-1800000000"]
    client.post("/setup", json=setup_payload() | {"project": 3})  # a bare id tells nothing either way
    assert queue.job_ids == ["connect-3", "anew-3-1800000000"]


def test_a_config_with_two_choices_is_served_by_one_and_the_log_says_which_once(client, caplog):
    two = AG_NEWS_CONFIG.replace(
        "</View>", '<Choices name="tone" toName="text"><Choice value="Calm"/><Choice value="Angry"/></Choices></View>'
    )
    with caplog.at_level("WARNING", logger="backend"):
        assert client.post("/setup", json=setup_payload(two)).status_code == 200
        client.post("/setup", json=setup_payload(two))  # before every /predict: not logged again
        client.post("/setup", json=setup_payload(two.replace("Angry", "Upset")))  # the config edited: again
    logged = [record.getMessage() for record in caplog.records if "get(s) no predictions" in record.getMessage()]
    assert len(logged) == 2
    assert "predicting and ranking by <Choices name='topic'> only; <Choices name='tone'>" in logged[0]
    (result,) = client.post("/predict", json=predict_payload([{"id": 1, "data": {"text": "goal"}}], two)).json[
        "results"
    ]
    assert {region["from_name"] for region in result["result"]} == {"topic"}


def test_setup_restarts_a_reconciliation_chain_that_broke(client, redis_url, settings):
    from rq.job import Job
    from rq.registry import ScheduledJobRegistry

    from backend.adapters.queue import FAILURE_TTL

    client.post("/setup", json=setup_payload())
    scheduled = ScheduledJobRegistry(settings.queue_name, connection=redis.Redis.from_url(redis_url))
    (first,) = scheduled.get_job_ids()
    assert first.startswith("reconcile-3-")
    job = Job.fetch(first, connection=redis.Redis.from_url(redis_url))
    # superseded a minute later: a failed one stays an hour (ten intervals if longer), not a week as a round does
    assert job.failure_ttl == max(3600, 10 * settings.reconcile_interval) < FAILURE_TTL
    client.post("/setup", json=setup_payload())
    assert scheduled.get_job_ids() == [first]  # alive: nothing more
    scheduled.remove(first, delete_job=True)  # the chain broke (say Redis was away when it rescheduled)
    redis.Redis.from_url(redis_url).delete("al:reconcile:alive:3")
    client.post("/setup", json=setup_payload())
    (restarted,) = scheduled.get_job_ids()
    assert restarted.startswith("reconcile-3-")


def test_a_disconnected_project_is_left_alone_until_connected_again(client, runtime, redis_url, settings):
    queue = Queue(settings.queue_name, connection=redis.Redis.from_url(redis_url))
    client.post("/setup", json=setup_payload())
    connect = queue.fetch_job("connect-3")
    queue.remove(connect)
    connect.set_status(JobStatus.FINISHED)  # as if it had run: its id stays taken while rq keeps its result
    runtime.registry.disconnect("3", "project 3 has no ML backend connected any more", runtime.registry.setups("3"))

    # Label Studio keeps a removed backend's webhook: its events are acknowledged and change nothing
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}, "task": {"id": 5}}
    answer = client.post("/webhook", json=event)
    assert answer.status_code == 201 and answer.json["rerank"] == "not needed" and answer.json["disconnected"]
    assert queue.job_ids == []
    metrics = client.get("/metrics").json
    assert "3" not in metrics["projects"] and "no ML backend" in metrics["disconnected"]["3"]["reason"]

    client.post("/setup", json=setup_payload())  # connected again (in the project's Model settings)
    assert queue.job_ids == ["connect-3"]  # configured and ranked again, though an earlier connect job exists
    assert client.post("/webhook", json=event).json["rerank"] in ("enqueued", "coalesced")
    assert client.get("/metrics").json["disconnected"] == {}


def zero_shot_probabilities(runtime, config: str, texts: list[str]) -> np.ndarray:
    """What the zero-shot head (no annotations yet) gives `texts`, from embeddings as the cache keeps them (fp16)."""
    from backend.label_config import parse_label_config
    from backend.services.train import zero_shot_artifact

    head = zero_shot_artifact(parse_label_config(config), runtime.encoder, None).head
    return head.predict_proba(runtime.encoder.encode(texts).astype(np.float16).astype(np.float32))


def test_predict_returns_one_valid_prediction_per_task_in_order(client, runtime):
    tasks = [ls_task(i, text) for i, text in enumerate(TEXTS, start=10)]
    response = client.post("/predict", json=predict_payload(tasks))
    assert response.status_code == 200
    results = response.json["results"]
    probs = zero_shot_probabilities(runtime, AG_NEWS_CONFIG, TEXTS)
    for result, p in zip(results, probs, strict=True):
        (region,) = result["result"]
        assert region["from_name"] == "topic" and region["to_name"] == "text" and region["type"] == "choices"
        assert region["value"]["choices"] == [AG_NEWS_LABELS[int(np.argmax(p))]]  # the most likely label
        assert result["score"] == pytest.approx(p.max(), abs=1e-4)  # its probability: >= 1/4 of a 4-way softmax
        assert re.fullmatch(r"al-zero-shot-[0-9a-f]{8}-predict", result["model_version"])  # never a ranking's
    single = client.post("/predict", json=predict_payload([tasks[1]])).json["results"][0]
    assert single["result"] == results[1]["result"]
    assert single["score"] == pytest.approx(results[1]["score"], abs=1e-5)


def test_a_predict_slower_than_label_studio_waits_says_so_in_the_log(client, monkeypatch, caplog):
    # Label Studio drops an answer after ML_TIMEOUT_PREDICT (100 s) with nothing stored and asks no more: the log
    # is where a user can learn why Retrieve Predictions "retrieved" nothing
    from backend import api

    caplog.set_level("INFO", logger="backend")
    tasks = [ls_task(i, text) for i, text in enumerate(TEXTS)]
    client.post("/predict", json=predict_payload(tasks))
    assert "predicted 3 tasks in" in caplog.text and "longer than Label Studio waits" not in caplog.text
    monkeypatch.setattr(api, "LABEL_STUDIO_PREDICT_WAIT", 0.0)
    client.post("/predict", json=predict_payload(tasks))
    assert "longer than Label Studio waits by default (ML_TIMEOUT_PREDICT=0 s)" in caplog.text
    assert "probably stored none of these 3 predictions" in caplog.text


def test_zero_shot_gives_each_text_the_label_whose_hint_it_is(client):
    # an independent check of the zero-shot direction: a text is most similar to itself, so when every choice's
    # hint is one of the texts, each text must get the choice it is the hint of (a head that ranked the labels
    # backwards, or ignored the hints, would not)
    choices = "".join(f'<Choice value="L{i}" hint="{text}"/>' for i, text in enumerate(TEXTS))
    config = f'<View><Text name="text" value="$text"/><Choices name="c" toName="text">{choices}</Choices></View>'
    tasks = [ls_task(i, text) for i, text in enumerate(TEXTS)]
    results = client.post("/predict", json=predict_payload(tasks, config)).json["results"]
    assert [result["result"][0]["value"]["choices"] for result in results] == [["L0"], ["L1"], ["L2"]]


def test_zero_shot_predictions_of_an_edited_config_carry_another_model_version(client):
    # Label Studio's "Retrieve Predictions" skips tasks that hold a prediction of the version /setup answers:
    # after a label is renamed, or the Choices or Text renamed, or the text read from another field, the old
    # config's zero-shot predictions (other labels, a from_name/to_name the editor no longer has, another text)
    # must not pass for current ones
    edits = {
        "label renamed": ('value="Sports"', 'value="Sport"'),
        "choices renamed": ('name="topic"', 'name="category"'),
        "text renamed": ('<Text name="text"', '<Text name="body"'),
        "other field": ('value="$text"', 'value="$summary"'),
    }
    configs = {"before": AG_NEWS_CONFIG} | {name: AG_NEWS_CONFIG.replace(*edit) for name, edit in edits.items()}
    configs["text renamed"] = configs["text renamed"].replace('toName="text"', 'toName="body"')
    configs["again"] = AG_NEWS_CONFIG
    versions = {}
    for name, config in configs.items():
        answered = client.post("/setup", json=setup_payload(config)).json["model_version"]
        task = {"id": 1, "data": {"text": TEXTS[0], "summary": TEXTS[1]}}
        (predicted,) = client.post("/predict", json=predict_payload([task], config)).json["results"]
        assert predicted["model_version"] == answered
        versions[name] = answered
    assert len({versions[name] for name in ("before", *edits)}) == 1 + len(edits)
    assert versions["again"] == versions["before"]


def test_predict_multi_label_chooses_each_label_above_one_half_and_scores_the_mean_certainty(client, runtime):
    config = AG_NEWS_CONFIG.replace('choice="single"', 'choice="multiple"')
    results = client.post("/predict", json=predict_payload([ls_task(i, t) for i, t in enumerate(TEXTS)], config))
    probs = zero_shot_probabilities(runtime, config, TEXTS)
    for result, p in zip(results.json["results"], probs, strict=True):
        chosen = result["result"][0]["value"]["choices"] if result["result"] else []
        assert chosen == [label for label, p_j in zip(AG_NEWS_LABELS, p, strict=True) if p_j >= 0.5]
        assert result["score"] == pytest.approx(np.maximum(p, 1 - p).mean(), abs=1e-4)
    assert any(result["result"] for result in results.json["results"])  # the case of labels chosen is exercised


def test_a_task_without_the_text_field_gets_an_empty_prediction_not_an_error(client, caplog):
    tasks = [ls_task(1, TEXTS[0]), {"id": 2, "data": {"other": "x"}}, ls_task(3, "  ")]
    with caplog.at_level("WARNING", logger="backend"):
        results = client.post("/predict", json=predict_payload(tasks)).json["results"]
    assert results[0]["result"] and results[1]["result"] == [] and results[2] == results[1]
    assert results[0]["score"] > 0 and results[1]["score"] is None  # no text, no confidence (not the lowest)
    (logged,) = [record.getMessage() for record in caplog.records if "cannot predict" in record.getMessage()]
    assert "cannot predict 2 of 3 tasks, e.g. task 2 has no data['text']" in logged  # one line, however many


def test_a_lone_surrogate_in_a_text_is_predicted_not_a_500(client):
    # JSON may escape a lone surrogate ("\\ud800"); the tokenizer refuses such a str, UTF-8 cannot hold it.
    body = '{"tasks": [{"id": 1, "data": {"text": "Stocks \\ud800 fall"}}, {"id": 2, "data": {"text": "Goal!"}}], '
    body += '"label_config": ' + json.dumps(AG_NEWS_CONFIG) + "}"
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 2
    assert all(result["result"][0]["value"]["choices"][0] in AG_NEWS_LABELS for result in results)


@pytest.mark.parametrize("route", ["/setup", "/predict"])
def test_unsupported_config_is_a_422_naming_supported_tags(client, route):
    image = (
        '<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i"><Label value="a"/>'
        "</RectangleLabels></View>"
    )
    body = setup_payload(image) if route == "/setup" else predict_payload([ls_task(1, "x")], image)
    response = client.post(route, json=body)
    assert response.status_code == 422
    assert "RectangleLabels" in response.json["message"] and "<Choices>" in response.json["message"]
    # all of it Label Studio keeps is requests' "422 Client Error: <reason phrase> for url": the message is there
    assert response.status == "422 " + " ".join(response.json["message"].split())[:300]


def test_a_config_refused_for_several_reasons_names_the_supported_tags_within_the_reason_phrase(client):
    per_region = '<Choices name="{}" toName="t" perRegion="true"><Choice value="a"/><Choice value="b"/></Choices>'
    config = (
        '<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="X"/></Labels>'
        + per_region.format("sentiment_per_region")
        + per_region.format("another_per_region")
        + "</View>"
    )
    response = client.post("/setup", json=setup_payload(config))
    assert response.status_code == 422 and "another_per_region" in response.json["message"]
    assert "needs a <Choices> over a <Text> or <HyperText>" in response.status  # what Label Studio shows


def test_the_reason_phrase_is_one_line_of_latin_1():
    from backend.api import reason_phrase

    assert reason_phrase("no <Choices>\r\nover   Text:\tthé 文\x00") == "no <Choices> over Text: thé ??"
    assert len(reason_phrase("x" * 1000)) == 300 and reason_phrase(" \n ") == "Error"


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        ("/predict", b"{not json", "not valid UTF-8 JSON"),
        ("/predict", b"", "empty"),
        ("/predict", b"\xff\xfe\x00garbage", "not valid UTF-8 JSON"),
        ("/predict", b'{"tasks": [], "project": ' + b"1" * 5000 + b"}", "Exceeds the limit (4300 digits)"),
        ("/webhook", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # deeper than the parser's stack
        ("/predict", b"[1, 2]", "JSON object"),
        ("/predict", b'{"tasks": "abc"}', "'tasks'"),
        ("/predict", b'{"tasks": [{"id": 1}], "label_config": "<View/>"}', "tasks[0]"),
        ("/predict", b'{"tasks": [], "project": "abc"}', "numeric project id"),
        ("/setup", '{"project": "\u00b2", "schema": "<View/>"}'.encode(), "numeric project id"),
        ("/webhook", '{"action": "ANNOTATION_CREATED", "project": {"id": "\u0661"}}'.encode(), "numeric project id"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": "-3"}}', "numeric project id"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": 1.5}}', "numeric project id"),
        ("/setup", b'{"project": 1}', "'schema'"),
        ("/setup", b'{"project": 1, "schema": "<View/>", "extra_params": "{bad"}', "extra_params"),
        ("/setup", b'{"project": 1, "schema": "<View/>", "extra_params": 0}', "'extra_params' must be a JSON object"),
        ("/predict", b'{"tasks": []}', "needs 'label_config', or the 'project' of a project set up by /setup"),
        ("/setup", b'{"project": 1, "schema": "<View/>", "extra_params": "' + b"[" * 100_000 + b'"}', "extra_params"),
        ("/setup", b'{"project": {"x": 1}, "schema": "<View/>"}', "{'x': 1}"),
        ("/setup", b'{"project": 1, "schema": "<View/>", "extra_params": {"strategy": "nope"}}', "known strategies"),
        ("/setup", b'{"project": 1, "schema": "<View/>", "extra_params": {"rank_top_k": 0}}', "rank_top_k"),
        (
            "/setup",
            json.dumps(
                {"project": 1, "schema": "<View/>", "extra_params": {f"note{i}": i for i in range(101)}}
            ).encode(),
            "extra_params has 101 keys, over the 100",
        ),
        ("/webhook", b'{"project": {"id": 1}}', "'action'"),
        ("/webhook", b'{"action": "NOPE", "project": {"id": 1}}', "unknown webhook action 'NOPE'"),
        ("/webhook", b'{"action": "NOPE", "project": {"id": 1}}', "accepted and ignored: PROJECT_CREATED"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED"}', "'project'"),
    ],
)
def test_malformed_bodies_get_a_400_naming_the_problem(client, route, body, expected):
    response = client.post(route, data=body, content_type="application/json")
    assert response.status_code == 400
    assert expected in response.json["message"]


class InvalidChunkSize(Exception):
    """What gunicorn's reader raises for a chunked body whose chunk size is not hexadecimal."""


class BadlyChunkedBody(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise InvalidChunkSize("zz")


@pytest.mark.parametrize("route", ["/setup", "/predict", "/webhook"])
def test_a_body_the_server_cannot_read_gets_a_400_saying_so(client, route):
    response = client.post(
        route,
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        # as gunicorn passes a chunked body: a stream that ends itself, without a length
        environ_overrides={"wsgi.input": BadlyChunkedBody(), "wsgi.input_terminated": True},
    )
    assert response.status_code == 400
    assert (
        response.json["message"]
        == f"{route} body could not be read (InvalidChunkSize): cut short, or its chunked encoding is broken"
    )


def test_a_body_over_the_limit_gets_a_413_naming_the_limit_in_its_reason_phrase(client, monkeypatch):
    from backend import api

    monkeypatch.setattr(api, "MAX_BODY_BYTES", 2 * 2**20)
    client.application.config["MAX_CONTENT_LENGTH"] = api.MAX_BODY_BYTES
    body = json.dumps(predict_payload([ls_task(i, "word " * 50_000) for i in range(10)])).encode()
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 413
    assert f"over the 2 MiB this backend reads ({len(body)} bytes)" in response.json["message"]
    assert "send fewer tasks per request" in response.status  # what Label Studio shows of a refused request


def test_a_chunked_body_over_the_limit_gets_the_413_too_not_a_400_about_its_cut_json(client, monkeypatch):
    import io

    from backend import api

    monkeypatch.setattr(api, "MAX_BODY_BYTES", 2**20)
    client.application.config["MAX_CONTENT_LENGTH"] = api.MAX_BODY_BYTES
    body = json.dumps(predict_payload([ls_task(i, "word " * 50_000) for i in range(10)])).encode()
    response = client.post(  # no Content-Length: the server reads up to the limit and stops there
        "/predict",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413 and "over the 1 MiB" in response.json["message"]


def test_a_compressed_body_gets_a_415_saying_so(client):
    import gzip

    body = gzip.compress(json.dumps(predict_payload([ls_task(1, TEXTS[0])])).encode())
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    response = client.post("/predict", data=body, headers=headers)
    assert response.status_code == 415 and "Content-Encoding 'gzip' is not supported" in response.json["message"]


def test_a_wrong_method_gets_a_405_naming_the_right_one(client):
    response = client.get("/predict")
    assert response.status_code == 405 and response.json["message"] == "/predict takes POST, not GET"
    assert response.status == "405 /predict takes POST, not GET"
    assert "POST" in response.headers["Allow"]
    assert client.post("/metrics").json["message"] == "/metrics takes GET, not POST"


def test_an_unknown_route_gets_a_json_404_whose_reason_phrase_is_its_message(client):
    response = client.post("/predictions", json={})
    assert response.status_code == 404 and response.json["error"] == "Not Found"
    assert "URL was not found" in response.json["message"]
    assert response.status == "404 " + response.json["message"]


def test_strategy_params_are_checked_against_the_backends_default_strategy(settings):
    from dataclasses import replace

    from backend.api import create_app
    from backend.runtime import Runtime

    client = create_app(Runtime(replace(settings, strategy="margin"))).test_client()
    body = setup_payload() | {"extra_params": {"strategy_params": {"candidate_factor": 2}}}  # a hybrid parameter
    response = client.post("/setup", json=body)
    assert response.status_code == 400 and "candidate_factor" in response.json["message"]


def test_a_change_of_ranking_parameters_at_setup_queues_a_round_and_other_keys_do_not(client, redis_url, settings):
    queue = Queue(settings.queue_name, connection=redis.Redis.from_url(redis_url))
    client.post("/setup", json=setup_payload() | {"extra_params": {"note": "ours"}})
    assert queue.job_ids == ["connect-3"]
    client.post("/setup", json=setup_payload() | {"extra_params": {"note": "edited"}})  # a note: nothing to rank
    client.post("/setup", json=setup_payload() | {"extra_params": {"note": "edited", "strategy": None}})  # the default
    assert queue.job_ids == ["connect-3"]
    client.post("/setup", json=setup_payload() | {"extra_params": {"strategy": "margin"}})  # the model edited
    assert queue.job_ids == ["connect-3", "rerank-3-0"]
    client.post("/setup", json=setup_payload() | {"extra_params": {"strategy": "margin"}})  # before every /predict
    assert queue.job_ids == ["connect-3", "rerank-3-0"]
    round_ = queue.fetch_job("rerank-3-0")
    queue.remove(round_)
    round_.set_status(JobStatus.FINISHED)  # as if it had run
    client.post("/setup", json=setup_payload() | {"extra_params": {"strategy": "margin", "rank_top_k": 50}})
    assert queue.job_ids == ["connect-3", "rerank-3-1"]


def test_a_ranking_parameter_change_whose_round_redis_failed_to_queue_is_queued_by_the_next_setup(
    client, runtime, redis_url, settings, monkeypatch
):
    queue = Queue(settings.queue_name, connection=redis.Redis.from_url(redis_url))
    client.post("/setup", json=setup_payload())
    ask = runtime.queue.request_rerank

    def redis_gone(project, reason):
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(runtime.queue, "request_rerank", redis_gone)  # the parameters were stored, then Redis went
    assert client.post("/setup", json=setup_payload() | {"extra_params": {"strategy": "margin"}}).status_code == 200
    assert queue.job_ids == ["connect-3"] and runtime.registry.params("3") == {"strategy": "margin"}
    monkeypatch.setattr(runtime.queue, "request_rerank", ask)
    client.post("/setup", json=setup_payload() | {"extra_params": {"strategy": "margin"}})  # the same: still owed
    assert queue.job_ids == ["connect-3", "rerank-3-0"]
    client.post("/setup", json=setup_payload() | {"extra_params": {"strategy": "margin"}})
    assert runtime.registry.last_setup("3") == (AG_NEWS_CONFIG, {"strategy": "margin"}, 0)  # paid


def test_null_strategy_params_at_setup_mean_none(client, runtime):
    body = setup_payload() | {"extra_params": {"strategy": "margin", "strategy_params": None}}
    assert client.post("/setup", json=body).status_code == 200
    assert runtime.registry.params("3") == {"strategy": "margin"}  # stored as absent: a round can build it


def test_a_null_strategy_or_top_k_at_setup_means_the_backends_setting(client, runtime):
    body = setup_payload() | {"extra_params": {"strategy": None, "rank_top_k": None, "note": None}}
    assert client.post("/setup", json=body).status_code == 200
    assert runtime.registry.params("3") == {"note": None}  # the keys the backend reads are left out, others kept


@pytest.mark.parametrize("misspelt, meant", [("rank_topk", "rank_top_k"), ("Strategy", "strategy")])
def test_a_misspelt_extra_param_at_setup_is_a_400_that_names_the_key_meant(client, runtime, misspelt, meant):
    response = client.post("/setup", json=setup_payload() | {"extra_params": {misspelt: 5, "note": "ours"}})
    assert response.status_code == 400
    assert f"unknown key '{misspelt}', did you mean '{meant}'?" in response.json["message"]
    assert runtime.registry.params("3") == {}  # nothing stored: the project is not connected with a silent typo


def test_blank_extra_params_at_setup_mean_none(client, runtime):
    assert client.post("/setup", json=setup_payload() | {"extra_params": " \n"}).status_code == 200
    assert runtime.registry.params("3") == {}


def test_project_ids_are_normalised(client):
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}
    assert client.post("/webhook", json=event | {"project": {"id": 7}}).json["rerank"] == "enqueued"
    assert client.post("/webhook", json=event | {"project": {"id": "007"}}).json["rerank"] == "coalesced"


def test_predict_without_label_config_uses_the_one_from_setup(client):
    client.post("/setup", json=setup_payload())
    body = predict_payload([ls_task(1, TEXTS[1])])
    del body["label_config"]
    assert client.post("/predict", json=body).json["results"][0]["result"][0]["from_name"] == "topic"


def test_webhook_acknowledges_and_coalesces_a_burst_into_one_job(client, redis_url, settings):
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}, "task": {"id": 5}}
    first = client.post("/webhook", json=event)
    assert first.status_code == 201 and first.json["rerank"] == "enqueued"
    for _ in range(20):
        assert client.post("/webhook", json=event).json["rerank"] == "coalesced"
    queue = Queue(settings.queue_name, connection=redis.Redis.from_url(redis_url))
    assert queue.job_ids == ["rerank-3-0"]


def test_project_updated_re_ranks_only_for_a_change_we_did_not_make(client, redis_url):
    registry = redis.Redis.from_url(redis_url)
    registry.hset("al:project:3", "live_version", "al-v000002-x")

    def project_updated(**project):
        return client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3, **project}}).json

    assert project_updated(model_version="al-v000002-x")["rerank"] == "not needed"  # our own switch
    assert project_updated(title="renamed")["rerank"] == "not needed"
    assert project_updated(model_version="")["rerank"] == "enqueued"  # reset from the UI
    # Label Studio sets the version to null when the live one is deleted (Settings -> Predictions): the next
    # PROJECT_UPDATED (an edit of the settings) carries it
    assert project_updated(model_version=None)["rerank"] == "coalesced"  # a round follows: the one queued above
    registry.hset("al:project:3", "live_version", "")
    assert project_updated(model_version=None)["rerank"] == "not needed"  # no live version of ours: no change


def test_metrics_lists_projects_and_their_events(client, settings, redis_url):
    client.post("/setup", json=setup_payload())
    client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 1}]})
    body = client.get("/metrics").json
    assert body["projects"]["3"]["events"] == {"TASKS_CREATED": 1}
    queued = Queue(settings.queue_name, connection=redis.Redis.from_url(redis_url)).count
    assert queued >= 1 and body["queue_length"] == queued  # no worker runs here: what /setup queued is still there


def test_metrics_show_a_projects_encoding_progress(client, runtime):
    client.post("/setup", json=setup_payload())
    assert client.get("/metrics").json["projects"]["3"]["encoding"] == {}  # nothing being encoded
    runtime.encoding.enqueue("3", [["one text", "another"], ["a third"]], then_rerank=False)
    # no worker runs here: the two chunks wait, none done
    assert client.get("/metrics").json["projects"]["3"]["encoding"] == {"chunks": 2, "done": 0, "failed": 0, "texts": 3}


def test_metrics_say_whether_the_workers_can_rerank(settings):
    from dataclasses import replace

    from backend.api import create_app
    from backend.runtime import Runtime

    def reranking(**changes) -> str:
        return create_app(Runtime(replace(settings, **changes))).test_client().get("/metrics").json["reranking"]

    assert reranking(label_studio_url="http://ls:8080", label_studio_api_key="key") == "on"
    for missing in ({"label_studio_api_key": ""}, {"label_studio_url": ""}):
        why = reranking(**({"label_studio_url": "http://ls:8080", "label_studio_api_key": "key"} | missing))
        assert why.startswith("off: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set for re-ranking")


def test_events_of_projects_never_set_up_are_not_counted(client, runtime):
    for action in ("PROJECT_CREATED", "ANNOTATION_CREATED", "TASKS_DELETED"):
        assert client.post("/webhook", json={"action": action, "project": {"id": 41}}).status_code == 201
    assert runtime.registry.event_counts("41") == {}
    assert not runtime.redis.keys("al:project:41*")  # no per-project record until /setup makes one
    # the events still queue a round (one): it asks Label Studio whether this backend serves the project, as it
    # does after Redis lost the backend's records, and records it as disconnected otherwise
    assert runtime.queue.queue.get_job_ids() == ["rerank-41-0"]


def test_an_import_keeps_the_task_list_snapshot_and_a_deletion_marks_it_stale(client, runtime):
    # a round extends the snapshot with the imported tasks alone; after a deletion it reads the whole list
    import numpy as np

    from backend.adapters.task_snapshot import TaskSnapshot

    client.post("/setup", json=setup_payload())
    runtime.snapshots.save("3", TaskSnapshot(np.array([1, 2]), [b"k" * 16, b"l" * 16], (2, 2), "text"))
    client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 3}]})
    kept = runtime.snapshots.load("3")
    assert kept.task_ids.tolist() == [1, 2] and kept.stamp == (2, 2) and kept.text_keys == [b"k" * 16, b"l" * 16]
    client.post("/webhook", json={"action": "TASKS_DELETED", "project": {"id": 3}, "tasks": [{"id": 1}]})
    assert runtime.snapshots.load("3") is None


def test_start_training_has_the_next_round_read_every_tasks_data_again(client, runtime):
    # an edit of a task's data sends no webhook and leaves the stamp alone; "Start Training" is how a user has it read
    import numpy as np

    from backend.adapters.task_snapshot import TaskSnapshot

    client.post("/setup", json=setup_payload())
    runtime.snapshots.save("3", TaskSnapshot(np.array([1, 2]), [b"k" * 16, b"l" * 16], (2, 2), "text"))
    client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 9}})
    assert runtime.snapshots.load("3") is not None
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
    assert response.status_code == 201 and response.json["rerank"] == "coalesced"  # behind the annotation's round
    assert runtime.snapshots.load("3") is None


def test_basic_auth_guards_every_route(settings, tmp_path):
    from dataclasses import replace

    from backend.api import create_app
    from backend.runtime import Runtime

    app = create_app(Runtime(replace(settings, basic_auth_user="ls", basic_auth_pass="s3cret")))
    client = app.test_client()
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    for method, route in ROUTES:
        for headers in ({}, bad):
            response = getattr(client, method)(route, headers=headers, json={})
            assert response.status_code == 401, route
            assert "s3cret" not in response.get_data(as_text=True)
        response = getattr(client, method)(route, headers=good, json={})
        if route in ("/health", "/metrics"):
            assert response.status_code == 200, route
        else:  # past the guard, the empty body reaches the route, which names what it lacks
            assert response.status_code == 400 and f"{route} needs" in response.json["message"], route


def test_basic_auth_with_non_ascii_credentials_is_a_401_or_accepted_never_a_500(settings):
    from dataclasses import replace

    from backend.api import create_app
    from backend.runtime import Runtime

    app = create_app(Runtime(replace(settings, basic_auth_user="ls", basic_auth_pass="pässwörd")))
    client = app.test_client()

    def health(credentials: str) -> int:
        token = base64.b64encode(credentials.encode("utf-8")).decode()
        return client.get("/health", headers={"Authorization": "Basic " + token}).status_code

    assert health("ls:pässwörd") == 200
    assert health("ls:passwörd") == 401
    assert health("lß:pässwörd") == 401
    # Label Studio itself calls backends through requests' HTTPBasicAuth, which encodes Latin-1
    latin1 = base64.b64encode("ls:pässwörd".encode("latin-1")).decode()
    assert client.get("/health", headers={"Authorization": "Basic " + latin1}).status_code == 200
    for header in ("Basic !!!", "Basic " + base64.b64encode(b"ls").decode(), "Bearer x", "Basic ü"):
        assert client.get("/health", headers={"Authorization": header}).status_code == 401


def test_a_refused_request_says_why_in_the_log_too(client, caplog):
    # Label Studio shows the user only "422 Client Error ..." and sends them to the backend's logs
    image = (
        '<View><Image name="i" value="$img"/>'
        '<Choices name="c" toName="i"><Choice value="x"/><Choice value="y"/></Choices></View>'
    )
    assert client.post("/setup", json=setup_payload(image)).status_code == 422
    assert (
        "POST /setup: 422 UnsupportedLabelConfig: Unsupported labeling config (needs a <Choices> over a <Text> or "
        "<HyperText>): <Choices name='c'> points at Image" in caplog.text
    )


def test_an_unexpected_error_is_a_500_naming_its_type_with_the_trace_only_in_the_log(
    client, runtime, caplog, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("internal detail: /srv/models/al-v000007/head.pt")

    monkeypatch.setattr(runtime.predictor, "predict", broken)  # a defect of ours, not bad input
    response = client.post("/predict", json=predict_payload([ls_task(1, TEXTS[0])]))
    assert response.status_code == 500
    assert response.json == {"error": "InternalError", "message": "RuntimeError while handling /predict"}
    assert response.status == "500 RuntimeError while handling /predict"  # what Label Studio shows of it
    assert "unhandled error on POST /predict" in caplog.text
    assert "Traceback" in caplog.text and "internal detail" in caplog.text  # for whoever reads the logs
    assert client.get("/health").status_code == 200  # and the server answers the next request


@pytest.mark.parametrize(("started_seconds_ago", "expected"), [(1, "coalesced"), (120, "enqueued")])
def test_a_rerank_whose_worker_died_before_it_began_does_not_swallow_events(runtime, started_seconds_ago, expected):
    from datetime import timedelta

    from rq.job import Job, JobStatus
    from rq.utils import now

    assert runtime.queue.request_rerank("3", "first") == "enqueued"
    job = Job.fetch("rerank-3-0", connection=runtime.redis)  # a worker took it, then was SIGKILLed
    job.started_at = now() - timedelta(seconds=started_seconds_ago)
    job.set_status(JobStatus.STARTED)
    job.save()
    assert runtime.queue.request_rerank("3", "another annotation") == expected
    assert ("rerank-3-1" in runtime.queue.queue.get_job_ids()) == (expected == "enqueued")


@pytest.mark.parametrize(
    ("queued_seconds_ago", "taken_by_a_worker", "expected"),
    [(1, True, "coalesced"), (120, True, "enqueued"), (120, False, "coalesced")],
)
def test_a_rerank_lost_as_redis_went_away_does_not_swallow_events(
    runtime, queued_seconds_ago, taken_by_a_worker, expected
):
    from datetime import timedelta

    from rq.intermediate_queue import IntermediateQueue
    from rq.job import Job, JobStatus
    from rq.utils import now

    assert runtime.queue.request_rerank("3", "first") == "enqueued"
    queue = runtime.queue.queue
    intermediate = IntermediateQueue(queue.key, connection=runtime.redis)
    if taken_by_a_worker:  # as a worker's BLMOVE does; the reply never reached it (Redis went away)
        runtime.redis.lmove(queue.key, intermediate.key, "RIGHT", "LEFT")
    job = Job.fetch("rerank-3-0", connection=runtime.redis)
    job.enqueued_at = now() - timedelta(seconds=queued_seconds_ago)  # else: waiting behind other jobs that long
    job.save()
    assert runtime.queue.request_rerank("3", "another annotation") == expected
    assert ("rerank-3-1" in queue.get_job_ids()) == (expected == "enqueued")
    if expected == "enqueued":  # given up where rq keeps what was given up, not left for rq to retry later
        assert job.get_status() == JobStatus.CANCELED and "rerank-3-0" in queue.canceled_job_registry.get_job_ids()
        assert "rerank-3-0" not in intermediate.get_job_ids()


@pytest.mark.parametrize("status", ["failed", "finished"])
def test_a_rerank_that_ended_without_moving_the_generation_does_not_swallow_events(runtime, status):
    from rq.job import Job, JobStatus

    assert runtime.queue.request_rerank("3", "first") == "enqueued"
    job = Job.fetch("rerank-3-0", connection=runtime.redis)
    runtime.queue.queue.remove(job)
    job.set_status(JobStatus(status))  # failed before it began, or finished and the counter was lost since
    assert runtime.queue.request_rerank("3", "another annotation") == "enqueued"
    assert "rerank-3-1" in runtime.queue.queue.get_job_ids()


def test_a_lost_generation_counter_resumes_from_the_published_generation_and_never_recurses(runtime):
    from rq.job import Job, JobStatus

    from backend.adapters.queue import generation_key

    finished = runtime.redis.pipeline()
    for generation in range(1500):  # an hour of rounds keeps their job ids as finished (RESULT_TTL)
        finished.hset(Job.key_for(f"rerank-3-{generation}"), mapping={"status": JobStatus.FINISHED.value})
    finished.execute()
    runtime.queue.may_publish("3", 1499)  # the last round published
    runtime.redis.delete(generation_key("3"))  # then the counter was evicted (allkeys-lru)
    assert runtime.queue.request_rerank("3", "annotation") == "enqueued"
    assert runtime.queue.queue.get_job_ids() == ["rerank-3-1500"]  # straight past every finished one

    runtime.queue.queue.empty()
    runtime.redis.set(generation_key("3"), 0)  # a counter that went back (a restored old dump, say): walked, in
    assert runtime.queue.request_rerank("3", "annotation") == "enqueued"  # a loop, not 1,500 nested calls
    assert runtime.queue.queue.get_job_ids() == ["rerank-3-1500"]


def test_a_burst_that_finds_a_dead_rerank_queues_one_follower(runtime):
    import threading

    from rq.job import Job, JobStatus

    assert runtime.queue.request_rerank("3", "first") == "enqueued"
    job = Job.fetch("rerank-3-0", connection=runtime.redis)
    runtime.queue.queue.remove(job)
    job.set_status(JobStatus.CANCELED)
    start, answers = threading.Barrier(16), []

    def event():
        start.wait()
        answers.append(runtime.queue.request_rerank("3", "annotation"))

    threads = [threading.Thread(target=event) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == ["coalesced"] * 15 + ["enqueued"]
    assert runtime.queue.queue.get_job_ids() == ["rerank-3-1"]
    assert not runtime.queue.advance_generation("3", 0)  # moved on from 0 already: a late request advances no more


def test_predictions_of_aliased_choices_are_what_label_studio_validates(client):
    # Label Studio stores a <Choice>'s alias in results, and its prediction validation takes the aliases only
    from label_studio_sdk.label_interface import LabelInterface

    config = AG_NEWS_CONFIG.replace('choice="single"', 'choice="multiple" showInline="true"')
    for label in AG_NEWS_LABELS:  # every choice aliased: whatever is predicted must be written as its alias
        config = config.replace(f'<Choice value="{label}"/>', f'<Choice value="{label} news" alias="{label}"/>')
    assert config.count("alias=") == len(AG_NEWS_LABELS)
    tasks = [ls_task(i, text) for i, text in enumerate(TEXTS, start=1)] + [{"id": 9, "data": {"text": None}}]
    results = client.post("/predict", json=predict_payload(tasks, config)).json["results"]
    assert len(results) == len(tasks) and results[-1]["result"] == []
    for task, prediction in zip(tasks, results, strict=True):
        assert LabelInterface(config).validate_prediction(prediction | {"task": task["id"]}, return_errors=True) == []
    chosen = {label for result in results for region in result["result"] for label in region["value"]["choices"]}
    assert chosen and chosen <= set(AG_NEWS_LABELS)  # something was predicted, and written as aliases


def test_a_webhook_naming_its_project_only_in_the_task_queues_that_projects_rerank(client, redis_url, settings):
    # an event whose payload carries the project only inside "task" (no top-level "project")
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "task": {"id": 5, "project": 3}}
    response = client.post("/webhook", json=event)
    assert response.status_code == 201 and response.json["rerank"] == "enqueued"
    queue = Queue(settings.queue_name, connection=redis.Redis.from_url(redis_url))
    assert queue.job_ids == ["rerank-3-0"]


def test_a_predict_label_config_that_is_not_a_string_is_a_400_naming_the_field(client):
    task = {"id": 1, "data": {"text": "Stocks fell"}}
    client.post("/setup", json={"project": 3, "schema": AG_NEWS_CONFIG})
    for config in (5, {"xml": AG_NEWS_CONFIG}, [], 0):
        response = client.post("/predict", json={"tasks": [task], "project": 3, "label_config": config})
        assert response.status_code == 400, config
        assert "label_config" in response.json["message"], config


def test_a_reconciliation_chain_counts_as_alive_for_two_intervals_only(runtime):
    interval = runtime.settings.reconcile_interval
    runtime.queue.schedule_reconcile("1", interval)
    assert runtime.queue.reconcile_scheduled("1")
    assert not runtime.queue.restart_reconcile_if_ended("1", interval)  # alive: left as it is
    # the chain breaks here; once two intervals (and a minute) pass without a successor, it counts as ended
    assert 0 < runtime.redis.ttl(reconcile_alive_key("1")) <= 2 * interval + 60
    runtime.redis.delete(reconcile_alive_key("1"))  # as that TTL does when it runs out
    assert not runtime.queue.reconcile_scheduled("1")
    assert runtime.queue.restart_reconcile_if_ended("1", interval)  # ended: scheduled again
    assert runtime.queue.reconcile_scheduled("1")


def test_reconciliation_switched_off_is_not_restarted_after_the_first_connections_pass(settings):
    rt = Runtime(replace(settings, reconcile_interval=0))
    scheduled = rt.queue.queue.scheduled_job_registry
    rt.projects.setup(SetupRequest("1", AG_NEWS_CONFIG))  # first connection: its one pass
    [one_pass] = scheduled.get_job_ids()
    scheduled.remove(one_pass, delete_job=True)  # an hour on: it ran, rq dropped its record, its mark ran out
    rt.redis.delete(reconcile_alive_key("1"))
    rt.projects.setup(SetupRequest("1", AG_NEWS_CONFIG))  # Label Studio calls /setup before every /predict
    assert reconciliation.revive_reconciliations(rt) == []  # a worker's maintenance pass, once a minute
    assert scheduled.get_job_ids() == []


def test_with_reconciliation_off_a_connection_again_gets_its_one_pass_while_the_last_ones_record_is_kept(settings):
    rt = Runtime(replace(settings, reconcile_interval=0))
    scheduled = rt.queue.queue.scheduled_job_registry
    rt.queue.schedule_reconcile("1", 0)  # the first connection's pass
    [first_pass] = scheduled.get_job_ids()
    scheduled.remove(first_pass)  # it ran; rq keeps the finished job's record for an hour
    assert Job.exists(first_pass, connection=rt.redis)
    time.sleep(1.01)  # the backend was removed and added again, a moment later
    rt.queue.schedule_reconcile("1", 0)
    [second_pass] = scheduled.get_job_ids()
    assert second_pass != first_pass


def test_a_rerank_a_worker_is_starting_is_not_cancelled(runtime):
    assert runtime.queue.request_rerank("3", "first") == "enqueued"
    queue = runtime.queue.queue
    runtime.redis.lmove(queue.key, IntermediateQueue(queue.key, connection=runtime.redis).key, "RIGHT", "LEFT")
    job = Job.fetch("rerank-3-0", connection=runtime.redis)
    job.enqueued_at = now() - timedelta(seconds=120)  # it waited behind other jobs that long
    job.save()
    with runtime.redis.pipeline() as pipe:  # what the worker does before it forks the horse
        Execution.create(job, 60, pipeline=pipe)
        pipe.execute()
    assert runtime.queue.request_rerank("3", "another annotation") == "coalesced"
    assert job.get_status() == JobStatus.QUEUED and queue.get_job_ids() == []
    assert "rerank-3-0" not in queue.canceled_job_registry.get_job_ids()
