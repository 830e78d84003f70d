"""Hundreds of malformed bodies to every route: never a 5xx, always a message."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AG_NEWS_CONFIG, AG_NEWS_LABELS
from tests.test_api import ls_task, predict_payload, setup_payload

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
VALID = {
    "/setup": setup_payload(),
    "/predict": predict_payload([ls_task(1, "A text about markets")]),
    "/webhook": {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}},
}
routes = st.sampled_from(sorted(VALID))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        assert response.json["message"]


@FUZZ
@given(route=routes, body=st.binary(max_size=200))
def test_random_bytes(client, route, body):
    check(client.post(route, data=body, content_type="application/json"))


@FUZZ
@given(route=routes, body=json_values)
def test_random_json(client, route, body):
    check(client.post(route, data=json.dumps(body), content_type="application/json"))


@FUZZ
@given(route=routes, data=st.data())
def test_valid_payloads_with_one_field_replaced(client, route, data):
    body = dict(VALID[route])
    field = data.draw(st.sampled_from(sorted(body)))
    body[field] = data.draw(json_values)
    check(client.post(route, json=body))


ANY_TEXT = st.one_of(
    st.text(st.characters(), max_size=300),  # any code point, lone surrogates included
    st.text(st.characters(), min_size=1, max_size=40).map(lambda piece: piece * 250),  # past the encoder's cut
)


@FUZZ
@given(texts=st.lists(ANY_TEXT, min_size=1, max_size=5))
def test_any_text_gets_a_prediction(client, texts):
    """Enormous or odd unicode (lone surrogates included) texts are predicted, blank ones get an empty prediction;
    none crashes."""
    tasks = [ls_task(i, text) for i, text in enumerate(texts)]
    response = client.post("/predict", json=predict_payload(tasks, AG_NEWS_CONFIG))
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == len(texts)
    for text, result in zip(texts, results, strict=True):
        if not text.strip():  # nothing to predict from
            assert result["result"] == [] and result["score"] is None
            continue
        # single choice: every other text gets one of the labels and a confidence
        assert len(result["result"]) == 1 and len(result["result"][0]["value"]["choices"]) == 1
        assert result["result"][0]["value"]["choices"][0] in AG_NEWS_LABELS
        assert 0.0 <= result["score"] <= 1.0


@FUZZ
@given(values=st.lists(json_values, min_size=1, max_size=5))
def test_any_json_value_as_the_text_gets_a_prediction_in_order(client, values):
    """Numbers, null, lists or objects where the text belongs: one prediction per task, in order, never a 5xx."""
    tasks = [{"id": i, "data": {"text": value}} for i, value in enumerate(values)]
    response = client.post("/predict", json=predict_payload(tasks, AG_NEWS_CONFIG))
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == len(values)
    for value, result in zip(values, results, strict=True):
        blank = value is None or (isinstance(value, str) and not value.strip())
        assert (result["result"] == []) == blank  # no text, no label: an empty prediction, with no score
        assert result["score"] is None if blank else 0.0 <= result["score"] <= 1.0
