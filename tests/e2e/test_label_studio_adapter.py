"""The Label Studio adapter against a real Label Studio 1.23.2: sampling, predictions, model versions, reads."""

from __future__ import annotations

import random
import time

import pytest

from backend.adapters.label_studio import LabelStudio
from backend.errors import LabelStudioNotFound, LabelStudioRejected, LabelStudioUnavailable
from tests.conftest import AG_NEWS_CONFIG, read_csv
from tests.helpers import choices_result

pytestmark = pytest.mark.e2e

N_TASKS = 50


@pytest.fixture()
def ls(label_studio) -> LabelStudio:
    return LabelStudio(label_studio.url, label_studio.token)


@pytest.fixture()
def project(ls) -> tuple[int, list[int]]:
    """A fresh project of N_TASKS AG News pool texts: (project id, task ids in id order)."""
    project_id = ls.create_project(f"adapter {time.time_ns()}", AG_NEWS_CONFIG)["id"]
    rows = read_csv("ag_news/pool.csv", N_TASKS)
    imported = ls.import_tasks(project_id, [{"text": row["text"]} for row in rows])
    assert len(imported["task_ids"]) == N_TASKS
    return project_id, sorted(imported["task_ids"])


def test_next_task_follows_the_lowest_score_of_the_current_version(ls, project):
    project_id, task_ids = project
    old = ls.import_predictions(
        project_id,
        [{"task": t, "result": choices_result("World"), "score": 0.5, "model_version": "rank-old"} for t in task_ids],
    )
    assert old["created"] == N_TASKS
    ls.set_model_version(project_id, "rank-old")

    previous = ls.configure_for_active_learning(project_id)
    assert previous["sampling"] == "Sequential sampling"
    scores = dict(zip(task_ids, random.Random(0).sample(range(1, N_TASKS + 1), N_TASKS), strict=True))
    lowest, second = sorted(task_ids, key=scores.get)[:2]
    assert lowest not in (task_ids[0], task_ids[-1])  # neither sequential nor reversed order would pick it
    created = ls.create_predictions(
        [
            {"task": t, "result": choices_result("Sports"), "score": scores[t] / 100, "model_version": "rank-new"}
            for t in task_ids
        ]
    )
    assert sorted(p["task"] for p in created) == task_ids
    ls.set_model_version(project_id, "rank-new")

    settings = ls.get_project(project_id)
    assert settings["sampling"] == "Uncertainty sampling"
    assert settings["show_collab_predictions"] is True
    assert settings["model_version"] == "rank-new"
    served = ls.next_task(project_id)
    assert served["id"] == lowest, f"served {served['id']} (score {scores[served['id']]}), lowest is {lowest}"
    assert [p["model_version"] for p in served["predictions"]].count("rank-new") == 1

    assert list(ls.model_versions(project_id)) == ["rank-new", "rank-old"]  # newest first: cleanup keeps by it
    assert ls.delete_model_version(project_id, "rank-old") == {"deleted_predictions": N_TASKS}
    assert ls.model_versions(project_id) == {"rank-new": N_TASKS}
    assert ls.get_project(project_id)["model_version"] == "rank-new"
    ls.create_annotation(lowest, choices_result("Sports"))
    assert ls.next_task(project_id)["id"] == second


def test_deleting_the_current_version_resets_the_project_model_version(ls, project):
    project_id, task_ids = project
    ls.create_predictions([{"task": task_ids[0], "result": [], "score": 0.1, "model_version": "only"}], max_workers=1)
    ls.set_model_version(project_id, "only")
    ls.delete_model_version(project_id, "only")
    assert ls.get_project(project_id)["model_version"] in (None, "")


def test_the_bulk_import_leaves_out_a_prediction_the_label_config_does_not_allow_and_says_so(ls, project):
    # what PredictionsDropped rests on: a 201 all the same, with the count of those stored
    project_id, task_ids = project
    fits, misfit = (
        {"task": task_ids[i], "result": choices_result(c), "score": 0.1, "model_version": "v"}
        for i, c in ((0, "World"), (1, "Cooking"))
    )
    assert ls.import_predictions(project_id, [fits, misfit]) == {"created": 1}
    assert ls.model_versions(project_id) == {"v": 1}


def test_predictions_imported_without_a_model_version_are_left_out_of_the_versions(ls, project):
    # Label Studio stores a null model_version as given; before, its unnamed group failed every cleanup job
    project_id, task_ids = project
    unnamed = {"task": task_ids[0], "result": choices_result("World"), "score": 0.1, "model_version": None}
    named = {"task": task_ids[1], "result": choices_result("World"), "score": 0.1, "model_version": "v"}
    assert ls.import_predictions(project_id, [unnamed, named]) == {"created": 2}
    assert ls.model_versions(project_id) == {"v": 1}


def test_a_task_annotated_below_the_page_being_read_does_not_repeat_a_task(ls, project):
    # the annotated list is paged by number: a task joining it before the next page shifts that page by one
    project_id, task_ids = project
    for task_id in task_ids[3:7]:
        ls.create_annotation(task_id, choices_result("World"))
    pages = ls.iter_annotated_tasks(project_id, page_size=2)
    first_page = [next(pages)["id"], next(pages)["id"]]
    ls.create_annotation(task_ids[0], choices_result("World"))  # joins the list below the next page
    rest = [task["id"] for task in pages]
    assert first_page == task_ids[3:5] and rest == task_ids[5:7]  # task_ids[4] not read twice


def test_tasks_come_with_their_annotations_and_paging_reaches_the_end(ls, label_studio, project):
    project_id, task_ids = project
    labelled = {task_ids[3]: "World", task_ids[17]: "Business", task_ids[42]: "Sci/Tech"}
    for task_id, label in labelled.items():
        ls.create_annotation(task_id, choices_result(label))
    skipped = ls.sdk.annotations.create(task_ids[9], result=[], was_cancelled=True)

    for page_size in (3, 1000):
        annotated = list(ls.iter_annotated_tasks(project_id, page_size=page_size))
        assert [task["id"] for task in annotated] == sorted({*labelled, task_ids[9]})
    by_id = {task["id"]: task for task in annotated}
    assert by_id[task_ids[9]]["annotations"][0]["was_cancelled"] is True
    assert by_id[task_ids[3]]["data"]["text"] and by_id[task_ids[3]]["annotations"][0]["result"] == choices_result(
        "World"
    )
    exported = list((label_studio.data_dir / "export").glob("*.json"))
    assert exported == [], f"reading annotations left files in Label Studio's data folder: {exported}"
    for page_size in (7, 10, 1000):  # a short last page, an exact multiple, a single page
        tasks = list(ls.iter_tasks(project_id, page_size=page_size))
        assert [task["id"] for task in tasks] == task_ids
        assert all(task["data"]["text"] for task in tasks)
        by_id = {task["id"]: task for task in tasks}
        for task_id, label in labelled.items():
            (annotation,) = by_id[task_id]["annotations"]
            assert annotation["result"][0]["value"]["choices"] == [label]
            assert annotation["was_cancelled"] is False and annotation["updated_at"] and annotation["id"]
        assert by_id[task_ids[9]]["annotations"][0]["id"] == skipped.id
        assert sum(bool(task["annotations"]) for task in tasks) == 4
    plain = list(ls.iter_tasks(project_id, page_size=20, fields="task_only"))
    assert [task["id"] for task in plain] == task_ids and "annotations" not in plain[0]


def test_the_tasks_an_import_added_are_read_alone(ls, project):
    project_id, task_ids = project
    added = ls.import_tasks(project_id, [{"text": f"imported later, number {i}"} for i in range(12)])["task_ids"]
    for page_size in (5, 1000):
        after = list(ls.iter_tasks_after(project_id, task_ids[-1], page_size=page_size))
        assert [task["id"] for task in after] == sorted(added)
        assert [task["data"]["text"] for task in after] == [f"imported later, number {i}" for i in range(12)]
    assert [task["id"] for task in ls.iter_tasks_after(project_id, task_ids[40])] == [*task_ids[41:], *sorted(added)]
    assert list(ls.iter_tasks_after(project_id, max(added))) == []


def test_the_task_list_stamp_changes_when_a_task_is_replaced_and_predictions_for_it_are_refused(ls, project):
    project_id, task_ids = project
    assert ls.task_list_stamp(project_id) == (N_TASKS, task_ids[-1])
    ls.delete_task(task_ids[0])
    (new_task,) = ls.import_tasks(project_id, [{"text": "One more task, imported after a deletion"}])["task_ids"]
    assert new_task > task_ids[-1]
    assert ls.task_list_stamp(project_id) == (N_TASKS, new_task)  # the same count, a newer newest task
    stale = [{"task": t, "result": choices_result("World"), "score": 0.1, "model_version": "v1"} for t in task_ids[:2]]
    with pytest.raises(LabelStudioRejected, match="HTTP 400"):  # the whole import: no partial ranking
        ls.import_predictions(project_id, stale)
    assert ls.model_versions(project_id) == {}


def test_webhook_headers_can_be_updated(ls, project):
    project_id, _ = project
    hook = ls.sdk.webhooks.create(project=project_id, url="http://127.0.0.1:9/webhook", send_for_all_actions=True)
    assert [w["id"] for w in ls.webhooks(project_id)] == [hook.id]
    ls.update_webhook(hook.id, headers={"Authorization": "Basic dTpw"})
    (updated,) = ls.webhooks(project_id)
    assert updated["headers"] == {"Authorization": "Basic dTpw"} and updated["url"] == "http://127.0.0.1:9/webhook"
    ls.delete_webhook(hook.id)
    assert ls.webhooks(project_id) == []


def test_a_personal_access_token_works_too(ls, label_studio, project):
    project_id, _ = project
    personal_token = ls.sdk.tokens.create().token  # one per user: this is the session user's only one
    with_pat = LabelStudio(label_studio.url, personal_token)
    assert not with_pat.sdk._client_wrapper._tokens_client._use_legacy_token
    assert with_pat.get_project(project_id)["id"] == project_id


def test_errors_name_the_call_and_never_the_key(ls, label_studio, project):
    project_id, _ = project
    with pytest.raises(LabelStudioRejected, match=r"PATCH /api/projects/\d+: HTTP 400"):
        ls.set_model_version(project_id, "no-such-version")
    with pytest.raises(LabelStudioNotFound, match="HTTP 404"):  # a deleted project reads the same
        ls.get_project(10**6)
    wrong_key = "f" * 40
    with pytest.raises(LabelStudioRejected, match="HTTP 401.*LABEL_STUDIO_API_KEY is not accepted") as refused:
        LabelStudio(label_studio.url, wrong_key).get_project(project_id)
    assert wrong_key not in str(refused.value)
    with pytest.raises(LabelStudioUnavailable, match="unreachable") as unreachable:
        LabelStudio("http://127.0.0.1:9", label_studio.token, timeout=2).next_task(project_id)
    assert not isinstance(unreachable.value, LabelStudioRejected)
    assert label_studio.token not in str(unreachable.value) and "/next" in str(unreachable.value)


def test_a_deleted_project_is_told_apart_from_a_url_that_is_not_label_studios_api(ls, label_studio, project):
    project_id, _ = project
    ls.delete_project(project_id)
    with pytest.raises(LabelStudioNotFound):
        ls.get_project(project_id)
    ls.confirm_project_deleted(project_id)  # the project list still answers: the project is gone
    wrong_path = LabelStudio(f"{label_studio.url}/no-such-prefix", label_studio.token)
    with pytest.raises(LabelStudioNotFound):
        wrong_path.get_project(project_id)
    with pytest.raises(LabelStudioUnavailable, match="is LABEL_STUDIO_URL right") as refused:
        wrong_path.confirm_project_deleted(project_id)
    assert not isinstance(refused.value, LabelStudioRejected)  # retried with back-off, not given up on
