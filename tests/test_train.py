"""Which label each annotated task teaches: the newest annotation that holds one, skips left out; and when the
labels taught leave the head zero-shot."""

import pytest

from backend.label_config import parse_label_config
from backend.services.train import labelled_tasks
from tests.conftest import AG_NEWS_CONFIG
from tests.helpers import choices_result

MULTI = parse_label_config(AG_NEWS_CONFIG.replace('choice="single"', 'choice="multiple"'))
SINGLE = parse_label_config(AG_NEWS_CONFIG)


def annotation(annotation_id, updated_at, *choices, cancelled=False):
    return {
        "id": annotation_id,
        "updated_at": updated_at,
        "was_cancelled": cancelled,
        "result": choices_result(*choices) if choices else [],
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


def test_a_newer_annotation_teaches_over_a_ground_truth_one():
    # Label Studio 1.23 marks every annotation imported with its task as ground truth: a later correction wins
    imported = annotation(10, "2026-01-01", "Sports") | {"ground_truth": True}
    tasks = [task(1, imported, annotation(11, "2026-01-05", "World"))]
    assert taught(tasks, SINGLE) == {1: ("World",)}


@pytest.mark.parametrize("config", [SINGLE, MULTI])
def test_annotations_of_another_shape_teach_nothing_and_fail_no_round(config):
    # Label Studio only checks that a result is a list: an import or an API call may store any regions
    def shaped(annotation_id, value):
        region = {"from_name": "topic", "to_name": "text", "type": "choices", "value": value}
        return {"id": annotation_id, "updated_at": "2026-01-05", "was_cancelled": False, "result": [region]}

    tasks = [
        task(1, annotation(10, "2026-01-01", "World"), shaped(11, ["Sports"])),  # the older, sound one teaches
        task(2, shaped(20, {"choices": "Sports"})),  # a string, not read letter by letter
        task(3, shaped(30, {"choices": 5})),
        task(4, shaped(40, {"choices": [{"x": 1}, "Business"]})),
        task(5, {"id": 50, "updated_at": 7, "result": "World"}, {"id": "51", "updated_at": "2026-01-05", "result": 5}),
        task(6, annotation(60, "2026-01-01", "Sports")),
    ]
    assert taught(tasks, config) == {1: ("World",), 4: ("Business",), 6: ("Sports",)}


@pytest.mark.parametrize(("config", "choices"), [(SINGLE, ("Sports",)), (MULTI, ()), (MULTI, ("World", "Sports"))])
def test_annotations_that_all_teach_the_same_labels_keep_the_zero_shot_head(tiny_bert, config, choices):
    # a head fit on one class alone answers that class for any text, with a confidence of 1: every score of the
    # ranking the same, and the next round's head agreeing with it perfectly, as if labels had stopped paying off
    from backend.ml.encoder import Encoder
    from backend.services.train import LabelledTask, train_artifact

    encoder = Encoder(tiny_bert, max_length=32, batch_tokens=128, dtype="fp32")
    examples = [LabelledTask(i, text, choices) for i, text in enumerate(["stocks fell", "a goal", "new chip", "rain"])]
    artifact = train_artifact(examples, config, encoder, None, committee_size=2, min_annotations=2)
    assert artifact.meta["kind"] == "zero-shot" and not artifact.committee
    examples[0] = LabelledTask(0, "stocks fell", ("Business",))  # one other label: something to learn from
    artifact = train_artifact(examples, config, encoder, None, committee_size=2, min_annotations=2)
    assert artifact.meta["kind"] == "trained"
