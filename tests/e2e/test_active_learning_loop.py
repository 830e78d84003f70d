"""The whole loop against real processes: Label Studio 1.23.2, redis-server, the backend server and RQ workers.

Label Studio's webhook -> /webhook -> RQ -> worker retrains and publishes -> Label Studio's /next serves our top.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import redis
import requests
from rq import Queue
from rq.job import Job

from tests.e2e.fixtures import annotate, wait_until

pytestmark = pytest.mark.e2e


def test_next_task_is_our_top_task_after_every_round(backend, project, secrets_never_logged):
    ls, project_id, truth = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")

    cold = backend.wait_for_round(project_id, annotations=0)  # /setup queued the cold-start ranking
    settings = ls.get_project(project_id)
    assert settings["sampling"] == "Uncertainty sampling"
    assert settings["model_version"] == cold["model_version"]
    # what tells this backend apart from others connected to the project: the version its /setup answered
    (connected,) = ls.ml_backends(project_id)
    assert connected["model_version"].startswith("al-") and connected["model_version"].endswith("-predict")
    top = cold["top_task"]
    for round_number in range(1, 5):
        served = ls.next_task(project_id)
        assert served["id"] == top, f"round {round_number}: Label Studio served {served['id']}, our top is {top}"
        annotate(ls, top, truth[top])
        last = backend.wait_for_round(project_id, annotations=round_number)
        assert ls.get_project(project_id)["model_version"] == last["model_version"]
        top = last["top_task"]
    assert ls.next_task(project_id)["id"] == top
    # each round's clean-up job deletes the rankings before it; the live one stays, whole
    live = ls.get_project(project_id)["model_version"]

    def rankings() -> list[str]:  # not the sets of /predict answers (Retrieve Predictions)
        return [version for version in ls.model_versions(project_id) if not version.endswith("-predict")]

    wait_until(lambda: rankings() == [live], "the older rankings to be deleted", 60)
    assert ls.model_versions(project_id)[live] == last["ranked"]


def test_our_own_version_switch_does_not_start_another_round(backend, project, redis_url):
    # Label Studio posts PROJECT_UPDATED from inside the PATCH that switches the version, before the round
    # that made it has returned: were that taken as a change from the UI, every round would queue the next.
    ls, project_id, _ = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    cold = backend.wait_for_round(project_id, annotations=0)
    client = redis.Redis.from_url(redis_url)
    # PROJECT_UPDATED from the connect job's sampling PATCH, then from the round's version switch
    assert backend.metrics()["projects"][str(project_id)]["events"].get("PROJECT_UPDATED", 0) >= 2
    time.sleep(8)  # several rounds' time on this project
    assert int(client.get(f"al:rerank:generation:{project_id}") or 0) == cold["generation"]
    assert not Job.exists(f"rerank-{project_id}-{cold['generation']}", connection=client)
    assert backend.last_round(project_id)["model_version"] == cold["model_version"]


def test_a_burst_of_webhooks_is_reflected_with_few_reranks(backend, project, redis_url):
    ls, project_id, truth = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    backend.wait_for_round(project_id, annotations=0)
    client = redis.Redis.from_url(redis_url)
    generation = f"al:rerank:generation:{project_id}"
    generation_before = int(client.get(generation) or 0)

    annotated = list(truth)[:30]
    for task_id in annotated:  # each makes Label Studio post ANNOTATION_CREATED to /webhook
        annotate(ls, task_id, truth[task_id])
    backend.wait_for_round(project_id, annotations=len(annotated))
    queue = Queue(backend.env["QUEUE_NAME"], connection=client)
    rounds = f"rerank-{project_id}-"
    # the last annotations' events may have queued one more round after the one that read them all: let it end
    wait_until(lambda: not any(job_id.startswith(rounds) for job_id in queued_or_running(queue)), "rounds to end", 120)
    # The 30 annotations, posted one after another over a few seconds, start a round whenever the one before has
    # finished (a round takes about as long as a few annotations; up to 7 runs seen in CI); without coalescing, 30
    generation_after_annotations = int(client.get(generation))
    assert 1 <= generation_after_annotations - generation_before <= len(annotated) // 2

    event = {"action": "ANNOTATION_CREATED", "project": {"id": project_id}, "annotation": {"id": 0}}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # then a burst of 300, concurrently
        statuses = list(
            pool.map(lambda _: requests.post(backend.url + "/webhook", json=event, timeout=5).status_code, range(300))
        )
    assert set(statuses) == {201}
    wait_until(lambda: not any(job_id.startswith(rounds) for job_id in queued_or_running(queue)), "rounds to end", 120)
    # without coalescing, 300 rounds; with it, one queued follower, and one more if a round was running
    assert 1 <= int(client.get(generation)) - generation_after_annotations <= 2
    last = backend.last_round(project_id)
    assert last["published"] and last["annotations"] == len(annotated)
    assert last["top_task"] not in annotated


def queued_or_running(queue: Queue) -> list[str]:
    """Jobs waiting, being handed to a worker (rq moves a job to its intermediate list first), or running."""
    return [*queue.get_job_ids(), *queue.intermediate_queue.get_job_ids(), *queue.started_job_registry.get_job_ids()]


@pytest.mark.parametrize("backend", [{"RECONCILE_INTERVAL": "3"}], indirect=True)
def test_reconciliation_repairs_what_lost_webhooks_did_not_say(backend, project):
    ls, project_id, truth = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    backend.wait_for_round(project_id, annotations=0)
    for webhook in ls.webhooks(project_id):  # drop every webhook: Label Studio now tells the backend nothing
        ls.delete_webhook(webhook["id"])

    annotated = list(truth)[:5]
    for task_id in annotated:
        annotate(ls, task_id, truth[task_id])
    # nothing was heard: only the periodic reconciliation (every 3 s here, via rq's scheduler) can notice
    last = backend.wait_for_round(project_id, annotations=len(annotated), timeout=60)
    assert "reconciliation found" in backend.all_logs()
    assert last["top_task"] not in annotated
    assert ls.next_task(project_id)["id"] == last["top_task"]


@pytest.mark.parametrize("backend", [{"RECONCILE_INTERVAL": "3"}], indirect=True)
def test_reconciliation_notices_labels_renamed_in_the_data_manager(backend, project):
    # the Data Manager's "Rename Labels" rewrites annotations' results alone: no webhook, and the same updated_at
    ls, project_id, truth = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    annotated = [task_id for task_id in truth if truth[task_id] == "World"][:2]
    annotated += [task_id for task_id in truth if truth[task_id] == "Sports"][:2]
    for task_id in annotated:
        annotate(ls, task_id, truth[task_id])
    before = backend.wait_for_round(project_id, annotations=len(annotated))
    for webhook in ls.webhooks(project_id):
        ls.delete_webhook(webhook["id"])
    found_before = backend.all_logs().count("reconciliation found")

    def annotations() -> dict[int, dict]:
        return {task_id: ls._raw("GET", f"api/tasks/{task_id}/annotations")[0] for task_id in annotated}

    before_renaming = annotations()
    renamed = {"control_tag": "topic", "old_label_name": "World", "new_label_name": "Sports"}
    ls._raw("POST", "api/dm/actions", params={"id": "rename_labels", "project": project_id}, json=renamed)
    after = annotations()
    assert [a["result"][0]["value"]["choices"] for a in after.values()] == [["Sports"]] * len(annotated)
    # what the digest used to read is as it was
    assert {t: a["updated_at"] for t, a in after.items()} == {t: a["updated_at"] for t, a in before_renaming.items()}

    wait_until(
        lambda: backend.all_logs().count("reconciliation found") > found_before,
        "a reconciliation that notices the renamed labels",
        timeout=60,
    )

    def ranked_again() -> bool:
        last = backend.last_round(project_id)
        return last.get("generation", 0) > before["generation"] and bool(last.get("published"))

    wait_until(ranked_again, "a round after the renaming", timeout=60)
    assert ls.next_task(project_id)["id"] == backend.last_round(project_id)["top_task"]


@pytest.mark.parametrize("backend", [{"RECONCILE_INTERVAL": "3"}], indirect=True)
def test_reconciliation_notices_a_task_replaced_by_another_without_webhooks(backend, project):
    ls, project_id, _ = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    cold = backend.wait_for_round(project_id, annotations=0)
    for webhook in ls.webhooks(project_id):
        ls.delete_webhook(webhook["id"])
    ls.delete_task(cold["top_task"])  # the task count stays the same: only the newest task id tells
    ls.import_tasks(project_id, [{"text": "Oil prices climb as supply worries grow"}])

    def replaced(last: dict) -> bool:  # a pass between the deletion and the import ranks 299 tasks: wait on
        newer = last.get("generation", 0) > cold["generation"] and last["published"]
        return newer and last["unlabelled"] == cold["unlabelled"] and last["top_task"] != cold["top_task"]

    deadline = time.time() + 60
    while not replaced(last := backend.last_round(project_id)):
        assert time.time() < deadline, f"no round ranked the tasks after the replacement; last: {last}"
        time.sleep(0.2)
    assert ls.next_task(project_id)["id"] == last["top_task"]
    assert "reconciliation found" in backend.all_logs()


@pytest.mark.parametrize("backend", [{"RECONCILE_INTERVAL": "3"}], indirect=True)
def test_reconciliation_notices_the_top_tasks_prediction_deleted_in_the_data_manager(backend, project):
    ls, project_id, _ = project
    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    cold = backend.wait_for_round(project_id, annotations=0)
    selected = {"selectedItems": {"all": False, "included": [cold["top_task"]]}}  # the action sends no webhook
    ls._raw("POST", "api/dm/actions", params={"id": "delete_tasks_predictions", "project": project_id}, json=selected)
    assert ls.get_project(project_id)["model_version"] == cold["model_version"]  # Label Studio leaves it

    deadline = time.time() + 60
    while (last := backend.last_round(project_id)).get("generation", 0) <= cold["generation"] or not last["published"]:
        assert time.time() < deadline, f"no round after the deletion; last: {last}"
        time.sleep(0.2)
    assert "predictions were deleted" in backend.all_logs()
    assert ls.next_task(project_id)["id"] == last["top_task"]


def test_removing_the_backend_stops_the_rounds_and_connecting_it_again_resumes_them(backend, project, redis_url):
    ls, project_id, truth = project
    connection = ls.connect_ml_backend(project_id, backend.url, "al-backend")
    cold = backend.wait_for_round(project_id, annotations=0)
    ls.delete_ml_backend(connection["id"])  # Label Studio keeps its webhook, which goes on posting events
    first, second = [task_id for task_id in truth if task_id != cold["top_task"]][:2]
    annotate(ls, first, truth[first])

    wait_until(lambda: str(project_id) in backend.metrics()["disconnected"], "a round to notice the removal", 60)
    assert "no ML backend" in backend.metrics()["disconnected"][str(project_id)]["reason"]
    client = redis.Redis.from_url(redis_url)
    generation = int(client.get(f"al:rerank:generation:{project_id}") or 0)
    annotate(ls, second, truth[second])  # Label Studio posts the webhook before its API answers
    event = {"action": "ANNOTATION_CREATED", "project": {"id": project_id}, "annotation": {"id": 0}}
    answer = requests.post(backend.url + "/webhook", json=event, timeout=5).json()
    assert answer["disconnected"] is True and answer["rerank"] == "not needed"
    # neither event queued a round: the next one would carry the current generation in its job id
    assert not Job.exists(f"rerank-{project_id}-{generation}", connection=client)
    assert int(client.get(f"al:rerank:generation:{project_id}") or 0) == generation
    assert ls.get_project(project_id)["model_version"] == cold["model_version"]

    ls.connect_ml_backend(project_id, backend.url, "al-backend")
    last = backend.wait_for_round(project_id, annotations=2)
    assert ls.get_project(project_id)["model_version"] == last["model_version"]
    assert ls.next_task(project_id)["id"] == last["top_task"] not in (first, second)
