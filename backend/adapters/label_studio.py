"""Label Studio's REST API as this backend uses it, on top of the SDK client (`label_studio_sdk.LabelStudio`).

The SDK sends the key (a legacy `Token` or a personal access token, which it exchanges for access tokens) and
retries connection errors, 408/409/429 and 5xx twice. Calls the SDK lacks (`/next`, `/model-versions/`) and
the reads that must be cheap (pages of tasks, annotated or not) go through the SDK's own authenticated
HTTP client and stay plain JSON. Every method returns Label Studio's JSON as dicts and lists. Failures raise
`LabelStudioUnavailable` (unreachable, timeout, 5xx) or its subclass `LabelStudioRejected` (4xx; `LabelStudioNotFound`
for 404); messages name the method, the URL path and the status, never the key.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from label_studio_sdk import LabelStudio as SdkClient
from label_studio_sdk.core.api_error import ApiError

from backend.config import url_without_password
from backend.errors import (
    LabelStudioForbidden,
    LabelStudioNotFound,
    LabelStudioRejected,
    LabelStudioUnavailable,
)

ACTIVE_LEARNING_SETTINGS = {"sampling": "Uncertainty sampling", "show_collab_predictions": True}
"""What connecting the backend changes in a project; `configure_for_active_learning` returns the old values."""
TASK_PAGE_SIZE = 1000
"""Tasks per page when listing; larger pages cost Label Studio the same per task and save round trips."""
TASK_FIELDS = "id,data,meta,inner_id,created_at,updated_at"
"""The task fields listed (`include=`): leaving out Label Studio's per-task counters and aggregates (annotators,
prediction results...) makes a page 3.5x cheaper (10k tasks: 3.1 s instead of 11 s for `fields=task_only`)."""
NEWEST_FIRST = json.dumps({"ordering": ["-tasks:id"]})
"""The task list's `query` parameter (Label Studio's Data Manager query) that lists the newest task first."""


ANNOTATED_TASKS = json.dumps(
    {
        "filters": {
            "conjunction": "or",
            "items": [
                {"filter": f"filter:tasks:{counter}", "operator": "greater", "type": "Number", "value": 0}
                for counter in ("total_annotations", "cancelled_annotations")
            ],
        },
        "ordering": ["tasks:id"],
    }
)
"""The task list's `query` that keeps the tasks with an annotation, submitted or skipped, oldest first."""
ANNOTATED_TASK_FIELDS = "id,data,annotations,result,was_cancelled,updated_at,ground_truth"
"""`include=` for the annotated tasks: Label Studio applies it to each annotation's fields too, so it names both
the task's (id, data, annotations) and the annotation's (id, result, was_cancelled, updated_at, ground_truth)."""


def ids_above(task_id: int) -> str:
    """The task list's `query` (a Data Manager filter) that keeps the tasks with an id above `task_id`, oldest
    first."""
    above = {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": int(task_id)}
    return json.dumps({"filters": {"conjunction": "and", "items": [above]}, "ordering": ["tasks:id"]})


FAST_PREDICTION_IMPORT_FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
"""Label Studio 1.23's feature flag (off by default; set it to "true" in Label Studio's environment) with which a
bulk prediction import updates the counters of the imported tasks only, instead of every task of the project: 20
predictions into a 100,000-task project then take 0.08 s instead of 6.2 s. Run the backend with
PREDICTION_WRITES=bulk against such a Label Studio."""
BULK_TIMEOUT = 600.0
"""Seconds allowed to calls whose cost grows with the project: imports, deleting a model version."""


def _refusal(request: str, status: int | None, body: object) -> LabelStudioUnavailable:
    """The error for Label Studio's answer `status` to `request`: its status and the start of its body, and for a
    refused key what to check."""
    message = f"Label Studio {request}: HTTP {status} {str(body)[:300]}"
    if status == 401:
        message += (
            " (LABEL_STUDIO_API_KEY is not accepted: a personal access token from Account & Settings, or a legacy "
            "token where the organization allows them)"
        )
    return _error_for(status)(message)


def _error_for(status: int | None) -> type[LabelStudioUnavailable]:
    if status == 404:
        return LabelStudioNotFound
    if status in (401, 403):
        return LabelStudioForbidden
    return LabelStudioRejected if status and 400 <= status < 500 else LabelStudioUnavailable


class LabelStudio:
    """The calls the backend, its tests and benchmarks make to one Label Studio.

    Args:
        url: Label Studio's base URL, e.g. "http://localhost:8080".
        api_key: a legacy token or a personal access token (the SDK tells them apart).
        timeout: seconds per ordinary call; bulk calls get `BULK_TIMEOUT`.
    """

    def __init__(self, url: str, api_key: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.shown_url = url_without_password(self.url)
        """What messages say: a password in the URL (a proxy's basic auth) ends up in failed rounds' reasons,
        which `/metrics` shows, so it never goes in."""
        self.timeout = timeout
        # the SDK decodes a personal access token here and raises if it has expired
        self.sdk = self._call("client", lambda: SdkClient(base_url=self.url, api_key=api_key, timeout=timeout))

    def __repr__(self) -> str:
        return f"LabelStudio(url={self.shown_url!r}, timeout={self.timeout})"

    # plumbing
    def _call(self, request: str, function: Callable[[], Any]) -> Any:
        """Run one call (`request` names it, e.g. "GET /api/projects/3"), turning failures into our errors.

        The SDK's own ApiError text includes the response headers (session cookie), so only the status and the
        start of the body are kept.
        """
        try:
            return function()
        except ApiError as exc:
            raise _refusal(request, exc.status_code, exc.body) from None
        except httpx.TimeoutException:
            raise LabelStudioUnavailable(f"Label Studio {request}: timed out at {self.shown_url}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise LabelStudioUnavailable(
                f"Label Studio {request}: unreachable at {self.shown_url} ({type(exc).__name__})"
            ) from None

    def _json(self, request: str, function: Callable[[], Any]) -> Any:
        """An SDK `with_raw_response` call, returning Label Studio's JSON rather than the SDK's models."""
        response = self._call(request, function).response
        return response.json() if response.content else None

    def _raw(self, method: str, path: str, timeout: float | None = None, **kwargs) -> Any:
        """A call through the SDK's authenticated HTTP client, without its models; returns the JSON."""
        client = self.sdk._client_wrapper.httpx_client
        options = {"timeout": timeout or self.timeout}
        request = f"{method} /{path}"
        response = self._call(request, lambda: client.request(path, method=method, request_options=options, **kwargs))
        if response.status_code >= 400:
            raise _refusal(request, response.status_code, response.text)
        return response.json() if response.content else None

    # projects
    def get_project(self, project_id: int) -> dict:
        """The project: id, title, label_config, model_version, sampling, show_collab_predictions, task_number..."""
        projects = self.sdk.projects.with_raw_response
        return self._json(f"GET /api/projects/{project_id}", lambda: projects.get(id=project_id))

    def confirm_project_deleted(self, project_id: int) -> None:
        """After `GET /api/projects/{id}` answered 404, check that Label Studio's project list still answers, so
        that a LABEL_STUDIO_URL that is not Label Studio's API (a wrong path, a proxy answering 404 for everything
        while Label Studio restarts) is not taken for a deleted project: then it raises `LabelStudioUnavailable`,
        which retries."""
        try:
            self._raw("GET", "api/projects/", params={"page_size": 1})
        except LabelStudioNotFound:
            raise LabelStudioUnavailable(
                f"Label Studio at {self.shown_url} answers 404 to GET /api/projects/{project_id} and to GET "
                "/api/projects/ too: is LABEL_STUDIO_URL right?"
            ) from None

    def create_project(self, title: str, label_config: str) -> dict:
        """A new project (Label Studio wants a title of at least 3 characters)."""
        projects = self.sdk.projects.with_raw_response
        return self._json("POST /api/projects", lambda: projects.create(title=title, label_config=label_config))

    def update_project(self, project_id: int, **fields) -> dict:
        """PATCH project fields (sampling, model_version, show_collab_predictions, ...); returns the project."""
        projects = self.sdk.projects.with_raw_response
        return self._json(f"PATCH /api/projects/{project_id}", lambda: projects.update(project_id, **fields))

    def configure_for_active_learning(self, project_id: int) -> dict:
        """Switch to Uncertainty sampling with predictions shown; returns the previous values, for undoing it.

        Undo with `update_project(project_id, **previous)` or `PATCH /api/projects/{id}` with those values (the
        open-source UI lists only Sequential and Uniform sampling).
        """
        current = self.get_project(project_id)
        previous = {key: current.get(key) for key in ACTIVE_LEARNING_SETTINGS}
        self.update_project(project_id, **ACTIVE_LEARNING_SETTINGS)
        return previous

    def set_model_version(self, project_id: int, version: str) -> dict:
        """Make `version` current; Label Studio refuses (400) a version no prediction or ML backend has."""
        return self.update_project(project_id, model_version=version)

    # tasks and annotations
    def iter_tasks(self, project_id: int, page_size: int = TASK_PAGE_SIZE, fields: str = "all") -> Iterator[dict]:
        """Every task of the project (the `TASK_FIELDS`: id, data, meta, ...) in id order, page by page.

        With `fields="all"` each task also has `annotations` (id, result, was_cancelled, updated_at, ...): the
        pages are joined with `iter_annotated_tasks`, which costs far less than Label Studio's own `fields=all`
        (that one serialises every task's counters, predictions and drafts). The two reads are not one
        snapshot: an annotation made in between may be missing. `fields="task_only"` leaves annotations out.
        """
        if fields not in ("all", "task_only"):
            raise ValueError(f"fields must be 'all' or 'task_only', got {fields!r}")
        annotations = {}
        if fields == "all":
            annotations = {task["id"]: task["annotations"] for task in self.iter_annotated_tasks(project_id)}
        for task in self._task_pages(project_id, page_size):
            if fields == "all":
                task["annotations"] = annotations.get(task["id"], [])
            yield task

    def iter_tasks_after(self, project_id: int, task_id: int, page_size: int = TASK_PAGE_SIZE) -> Iterator[dict]:
        """The project's tasks with an id above `task_id` (as `iter_tasks` with fields="task_only"), in id order:
        what an import added, read without reading the tasks that were there before."""
        yield from self._task_pages(project_id, page_size, query=ids_above(task_id))

    def _task_pages(
        self, project_id: int, page_size: int, query: str = "", include: str = TASK_FIELDS, fields: str = "task_only"
    ) -> Iterator[dict]:
        """The tasks of a list paged by number while annotators work, each yielded once: a task that joins the list
        below the page being read (a first annotation, for the annotated list) shifts the next page by one, which
        then starts with the last task of this page again. (Such a task is itself missing from this read, and a
        deletion below shifts the next page the other way, missing one task: the round's fingerprint then differs
        from Label Studio's, and the next reconciliation ranks again.)"""
        page, seen, yielded = 1, 0, set()
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size, "include": include, "fields": fields}
            if query:
                params["query"] = query
            body = self._raw("GET", "api/tasks/", timeout=max(self.timeout, BULK_TIMEOUT / 5), params=params)
            for task in body["tasks"]:
                if task["id"] not in yielded:
                    yielded.add(task["id"])
                    yield task
            seen += len(body["tasks"])
            # a page past the end is a 404, so stop on the total (the SDK's pager asks for it and swallows it)
            if not body["tasks"] or seen >= body["total"]:
                return
            page += 1

    def task_list_stamp(self, project_id: int) -> tuple[int, int]:
        """(number of tasks, newest task id): one small read that changes whenever tasks are imported or deleted.

        The count alone misses an import and a deletion of as many tasks; the newest id catches it, since an
        import gets ids above every existing one (never a deleted task's: Django creates Label Studio's keys with
        AUTOINCREMENT on SQLite too).
        """
        params = {"project": project_id, "page_size": 1, "include": "id", "query": NEWEST_FIRST}
        body = self._raw("GET", "api/tasks/", params=params)
        return int(body["total"]), int(body["tasks"][0]["id"]) if body["tasks"] else 0

    def iter_annotated_tasks(self, project_id: int, page_size: int = TASK_PAGE_SIZE) -> Iterator[dict]:
        """Only the tasks that have annotations (skipped ones too), each with id, data and annotations, in id order.

        Pages of the task list filtered on Label Studio's annotation counters: the cost follows the number of
        annotated tasks, not the size of the project, and matches the JSON export's (10,000 annotated tasks:
        12.6-12.9 s against 14.2-14.3 s), which this replaced because every export also writes its whole result
        to files in Label Studio's data folder that nothing deletes: a round and a reconciliation a minute made
        Label Studio's disk grow without end.
        """
        yield from self._task_pages(
            project_id, page_size, query=ANNOTATED_TASKS, include=ANNOTATED_TASK_FIELDS, fields="all"
        )

    def annotated_tasks(self, project_id: int) -> list[dict]:
        """`iter_annotated_tasks` as a list."""
        return list(self.iter_annotated_tasks(project_id))

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        """Bulk task import: each dict is a task's data, or {"data": ..., "predictions": [...]}.

        Returns Label Studio's summary, with `task_ids` of the new tasks.
        """
        projects = self.sdk.projects.with_raw_response
        options = {"timeout": BULK_TIMEOUT}
        return self._json(
            f"POST /api/projects/{project_id}/import",
            lambda: projects.import_tasks(project_id, request=tasks, return_task_ids=True, request_options=options),
        )

    def delete_task(self, task_id: int) -> None:
        """Delete a task with its annotations and predictions (Label Studio posts TASKS_DELETED)."""
        tasks = self.sdk.tasks.with_raw_response
        self._call(f"DELETE /api/tasks/{task_id}", lambda: tasks.delete(str(task_id)))

    def create_annotation(self, task_id: int, result: list[dict]) -> dict:
        """Annotate a task as the key's user, like submitting it in the labeling UI."""
        annotations = self.sdk.annotations.with_raw_response
        return self._json(
            f"POST /api/tasks/{task_id}/annotations/",
            lambda: annotations.create(task_id, result=result, was_cancelled=False),
        )

    def next_task(self, project_id: int) -> dict:
        """The task Label Studio serves the key's user next (`GET /api/projects/{id}/next`), locking it to them."""
        return self._raw("GET", f"api/projects/{project_id}/next")

    # predictions and model versions
    def create_predictions(self, predictions: list[dict], max_workers: int = 4) -> list[dict]:
        """One `POST /api/predictions/` per prediction ({task, result, score, model_version}), a few at a time.

        Unlike `import_predictions`, this does not recount the project's tasks, so its cost does not grow with
        the project: ~0.11 s per prediction with 4 threads (SQLite, 2 cores), cheaper than the bulk import from
        ~1,800 project tasks per prediction on (see `services.rerank.write_predictions`). `cluster` can be set
        only this way.
        """
        client = self.sdk.predictions.with_raw_response

        def create(prediction: dict) -> dict:
            return self._json("POST /api/predictions/", lambda: client.create(**prediction))

        if max_workers <= 1:
            return [create(prediction) for prediction in predictions]
        with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
            return list(pool.map(create, predictions))

    def predictions(self, project_id: int) -> list[dict]:
        """Every prediction of the project (for tests and inspection: this reads them all)."""
        body = self._raw("GET", "api/predictions", params={"project": project_id})
        return body.get("results", body) if isinstance(body, dict) else body

    def import_predictions(self, project_id: int, predictions: list[dict]) -> dict:
        """Bulk `POST /api/projects/{id}/import/predictions`; stores task, result, score, model_version only.

        Label Studio then recounts every task of the project, so the cost grows with the project, not the list.
        """
        projects = self.sdk.projects.with_raw_response
        options = {"timeout": BULK_TIMEOUT}
        return self._json(
            f"POST /api/projects/{project_id}/import/predictions",
            lambda: projects.import_predictions(project_id, request=predictions, request_options=options),
        )

    def model_versions(self, project_id: int) -> dict[str, int]:
        """`{model_version: number of predictions}` of the project's predictions, in one grouped query, the version
        whose latest prediction is newest first (iterating it gives versions in that order). Predictions imported
        with `"model_version": null` (Label Studio stores it as given) form a group without a name: left out, since
        no version can name them."""
        body = self._raw("GET", f"api/projects/{project_id}/model-versions/", params={"extended": "true"})
        rows = body.get("static", []) if isinstance(body, dict) else []
        named = [row for row in rows if isinstance(row.get("model_version"), str)]
        return {row["model_version"]: int(row["count"]) for row in sorted(named, key=_latest, reverse=True)}

    def delete_model_version(self, project_id: int, version: str) -> dict:
        """Delete every prediction of `version`; returns {"deleted_predictions": n}.

        Deleting the project's current version resets `project.model_version` to null (sampling turns random).
        """
        path = f"api/projects/{project_id}/model-versions/"
        return self._raw("DELETE", path, timeout=BULK_TIMEOUT, json={"model_version": version})

    # ML backends and webhooks
    def connect_ml_backend(self, project_id: int, url: str, title: str, **options) -> dict:
        """Connect an ML backend (`POST /api/ml`); Label Studio calls its /health and /setup and adds a webhook."""
        ml = self.sdk.ml.with_raw_response
        return self._json("POST /api/ml", lambda: ml.create(project=project_id, url=url, title=title, **options))

    def ml_backends(self, project_id: int) -> list[dict]:
        """The ML backends connected to the project."""
        ml = self.sdk.ml.with_raw_response
        return self._json(f"GET /api/ml?project={project_id}", lambda: ml.list(project=project_id))

    def delete_ml_backend(self, ml_backend_id: int) -> None:
        """Disconnect an ML backend, as "Delete" in the project's Model settings does (its webhook stays)."""
        ml = self.sdk.ml.with_raw_response
        self._call(f"DELETE /api/ml/{ml_backend_id}", lambda: ml.delete(ml_backend_id))

    def delete_project(self, project_id: int) -> None:
        """Delete a project with its tasks, annotations and predictions (no webhook is sent for it)."""
        projects = self.sdk.projects.with_raw_response
        self._call(f"DELETE /api/projects/{project_id}", lambda: projects.delete(project_id))

    def webhooks(self, project_id: int) -> list[dict]:
        """The project's webhooks (id, url, headers, actions, ...)."""
        hooks = self.sdk.webhooks.with_raw_response
        return self._json(f"GET /api/webhooks/?project={project_id}", lambda: hooks.list(project=str(project_id)))

    def update_webhook(self, webhook_id: int, headers: dict) -> dict:
        """Replace a webhook's headers, e.g. to add the Authorization header Label Studio's own webhook lacks."""
        hooks = self.sdk.webhooks.with_raw_response
        return self._json(f"PATCH /api/webhooks/{webhook_id}/", lambda: hooks.update(webhook_id, headers=headers))

    def delete_webhook(self, webhook_id: int) -> None:
        """Delete a webhook."""
        hooks = self.sdk.webhooks.with_raw_response
        self._call(f"DELETE /api/webhooks/{webhook_id}/", lambda: hooks.delete(webhook_id))


def _latest(row: dict) -> datetime.datetime:
    """When a model version's latest prediction was made, as Label Studio's extended version list says."""
    try:
        when = datetime.datetime.fromisoformat(str(row.get("latest")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.UTC)
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
