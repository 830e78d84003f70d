"""Request shapes of the Label Studio ML backend protocol, checked field by field.

Each `parse_*` takes the decoded JSON body and returns a small typed object, or raises `MalformedRequest`
naming the field and what was wrong with it. Routes never index into raw request dicts themselves.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field

from backend.errors import MalformedRequest
from backend.scoring.registry import get_strategy

WEBHOOK_ACTIONS = (
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "TASKS_CREATED",
    "TASKS_DELETED",
    "START_TRAINING",
    "PROJECT_UPDATED",
)
IGNORED_WEBHOOK_ACTIONS = (
    "PROJECT_CREATED",
    "PROJECT_DELETED",
    "LABEL_LINK_CREATED",
    "LABEL_LINK_UPDATED",
    "LABEL_LINK_DELETED",
    "REVIEW_CREATED",
    "REVIEW_UPDATED",
    "REVIEWS_DELETED",
)
"""Events Label Studio sends to a backend's webhook that need no re-ranking: acknowledged and dropped."""


@dataclass(frozen=True)
class SetupRequest:
    project: str
    label_config: str
    model_version: str | None = None
    extra_params: dict = field(default_factory=dict)
    created: str | None = None
    """When Label Studio created the project (the "timestamp" of its "id.timestamp" uid): a project given the
    id of one the backend still keeps records of (a Label Studio started on a new database) tells itself apart
    by it. None when Label Studio sends the bare id."""


@dataclass(frozen=True)
class PredictRequest:
    project: str
    tasks: list[dict]
    label_config: str | None
    created: str | None = None
    """As `SetupRequest.created`."""


@dataclass(frozen=True)
class WebhookEvent:
    action: str
    project: str
    payload: dict


def require_object(body: object, route: str) -> dict:
    if not isinstance(body, dict):
        raise MalformedRequest(f"{route} expects a JSON object body, got {type(body).__name__}")
    return body


PROJECT_ID = re.compile(r"[0-9]{1,18}")


def project_id(value: object, field_name: str = "project") -> str:
    """Label Studio sends project ids as ints, as strings, as "id.timestamp" (in /predict), or as objects."""
    given = value
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None or value == "":
        raise MalformedRequest(f"'{field_name}' must be a project id, got {given!r:.80}")
    if isinstance(value, float):  # 1.5 would pass for project 1 below
        raise MalformedRequest(f"'{field_name}' must be a numeric project id, got {value!r}")
    text = str(value).split(".", 1)[0]
    if not PROJECT_ID.fullmatch(text):  # ASCII digits only: str.isdigit() also takes "²" and "١٢"
        raise MalformedRequest(f"'{field_name}' must be a numeric project id, got {value!r:.80}")
    return str(int(text))  # "007" and "7" are one project


PROJECT_PARAMS = ("strategy", "strategy_params", "rank_top_k")
"""The keys of Label Studio's extra params that the backend reads (see `_check_strategy_params`)."""


def parse_setup(body: object, default_strategy: str = "hybrid") -> SetupRequest:
    """`default_strategy`: the backend's STRATEGY, which `strategy_params` apply to when extra_params names none."""
    body = require_object(body, "/setup")
    schema = body.get("schema", body.get("label_config"))
    if not isinstance(schema, str) or not schema.strip():
        raise MalformedRequest(f"/setup needs 'schema' (the project's label config XML), got {schema!r:.80}")
    extra = body.get("extra_params")
    if extra is None:
        extra = {}
    if isinstance(extra, str):  # a blank field in the form is no extra params, not malformed JSON
        extra = _json_object(extra, "extra_params") if extra.strip() else {}
    if not isinstance(extra, dict):
        raise MalformedRequest(f"'extra_params' must be a JSON object, got {type(extra).__name__}")
    # null means "the backend's setting", as if absent (a form that clears a field may send it so)
    extra = {key: value for key, value in extra.items() if not (key in PROJECT_PARAMS and value is None)}
    _check_strategy_params(extra, default_strategy)
    version = body.get("model_version")
    project = body.get("project")
    return SetupRequest(
        project_id(project), schema, version if isinstance(version, str) else None, extra, project_created(project)
    )


def project_created(value: object) -> str | None:
    """The "timestamp" of Label Studio's "id.timestamp" project uid (`project_id` checked the id), else None."""
    if not isinstance(value, str) or "." not in value:
        return None
    created = value.split(".", 1)[1]
    return created if PROJECT_ID.fullmatch(created) else None


def parse_predict(body: object) -> PredictRequest:
    body = require_object(body, "/predict")
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise MalformedRequest(f"/predict needs 'tasks': a list of task objects, got {type(tasks).__name__}")
    for index, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise MalformedRequest(f"tasks[{index}] must be an object with a 'data' object, got {task!r:.80}")
    label_config = body.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise MalformedRequest(f"'label_config' must be the label config XML string, got {type(label_config).__name__}")
    given = body.get("project")
    project = project_id(given) if given not in (None, "") else ""
    return PredictRequest(project, tasks, label_config, project_created(given))


def parse_webhook(body: object) -> WebhookEvent:
    body = require_object(body, "/webhook")
    action = body.get("action")
    if not isinstance(action, str):
        raise MalformedRequest(f"/webhook needs 'action' (a Label Studio event name), got {action!r:.80}")
    if action not in WEBHOOK_ACTIONS and action not in IGNORED_WEBHOOK_ACTIONS:
        raise MalformedRequest(
            f"unknown webhook action {action!r:.80}; ranked on: {', '.join(WEBHOOK_ACTIONS)}; "
            f"accepted and ignored: {', '.join(IGNORED_WEBHOOK_ACTIONS)}"
        )
    project = body.get("project")
    if project is None and isinstance(body.get("task"), dict):
        project = body["task"].get("project")
    return WebhookEvent(action, project_id(project), body)


MAX_EXTRA_PARAMS = 100


def _check_strategy_params(extra: dict, default_strategy: str) -> None:
    """`extra_params` may choose the project's strategy: {"strategy", "strategy_params", "rank_top_k"}. Other keys
    are kept and ignored (a user's notes), unless one looks like a misspelt key the backend reads."""
    if len(extra) > MAX_EXTRA_PARAMS:  # (each is looked at, and all are kept in Redis with the project)
        raise MalformedRequest(
            f"extra_params has {len(extra)} keys, over the {MAX_EXTRA_PARAMS} this backend keeps (it reads "
            f"{', '.join(PROJECT_PARAMS)})"
        )
    for key in extra:
        misspelt = key not in PROJECT_PARAMS and difflib.get_close_matches(str(key), PROJECT_PARAMS, n=1, cutoff=0.8)
        if misspelt:
            raise MalformedRequest(
                f"extra_params: unknown key {key!r:.80}, did you mean {misspelt[0]!r}? (the backend reads "
                f"{', '.join(PROJECT_PARAMS)})"
            )
    if "strategy" in extra or "strategy_params" in extra:
        params = extra.get("strategy_params") or {}
        if not isinstance(params, dict):
            raise MalformedRequest(f"'strategy_params' must be an object, got {type(params).__name__}")
        try:
            get_strategy(str(extra.get("strategy", default_strategy)), **params)
        except (ValueError, TypeError) as exc:
            raise MalformedRequest(f"extra_params: {exc}") from None
    top_k = extra.get("rank_top_k", 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise MalformedRequest(f"extra_params 'rank_top_k' must be a positive integer, got {top_k!r}")


def _json_object(text: str, field_name: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise MalformedRequest(f"'{field_name}' is a string but not JSON: {text!r:.80}") from None
    if not isinstance(value, dict):
        raise MalformedRequest(f"'{field_name}' must be a JSON object, got {type(value).__name__}")
    return value
