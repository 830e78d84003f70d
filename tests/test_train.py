"""Which label each annotated task teaches: the newest annotation that holds one, skips left out."""

from backend.label_config import parse_label_config
from backend.services.train import labelled_tasks
from tests.conftest import AG_NEWS_CONFIG

MULTI = parse_label_config(AG_NEWS_CONFIG.replace('choice="single"', 'choice="multiple"'))
SINGLE = parse_label_config(AG_NEWS_CONFIG)


def annotation(annotation_id, updated_at, *choices, cancelled=False):
    regions = [{"from_name": "topic", "to_name": "text", "type": "choices", "value": {"choices": list(choices)}}]
    return {
        "id": annotation_id,
        "updated_at": updated_at,
        "was_cancelled": cancelled,
        "result": regions if choices else [],
    }


def task(task_id, *annotations):
    return {"id": task_id, "data": {"text": f"text {task_id}"}, "annotations": list(annotations)}


def taught(tasks, config):
    return {example.task_id: example.choices for example in labelled_tasks(tasks, config)}


def test_multi_label_an_annotation_that_ticks_nothing_says_no_label_applies():
    tasks = [
        task(1, annotation(10, "2026-01-02")),  # accepted an empty pre-annotation
        task(2, annotation(20, "2026-01-01", "Sports"), annotation(21, "2026-01-05")),  # unticked later
        task(3, annotation(30, "2026-01-01", "Sports"), annotation(31, "2026-01-05", cancelled=True)),  # then skipped
        task(4, annotation(40, "2026-01-01", "World"), annotation(41, "2026-01-05", "Renamed since")),
    ]
    assert taught(tasks, MULTI) == {1: (), 2: (), 3: ("Sports",), 4: ("World",)}


def test_single_choice_an_annotation_with_several_choices_from_a_multiple_choice_past_teaches_nothing():
    tasks = [
        task(1, annotation(10, "2026-01-01", "World"), annotation(11, "2026-01-05", "Sports", "Business")),
        task(2, annotation(20, "2026-01-05", "Sports", "Business")),
    ]
    assert taught(tasks, SINGLE) == {1: ("World",)}  # not "Sports", the first of two in the config's order
    assert taught(tasks, MULTI) == {1: ("Sports", "Business"), 2: ("Sports", "Business")}


def test_single_choice_an_annotation_without_a_choice_teaches_nothing():
    tasks = [
        task(1, annotation(10, "2026-01-02")),
        task(2, annotation(20, "2026-01-01", "Sports"), annotation(21, "2026-01-05")),
    ]
    assert taught(tasks, SINGLE) == {2: ("Sports",)}
