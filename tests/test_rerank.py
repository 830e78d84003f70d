"""A whole ranking round through the real services, Redis and artifacts, with Label Studio faked in memory.

The end-to-end tests run the same code against a real Label Studio; these catch breakage in seconds.
"""

import json
import logging
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import redis
from rq import SimpleWorker

from backend import jobs, reconciliation
from backend.adapters.embedding_cache import EmbeddingsMissing, text_key
from backend.adapters.encoding_jobs import encoding_follow_up_key, encoding_runs_key
from backend.adapters.label_studio import ACTIVE_LEARNING_SETTINGS
from backend.adapters.queue import RETRY, generation_key, published_key
from backend.errors import LabelStudioNotFound, LabelStudioRejected, LabelStudioUnavailable
from backend.protocol import SetupRequest
from backend.round_lock import round_lock
from backend.scoring.stopping import prediction_stability
from backend.scoring.strategies import uncertainty_scores
from backend.services import pool as pool_module
from backend.services import project_state
from backend.services import rerank as rerank_module
from backend.services.predict import version_number
from backend.services.project_state import RoundRefused
from backend.services.rerank import rerank
from tests.conftest import AG_NEWS_CONFIG, read_csv
from tests.helpers import choices_result, chunk_encoded


class FakeLabelStudio:
    """The calls a round makes, over dicts. Records what was written."""

    def __init__(self, texts: list[str]):
        self.tasks = {i + 1: {"id": i + 1, "data": {"text": text}, "annotations": []} for i, text in enumerate(texts)}
        self.project = {
            "id": 1,
            "label_config": AG_NEWS_CONFIG,
            "model_version": "al-backend",
            "task_number": len(texts),
            "sampling": "Sequential sampling",
            "show_collab_predictions": False,
        }
        self.predictions: list[dict] = []
        self.task_list_reads = 0
        self.imported_task_reads = 0
        self.writes: list[str] = []
        self.backends = [{"id": 1, "url": "http://backend:9090", "project": 1}]
        self.deleted = False
        self.answers_404_to_everything = False  # a LABEL_STUDIO_URL that is not Label Studio's API

    def get_project(self, project_id):
        if self.deleted or self.answers_404_to_everything:
            raise LabelStudioNotFound(f"Label Studio GET /api/projects/{project_id}: HTTP 404")
        return dict(self.project)

    def confirm_project_deleted(self, project_id):
        if self.answers_404_to_everything:
            raise LabelStudioUnavailable("Label Studio answers 404 to GET /api/projects/ too")

    def configure_for_active_learning(self, project_id):
        previous = {key: self.project[key] for key in ("sampling", "show_collab_predictions")}
        self.project.update(sampling="Uncertainty sampling", show_collab_predictions=True)
        return previous

    def ml_backends(self, project_id):
        return list(self.backends)

    def annotated_tasks(self, project_id):
        return [task for task in self.tasks.values() if task["annotations"]]

    def iter_tasks(self, project_id, fields="all"):
        self.task_list_reads += 1
        return iter(list(self.tasks.values()))

    def iter_tasks_after(self, project_id, task_id):
        self.imported_task_reads += 1
        return iter([self.tasks[i] for i in sorted(self.tasks) if i > task_id])

    def import_tasks(self, texts):
        """New tasks with ids above all others, as an import gives them."""
        first = max(self.tasks, default=0) + 1
        for task_id, text in enumerate(texts, first):
            self.tasks[task_id] = {"id": task_id, "data": {"text": text}, "annotations": []}
        return list(range(first, first + len(texts)))

    def task_list_stamp(self, project_id):
        return len(self.tasks), max(self.tasks, default=0)

    def replace_task(self, task_id, text):
        """Delete a task and import one (a new id above all others): the count stays the same."""
        del self.tasks[task_id]
        new_id = max(self.tasks) + 1
        self.tasks[new_id] = {"id": new_id, "data": {"text": text}, "annotations": []}
        self.project["task_number"] = len(self.tasks)
        return new_id

    def _check_tasks_exist(self, predictions):
        # as Label Studio 1.23 does, refusing the whole request
        missing = [p["task"] for p in predictions if p["task"] not in self.tasks]
        if missing:
            raise LabelStudioRejected(f"HTTP 400 {{'task': ['Invalid pk {missing[0]} - object does not exist.']}}")

    def import_predictions(self, project_id, predictions):
        self._check_tasks_exist(predictions)
        self.writes.append("bulk")
        self.predictions.extend(predictions)
        return {"created": len(predictions)}

    def create_predictions(self, predictions):
        self._check_tasks_exist(predictions)
        self.writes.append("single")
        self.predictions.extend(predictions)

    def model_versions(self, project_id):  # newest first: by the position of each version's last prediction
        counts: dict[str, int] = {}
        newest: dict[str, int] = {}
        for i, prediction in enumerate(self.predictions):
            counts[prediction["model_version"]] = counts.get(prediction["model_version"], 0) + 1
            newest[prediction["model_version"]] = i
        return {version: counts[version] for version in sorted(newest, key=newest.get, reverse=True)}

    def delete_model_version(self, project_id, version):
        self.predictions = [p for p in self.predictions if p["model_version"] != version]

    def set_model_version(self, project_id, version):
        assert any(p["model_version"] == version for p in self.predictions), "switch to a version with predictions"
        self.project["model_version"] = version

    def annotate(self, task_id, label, *, skipped=False, updated_at="2026-11-23T10:00:00Z"):
        """Add an annotation choosing `label` to the task (None: submitted with no choice) and return it."""
        annotation = {
            "id": sum(len(task["annotations"]) for task in self.tasks.values()) + 1,
            "updated_at": updated_at,
            "was_cancelled": skipped,
            "result": [] if skipped or label is None else choices_result(label),
        }
        self.tasks[task_id]["annotations"].append(annotation)
        return annotation


@pytest.fixture()
def label_studio(runtime):
    rows = read_csv("ag_news/pool.csv", 60)
    fake = FakeLabelStudio([row["text"] for row in rows])
    fake.truth = {i + 1: row["label"] for i, row in enumerate(rows)}
    runtime.__dict__["label_studio"] = fake
    return fake


def test_a_round_publishes_a_whole_ranking_and_switches_the_version(runtime, label_studio):
    summary = rerank("1", runtime, generation=1)
    assert summary["published"] and summary["annotations"] == 0 and summary["ranked"] == 20
    assert label_studio.project["model_version"] == summary["model_version"]
    scores = [p["score"] for p in label_studio.predictions]
    assert scores == sorted(scores) and scores[0] == 0.0 and max(scores) < 1.0
    assert label_studio.predictions[0]["task"] == summary["top_task"]
    assert runtime.redis.ttl(runtime.embedding_cache.key) > 29 * 24 * 3600  # ranked from: kept another 30 days
    assert len({p["task"] for p in label_studio.predictions}) == 20
    assert all(p["result"][0]["value"]["choices"][0] in label_studio.truth.values() for p in label_studio.predictions)


def test_tasks_without_a_readable_text_are_left_out_of_a_round_that_ranks_the_others(runtime, label_studio, caplog):
    del label_studio.tasks[5]["data"]["text"]  # imported with another field
    label_studio.tasks[6]["data"]["text"] = None
    label_studio.tasks[7]["data"]["text"] = "   "
    with caplog.at_level(logging.WARNING, logger="backend"):
        summary = rerank("1", runtime, generation=1)
    assert summary["published"] and summary["ranked"] == 20
    assert set(runtime.snapshots.load("1").task_ids.tolist()) == set(label_studio.tasks) - {5, 6, 7}
    assert not {5, 6, 7} & {p["task"] for p in label_studio.predictions}
    left_out = [record.getMessage() for record in caplog.records if "left out of the ranking" in record.getMessage()]
    assert len(left_out) == 1 and "3 tasks left out" in left_out[0] and "data['text']" in left_out[0]  # one line


def test_a_multi_label_round_publishes_predictions_that_choose_no_label(runtime, label_studio):
    label_studio.project["label_config"] = AG_NEWS_CONFIG.replace('choice="single"', 'choice="multiple"')
    for task_id in range(1, 9):  # each label on ~1/4 of the tasks: most sigmoids end below 0.5
        label_studio.annotate(task_id, ["World", "Sports", "Business", "Sci/Tech"][task_id % 4])
    summary = rerank("1", runtime, generation=1)
    assert summary["published"] and label_studio.project["model_version"] == summary["model_version"]
    empty = [p["task"] for p in label_studio.predictions if not p["result"]]
    assert empty, "no prediction without a label: the case this test is about did not occur"
    assert runtime.registry.shown("1", empty) == {task: () for task in empty}


def test_a_multi_label_annotation_that_ticks_nothing_is_trained_on_and_leaves_the_pool(runtime, label_studio):
    label_studio.project["label_config"] = AG_NEWS_CONFIG.replace('choice="single"', 'choice="multiple"')
    for task_id in range(1, 9):
        label_studio.annotate(task_id, ["World", "Sports", "Business", "Sci/Tech"][task_id % 4])
    label_studio.annotate(9, "World")
    label_studio.tasks[9]["annotations"][0]["result"] = []  # submitted with no label ticked: none applies
    summary = rerank("1", runtime, generation=1)
    assert summary["annotations"] == 9 and summary["published"]
    ranked = {p["task"] for p in label_studio.predictions if p["model_version"] == summary["model_version"]}
    assert len(ranked) == 20 and 9 not in ranked


def test_large_projects_get_single_writes_instead_of_a_bulk_import(runtime, label_studio, monkeypatch):
    assert rerank("1", runtime, generation=1)["writes"] == "bulk"  # 60 tasks, 20 predictions
    monkeypatch.setattr(rerank_module, "SINGLE_WRITES_ABOVE_TASKS_PER_PREDICTION", 2)  # as if 60 were many
    summary = rerank("1", runtime, generation=2)
    assert summary["published"] and summary["writes"] == "single" and label_studio.writes == ["bulk", "single"]
    assert label_studio.project["model_version"] == summary["model_version"]
    assert len([p for p in label_studio.predictions if p["model_version"] == summary["model_version"]]) == 20


@pytest.mark.parametrize("how", ["bulk", "single"])
def test_prediction_writes_can_be_fixed_whatever_the_size(runtime, label_studio, monkeypatch, how):
    # e.g. "bulk" for a Label Studio whose bulk import no longer recounts every task (see README)
    runtime.settings = replace(runtime.settings, prediction_writes=how)
    monkeypatch.setattr(rerank_module, "SINGLE_WRITES_ABOVE_TASKS_PER_PREDICTION", 2 if how == "bulk" else 10**6)
    summary = rerank("1", runtime, generation=1)
    assert summary["published"] and summary["writes"] == how and label_studio.writes == [how]


def test_an_unknown_way_of_writing_is_refused_with_the_choices():
    from backend.config import Settings

    with pytest.raises(ValueError, match="PREDICTION_WRITES must be one of auto, bulk, single; got 'sometimes'"):
        Settings.from_env({"PREDICTION_WRITES": "sometimes"})


def test_an_unknown_default_strategy_is_refused_at_start_with_the_choices():
    from backend.config import Settings

    with pytest.raises(ValueError, match="STRATEGY must be one of .*margin.*hybrid; got 'smart'"):
        Settings.from_env({"STRATEGY": "smart"})


def test_the_strategy_and_the_way_of_writing_are_read_in_either_case():
    from backend.config import Settings

    settings = Settings.from_env({"STRATEGY": "Margin", "PREDICTION_WRITES": "BULK"})
    assert (settings.strategy, settings.prediction_writes) == ("margin", "bulk")


def test_a_strategy_that_cannot_be_built_fails_the_round_before_it_saves_a_version(runtime, label_studio):
    runtime.registry.client.hset(runtime.registry.key("1"), "params", '{"strategy_params": {"nope": 1}}')
    with pytest.raises(RoundRefused, match="nope"):  # the same parameters would fail again: no retries
        rerank("1", runtime, generation=1)
    assert runtime.artifacts.versions("1") == []


def test_the_next_round_uses_the_new_annotation_and_never_ranks_it(runtime, label_studio):
    first = rerank("1", runtime, generation=1)
    label_studio.annotate(first["top_task"], label_studio.truth[first["top_task"]])
    label_studio.annotate(2, label_studio.truth[2])
    second = rerank("1", runtime, generation=2)
    assert second["annotations"] == 2 and second["model_version"] != first["model_version"]
    ranked = {p["task"] for p in label_studio.predictions if p["model_version"] == second["model_version"]}
    assert len(ranked) == 20 and first["top_task"] not in ranked and 2 not in ranked
    assert label_studio.task_list_reads == 1  # the task list came from the snapshot the second time


def test_skipped_tasks_and_single_choice_annotations_without_a_choice_teach_nothing_and_are_not_ranked(
    runtime, label_studio
):
    label_studio.annotate(1, label_studio.truth[1])
    label_studio.annotate(2, None, skipped=True)
    label_studio.annotate(3, None)  # a single choice submitted with nothing ticked
    summary = rerank("1", runtime, generation=1)
    assert summary["annotations"] == 1 and summary["unlabelled"] == 57
    ranked = {p["task"] for p in label_studio.predictions}
    assert len(ranked) == 20 and ranked.isdisjoint({1, 2, 3})


def test_the_projects_own_strategy_and_number_of_ranked_tasks_make_its_round(runtime, label_studio, pools_built):
    from backend.scoring.uncertainty import margin

    for task_id in range(1, 9):
        label_studio.annotate(task_id, label_studio.truth[task_id])
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {"strategy": "margin", "rank_top_k": 5})
    summary = rerank("1", runtime, generation=1)
    assert summary["strategy"] == "MarginSampling()" and summary["ranked"] == 5
    assert len(label_studio.predictions) == 5
    # published: the five tasks the head is least sure of, the least sure first (lowest score)
    state = project_state.read_project_state(runtime, "1", project_state.Stopwatch())
    row_of = {task_id: row for row, task_id in enumerate(state.task_ids)}
    published = sorted(label_studio.predictions, key=lambda prediction: prediction["score"])
    uncertainty = margin(pools_built[-1].probs)[[row_of[prediction["task"]] for prediction in published]]
    unlabelled = margin(pools_built[-1].probs)[~pools_built[-1].labeled]
    assert np.all(np.diff(uncertainty) <= 0) and uncertainty.min() >= np.sort(unlabelled)[-5]


def two_topics(runtime) -> FakeLabelStudio:
    """40 tasks of two kinds of text the tiny random encoder tells apart (odd ids: sports, even ids: markets), the
    first 16 annotated: a head trained on them predicts each task's topic."""
    sports = [f"the striker scored goal number {i} in the match" for i in range(20)]
    markets = [f"shares of company {i} fell on the stock market" for i in range(20)]
    fake = FakeLabelStudio([text for pair in zip(sports, markets, strict=True) for text in pair])
    fake.truth = {task_id: "Sports" if task_id % 2 else "Business" for task_id in fake.tasks}
    for task_id in range(1, 17):
        fake.annotate(task_id, fake.truth[task_id])
    runtime.__dict__["label_studio"] = fake
    return fake


def test_each_ranked_task_is_pre_annotated_with_the_choice_the_model_predicts_for_it(runtime):
    from backend.label_config import parse_label_config

    label_studio = two_topics(runtime)
    runtime.settings = replace(runtime.settings, rank_top_k=1000)
    rerank("1", runtime, generation=1)
    ranked = [{"id": p["task"], "data": label_studio.tasks[p["task"]]["data"]} for p in label_studio.predictions]
    answers = runtime.predictor.predict("1", parse_label_config(AG_NEWS_CONFIG), ranked)
    shown = [p["result"] for p in label_studio.predictions]
    assert len(shown) == 24 and shown == [answer["result"] for answer in answers]  # what /predict says of each
    assert [result[0]["value"]["choices"] for result in shown] == [[label_studio.truth[t["id"]]] for t in ranked]


def test_the_trained_head_learns_the_annotated_choices(runtime):
    from backend.services.embeddings import embed_texts

    label_studio = two_topics(runtime)
    rerank("1", runtime, generation=1)
    artifact = runtime.artifacts.load("1", runtime.artifacts.versions("1")[-1])
    assert artifact.meta["kind"] == "trained" and artifact.meta["annotations"] == 16
    texts = [task["data"]["text"] for task in label_studio.tasks.values()]
    probs = artifact.head.predict_proba(embed_texts(texts, runtime.encoder, runtime.embedding_cache))
    predicted = [artifact.labels[column] for column in probs.argmax(axis=1)]
    assert predicted == [label_studio.truth[task_id] for task_id in label_studio.tasks]  # the 24 unseen ones too


def test_a_task_replaced_by_another_is_noticed_though_the_task_count_is_the_same(runtime, label_studio):
    first = rerank("1", runtime, generation=1)
    new_task = label_studio.replace_task(first["top_task"], "Stocks rally as the central bank holds rates")
    second = rerank("1", runtime, generation=2)  # no TASKS_* event was heard
    assert label_studio.task_list_reads == 2 and second["published"]
    assert second["unlabelled"] == first["unlabelled"] == len(label_studio.tasks)
    ranked = {p["task"] for p in label_studio.predictions if p["model_version"] == second["model_version"]}
    assert first["top_task"] not in ranked
    task_ids = set(runtime.snapshots.load("1").task_ids.tolist())
    assert new_task in task_ids and first["top_task"] not in task_ids


def test_predictions_refused_for_a_deleted_task_make_the_retry_reread_the_task_list(runtime, label_studio):
    runtime.settings = replace(runtime.settings, rank_top_k=1000)  # every task gets a prediction: the deleted one too
    first = rerank("1", runtime, generation=1)
    label_studio.tasks.pop(first["top_task"])  # deleted, and the count kept: one more task imported elsewhere...
    label_studio.task_list_stamp = lambda project_id: (len(label_studio.tasks) + 1, max(label_studio.tasks))
    with pytest.raises(rerank_module.TaskListOutdated, match="refused the predictions; the retry re-reads"):
        rerank("1", runtime, generation=2)  # ...so the stamp cannot tell, and the write is refused
    assert label_studio.project["model_version"] == first["model_version"]  # the previous ranking stays live
    retry = rerank("1", runtime, generation=3)
    assert retry["published"] and label_studio.task_list_reads == 2
    ranked = {p["task"] for p in label_studio.predictions if p["model_version"] == retry["model_version"]}
    assert first["top_task"] not in ranked


def test_a_stale_mark_that_comes_while_a_round_reads_the_task_list_is_kept_for_the_next_round(
    runtime, label_studio, monkeypatch
):
    # "Start Training" (or a deletion) while the first round pages through the tasks: what it read may predate the
    # edit, so the next round reads the whole list again rather than trusting the snapshot just saved
    read = label_studio.iter_tasks

    def start_training_meanwhile(project_id, fields="all"):
        runtime.snapshots.mark_stale("1")
        return read(project_id, fields)

    monkeypatch.setattr(label_studio, "iter_tasks", start_training_meanwhile)
    rerank("1", runtime, generation=1)
    assert runtime.snapshots.load("1") is None
    monkeypatch.setattr(label_studio, "iter_tasks", read)
    rerank("1", runtime, generation=2)
    assert label_studio.task_list_reads == 2 and runtime.snapshots.load("1") is not None
    rerank("1", runtime, generation=3)
    assert label_studio.task_list_reads == 2  # nothing marked since: the snapshot serves


def test_predictions_refused_to_the_api_key_keep_the_task_list_snapshot(runtime, label_studio, monkeypatch):
    from backend.errors import LabelStudioForbidden

    first = rerank("1", runtime, generation=1)

    def forbidden(project_id, predictions):
        raise LabelStudioForbidden("Label Studio POST /api/projects/1/import/predictions: HTTP 403 no permission")

    monkeypatch.setattr(label_studio, "import_predictions", forbidden)
    with pytest.raises(LabelStudioForbidden, match="HTTP 403"):
        rerank("1", runtime, generation=2)
    assert label_studio.project["model_version"] == first["model_version"]  # the previous ranking stays live
    # a refused key is not an outdated task list: retries must not re-read every task for it
    assert runtime.snapshots.load("1") is not None and label_studio.task_list_reads == 1


def test_predictions_label_studio_leaves_out_keep_the_previous_ranking_live(runtime, label_studio, monkeypatch):
    first = rerank("1", runtime, generation=1)
    label_studio.annotate(first["top_task"], label_studio.truth[first["top_task"]])
    write = label_studio.import_predictions

    def leaves_out_one(project_id, predictions):  # as its import does with a prediction that fails validation
        write(project_id, predictions[1:])
        return {"created": len(predictions) - 1}

    monkeypatch.setattr(label_studio, "import_predictions", leaves_out_one)
    with pytest.raises(rerank_module.PredictionsDropped, match="stored 19 of the round's 20 predictions"):
        rerank("1", runtime, generation=2)
    assert label_studio.project["model_version"] == first["model_version"]
    assert runtime.registry.live_version("1") == first["model_version"]
    monkeypatch.setattr(label_studio, "import_predictions", write)
    assert rerank("1", runtime, generation=3)["published"]  # the retry


def test_an_annotation_that_corrected_its_pre_annotation_stays_a_mistake_after_cleanup(runtime, label_studio):
    first = rerank("1", runtime, generation=1)
    shown = {p["task"]: p["result"][0]["value"]["choices"][0] for p in label_studio.predictions}
    corrected_task, confirmed_task = list(shown)[:2]
    label_studio.annotate(corrected_task, next(c for c in ("World", "Sports") if c != shown[corrected_task]))
    label_studio.annotate(confirmed_task, shown[confirmed_task])
    never_shown = next(task_id for task_id in label_studio.tasks if task_id not in shown)
    label_studio.annotate(never_shown, "Business")

    def corrected() -> dict[int, bool]:
        state = project_state.read_project_state(runtime, "1", project_state.Stopwatch())
        artifact = runtime.artifacts.load("1", runtime.artifacts.versions("1")[-1])
        dim = artifact.head.weights.shape[0]
        matrix = np.zeros((len(state.task_ids) + len(state.labelled), dim), np.float16)
        pool = pool_module.build_pool(state, artifact, matrix, np.zeros((len(state.labelled), dim)))
        unlabelled_rows, labelled_rows = np.split(pool.mistakes, [len(state.task_ids)])
        flagged = [example.task_id for example, mistake in zip(state.labelled, labelled_rows, strict=True) if mistake]
        assert not unlabelled_rows.any()
        assert flagged == [example.task_id for example in state.labelled if example.corrected]
        return {example.task_id: example.corrected for example in state.labelled}

    expected = {corrected_task: True, confirmed_task: False, never_shown: False}
    assert corrected() == expected
    second = rerank("1", runtime, generation=2)  # ranks other tasks: what the annotated ones were shown stays
    label_studio.delete_model_version(1, first["model_version"])
    assert second["published"] and corrected() == expected


def test_an_older_generation_never_publishes_over_a_newer_one(runtime, label_studio):
    rerank("1", runtime, generation=5)
    live = label_studio.project["model_version"]
    stale = rerank("1", runtime, generation=4)
    assert stale["published"] is False and label_studio.project["model_version"] == live


def test_rounds_publish_again_after_the_generation_counter_is_lost(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    for _ in range(3):
        assert jobs.rerank_project("1")["published"]
    runtime.redis.delete(generation_key("1"))  # evicted, e.g. by an allkeys-lru maxmemory policy
    label_studio.annotate(3, label_studio.truth[3])
    after = jobs.rerank_project("1")
    assert after["published"] and after["generation"] == 4  # not "overtaken" by the generation 3 that published
    assert runtime.registry.last_round("1")["annotations"] == 1


@pytest.mark.parametrize("finishes", ["after a newer round published", "before any newer round"])
def test_a_round_from_before_redis_lost_data_never_publishes_over_the_rounds_after(
    runtime, label_studio, monkeypatch, finishes
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    for _ in range(3):
        assert jobs.rerank_project("1")["published"]
    in_flight = runtime.queue.start_rerank("1")  # generation 4 reads Label Studio...
    runtime.redis.delete(generation_key("1"), published_key("1"))  # ...and Redis comes back without its counters
    label_studio.annotate(3, label_studio.truth[3])  # the annotation of the first round after the loss
    if finishes == "before any newer round":  # nothing newer can be replaced: it publishes, and later rounds too
        assert rerank("1", runtime, generation=in_flight)["published"]
        assert jobs.rerank_project("1")["generation"] == in_flight + 1
        return
    after = jobs.rerank_project("1")
    assert after["published"] and after["generation"] == 1  # counting again from the start
    live = label_studio.project["model_version"]
    runtime.queue.queue.empty()
    stale = rerank("1", runtime, generation=in_flight)
    assert not stale["published"] and label_studio.project["model_version"] == live
    assert runtime.registry.last_round("1")["annotations"] == 1  # the newer round's record stays
    [queued] = runtime.queue.queue.get_jobs()  # one more round ranks whatever the old one read
    assert queued.func_name == "backend.jobs.rerank_project" and queued.args[0] == "1"


def test_a_round_that_lost_its_lock_to_rounds_counting_past_it_does_not_publish(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    for _ in range(3):
        assert jobs.rerank_project("1")["published"]
    in_flight = runtime.queue.start_rerank("1")  # generation 4 takes the lock and reads Label Studio...
    lock = runtime.redis.lock("al:rerank:lock:1", timeout=60)
    assert lock.acquire(blocking=False)
    runtime.redis.delete(generation_key("1"), published_key("1"), lock.name)  # ...Redis is back from an older
    label_studio.annotate(3, label_studio.truth[3])  # snapshot, and the rounds after it, with this annotation,
    for _ in range(3):  # count from 1 again, beside it, as it holds no lock
        assert jobs.rerank_project("1")["published"]
    assert runtime.queue.start_rerank("1") == in_flight  # the counter is back at its generation
    live = label_studio.project["model_version"]
    runtime.queue.queue.empty()
    stale = rerank("1", runtime, generation=in_flight, lock=lock)
    assert not stale["published"] and stale["lost_lock"] and label_studio.project["model_version"] == live
    assert runtime.registry.last_round("1")["annotations"] == 1  # the newer rounds' record stays
    [queued] = runtime.queue.queue.get_jobs()  # one more round ranks whatever the old one read
    assert queued.func_name == "backend.jobs.rerank_project" and queued.args[0] == "1"


def test_a_round_whose_claim_redis_lost_while_writing_queues_one_more(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    assert jobs.rerank_project("1")["published"]
    live = label_studio.project["model_version"]
    written = rerank_module.write_predictions

    def write_then_lose_the_claim(*args):
        how = written(*args)
        runtime.redis.delete(published_key("1"))  # Redis back from a snapshot older than the claim, or evicted
        return how

    monkeypatch.setattr(rerank_module, "write_predictions", write_then_lose_the_claim)
    runtime.queue.queue.empty()
    outcome = rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    assert not outcome["published"] and label_studio.project["model_version"] == live  # no switch
    [queued] = runtime.queue.queue.get_jobs()  # and no newer round ranks what it read: one more does
    assert queued.func_name == "backend.jobs.rerank_project" and queued.args[0] == "1"


def test_an_overtaken_round_keeps_the_record_that_reconciliation_compares_with(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    rerank("1", runtime, generation=5)
    label_studio.annotate(3, label_studio.truth[3])  # its webhook is lost
    stale = rerank("1", runtime, generation=4)  # sees the annotation, but a newer round's ranking is live
    assert stale["published"] is False and stale["overtaken"] is True
    assert runtime.registry.last_round("1")["generation"] == 5
    assert reconciliation.reconcile_project("1")["reasons"] == ["annotations, tasks or the label config changed"]


def test_a_job_that_gets_the_lock_after_a_newer_round_published_skips_its_round(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    taken = runtime.queue.start_rerank("1")  # this job took its generation as it started...
    rerank("1", runtime, generation=runtime.queue.start_rerank("1"))  # ...a follower on another worker took the
    versions = runtime.artifacts.versions("1")  # next, got the lock first and published
    monkeypatch.setattr(runtime.queue, "start_rerank", lambda project: taken)
    outcome = jobs.rerank_project("1")
    assert outcome["overtaken"] is True and outcome["published"] is False
    assert runtime.artifacts.versions("1") == versions  # no training, no reading Label Studio


def test_many_uncached_texts_become_chunk_jobs_and_a_follow_up_round(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(project_state, "ENCODE_CHUNK", 25)
    summary = rerank("1", runtime, generation=1)
    assert summary["published"] is False and "3 chunk jobs" in summary["encoding"]
    job_ids = runtime.encoding.queue.get_job_ids() + runtime.queue.queue.deferred_job_registry.get_job_ids()
    assert sum(job_id.startswith("encode-1-") for job_id in job_ids) == 3
    assert runtime.encoding.progress("1") == {"chunks": 3, "done": 0, "failed": 0, "texts": 60}
    assert runtime.projects.metrics()["encoding_queue_length"] == 3


def test_rounds_during_the_first_encoding_do_not_read_every_task_again(runtime, label_studio, monkeypatch):
    # reading a big project's task list takes minutes: once per encoding, not once per annotation meanwhile
    monkeypatch.setattr(project_state, "ENCODE_CHUNK", 25)
    rerank("1", runtime, generation=1)  # reads the task list, queues 3 chunk jobs and the round after them
    assert label_studio.task_list_reads == 1
    label_studio.annotate(3, label_studio.truth[3])
    assert rerank("1", runtime, generation=2) == {"generation": 2, "published": False, "encoding": "under way"}
    assert label_studio.task_list_reads == 1  # (with a chunk failed for good it re-reads: the test below)


def test_tasks_deleted_during_the_first_encoding_leave_its_chunks_as_they_are(runtime, label_studio, monkeypatch):
    # chunk ids are made from their texts: the task list read again without task 1 would be chunked otherwise, and
    # every chunk after it queued a second time (a million-task pool: most of an hour's encoding done twice)
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(project_state, "ENCODE_CHUNK", 25)
    rerank("1", runtime, generation=1)  # 3 chunk jobs, and the round after them
    chunks = sorted(runtime.encoding.queue.get_job_ids())
    del label_studio.tasks[1]
    label_studio.project["task_number"] = len(label_studio.tasks)
    runtime.snapshots.mark_stale("1")  # as TASKS_DELETED does
    assert rerank("1", runtime, generation=2) == {"generation": 2, "published": False, "encoding": "under way"}
    assert label_studio.task_list_reads == 2
    assert sorted(runtime.encoding.queue.get_job_ids()) == chunks
    assert runtime.encoding.progress("1") == {"chunks": 3, "done": 0, "failed": 0, "texts": 60}
    SimpleWorker(runtime.queues, connection=runtime.redis).work(burst=True)
    runs = runtime.redis.hgetall(encoding_runs_key("1"))
    assert sorted(job_id.decode() for job_id in runs) == chunks and set(runs.values()) == {b"1"}
    assert runtime.registry.last_round("1")["published"] and runtime.registry.last_round("1")["unlabelled"] == 59


def test_pool_encoded_once_already_is_encoded_again_when_its_vectors_are_gone(runtime, label_studio, monkeypatch):
    # e.g. MODEL_NAME switched to a fine-tuned folder, or Redis evicted the cache, within an hour of the first
    # encoding: the chunk jobs (ids = hash of the texts) are still there, finished
    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(project_state, "ENCODE_CHUNK", 25)
    queue = runtime.queue.queue
    runtime.queue.request_rerank("1", "connected")
    SimpleWorker(runtime.queues, connection=runtime.redis).work(burst=True)
    assert runtime.registry.last_round("1")["published"]
    runtime.redis.delete(runtime.embedding_cache.key)
    label_studio.annotate(5, label_studio.truth[5])
    runtime.queue.request_rerank("1", "ANNOTATION_CREATED")
    SimpleWorker(runtime.queues, connection=runtime.redis).work(burst=True, max_jobs=20)
    assert len(queue) == len(runtime.encoding.queue) == 0, "the follow-up round kept re-queueing itself"
    assert runtime.registry.last_round("1")["annotations"] == 1 and runtime.registry.last_round("1")["published"]


def test_a_chunk_encoded_again_while_its_round_waits_still_releases_that_round(runtime, label_studio, monkeypatch):
    # rq deletes a job's list of dependents with the job: the round waiting on a finished chunk that is encoded
    # again (its vectors evicted meanwhile) must be queued again, or it waits for ever and every round defers to it
    from rq.job import Job, JobStatus

    monkeypatch.setattr(jobs, "_runtime", runtime)
    queue = runtime.encoding.queue
    texts = [task["data"]["text"] for task in label_studio.tasks.values()]
    chunks = [texts[:30], texts[30:]]
    first, second = runtime.encoding.enqueue("1", chunks)
    follow_up = runtime.redis.get(encoding_follow_up_key("1")).decode()
    queue.remove(second)  # the second chunk waits (another worker is slow to take it)...
    SimpleWorker(runtime.queues, connection=runtime.redis).work(burst=True)  # ...while the first is encoded
    assert Job.fetch(follow_up, connection=runtime.redis).get_status() == JobStatus.DEFERRED
    runtime.redis.delete(runtime.embedding_cache.key)  # its vectors are evicted; a round asks for both again
    assert runtime.encoding.enqueue("1", chunks) == [first, second]
    queue.enqueue_job(Job.fetch(second, connection=runtime.redis), at_front=True)  # the slow worker takes it
    SimpleWorker(runtime.queues, connection=runtime.redis).work(burst=True)
    assert Job.fetch(follow_up, connection=runtime.redis).get_status() == JobStatus.FINISHED
    assert runtime.encoding.pending("1") is False
    assert runtime.registry.last_round("1")["published"]


def test_a_reconciliation_on_a_clock_behind_the_schedulers_still_schedules_the_next(runtime, label_studio, monkeypatch):
    # scheduled by a machine whose clock is ahead, it runs where the clock still reads the period before its slot:
    # the slot its own clock gives the next one is its own id, which must not end the chain
    from rq.registry import ScheduledJobRegistry

    from backend.adapters.queue import reconcile_job_id, reconcile_slot

    monkeypatch.setattr(jobs, "_runtime", runtime)
    interval = runtime.settings.reconcile_interval
    own = int(time.time() // interval) + 1
    first_id = reconcile_job_id("1", own)
    runtime.queue.queue.enqueue_call("backend.reconciliation.reconcile_project", args=("1",), job_id=first_id)
    SimpleWorker([runtime.queue.queue], connection=runtime.redis).work(burst=True)
    scheduled = ScheduledJobRegistry(queue=runtime.queue.queue).get_job_ids()
    assert [reconcile_slot("1", job_id) > own for job_id in scheduled] == [True]


def test_a_reconciliation_of_a_chain_a_newer_one_replaced_ends_its_chain(runtime, label_studio, monkeypatch):
    # the project connected again (or its chain restarted) while an older chain's pass waited: with passes spaced
    # by how long each read took, the two would never land on the same slot, and both would go on reading. The
    # pass itself still reads and repairs: under a backlog, every pass may find itself replaced by then
    from rq.registry import ScheduledJobRegistry

    from backend.adapters.queue import reconcile_job_id, reconcile_slot

    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    interval = runtime.settings.reconcile_interval
    runtime.queue.schedule_reconcile("1", interval)  # the newer chain
    scheduled = ScheduledJobRegistry(queue=runtime.queue.queue)
    [newer] = scheduled.get_job_ids()
    older = reconcile_job_id("1", reconcile_slot("1", newer) - 3)
    runtime.queue.queue.enqueue_call("backend.reconciliation.reconcile_project", args=("1",), job_id=older)
    SimpleWorker([runtime.queue.queue], connection=runtime.redis).work(burst=True)
    assert scheduled.get_job_ids() == [newer]  # the older chain scheduled no successor...
    assert runtime.queue.queue.fetch_job(older).return_value()["rerank"] == "enqueued"  # ...and repaired all the same
    runtime.queue.queue.fetch_job(newer).delete()  # its time comes: run it now
    runtime.queue.queue.enqueue_call("backend.reconciliation.reconcile_project", args=("1",), job_id=newer)
    SimpleWorker([runtime.queue.queue], connection=runtime.redis).work(burst=True)  # the newer chain goes on
    assert [reconcile_slot("1", job_id) > reconcile_slot("1", newer) for job_id in scheduled.get_job_ids()] == [True]


def test_a_reconciliation_whose_read_took_long_spaces_out_the_next(runtime, label_studio, monkeypatch):
    # each pass reads every annotation's id and update time: for tens of thousands of annotations that takes
    # longer than the interval, and back-to-back passes would keep a worker (and Label Studio) busy for good
    from rq.registry import ScheduledJobRegistry

    monkeypatch.setattr(jobs, "_runtime", runtime)
    interval = runtime.settings.reconcile_interval
    scheduled = ScheduledJobRegistry(queue=runtime.queue.queue)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    runtime.registry.record_reconcile_read("1", interval / 10)  # a fast read: the next pass in one interval
    reconciliation.reconcile_project("1")
    [job_id] = scheduled.get_job_ids()
    assert interval - 5 < scheduled.get_scheduled_time(job_id).timestamp() - time.time() <= interval
    assert runtime.registry.reconcile_read_seconds("1") < interval / 10  # this pass's own read, recorded
    scheduled.remove(job_id)
    runtime.registry.record_reconcile_read("1", interval)  # a read as long as the interval
    reconciliation.reconcile_project("1")
    [job_id] = scheduled.get_job_ids()
    due = scheduled.get_scheduled_time(job_id).timestamp() - time.time()
    assert 5 * interval - 5 < due <= 5 * interval  # RECONCILE_SHARE = 0.2
    assert runtime.queue.reconcile_scheduled("1")  # the chain stays alive over the longer wait
    read = runtime.projects.metrics()["projects"]["1"]["reconcile_read_seconds"]
    assert read < interval / 10  # shown in /metrics: this pass's read, not the long one before (a fake Label
    # Studio answers in well under the millisecond it is stored to, so 0.0 is a valid figure here)


def test_a_label_config_that_reads_another_field_ranks_the_new_texts(runtime, label_studio):
    for task in label_studio.tasks.values():
        task["data"]["headline"] = f"headline {task['id']}: " + task["data"]["text"][:30]
    rerank("1", runtime, generation=1)
    label_studio.project["label_config"] = AG_NEWS_CONFIG.replace('value="$text"', 'value="$headline"')
    rerank("1", runtime, generation=2)  # the task list itself did not change
    expected = {text_key(task["data"]["headline"]) for task in label_studio.tasks.values()}
    assert set(runtime.snapshots.load("1").text_keys) == expected


def test_reconciliation_requests_a_round_only_when_label_studio_changed(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    first = rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    assert first["published"]
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}
    label_studio.annotate(3, label_studio.truth[3])  # a webhook that never arrived
    outcome = reconciliation.reconcile_project("1")
    assert outcome["rerank"] == "enqueued" and outcome["reasons"] == ["annotations, tasks or the label config changed"]
    label_studio.project["model_version"] = ""  # reset from the UI
    assert "model version is ''" in reconciliation.reconcile_project("1")["reasons"]


@pytest.mark.parametrize("change", ["relabelled", "rewritten in place", "deleted"])
def test_reconciliation_notices_an_annotation_changed_or_deleted_whose_webhook_was_lost(
    runtime, label_studio, monkeypatch, change
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    label_studio.annotate(3, "World")
    assert rerank("1", runtime, generation=runtime.queue.start_rerank("1"))["published"]
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}
    if change == "relabelled":  # the same annotation, changed
        (annotation,) = label_studio.tasks[3]["annotations"]
        annotation["result"][0]["value"]["choices"] = ["Sports"]
        annotation["updated_at"] = "2026-11-23T11:00:00Z"
    elif change == "rewritten in place":  # Label Studio's "Rename Labels" action and /api/labels/bulk write the
        (annotation,) = label_studio.tasks[3]["annotations"]  # result alone: no webhook, updated_at unchanged
        annotation["result"][0]["value"]["choices"] = ["Sports"]
    else:
        label_studio.tasks[3]["annotations"] = []
    outcome = reconciliation.reconcile_project("1")
    assert outcome["rerank"] == "enqueued" and outcome["reasons"] == ["annotations, tasks or the label config changed"]


def test_reconciliation_notices_ranking_predictions_deleted_from_the_data_manager(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    live = jobs.rerank_project("1")
    top = live["top_task"]  # "Delete predictions" sends no webhook and keeps the project's model version
    label_studio.predictions = [p for p in label_studio.predictions if p["task"] != top]
    outcome = reconciliation.reconcile_project("1")
    assert outcome["reasons"] == [f"1 of the live ranking's {live['ranked']} predictions were deleted"]
    assert jobs.rerank_project("1")["published"]
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}  # the new ranking is whole


def test_a_fully_labelled_project_whose_version_was_reset_is_not_reranked_every_interval(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    jobs.rerank_project("1")
    for task_id in label_studio.tasks:
        label_studio.annotate(task_id, label_studio.truth[task_id])
    assert jobs.rerank_project("1")["ranked"] == 0  # nothing left to rank, so no version to switch to
    label_studio.project["model_version"] = None  # e.g. the old predictions deleted in the project's settings
    # a round would have nothing to rank either
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}
    label_studio.replace_task(1, "A task imported while the webhooks were lost")
    assert reconciliation.reconcile_project("1")["reasons"] == ["annotations, tasks or the label config changed"]


@pytest.fixture(
    params=[
        LabelStudioRejected("Label Studio GET /api/webhooks/: HTTP 403"),
        LabelStudioUnavailable("Label Studio GET /api/webhooks/ timed out"),
    ],
    ids=["refused", "timed out"],
)
def webhooks_refused(runtime, label_studio, monkeypatch, request):
    """Basic auth on, the jobs on `runtime`, and a Label Studio that refuses (403) to show its webhooks, or does
    not answer in time."""
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.settings = replace(runtime.settings, basic_auth_user="ls", basic_auth_pass="secret")

    def refuse(project_id):
        raise request.param

    label_studio.webhooks = refuse


def test_reconciliation_still_compares_when_label_studio_refuses_to_secure_the_webhook(
    runtime, label_studio, webhooks_refused
):
    rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    label_studio.annotate(3, label_studio.truth[3])  # a webhook that never arrived
    assert reconciliation.reconcile_project("1")["reasons"] == ["annotations, tasks or the label config changed"]


def test_a_webhook_label_studio_refuses_to_secure_holds_up_neither_the_set_up_nor_the_first_ranking(
    runtime, label_studio, webhooks_refused
):
    assert jobs.connect_project("1")["rerank"] == "enqueued"
    assert label_studio.project["sampling"] == "Uncertainty sampling"
    assert runtime.registry.settings_before_connect("1") == {
        "sampling": "Sequential sampling",
        "show_collab_predictions": False,
    }


def test_only_the_webhook_of_this_backend_gets_its_credentials_never_another_backends(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.settings = replace(runtime.settings, basic_auth_user="ls", basic_auth_pass="secret")
    label_studio.backends = [
        {"id": 1, "url": "http://backend:9090", "model_version": "al-1-2-3"},
        {"id": 2, "url": "http://other-vendor:9090/", "model_version": "their-model-7"},
    ]
    hooks = {
        10: {"id": 10, "url": "http://backend:9090/webhook", "headers": {}},
        11: {"id": 11, "url": "http://other-vendor:9090/webhook", "headers": {"X-Theirs": "1"}},
    }
    label_studio.webhooks = lambda project_id: [dict(hook) for hook in hooks.values()]
    label_studio.update_webhook = lambda hook_id, headers: hooks[hook_id].update(headers=headers)

    assert jobs.secure_webhooks(runtime, "1") == 1
    assert hooks[10]["headers"] == {"Authorization": "Basic bHM6c2VjcmV0"}  # base64 of ls:secret
    assert hooks[11]["headers"] == {"X-Theirs": "1"}
    assert jobs.secure_webhooks(runtime, "1") == 0  # already secured: nothing written again


def test_reconciliation_configures_the_project_even_when_securing_its_webhook_is_refused(
    runtime, label_studio, webhooks_refused
):
    rerank("1", runtime, generation=runtime.queue.start_rerank("1"))  # the connect job had failed for good
    reconciliation.reconcile_project("1")
    assert label_studio.project["sampling"] == "Uncertainty sampling"


def test_a_connection_refused_on_its_last_try_shows_as_failing_until_a_round_runs(runtime, label_studio, monkeypatch):
    # a wrong LABEL_STUDIO_API_KEY: without this, /metrics showed nothing until an annotation's round failed too
    from backend.errors import LabelStudioForbidden

    def refused(project_id):
        raise LabelStudioForbidden("Label Studio PATCH /api/projects/1: HTTP 401 (LABEL_STUDIO_API_KEY is not ...)")

    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(label_studio, "configure_for_active_learning", refused)
    with pytest.raises(LabelStudioForbidden):
        jobs.connect_project("1")  # outside rq: its last try
    assert runtime.registry.failing("1")["reason"].startswith("connecting: LabelStudioForbidden: ")
    monkeypatch.undo()
    monkeypatch.setattr(jobs, "_runtime", runtime)
    # the key fixed: the next reconciliation configures the project and ranks it, without backing off first
    assert reconciliation.reconcile_project("1")["rerank"] == "enqueued" and runtime.registry.failing("1") is None
    assert label_studio.project["sampling"] == "Uncertainty sampling"


def test_a_rerank_waits_for_its_projects_lock_half_of_job_timeout_then_fails_to_be_retried(runtime):
    # rq counts JOB_TIMEOUT from the job's start: a job that waited it all out would be killed mid-round
    runtime.settings = replace(runtime.settings, job_timeout=6)
    runtime.redis.set("al:rerank:lock:1", "another worker's round")
    started = time.monotonic()
    with pytest.raises(redis.exceptions.LockError, match="not free within half of JOB_TIMEOUT=6 s"):
        with round_lock(runtime, "1", generation=1):
            pass
    assert 3 <= time.monotonic() - started < 6  # gave up at half, with half left for a loaded machine's slack


def test_a_round_whose_lock_never_came_free_on_its_last_try_counts_as_failed(runtime, label_studio, monkeypatch):
    # so that reconciliation backs off from it as from any round that failed for good
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.settings = replace(runtime.settings, job_timeout=2)
    runtime.redis.set("al:rerank:lock:1", "another worker's round")
    with pytest.raises(redis.exceptions.LockError):
        jobs.rerank_project("1")  # outside rq: its last try
    assert runtime.registry.failing("1")["reason"].startswith("LockError: ")
    assert runtime.registry.failing("1")["rounds"] == 1


def test_a_round_lock_that_expired_meanwhile_does_not_fail_the_round(runtime, caplog):
    with round_lock(runtime, "1", generation=1) as held:
        assert held
        runtime.redis.delete("al:rerank:lock:1")  # expired while Redis was away longer than its timeout
    # no LockNotOwnedError: the round's work stands, and the log says what happened
    assert "project 1: round lock had expired before the round released it" in caplog.text
    with round_lock(runtime, "1", generation=2) as held:  # and the next round takes the lock at once
        assert held and runtime.redis.exists("al:rerank:lock:1")


def test_a_project_redis_lost_every_record_of_is_revived_from_its_heads_on_disk(runtime, label_studio, monkeypatch):
    # Redis back without its data (no persistence): Label Studio calls /setup again only when someone opens the
    # project's Model settings, so an annotation whose webhook Redis refused meanwhile would wait for good
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    runtime.registry.save_setup("2", AG_NEWS_CONFIG, {})
    runtime.registry.disconnect("2", "no ML backend connected", runtime.registry.setups("2"))
    runtime.artifacts.project_dir("2").mkdir(parents=True)  # its heads stay, for inspection
    runtime.redis.flushdb()
    label_studio.annotate(1, label_studio.truth[1])  # its webhook refused: Redis was away
    runtime.registry.disconnect("2", "no ML backend connected", 0)  # recorded again since: left alone
    assert reconciliation.revive_reconciliations(runtime) == ["1"]
    assert reconciliation.revive_reconciliations(runtime) == []  # alive now: not doubled
    # connected in Label Studio, and nothing seen yet
    assert reconciliation.reconcile_project("1")["rerank"] == "enqueued"
    summary = rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    assert summary["annotations"] == 1 and runtime.registry.is_connected("1")  # the annotation counts, and
    assert "connect-1" in runtime.queue.queue.job_ids, runtime.queue.queue.jobs  # set up again as at a first /setup


def test_reconciliation_completes_a_set_up_that_never_succeeded_and_keeps_the_first_settings(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    rerank("1", runtime, generation=runtime.queue.start_rerank("1"))  # the connect job had failed for good
    assert label_studio.project["sampling"] == "Sequential sampling"
    # the ranking is current; only the set-up was not
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}
    assert (
        label_studio.project["sampling"] == "Uncertainty sampling" and label_studio.project["show_collab_predictions"]
    )
    before = {"sampling": "Sequential sampling", "show_collab_predictions": False}
    assert runtime.registry.settings_before_connect("1") == before
    jobs.connect_project("1")  # connected again later: finds the backend's own values, keeps the first ones
    assert runtime.registry.settings_before_connect("1") == before


def test_the_users_settings_are_kept_when_a_reconciliation_records_the_backends_own_first(runtime, label_studio):
    before = {"sampling": "Sequential sampling", "show_collab_predictions": False}
    user_values = label_studio.configure_for_active_learning(1)  # the connect job switched the project...
    jobs.configure_project(runtime, "1")  # ...a reconciliation, seeing no record yet, read the backend's values back
    assert runtime.registry.settings_before_connect("1") == ACTIVE_LEARNING_SETTINGS
    runtime.registry.record_settings_before_connect("1", user_values, ours=ACTIVE_LEARNING_SETTINGS)  # connect's
    assert runtime.registry.settings_before_connect("1") == before
    jobs.configure_project(runtime, "1")  # connecting again later changes nothing either
    runtime.registry.record_settings_before_connect(
        "1", {"sampling": "Uniform sampling"}, ours=ACTIVE_LEARNING_SETTINGS
    )
    assert runtime.registry.settings_before_connect("1") == before


def test_a_config_edit_label_studio_could_not_tell_setup_about_does_not_make_rounds_queue_rounds(runtime, label_studio):
    from backend.protocol import WebhookEvent

    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    edited = AG_NEWS_CONFIG.replace('value="Sports"', 'value="Sport"')
    label_studio.project["label_config"] = edited  # and /setup unreachable (say, stale basic-auth credentials)
    first = rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    # the PROJECT_UPDATED that the round's own version switch makes Label Studio post
    switch = WebhookEvent("PROJECT_UPDATED", "1", {"project": {"model_version": first["model_version"]}})
    switch.payload["project"]["label_config"] = edited
    assert runtime.projects.on_event(switch) == {"rerank": "not needed"}  # not one more round after each round
    assert runtime.registry.label_config("1") == edited  # and /predict without a config reads the current one


def test_a_round_switching_versions_while_reconciliation_reads_label_studio_queues_no_other(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    label_studio.annotate(1, "Sports")
    read = reconciliation.read_connected_project

    def a_round_publishes_right_after(*args):
        reading = read(*args)  # Label Studio still on the previous version, the annotation in
        rerank("1", runtime, generation=runtime.queue.start_rerank("1"))  # that annotation's round
        return reading

    monkeypatch.setattr(reconciliation, "read_connected_project", a_round_publishes_right_after)
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}
    monkeypatch.setattr(reconciliation, "read_connected_project", read)
    label_studio.project["model_version"] = "reset from the UI"  # a version neither before nor after: a repair
    assert reconciliation.reconcile_project("1")["reasons"] == ["model version is 'reset from the UI'"]


def test_reconciliation_notices_tasks_replaced_with_the_count_unchanged(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    first = rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}
    label_studio.replace_task(first["top_task"], "A new task, imported while the webhooks were lost")
    assert reconciliation.reconcile_project("1")["reasons"] == ["annotations, tasks or the label config changed"]


def test_reconciliation_notices_a_label_config_change_whose_webhook_was_lost(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}
    label_studio.project["label_config"] = AG_NEWS_CONFIG.replace('value="Sports"', 'value="Sport"')
    assert 'value="Sport"' in label_studio.project["label_config"]  # a choice renamed; PROJECT_UPDATED was lost
    outcome = reconciliation.reconcile_project("1")
    assert outcome["reasons"] == ["annotations, tasks or the label config changed"]
    summary = rerank("1", runtime, generation=runtime.queue.start_rerank("1"))
    assert summary["published"] and reconciliation.reconcile_project("1") == {"rerank": "not needed"}


def test_a_project_switched_to_another_ml_backend_is_left_alone(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    ours = {"id": 1, "url": "http://backend:9090", "model_version": "al-v000001-20261124T100000-predict"}
    other = {"id": 2, "url": "http://other-backend:9090", "model_version": "sentiment-v3"}
    not_yet_answered = {"id": 3, "url": "http://new-backend:9090", "model_version": ""}
    for backends in ([ours, other], [other, not_yet_answered]):  # this backend may be among them: go on
        label_studio.backends = backends
        assert jobs.rerank_project("1")["published"]
    live = label_studio.project["model_version"]
    label_studio.backends = [other]  # ours removed, another one connected instead
    outcome = jobs.rerank_project("1")
    assert outcome["published"] is False and "only other ML backends connected" in outcome["disconnected"]
    assert "http://other-backend:9090 (sentiment-v3)" in outcome["disconnected"]
    assert runtime.registry.is_disconnected("1")
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed", "disconnected": True}
    assert label_studio.project["model_version"] == live  # the other backend's project is no longer switched


def test_a_project_whose_first_setup_came_while_redis_was_away_is_set_up_by_its_first_round(
    runtime, label_studio, monkeypatch, caplog
):
    """/setup answers while Redis is away (nothing recorded, no connect job); webhooks then queue rounds, which
    publish, but Label Studio would keep its sampling and serve none of it, and no reconciliation would repair
    lost webhooks. The first round records the connection and queues what a first /setup queues."""
    monkeypatch.setattr(jobs, "_runtime", runtime)
    assert runtime.registry.projects() == [] and label_studio.project["sampling"] == "Sequential sampling"
    assert jobs.rerank_project("1")["published"]
    assert runtime.registry.projects() == ["1"] and runtime.queue.reconcile_scheduled("1")
    assert "no /setup of it was recorded" in caplog.text
    connect = runtime.queue.queue.fetch_job("connect-1")
    assert connect.func_name == "backend.jobs.connect_project"
    assert connect.perform()["rerank"] == "enqueued"
    assert label_studio.project["sampling"] == "Uncertainty sampling"
    caplog.clear()
    jobs.rerank_project("1")
    assert "no /setup" not in caplog.text  # recorded once: later rounds queue nothing more
    assert [job_id for job_id in runtime.queue.queue.get_job_ids() if job_id.startswith("connect-")] == ["connect-1"]


def test_removing_the_backend_or_deleting_the_project_stops_the_work_on_it(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    live = jobs.rerank_project("1")["model_version"]
    known = (runtime.snapshots.load("1").task_ids.tolist(), runtime.artifacts.versions("1"))
    known_round, known_shown = runtime.registry.last_round("1"), runtime.registry.shown("1", list(label_studio.tasks))
    label_studio.backends = []  # "Delete" in the project's Model settings; its webhook keeps posting
    label_studio.annotate(3, label_studio.truth[3])
    outcome = jobs.rerank_project("1")
    assert outcome["published"] is False and "no ML backend" in outcome["disconnected"]
    assert label_studio.project["model_version"] == live and runtime.registry.is_disconnected("1")
    assert {p["model_version"] for p in label_studio.predictions} == {live}  # nothing written

    scheduled = runtime.queue.queue.scheduled_job_registry
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed", "disconnected": True}
    assert scheduled.get_job_ids() == []  # the chain of reconciliations ends
    # removed from the project, not deleted: what the backend knows of it stays, for connecting it again
    assert (runtime.snapshots.load("1").task_ids.tolist(), runtime.artifacts.versions("1")) == known
    assert known[1] and list(runtime.matrix_files.folder.glob("1-*.f16"))
    assert runtime.registry.last_round("1") == known_round
    assert runtime.registry.shown("1", list(label_studio.tasks)) == known_shown and known_shown

    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})  # connected again, then the project is deleted
    label_studio.backends = [{"id": 2, "url": "http://backend:9090", "project": 1}]
    runtime.registry.count_event("1", "ANNOTATION_CREATED")
    label_studio.deleted = True
    # it hands the deletion to a round, which holds the project's round lock
    outcome = reconciliation.reconcile_project("1")
    assert outcome["rerank"] == "enqueued" and "no longer exists" in outcome["reasons"][0]
    assert runtime.snapshots.load("1") is not None  # nothing deleted outside the lock
    outcome = jobs.rerank_project("1")
    assert "no longer exists" in outcome["disconnected"] and runtime.registry.is_disconnected("1")
    # deleted: its task list, head versions and records go, and a new project with its id would start clean
    assert runtime.snapshots.load("1") is None and runtime.artifacts.versions("1") == []
    assert not list(runtime.matrix_files.folder.glob("1-*.f16"))
    assert runtime.registry.last_round("1") is None and runtime.registry.label_config("1") is None
    assert runtime.registry.event_counts("1") == {} and runtime.registry.shown("1", list(label_studio.tasks)) == {}
    assert "no longer exists" in runtime.projects.metrics()["disconnected"]["1"]["reason"]
    assert jobs.rerank_project("1")["disconnected"] and jobs.cleanup_versions("1", live) == []
    assert not runtime.registry.count_event("1", "PROJECT_DELETED")  # Label Studio's last word brings nothing back
    assert runtime.registry.event_counts("1") == {}


def test_a_project_deleted_after_its_backend_was_removed_is_forgotten_by_the_hourly_sweep(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    jobs.rerank_project("1")
    label_studio.backends = []  # removed first: no round or reconciliation comes for the project any more
    assert "no ML backend" in jobs.rerank_project("1")["disconnected"]
    assert reconciliation.sweep_disconnected_projects(runtime)  # queued...
    assert not reconciliation.sweep_disconnected_projects(runtime)  # ...once an hour, whichever worker asks
    # still in Label Studio: kept, for connecting the backend again
    assert reconciliation.forget_deleted_projects() == []
    assert runtime.snapshots.load("1") is not None and runtime.artifacts.versions("1")

    label_studio.deleted = True  # then the project is deleted
    ask = label_studio.get_project

    def times_out(project_id):
        raise LabelStudioUnavailable("GET /api/projects/1/ timed out")

    monkeypatch.setattr(label_studio, "get_project", times_out)
    # a project Label Studio does not answer for is skipped, not failed: the next sweep asks again
    assert reconciliation.forget_deleted_projects() == []
    monkeypatch.setattr(label_studio, "get_project", ask)
    assert reconciliation.forget_deleted_projects() == ["1"]
    assert runtime.snapshots.load("1") is None and runtime.artifacts.versions("1") == []
    assert not list(runtime.matrix_files.folder.glob("1-*.f16")) and runtime.registry.last_round("1") is None
    assert "no longer exists" in runtime.registry.disconnected()["1"]["reason"]
    assert reconciliation.forget_deleted_projects() == []  # nothing left to ask Label Studio about
    runtime.redis.delete("al:sweep:disconnected")
    assert not reconciliation.sweep_disconnected_projects(runtime)


def test_a_label_studio_url_answering_404_to_everything_is_not_taken_for_a_deleted_project(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    jobs.connect_project("1")
    before_connect = runtime.registry.settings_before_connect("1")
    live = jobs.rerank_project("1")["model_version"]
    label_studio.answers_404_to_everything = True  # e.g. LABEL_STUDIO_URL changed to a wrong path, a proxy's 404
    for job in (jobs.rerank_project, reconciliation.reconcile_project):
        with pytest.raises(LabelStudioUnavailable, match="404 to GET /api/projects/ too"):  # failed: rq retries it
            job("1")
    # nothing forgotten: the undo record, the head versions, the task list, the last round
    assert not runtime.registry.is_disconnected("1")
    assert runtime.registry.settings_before_connect("1") == before_connect is not None
    assert runtime.snapshots.load("1") is not None and runtime.artifacts.versions("1")
    assert runtime.registry.last_round("1")["model_version"] == live
    label_studio.answers_404_to_everything = False
    label_studio.annotate(3, label_studio.truth[3])
    assert jobs.rerank_project("1")["published"]


@pytest.mark.parametrize("job", [jobs.rerank_project, reconciliation.reconcile_project], ids=lambda job: job.__name__)
def test_a_connection_made_while_a_job_finds_the_project_disconnected_stands(runtime, label_studio, monkeypatch, job):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    assert jobs.rerank_project("1")["published"]
    label_studio.backends = []  # the user removed the backend and adds it again while the job reads Label Studio:

    def no_backend_yet(project_id):
        runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG))  # Label Studio's /setup for the new one
        label_studio.backends = [{"id": 2, "url": "http://backend:9090", "project": 1}]
        return []  # what the job had read a moment before

    monkeypatch.setattr(label_studio, "ml_backends", no_backend_yet)
    outcome = job("1")
    assert "no ML backend" in outcome["connected_again"] and outcome["rerank"] == "enqueued"
    assert runtime.registry.is_connected("1") and not runtime.registry.is_disconnected("1")
    monkeypatch.undo()
    monkeypatch.setattr(jobs, "_runtime", runtime)
    assert jobs.rerank_project("1")["published"]  # the round that follows serves the project again


def test_a_new_project_connected_under_a_deleted_ones_id_while_a_round_finds_it_deleted_is_set_up_anew(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, extra_params={"rank_top_k": 5}))
    jobs.connect_project("1")
    assert jobs.rerank_project("1")["published"]
    runtime.registry.count_event("1", "ANNOTATION_CREATED")
    old_undo = runtime.registry.settings_before_connect("1")
    ask = label_studio.get_project

    def deleted_and_replaced(project_id):  # a Label Studio on a new database gives a new project this id; it
        runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, extra_params={"rank_top_k": 7}))  # calls /setup
        label_studio.deleted = True  # for the new project, while the round reads the old one
        return ask(project_id)

    monkeypatch.setattr(label_studio, "get_project", deleted_and_replaced)
    outcome = jobs.rerank_project("1")
    assert "no longer exists" in outcome["connected_again"] and outcome["connect"] == "enqueued"
    # the new project's /setup stands; the old project's files and records are gone
    assert runtime.registry.is_connected("1") and not runtime.registry.is_disconnected("1")
    assert runtime.registry.params("1") == {"rank_top_k": 7} and runtime.registry.label_config("1") == AG_NEWS_CONFIG
    assert runtime.registry.last_round("1") is None and runtime.registry.event_counts("1") == {}
    assert old_undo is not None and runtime.registry.settings_before_connect("1") is None  # not the old one's
    assert runtime.artifacts.versions("1") == [] and runtime.snapshots.load("1") is None
    assert "connect-1" in runtime.queue.queue.get_job_ids()  # configured as at any first connection


def test_another_project_set_up_under_a_known_id_starts_anew(runtime, label_studio, monkeypatch):
    # Label Studio started on a new database, the backend's Redis and MODEL_DIR kept: project 1 is another one,
    # and only the creation time in the "id.timestamp" uid of its /setup tells
    from rq.job import Job, JobStatus

    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1732356000"))
    jobs.connect_project("1")
    assert jobs.rerank_project("1")["published"]
    runtime.registry.count_event("1", "ANNOTATION_CREATED")
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1732356000"))  # the same one: nothing queued
    assert not [job_id for job_id in runtime.queue.queue.get_job_ids() if job_id.startswith("anew-")]

    label_studio.project.update(sampling="Sequential sampling", show_collab_predictions=False)  # the new project's
    anew = "anew-1-1800000000"
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1800000000"))
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1800000000"))  # before every /predict
    assert runtime.queue.queue.get_job_ids().count(anew) == 1
    runtime.queue.queue.remove(anew)  # the job failed for good (say, its lock never came free)
    Job.fetch(anew, connection=runtime.redis).set_status(JobStatus.FAILED)
    assert runtime.registry.created("1") == "1732356000"  # the old project's records are still there...
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1800000000"))
    assert anew in runtime.queue.queue.get_job_ids()  # ...so the next /setup asks again

    import threading

    # another worker's round holds the lock, and a newer round starts while the job waits: it does not give way
    runtime.redis.set("al:rerank:lock:1", "another worker's round", px=1500)
    threading.Timer(0.3, runtime.queue.start_rerank, args=("1",)).start()
    outcome = jobs.start_anew("1", "1800000000")
    assert outcome["rerank"] in ("enqueued", "coalesced") and label_studio.project["sampling"] == "Uncertainty sampling"
    assert runtime.registry.last_round("1") is None and runtime.registry.live_version("1") is None
    assert runtime.registry.event_counts("1") == {} and runtime.registry.shown("1", [1, 2, 3]) == {}
    assert runtime.artifacts.versions("1") == [] and runtime.snapshots.load("1") is None
    # undoing restores the new project's settings, not the old one's
    assert runtime.registry.settings_before_connect("1") == {
        "sampling": "Sequential sampling",
        "show_collab_predictions": False,
    }
    assert runtime.registry.created("1") == "1800000000" and runtime.registry.label_config("1") == AG_NEWS_CONFIG
    runtime.queue.queue.remove(anew)
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1800000000"))
    assert anew not in runtime.queue.queue.get_job_ids()  # done: the creation time is the new project's now


def test_another_project_under_a_known_id_is_predicted_zero_shot_until_the_old_ones_heads_are_gone(
    runtime, label_studio, monkeypatch
):
    # Label Studio calls /setup and /predict at once: predictions stored from the old project's head would stay
    from backend.api import create_app

    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1732356000"))
    jobs.connect_project("1")
    for task_id in range(1, 21):
        label_studio.annotate(task_id, label_studio.truth[task_id])
    assert jobs.rerank_project("1")["published"]
    assert runtime.artifacts.versions("1")  # a head trained on the old project's annotations
    client = create_app(runtime).test_client()
    task = {"id": 1, "data": {"text": "Stocks rally as the central bank holds rates"}}

    def served(created: str) -> tuple[str, str]:
        setup = client.post("/setup", json={"project": f"1.{created}", "schema": AG_NEWS_CONFIG})
        predict = client.post(
            "/predict", json={"project": f"1.{created}", "label_config": AG_NEWS_CONFIG, "tasks": [task]}
        )
        return setup.json["model_version"], predict.json["results"][0]["model_version"]

    old_head = served("1732356000")
    assert old_head[0] == old_head[1] and not old_head[0].startswith("al-zero-shot-")
    assert all(version.startswith("al-zero-shot-") for version in served("1800000000"))  # start_anew still queued
    jobs.start_anew("1", "1800000000")
    assert runtime.registry.created("1") == "1800000000" and runtime.artifacts.versions("1") == []
    assert all(version.startswith("al-zero-shot-") for version in served("1800000000"))  # no head of its own yet


def new_database_under_project_1(runtime, label_studio) -> dict[int, str]:
    """Project 1 connected and ranked once; then Label Studio on a new database, whose project 1 (created later)
    has more tasks, other texts, ids from 1 again, and the user's own settings -> the new project's texts by id."""
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1732356000"))
    jobs.connect_project("1")
    assert jobs.rerank_project("1")["published"]
    texts = {i: row["text"] for i, row in enumerate(read_csv("ag_news/pool.csv", 140)[60:], 1)}
    label_studio.tasks = {i: {"id": i, "data": {"text": text}, "annotations": []} for i, text in texts.items()}
    label_studio.predictions.clear()
    label_studio.project.update(model_version=None, sampling="Sequential sampling", show_collab_predictions=False)
    runtime.projects.setup(SetupRequest("1", AG_NEWS_CONFIG, created="1800000000"))  # queues start_anew
    return texts


def test_a_round_that_gets_the_lock_before_start_anew_ranks_the_new_project_not_the_old_one(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    texts = new_database_under_project_1(runtime, label_studio)
    reads = label_studio.task_list_reads
    assert jobs.rerank_project("1", "ANNOTATION_CREATED")["published"]  # got the lock before start_anew
    # the whole new task list, not the old project's snapshot extended by the ids above its newest
    assert label_studio.task_list_reads == reads + 1
    snapshot = runtime.snapshots.load("1")
    assert dict(zip(snapshot.task_ids.tolist(), snapshot.text_keys, strict=True)) == {
        i: text_key(text) for i, text in texts.items()
    }
    assert runtime.registry.created("1") == "1800000000"
    assert runtime.artifacts.versions("1") == ["v000001"]  # numbered from 1 again
    # start_anew then finds the old project forgotten, and only connects the new one, keeping its round
    assert jobs.start_anew("1", "1800000000")["rerank"] in ("enqueued", "coalesced")
    assert runtime.registry.last_round("1")["model_version"] == label_studio.project["model_version"]
    assert runtime.registry.settings_before_connect("1") == {
        "sampling": "Sequential sampling",
        "show_collab_predictions": False,
    }


def test_start_anew_run_twice_keeps_what_the_new_project_gained_since_the_first(runtime, label_studio, monkeypatch):
    # rq retries the job after it did its work (its worker killed in connect_project), or a stale /setup asked again
    monkeypatch.setattr(jobs, "_runtime", runtime)
    new_database_under_project_1(runtime, label_studio)
    jobs.start_anew("1", "1800000000")
    assert jobs.rerank_project("1")["published"]
    kept = runtime.registry.settings_before_connect("1"), runtime.registry.last_round("1")
    versions = runtime.artifacts.versions("1")
    jobs.start_anew("1", "1800000000")
    assert (runtime.registry.settings_before_connect("1"), runtime.registry.last_round("1")) == kept
    assert kept[0] == {"sampling": "Sequential sampling", "show_collab_predictions": False}  # the user's, to undo to
    assert runtime.artifacts.versions("1") == versions and runtime.snapshots.load("1") is not None


def test_a_disconnection_recorded_late_is_undone_by_the_next_round(runtime, label_studio, monkeypatch):
    # a job read the /setup count, Label Studio answered /setup before it listed the new backend, and the job saw
    # no backend: it records the disconnection, which the connect job's round then undoes
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    seen = runtime.registry.setups("1")
    assert runtime.registry.disconnect("1", "project 1 has no ML backend connected any more", seen)
    assert jobs.rerank_project("1")["published"]  # the connect job's round: Label Studio shows it connected
    assert not runtime.registry.is_disconnected("1") and runtime.registry.is_connected("1")


def test_a_round_longer_than_the_lock_timeout_keeps_its_lock_even_when_a_renewal_fails(
    runtime, label_studio, monkeypatch
):
    from redis.lock import Lock

    runtime.settings = replace(runtime.settings, rerank_lock_timeout=4)  # renewed every 1.33 s
    monkeypatch.setattr(jobs, "_runtime", runtime)
    lock_key = "al:rerank:lock:1"
    renew, failures = Lock.reacquire, []

    def blips_once(self):
        if not failures:
            failures.append(1)
            raise redis.ConnectionError("Redis away for a moment")
        return renew(self)

    monkeypatch.setattr(Lock, "reacquire", blips_once)
    held = []

    def a_long_round(project, rt, generation, timing, lock):
        # 9 s, more than two lock timeouts: the first renewal (at 1.33 s) fails, the ones after keep the lock
        for _ in range(6):
            time.sleep(1.5)
            held.append(rt.redis.exists(lock_key) and rt.redis.pttl(lock_key) > 0)
        return {"published": lock.owned()}  # what the round checks before it publishes

    monkeypatch.setattr(jobs, "rerank", a_long_round)
    assert jobs.rerank_project("1") == {"published": True}
    assert failures and held == [True] * 6, "another worker could have taken the project mid-round"
    assert not runtime.redis.exists(lock_key)  # released at the end


def test_a_re_rank_waiting_for_the_lock_yields_to_a_newer_one_instead_of_holding_a_worker(
    runtime, label_studio, monkeypatch
):
    import threading

    monkeypatch.setattr(jobs, "_runtime", runtime)
    running = runtime.redis.lock("al:rerank:lock:1", timeout=60)
    assert running.acquire(blocking=False)  # a round is running on another worker
    outcome = {}
    waiting = threading.Thread(target=lambda: outcome.update(jobs.rerank_project("1")))
    waiting.start()
    deadline = time.monotonic() + 30
    while runtime.queue.latest_generation("1") < 1:  # the follower started and waits for the lock
        assert waiting.is_alive() and time.monotonic() < deadline, f"the follower never took a generation: {outcome}"
        time.sleep(0.05)
    runtime.queue.start_rerank("1")  # a newer follower starts on a third worker
    waiting.join(timeout=10)
    assert not waiting.is_alive(), "the older follower kept waiting for the lock"
    assert outcome["superseded"] is True and outcome["generation"] == 1
    assert runtime.artifacts.versions("1") == []  # it did no work
    running.release()


@pytest.fixture()
def pools_built(monkeypatch):
    """The `Pool` each round hands to its strategy, in order."""
    pools = []

    def recording(*args, **kwargs):
        pools.append(pool_module.build_pool(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(rerank_module, "build_pool", recording)
    return pools


def test_committee_probabilities_reach_the_strategy(runtime, label_studio, pools_built):
    summary = rerank("1", runtime, generation=1)
    artifact = runtime.artifacts.load("1", runtime.artifacts.versions("1")[-1])
    assert summary["annotations"] == 0 and artifact.meta["kind"] == "zero-shot" and not artifact.committee
    assert pools_built[0].committee_probs is None
    for task_id in range(1, 9):
        label_studio.annotate(task_id, label_studio.truth[task_id])
    rerank("1", runtime, generation=2)
    artifact = runtime.artifacts.load("1", runtime.artifacts.versions("1")[-1])
    assert artifact.meta["annotations"] == 8 and len(artifact.committee) == runtime.settings.committee_size
    pool = pools_built[1]
    expected = np.stack([member.predict_proba(pool.embeddings) for member in artifact.committee])
    assert pool.committee_probs.shape == (runtime.settings.committee_size, 60, 4)
    np.testing.assert_allclose(pool.committee_probs, expected, atol=1e-5)


def test_rounds_report_a_stopping_signal(runtime, label_studio, pools_built):
    first = rerank("1", runtime, generation=1)
    assert first["stopping"]["stability_kappa"] is None and first["stopping"]["suggest_stop"] is False
    for task_id in range(1, 9):
        label_studio.annotate(task_id, label_studio.truth[task_id])
    second = rerank("1", runtime, generation=2)
    assert second["stopping"]["stability_kappa"] is None  # the head before was zero-shot: nothing to compare
    label_studio.annotate(9, label_studio.truth[9])
    third = rerank("1", runtime, generation=3)  # one label more: compared with the second round's head
    previous = runtime.artifacts.load("1", runtime.artifacts.versions("1")[-2])
    pool, rows = pools_built[-1], np.flatnonzero(~pools_built[-1].labeled)
    kappa = prediction_stability(previous.head.predict_proba(pool.embeddings[rows]), pool.probs[rows], False)
    assert third["stopping"]["stability_kappa"] == pytest.approx(kappa, abs=1e-5)
    assert third["stopping"]["history"] == [third["stopping"]["stability_kappa"]]
    # margin uncertainty of the rows still unlabelled, averaged
    expected = uncertainty_scores(pool.probs[~pool.labeled], pool.multi_label).mean()
    assert third["stopping"]["mean_uncertainty"] == pytest.approx(expected, abs=1e-5) and expected > 0.01
    for task_id in range(10, 22):  # most new labels "World": the bias of the tiny model's head moves to it
        label_studio.annotate(task_id, "World")
    fourth = rerank("1", runtime, generation=4)  # another head, compared with the third round's
    previous = runtime.artifacts.load("1", runtime.artifacts.versions("1")[-2])
    pool, rows = pools_built[-1], np.flatnonzero(~pools_built[-1].labeled)
    expected = prediction_stability(previous.head.predict_proba(pool.embeddings[rows]), pool.probs[rows], False)
    assert expected < 0.9  # the two heads disagree: a head compared with itself would give 1.0
    assert fourth["stopping"]["stability_kappa"] == pytest.approx(expected, abs=1e-5)
    assert fourth["stopping"]["history"] == [
        third["stopping"]["stability_kappa"],
        fourth["stopping"]["stability_kappa"],
    ]


def test_zero_shot_rounds_do_not_count_towards_the_stopping_signal(runtime, label_studio):
    # before MIN_ANNOTATIONS_TO_TRAIN every round is the same zero-shot head, which agrees with itself fully
    rerank("1", runtime, generation=1)
    label_studio.annotate(1, label_studio.truth[1])
    for generation in (2, 3, 4):
        summary = rerank("1", runtime, generation=generation)
    assert summary["annotations"] == 1
    assert summary["stopping"]["history"] == [] and summary["stopping"]["suggest_stop"] is False


def test_rounds_that_retrain_on_the_same_labels_do_not_count_as_stable(runtime, label_studio):
    # a head retrained on unchanged labels (after an import, a deletion, "Start Training") is the same head: its
    # agreement with the one before says nothing about whether more labels pay off
    rerank("1", runtime, generation=1)
    for task_id in range(1, 9):
        label_studio.annotate(task_id, label_studio.truth[task_id])
    rerank("1", runtime, generation=2)
    label_studio.annotate(9, label_studio.truth[9])
    compared = rerank("1", runtime, generation=3)["stopping"]
    assert compared["stability_kappa"] is not None and compared["history"] == [compared["stability_kappa"]]
    for generation in (4, 5, 6, 7):  # the same labels each time
        same = rerank("1", runtime, generation=generation)["stopping"]
        assert same["stability_kappa"] is None and same["history"] == compared["history"]
        assert same["suggest_stop"] is False
    # nothing comparable before (the labels, the encoder or single/multi-label changed): the run starts over
    runtime.artifacts.delete_project("1")
    label_studio.annotate(10, label_studio.truth[10])
    assert rerank("1", runtime, generation=8)["stopping"]["history"] == []


def test_a_project_back_at_zero_shot_is_no_longer_suggested_to_stop(runtime, label_studio):
    rerank("1", runtime, generation=1)
    for task_id in range(1, 9):
        label_studio.annotate(task_id, label_studio.truth[task_id])
    for generation, task_id in zip((2, 3, 4, 5), (None, 9, 10, 11), strict=True):  # a label more each round
        if task_id:
            label_studio.annotate(task_id, label_studio.truth[task_id])
        compared = rerank("1", runtime, generation=generation)  # one label more among 8: predictions hold
    assert len(compared["stopping"]["history"]) == 3 and compared["stopping"]["suggest_stop"] is True
    kept = label_studio.truth[1]
    for task_id in range(2, 12):  # annotations deleted until one class is left: the head is zero-shot again
        if label_studio.truth[task_id] != kept:
            label_studio.tasks[task_id]["annotations"] = []
    back = rerank("1", runtime, generation=6)
    assert runtime.artifacts.load("1", runtime.artifacts.versions("1")[-1]).meta["kind"] == "zero-shot"
    assert back["stopping"]["history"] == [] and back["stopping"]["suggest_stop"] is False


def test_cleanup_deletes_older_versions_only_never_one_a_newer_round_is_writing(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    first, second = (rerank("1", runtime, generation=g)["model_version"] for g in (1, 2))
    label_studio.predictions.append({"task": 1, "score": 0.0, "model_version": "al-v000099-20991231T000000"})
    label_studio.predictions.append({"task": 2, "score": 0.0, "model_version": "someone-else-v1"})
    assert jobs.cleanup_versions("1", second) == [first]
    assert set(label_studio.model_versions(1)) == {second, "al-v000099-20991231T000000", "someone-else-v1"}
    assert label_studio.project["model_version"] == second


def test_cleanup_keeps_five_heads_and_never_deletes_the_ranking_label_studio_serves(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    rankings = [rerank("1", runtime, generation=g)["model_version"] for g in range(1, 8)]
    heads = runtime.artifacts.versions("1")
    assert len(heads) == 7
    label_studio.project["model_version"] = rankings[2]  # switched back to an older ranking in the UI
    assert set(jobs.cleanup_versions("1", rankings[-1])) == set(rankings[:-1]) - {rankings[2]}
    assert set(label_studio.model_versions(1)) == {rankings[2], rankings[-1]}
    assert runtime.artifacts.versions("1") == heads[-5:]


def test_cleanup_keeps_the_newest_retrieved_predictions_until_newer_ones_are_retrieved(
    runtime, label_studio, monkeypatch
):
    from backend.label_config import parse_label_config

    monkeypatch.setattr(jobs, "_runtime", runtime)
    config = parse_label_config(AG_NEWS_CONFIG)

    def retrieve_predictions():  # the Data Manager's "Retrieve Predictions": Label Studio stores /predict's answers
        tasks = [{"id": i, "data": task["data"]} for i, task in label_studio.tasks.items()]
        answers = runtime.predictor.predict("1", config, tasks)
        label_studio.predictions.extend({"task": t["id"], **a} for t, a in zip(tasks, answers, strict=True))
        return answers[0]["model_version"]

    zero_shot = retrieve_predictions()  # before the first round: the zero-shot head's answers
    assert "zero-shot" in zero_shot
    first = rerank("1", runtime, generation=1)["model_version"]
    retrieved = retrieve_predictions()
    second, third = (rerank("1", runtime, generation=g)["model_version"] for g in (2, 3))
    assert set(jobs.cleanup_versions("1", third)) == {zero_shot, first, second}
    assert set(label_studio.model_versions(1)) == {retrieved, third}  # the user still sees what they retrieved
    newer = retrieve_predictions()
    assert jobs.cleanup_versions("1", third) == [retrieved]
    assert set(label_studio.model_versions(1)) == {newer, third}


def test_zero_shot_predictions_retrieved_after_the_labels_changed_are_the_newest_and_stay(
    runtime, label_studio, monkeypatch
):
    from backend.label_config import parse_label_config

    monkeypatch.setattr(jobs, "_runtime", runtime)
    rerank("1", runtime, generation=1)
    tasks = [{"id": i, "data": task["data"]} for i, task in label_studio.tasks.items()]
    old_answers = runtime.predictor.predict("1", parse_label_config(AG_NEWS_CONFIG), tasks)
    label_studio.predictions.extend({"task": t["id"], **a} for t, a in zip(tasks, old_answers, strict=True))
    renamed = parse_label_config(AG_NEWS_CONFIG.replace('value="World"', 'value="Politics"'))  # a label renamed
    new_answers = runtime.predictor.predict("1", renamed, tasks)  # no head for these labels yet: zero-shot
    assert "zero-shot" in new_answers[0]["model_version"]
    label_studio.predictions.extend({"task": t["id"], **a} for t, a in zip(tasks, new_answers, strict=True))
    live = rerank("1", runtime, generation=2)["model_version"]
    assert old_answers[0]["model_version"] in jobs.cleanup_versions("1", live)  # the old labels' answers go
    assert new_answers[0]["model_version"] in label_studio.model_versions(1)  # what the user just retrieved stays


def test_a_round_overtaken_while_writing_does_not_switch_the_version(runtime, label_studio, monkeypatch):
    first = rerank("1", runtime, generation=1)
    write = label_studio.import_predictions

    def a_newer_round_claims_meanwhile(project_id, predictions):
        write(project_id, predictions)
        assert runtime.queue.may_publish("1", 3)

    monkeypatch.setattr(label_studio, "import_predictions", a_newer_round_claims_meanwhile)
    second = rerank("1", runtime, generation=2)
    assert not second["published"] and second["writes"] == "bulk"
    assert label_studio.project["model_version"] == first["model_version"]
    assert runtime.registry.live_version("1") == first["model_version"]


def test_a_round_overtaken_while_switching_queues_one_more_and_records_nothing(runtime, label_studio, monkeypatch):
    # a round whose lock was lost (its worker stalled) switching beside a newer one: which switch landed last is
    # unknown, and the newer round's cleanup may delete this version; one more round settles it
    first = rerank("1", runtime, generation=1)
    switch = label_studio.set_model_version

    def a_newer_round_claims_meanwhile(project_id, version):
        assert runtime.queue.may_publish("1", 3)
        switch(project_id, version)

    monkeypatch.setattr(label_studio, "set_model_version", a_newer_round_claims_meanwhile)
    runtime.queue.queue.empty()
    second = rerank("1", runtime, generation=2)
    assert not second["published"]
    assert runtime.registry.last_round("1")["model_version"] == first["model_version"]
    [queued] = runtime.queue.queue.get_jobs()
    assert queued.func_name == "backend.jobs.rerank_project"  # and no cleanup, which could delete the live version


def test_a_failed_version_switch_records_no_pre_annotation_as_shown(runtime, label_studio, monkeypatch):
    # annotators still see the old version's pre-annotations: a later annotation must not be compared with these
    def unavailable(project_id, version):
        raise LabelStudioUnavailable(f"Label Studio PATCH /api/projects/{project_id}/: HTTP 503")

    monkeypatch.setattr(label_studio, "set_model_version", unavailable)
    with pytest.raises(LabelStudioUnavailable):
        rerank("1", runtime, generation=1)
    assert runtime.registry.shown("1", list(label_studio.tasks)) == {}


def test_interactive_predictions_never_carry_the_ranking_version(runtime, label_studio):
    from backend.label_config import parse_label_config

    live = rerank("1", runtime, generation=1)["model_version"]
    task = {"id": 1, "data": label_studio.tasks[1]["data"]}
    (answer,) = runtime.predictor.predict("1", parse_label_config(AG_NEWS_CONFIG), [task])
    assert answer["model_version"] == live + "-predict"  # same head, but Label Studio keeps them apart
    assert version_number(answer["model_version"], "al") == version_number(live, "al")  # numbered as it


def published_from(artifact, model_version: str) -> bool:
    """Whether `artifact` is the saved head version that `model_version` was published from; never a zero-shot
    head built on the spot (its version is "")."""
    return bool(artifact.version) and model_version.startswith(f"al-{artifact.version}-")


def test_the_server_keeps_one_head_per_project_not_one_per_version(runtime, label_studio):
    from backend.label_config import parse_label_config

    config = parse_label_config(AG_NEWS_CONFIG)
    for generation in (1, 2, 3):
        version = rerank("1", runtime, generation=generation)["model_version"]
        assert published_from(runtime.predictor.artifact_for("1", config), version)  # the newest, every time
    assert len(runtime.predictor._heads) == 1


def test_a_head_served_in_place_of_an_unreadable_newest_version_is_replaced_once_it_reads(
    runtime, label_studio, monkeypatch
):
    from backend.label_config import parse_label_config
    from backend.services import predict as predict_module

    config = parse_label_config(AG_NEWS_CONFIG)
    first, second = (rerank("1", runtime, generation=g)["model_version"] for g in (1, 2))
    head = runtime.artifacts.project_dir("1") / runtime.artifacts.versions("1")[-1] / "head.npz"
    sound = head.read_bytes()
    head.write_bytes(b"not yet all there")  # e.g. a shared folder that shows the new version half-written
    fallback = runtime.predictor.artifact_for("1", config)
    assert published_from(fallback, first)
    head.write_bytes(sound)
    assert runtime.predictor.artifact_for("1", config) is fallback  # kept a while: no reload per request
    later = time.monotonic() + predict_module.FALLBACK_RETRY_SECONDS + 1
    monkeypatch.setattr(predict_module.time, "monotonic", lambda: later)
    assert published_from(runtime.predictor.artifact_for("1", config), second)


def test_a_project_deleted_and_connected_again_under_its_id_is_not_served_the_old_head(runtime, label_studio):
    from backend.label_config import parse_label_config
    from backend.ml.head import LinearHead
    from backend.services.train import save_version

    config = parse_label_config(AG_NEWS_CONFIG)
    rerank("1", runtime, generation=1)
    old = runtime.predictor.artifact_for("1", config)  # now cached by the server
    runtime.artifacts.delete_project("1")  # as jobs.forget_project_files does for a deleted project
    other = LinearHead(-old.head.weights, old.head.bias, False)  # the new project's own head
    new = replace(old, head=other, version="", meta={"kind": "trained", "annotations": 10})
    save_version("1", new, runtime.artifacts)
    assert runtime.artifacts.versions("1") == [old.version]  # numbered from 1 again: the same name
    served = runtime.predictor.artifact_for("1", config)
    assert np.array_equal(served.head.weights, other.weights) and served.meta["kind"] == "trained"


def test_a_saved_zero_shot_version_is_not_served_once_the_hints_it_was_built_from_are_edited(runtime, label_studio):
    from backend.label_config import parse_label_config

    config = parse_label_config(AG_NEWS_CONFIG)
    version = rerank("1", runtime, generation=1)["model_version"]  # no annotation yet: a zero-shot version
    assert published_from(runtime.predictor.artifact_for("1", config), version)
    hinted = parse_label_config(AG_NEWS_CONFIG.replace('value="Sports"', 'value="Sports" hint="football, tennis"'))
    served = runtime.predictor.artifact_for("1", hinted)  # before the round the edit queues has run
    assert served.version == "" and served.meta["kind"] == "zero-shot"  # built from the hints as they are now
    assert (
        served.meta["zero_shot_of"]
        != runtime.artifacts.load("1", runtime.artifacts.versions("1")[-1]).meta["zero_shot_of"]
    )
    assert published_from(runtime.predictor.artifact_for("1", config), version)  # the unedited config: the saved one


def test_a_round_while_chunks_are_encoding_waits_for_them_and_requeues_a_failed_one(runtime, label_studio, monkeypatch):
    from rq.job import Job, JobStatus

    monkeypatch.setattr(project_state, "ENCODE_CHUNK", 25)
    rerank("1", runtime, generation=1)
    queue = runtime.encoding.queue
    chunk, encoded = [job_id for job_id in queue.get_job_ids() if job_id.startswith("encode-1-")][:2]
    chunk_encoded(runtime, "1", encoded)  # one chunk encoded meanwhile (its vectors lost since)
    failed = Job.fetch(chunk, connection=runtime.redis)  # and another failed for good
    queue.remove(failed)
    failed.retries_left = 0
    failed.save()
    failed.set_status(JobStatus.FAILED)
    queue.failed_job_registry.add(failed, ttl=3600)

    second = rerank("1", runtime, generation=2)  # snapshot saved, vectors missing: waits, does not fail
    assert second["published"] is False and "chunk jobs" in second["encoding"]
    assert chunk in queue.get_job_ids() and chunk not in queue.failed_job_registry.get_job_ids()
    assert Job.fetch(chunk, connection=runtime.redis).retries_left == RETRY.max  # a fresh start, not one fault left
    follow_ups = [j for j in runtime.queue.queue.deferred_job_registry.get_job_ids() if j.startswith("rerank-1-after-")]
    assert len(follow_ups) == 1  # one round waits for the chunks, however many rounds asked
    # the same encoding, still under way: its chunk done, asked for again (vectors lost), counts once encoded again
    assert runtime.encoding.progress("1") == {"chunks": 3, "done": 0, "failed": 0, "texts": 60}


def test_a_chunk_that_failed_for_good_is_a_failed_round_that_metrics_shows_and_reconciliation_backs_off_from(
    runtime, label_studio, monkeypatch
):
    # e.g. a worker out of memory on every try, or Redis full (`noeviction`) when the vectors are stored: each round
    # would queue the chunk again and read every task again, with nothing in /metrics to say why nothing is ranked
    from rq.job import Job

    monkeypatch.setattr(jobs, "_runtime", runtime)
    monkeypatch.setattr(project_state, "ENCODE_CHUNK", 25)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    rerank("1", runtime, generation=1)
    queue = runtime.encoding.queue
    chunk = queue.get_job_ids()[0]  # the first of the chunk jobs
    job = Job.fetch(chunk, connection=runtime.redis)
    job.retries_left = 0  # its last try
    job.save()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(jobs, "embed_texts", out_of_memory)
    SimpleWorker([queue], connection=runtime.redis).work(burst=True, max_jobs=1)
    assert chunk in queue.failed_job_registry and runtime.registry.failing("1") is None

    assert "chunk jobs" in rerank("1", runtime, generation=2)["encoding"]
    reason = runtime.registry.failing("1")["reason"]
    assert chunk in reason and "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in reason
    assert chunk in queue.get_job_ids()  # queued again, in case the cause went away
    label_studio.annotate(3, label_studio.truth[3])
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed", "failing": reason}  # backs off meanwhile


@pytest.mark.parametrize("ended", ["stopped", "canceled"])
def test_a_chunk_an_operator_stopped_or_cancelled_is_queued_again(runtime, label_studio, monkeypatch, ended):
    # rq keeps a job that depends on a stopped or cancelled one waiting for good: the round after must not
    from rq.job import Job, JobStatus

    monkeypatch.setattr(project_state, "ENCODE_CHUNK", 25)
    rerank("1", runtime, generation=1)
    queue = runtime.encoding.queue
    chunk = next(job_id for job_id in queue.get_job_ids() if job_id.startswith("encode-1-"))
    job = Job.fetch(chunk, connection=runtime.redis)
    queue.remove(job)
    job.set_status(JobStatus(ended))  # e.g. `rq` CLI's stop or cancel

    second = rerank("1", runtime, generation=2)
    assert second["published"] is False and "chunk jobs" in second["encoding"]
    assert chunk in queue.get_job_ids() and runtime.queue.status(chunk) == JobStatus.QUEUED
    follow_up = runtime.redis.get(encoding_follow_up_key("1")).decode()
    assert chunk in Job.fetch(follow_up, connection=runtime.redis).dependency_ids
    assert runtime.encoding.pending("1")  # a round waits for these chunks, not for one that never ends


def test_a_follow_up_round_that_nothing_will_release_is_not_waited_for(runtime, label_studio, monkeypatch):
    # a chunk failed for good and its record expired after FAILURE_TTL, the other chunks finished: rq keeps the
    # follow-up waiting forever, and rounds that waited for it would never publish again
    from rq.job import Job, JobStatus

    monkeypatch.setattr(project_state, "ENCODE_CHUNK", 25)
    rerank("1", runtime, generation=1)
    queue = runtime.encoding.queue
    chunks = [job_id for job_id in queue.get_job_ids() if job_id.startswith("encode-1-")]
    follow_up = runtime.redis.get(encoding_follow_up_key("1")).decode()
    assert len(chunks) == 3 and runtime.encoding.pending("1")  # chunks queued: worth waiting for
    for chunk in chunks[:2]:
        job = Job.fetch(chunk, connection=runtime.redis)
        queue.remove(job)
        job.set_status(JobStatus.FINISHED)
    assert runtime.encoding.pending("1")  # one chunk still to run
    queue.remove(chunks[2])
    Job.fetch(chunks[2], connection=runtime.redis).delete()  # failed, and forgotten since
    assert Job.fetch(follow_up, connection=runtime.redis).get_status() == JobStatus.DEFERRED
    assert runtime.encoding.pending("1") is False
    assert runtime.redis.get(encoding_follow_up_key("1")) is None
    assert follow_up not in runtime.queue.queue.deferred_job_registry.get_job_ids()


def test_the_matrix_is_read_from_the_cache_into_one_array_with_room_for_the_labelled_rows(runtime, monkeypatch):
    from backend.adapters import embedding_cache

    monkeypatch.setattr(embedding_cache, "CHUNK", 3)  # several round trips
    cache = runtime.embedding_cache
    keys = [text_key(f"text {i}") for i in range(8)]
    vectors = np.random.default_rng(0).normal(size=(8, cache.dim)).astype(np.float16)
    cache.put_many(keys[:7], vectors[:7])
    assert cache.missing(keys) == [keys[7]]
    matrix = pool_module.cached_matrix(cache, keys[6::-1], spare_rows=2)  # in the order asked, two spare rows
    assert matrix.dtype == np.float16 and matrix.shape == (9, cache.dim)
    assert np.array_equal(matrix[:7], vectors[6::-1]) and not matrix[7:].any()
    with pytest.raises(EmbeddingsMissing, match="1 task embeddings missing"):
        pool_module.cached_matrix(cache, keys)


def test_the_pool_is_the_matrix_read_from_the_cache_not_a_copy(runtime, label_studio):
    for task_id in range(1, 9):
        label_studio.annotate(task_id, label_studio.truth[task_id])
    rerank("1", runtime, generation=1)  # caches every text
    state = project_state.read_project_state(runtime, "1", project_state.Stopwatch())
    artifact = runtime.artifacts.load("1", runtime.artifacts.versions("1")[-1])
    matrix = pool_module.cached_matrix(runtime.embedding_cache, state.text_keys, spare_rows=len(state.labelled))
    pool = pool_module.build_pool(state, artifact, matrix, np.ones((len(state.labelled), matrix.shape[1])))
    assert pool.embeddings is matrix and len(matrix) == 60  # 52 unlabelled rows, then the 8 labelled ones
    assert (matrix[52:] == 1).all() and pool.labeled[52:].all() and not pool.labeled[:52].any()


def test_rounds_read_the_matrix_from_the_project_file_written_when_the_task_list_changes(runtime, label_studio):
    # reading a million vectors from Redis takes ~10 s; the file in the page cache well under one
    assert rerank("1", runtime, generation=1)["matrix"] == "cache, then file"
    label_studio.annotate(4, label_studio.truth[4])
    label_studio.annotate(9, label_studio.truth[9])
    assert rerank("1", runtime, generation=2)["matrix"] == "file"  # annotations do not change the file
    state = project_state.read_project_state(runtime, "1", project_state.Stopwatch())
    from_file, source = pool_module.pool_matrix(runtime, "1", state)
    from_redis = pool_module.cached_matrix(runtime.embedding_cache, state.text_keys, spare_rows=2)
    assert source == "file" and np.array_equal(from_file, from_redis) and len(from_file) == 60
    label_studio.replace_task(7, "a task imported since")
    assert rerank("1", runtime, generation=3)["matrix"] == "cache, then file"


def test_a_matrix_file_that_cannot_be_written_leaves_the_round_reading_redis(runtime, label_studio, caplog):
    files = runtime.matrix_files
    files.folder.mkdir(parents=True)
    files.folder.chmod(0o555)  # e.g. a read-only volume (root ignores the mode: the write fails below instead)
    real_replace = os.replace

    def disk_full(source, target):
        raise OSError(28, "No space left on device")

    try:
        os.replace = disk_full
        summary = rerank("1", runtime, generation=1)
    finally:
        os.replace = real_replace
        files.folder.chmod(0o755)
    assert summary["published"] and summary["matrix"] == "cache"
    assert "matrix file unusable, reading the embeddings from Redis" in caplog.text
    assert list(files.folder.iterdir()) == []  # no file, no temporary left behind


def test_a_project_without_tasks_ranks_nothing_round_after_round(runtime, label_studio):
    label_studio.tasks.clear()
    for generation in (1, 2):
        summary = rerank("1", runtime, generation=generation)
        assert summary["unlabelled"] == 0 and summary["ranked"] == 0 and not summary["published"]


def test_a_round_after_an_import_reads_only_the_imported_tasks(runtime, label_studio):
    rerank("1", runtime, generation=1)
    label_studio.annotate(2, label_studio.truth[2])
    added = label_studio.import_tasks([f"a story imported later, number {i}" for i in range(5)])
    summary = rerank("1", runtime, generation=2)
    assert label_studio.task_list_reads == 1 and label_studio.imported_task_reads == 1  # no whole list again
    assert summary["published"] and summary["unlabelled"] == 64 and "read_imported_tasks" in summary["seconds"]
    snapshot = runtime.snapshots.load("1")
    assert snapshot.task_ids.tolist() == sorted(label_studio.tasks) and snapshot.stamp == (65, added[-1])
    assert snapshot.text_keys[-5:] == [text_key(f"a story imported later, number {i}") for i in range(5)]
    assert runtime.embedding_cache.missing(snapshot.text_keys) == []  # the imported texts were encoded
    assert summary["matrix"] == "file and cache, then file"  # the previous file's rows, the imported tasks' vectors


def test_tasks_imported_while_the_whole_list_is_read_are_not_added_twice(runtime, label_studio, monkeypatch):
    whole_list = label_studio.iter_tasks

    def import_midway(project_id, fields="all"):  # the stamp was read before the pages; the import lands in them
        label_studio.import_tasks(["a story imported during the read", "and another"])
        return whole_list(project_id, fields)

    monkeypatch.setattr(label_studio, "iter_tasks", import_midway)
    rerank("1", runtime, generation=1)
    monkeypatch.setattr(label_studio, "iter_tasks", whole_list)
    summary = rerank("1", runtime, generation=2)  # the stamp changed: the round reads the tasks after it
    assert label_studio.imported_task_reads == 1 and summary["unlabelled"] == 62
    assert runtime.snapshots.load("1").task_ids.tolist() == sorted(label_studio.tasks)  # each task once
    assert len({p["task"] for p in label_studio.predictions if p["model_version"] == summary["model_version"]}) == 20


def test_an_import_with_deletions_reads_the_whole_task_list(runtime, label_studio):
    rerank("1", runtime, generation=1)
    del label_studio.tasks[10]
    label_studio.import_tasks(["one new story", "and another"])  # one task more, but two new ids
    summary = rerank("1", runtime, generation=2)
    assert label_studio.imported_task_reads == 1 and label_studio.task_list_reads == 2
    assert summary["published"] and runtime.snapshots.load("1").task_ids.tolist() == sorted(label_studio.tasks)


def test_heads_kept_in_memory_are_bounded_and_follow_the_config(runtime, monkeypatch):
    from backend.label_config import parse_label_config
    from backend.services import predict

    monkeypatch.setattr(predict, "CACHED_HEADS", 3)
    config = parse_label_config(AG_NEWS_CONFIG)
    for project in ("1", "2", "3", "4", "5"):
        runtime.predictor.artifact_for(project, config)
    assert list(runtime.predictor._heads) == ["3", "4", "5"]  # the least recently used went first
    two_labels = parse_label_config(AG_NEWS_CONFIG.replace('<Choice value="Sports"/>', ""))
    assert runtime.predictor.artifact_for("5", two_labels).labels == two_labels.labels  # not the old config's head
    assert len(runtime.predictor._heads) == 3


def test_reconciliation_backs_off_from_a_project_whose_rounds_keep_failing(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    live = jobs.rerank_project("1")["model_version"]

    def fails(*args, **kwargs):  # e.g. a round that always outlasts JOB_TIMEOUT
        raise MemoryError("the pool does not fit")

    monkeypatch.setattr(rerank_module, "train_artifact", fails)
    label_studio.annotate(3, label_studio.truth[3])  # its webhook lost
    assert reconciliation.reconcile_project("1")["rerank"] == "enqueued"
    queue = runtime.queue.queue
    SimpleWorker([queue], connection=runtime.redis).work(burst=True)  # a first try: rq retries it later
    retried = [job_id for job_id in queue.scheduled_job_registry.get_job_ids() if job_id.startswith("rerank-1-")]
    assert retried and runtime.registry.failing("1") is None  # the round itself waits for its retry
    for failed_rounds in (1, 2):
        with pytest.raises(MemoryError):
            jobs.rerank_project("1")  # its last try (no retries left)
        failing = runtime.projects.metrics()["projects"]["1"]["failing"]
        assert failing["rounds"] == failed_rounds and "MemoryError: the pool does not fit" in failing["reason"]
        assert reconciliation.reconcile_project("1") == {"rerank": "not needed", "failing": failing["reason"]}
        waited = reconciliation.failed_round_backoff(failed_rounds, runtime.settings.reconcile_interval)
        assert waited == runtime.settings.reconcile_interval * 2**failed_rounds  # doubling
        failing["at"] -= waited + 1  # after the back-off, reconciliation tries a round again
        runtime.redis.hset(runtime.registry.key("1"), "failing", json.dumps(failing))
        queue.empty()
        assert reconciliation.reconcile_project("1")["rerank"] == "enqueued"
    with pytest.raises(MemoryError):
        jobs.rerank_project("1")
    assert reconciliation.reconcile_project("1")["rerank"] == "not needed"  # backing off, until...
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {"rank_top_k": 5})  # ...the project gets new parameters
    queue.empty()
    assert reconciliation.reconcile_project("1")["rerank"] == "enqueued"
    assert label_studio.project["model_version"] == live  # the previous ranking stayed all along
    monkeypatch.undo()
    monkeypatch.setattr(jobs, "_runtime", runtime)
    assert jobs.rerank_project("1")["published"] and runtime.registry.failing("1") is None  # a round ends the run
    assert reconciliation.failed_round_backoff(20, 60) == reconciliation.MAX_FAILED_ROUND_BACKOFF


def test_a_label_config_made_unsupported_fails_one_round_without_retries_until_it_changes(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})
    live = jobs.rerank_project("1")["model_version"]
    label_studio.project["label_config"] = AG_NEWS_CONFIG.replace('choice="single"', 'choice="single" perRegion="true"')
    label_studio.annotate(3, label_studio.truth[3])  # the edit and an annotation, webhooks lost
    queue = runtime.queue.queue
    assert reconciliation.reconcile_project("1")["rerank"] == "enqueued"
    SimpleWorker([queue], connection=runtime.redis).work(burst=True)
    [failed] = queue.failed_job_registry.get_job_ids()  # visible, and not retried: it would fail the same way
    assert failed not in queue.scheduled_job_registry.get_job_ids() and failed.startswith("rerank-1-")
    assert label_studio.project["model_version"] == live  # the previous ranking stays
    refused = runtime.projects.metrics()["projects"]["1"]["refused"]
    assert "perRegion" in refused["reason"]
    outcome = reconciliation.reconcile_project("1")
    assert outcome == {"rerank": "not needed", "refused": refused["reason"]}  # not a failing round every minute
    label_studio.project["label_config"] = AG_NEWS_CONFIG  # fixed: the next reconciliation ranks again
    assert reconciliation.reconcile_project("1")["rerank"] == "enqueued"
    SimpleWorker([queue], connection=runtime.redis).work(burst=True)
    assert runtime.registry.last_round("1")["annotations"] == 1 and label_studio.project["model_version"] != live
    assert runtime.projects.metrics()["projects"]["1"]["refused"] is None


def test_live_predictions_stored_twice_are_not_taken_for_deleted_ones(runtime, label_studio, monkeypatch):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    assert jobs.rerank_project("1")["published"]
    label_studio.predictions.append(dict(label_studio.predictions[0]))
    assert reconciliation.reconcile_project("1") == {"rerank": "not needed"}
    assert not [job_id for job_id in runtime.queue.queue.get_job_ids() if job_id.startswith("rerank-")]


@pytest.mark.parametrize(("rounds", "counter"), [(1, None), (3, 2)])  # None: evicted; 2: restored one round old
def test_a_round_after_the_counter_lands_on_the_published_generation_still_publishes(
    runtime, label_studio, monkeypatch, rounds, counter
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    for _ in range(rounds):
        assert jobs.rerank_project("1")["published"]
    if counter is None:
        runtime.redis.delete(generation_key("1"))
    else:
        runtime.redis.set(generation_key("1"), counter)
    label_studio.annotate(3, label_studio.truth[3])
    after = jobs.rerank_project("1")
    assert after["published"] and after["generation"] == rounds + 1
    assert runtime.registry.last_round("1")["annotations"] == 1


def test_parameters_fixed_after_a_refused_round_rank_the_project_at_the_next_reconciliation(
    runtime, label_studio, monkeypatch
):
    monkeypatch.setattr(jobs, "_runtime", runtime)
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {"strategy_params": {"nope": 1}})
    with pytest.raises(RoundRefused, match="nope"):
        jobs.rerank_project("1")
    refused = reconciliation.reconcile_project("1")
    assert refused["rerank"] == "not needed" and "nope" in refused["refused"]  # the same parameters: not again
    runtime.registry.save_setup("1", AG_NEWS_CONFIG, {})  # the user fixes them: Label Studio calls /setup
    assert reconciliation.reconcile_project("1")["rerank"] == "enqueued"  # Label Studio itself did not change
