"""What the backend remembers about each connected project, in Redis (shared by server and workers)."""

from __future__ import annotations

import json
import time

import redis

PROJECTS_KEY = "al:projects"
DISCONNECTED_KEY = "al:projects:disconnected"
"""Projects the backend stopped working on: {project: JSON {reason, at}}; connecting one again clears it."""
SETUPS_KEY = "al:projects:setups"
"""{project: how many `/setup` calls came for it}, so that a job can tell whether one came while it read Label
Studio (`disconnect`)."""

DISCONNECT_UNLESS_SET_UP_SINCE = """
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') ~= tonumber(ARGV[2]) then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""
"""Disconnect a project unless a /setup came since the caller looked; delete KEYS[4:] (its records) with it."""

PARAMS_ROUNDS_OWED = "params_rounds_owed"
"""Changes of the parameters a project ranks by that no round was requested for yet: kept with the parameters, so
that a Redis failure between storing them and requesting the round leaves the next `/setup` to request it."""

SETUP_FIELDS = ("label_config", "params", "setup_at", "created_at_setup")
"""What `/setup` stores of a project."""

CONFIRM_CONNECTED = """
local undone = redis.call('HDEL', KEYS[2], ARGV[1])
local added = redis.call('SADD', KEYS[1], ARGV[1])
if added == 1 and undone == 0 then return 1 end
return 0
"""
"""Record a project as connected, undoing a disconnect; 1 when the backend had no record of it either way."""

COUNT_EVENT_IF_CONNECTED = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
"""


FAILED_CONNECTION = "connecting: "
"""How the reason of a failed connection starts, among failed rounds (see `record_failed_connection`)."""


class ProjectRegistry:
    """Per project: label config and parameters from `/setup`, and the record of the last ranking round."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._disconnect_unless_set_up_since = client.register_script(DISCONNECT_UNLESS_SET_UP_SINCE)
        self._count_event_if_connected = client.register_script(COUNT_EVENT_IF_CONNECTED)
        self._confirm_connected = client.register_script(CONFIRM_CONNECTED)

    @staticmethod
    def key(project: str) -> str:
        return f"al:project:{project}"

    def save_setup(
        self, project: str, label_config: str, params: dict, created: str | None = None, params_changed: bool = False
    ) -> bool:
        """Store the project's config (and when Label Studio created it, if known); True when the project is
        connected for the first time. `params_changed`: the parameters it ranks by changed, and a round is owed
        for them (`last_setup`), stored with them in one step."""
        self.client.hincrby(SETUPS_KEY, project, 1)  # first: a job that read Label Studio before this sees it
        first = bool(self.client.sadd(PROJECTS_KEY, project))
        self.client.hdel(DISCONNECTED_KEY, project)
        setup = {"label_config": label_config, "params": json.dumps(params), "setup_at": time.time()}
        if created:
            setup["created_at_setup"] = created
        with self.client.pipeline() as both:  # MULTI/EXEC: the parameters and the round they are owed, or neither
            both.hset(self.key(project), mapping=setup)
            if params_changed:
                both.hincrby(self.key(project), PARAMS_ROUNDS_OWED, 1)
            both.execute()
        if created:  # the project's, whose records these are: replaced only once they are forgotten (start_anew)
            self.client.hsetnx(self.key(project), "created", created)
        return first

    def last_setup(self, project: str) -> tuple[str | None, dict, int]:
        """What `/setup` stored, in one read (Label Studio calls it before every /predict): the label config (None
        if never set up), the extra params, and the changes of the ranking parameters no round was requested for
        yet (one request serves them all)."""
        config, params, owed = self.client.hmget(self.key(project), "label_config", "params", PARAMS_ROUNDS_OWED)
        return (config.decode() if config else None), (json.loads(params) if params else {}), int(owed or 0)

    def rounds_requested_for_params(self, project: str, owed: int) -> None:
        """A round was requested after `owed` changes: those are paid; a change stored since stays owed."""
        self.client.hincrby(self.key(project), PARAMS_ROUNDS_OWED, -owed)

    def created(self, project: str) -> str | None:
        """When Label Studio created the project whose records the backend keeps under this id; None if unknown."""
        raw = self.client.hget(self.key(project), "created")
        return raw.decode() if raw else None

    def another_project_set_up(self, project: str) -> str | None:
        """The creation time the latest `/setup` carried, when it is not that of the project whose records the
        backend keeps under this id (another project has the id now); None when it is, or either is unknown."""
        kept, latest = (
            raw.decode() if raw else None for raw in self.client.hmget(self.key(project), "created", "created_at_setup")
        )
        return latest if kept and latest and kept != latest else None

    def set_created(self, project: str, created: str) -> None:
        self.client.hset(self.key(project), "created", created)

    def projects(self) -> list[str]:
        return sorted((p.decode() for p in self.client.smembers(PROJECTS_KEY)), key=lambda p: int(p))

    def is_connected(self, project: str) -> bool:
        return bool(self.client.sismember(PROJECTS_KEY, project))

    def setups(self, project: str) -> int:
        """How many `/setup` calls came for `project` so far; what a job passes to `disconnect`."""
        return int(self.client.hget(SETUPS_KEY, project) or 0)

    def disconnect(self, project: str, reason: str, setups_seen: int, forgotten: bool = False) -> bool:
        """Stop serving `project` (deleted in Label Studio, or its ML backend removed) until `/setup` comes again,
        unless one came since the caller saw `setups_seen` (read before it read Label Studio): then the user
        connected the backend again meanwhile, and that connection stands. -> whether the project is disconnected.

        Its config, rounds and the settings from before connecting stay, for inspection and for undoing, unless
        the project was deleted (`forgotten`): then they go in the same step, so that a `/setup` that came since
        keeps what it stored.
        """
        record = json.dumps({"reason": reason, "at": time.time(), "forgotten": forgotten})
        keys = [SETUPS_KEY, PROJECTS_KEY, DISCONNECTED_KEY] + (self._record_keys(project) if forgotten else [])
        return bool(self._disconnect_unless_set_up_since(keys=keys, args=[project, setups_seen, record]))

    def forget_all_but_setup(self, project: str) -> None:
        """Keep only what `/setup` stored (config, parameters) of `project`: for a project deleted in Label Studio
        whose id a new project, connected meanwhile, now has."""
        stale = {field.decode() for field in self.client.hkeys(self.key(project))} - set(SETUP_FIELDS)
        if stale:
            self.client.hdel(self.key(project), *stale)
        self.client.delete(self._events_key(project), self._shown_key(project))

    def _record_keys(self, project: str) -> list[str]:
        """What is kept about `project`: its config and rounds, event counts, the versions shown to annotators."""
        return [self.key(project), self._events_key(project), self._shown_key(project)]

    def confirm_connected(self, project: str) -> bool:
        """Label Studio shows `project` connected: undo a `disconnect` that a slower round recorded after the user
        had connected the backend again; record a connection whose `/setup` came while Redis was away (webhooks
        queue rounds all the same) -> True for the latter, which no connect job or reconciliation set up yet."""
        return bool(self._confirm_connected(keys=[PROJECTS_KEY, DISCONNECTED_KEY], args=[project]))

    def disconnected(self) -> dict[str, dict]:
        """{project: {reason, at}} for every project the backend stopped working on."""
        return {k.decode(): json.loads(v) for k, v in self.client.hgetall(DISCONNECTED_KEY).items()}

    def disconnected_with_records(self) -> list[str]:
        """Disconnected projects whose config, rounds and files the backend still keeps (not `forgotten`)."""
        return [project for project, record in self.disconnected().items() if not record.get("forgotten")]

    def is_disconnected(self, project: str) -> bool:
        return bool(self.client.hexists(DISCONNECTED_KEY, project))

    def save_label_config(self, project: str, label_config: str) -> None:
        """The label config a round read from Label Studio: newer than /setup's when Label Studio could not reach
        `/setup` since the config was edited."""
        self.client.hset(self.key(project), "label_config", label_config)

    def label_config(self, project: str) -> str | None:
        raw = self.client.hget(self.key(project), "label_config")
        return raw.decode() if raw else None

    def params(self, project: str) -> dict:
        raw = self.client.hget(self.key(project), "params")
        return json.loads(raw) if raw else {}

    def record_round(self, project: str, summary: dict) -> None:
        """The round's summary (shown in /metrics); a round that ran also ends any refusal or run of failures."""
        self.client.hset(self.key(project), "last_round", json.dumps(summary))
        self.client.hdel(self.key(project), "refused", "failing")

    def record_failed_round(self, project: str, reason: str) -> None:
        """A round failed for good (its retries spent): why, when, how many in a row, and with which parameters."""
        rounds = (self.failing(project) or {}).get("rounds", 0) + 1
        failing = {"reason": reason[:500], "at": time.time(), "rounds": rounds, "params": self.params(project)}
        self.client.hset(self.key(project), "failing", json.dumps(failing))

    def record_failed_connection(self, project: str, reason: str) -> None:
        """The first connection failed for good: shown as a failed round is, until a round runs or the project is
        configured (`end_failed_connection`)."""
        self.record_failed_round(project, FAILED_CONNECTION + reason)

    def end_failed_connection(self, project: str) -> None:
        """The project is configured after all: a failed connection no longer shows, nor holds reconciliation
        back (a failed round recorded since stays)."""
        failing = self.failing(project)
        if failing and failing["reason"].startswith(FAILED_CONNECTION):
            self.client.hdel(self.key(project), "failing")

    def failing(self, project: str) -> dict | None:
        """The last `record_failed_round` since the last round that ran, or None."""
        raw = self.client.hget(self.key(project), "failing")
        return json.loads(raw) if raw else None

    def record_refusal(self, project: str, reason: str, fingerprint: str) -> None:
        """A round refused the project as it is (see `RoundRefused`): why, and for which state and parameters."""
        refusal = {"reason": reason, "fingerprint": fingerprint, "params": self.params(project), "at": time.time()}
        self.client.hset(self.key(project), "refused", json.dumps(refusal))

    def refusal(self, project: str) -> dict | None:
        raw = self.client.hget(self.key(project), "refused")
        return json.loads(raw) if raw else None

    def record_reconcile_read(self, project: str, seconds: float) -> None:
        """How long the project's last reconciliation took to read Label Studio."""
        self.client.hset(self.key(project), "reconcile_read_seconds", f"{seconds:.3f}")

    def reconcile_read_seconds(self, project: str) -> float:
        """How long the project's last reconciliation took to read Label Studio (0 before the first)."""
        return float(self.client.hget(self.key(project), "reconcile_read_seconds") or 0)

    def last_round(self, project: str) -> dict | None:
        raw = self.client.hget(self.key(project), "last_round")
        return json.loads(raw) if raw else None

    def record_settings_before_connect(self, project: str, previous: dict, ours: dict) -> None:
        """The project's settings before the backend first changed them, for undoing (see README).

        `ours` are the values the backend sets. Once recorded, other values are never replaced, and values equal
        to `ours` never replace anything: a job that configured the project after another had (the connect job and
        a reconciliation running side by side, or connecting again) read the backend's own values back, and
        the first job's record of the user's values wins whichever job writes first.
        """
        field = "settings_before_connect"
        if previous == ours:
            self.client.hsetnx(self.key(project), field, json.dumps(previous))
        elif self.settings_before_connect(project) in (None, ours):
            self.client.hset(self.key(project), field, json.dumps(previous))

    def settings_before_connect(self, project: str) -> dict | None:
        """What `record_settings_before_connect` kept; None until the project's set-up first succeeded."""
        raw = self.client.hget(self.key(project), "settings_before_connect")
        return json.loads(raw) if raw else None

    def set_live_version(self, project: str, version: str) -> None:
        """The model version the backend last switched the project to."""
        self.client.hset(self.key(project), "live_version", version)

    def live_version(self, project: str) -> str | None:
        raw = self.client.hget(self.key(project), "live_version")
        return raw.decode() if raw else None

    def record_shown(self, project: str, shown: dict[int, tuple[str, ...]]) -> None:
        """Per task, the choices of the prediction a round wrote: the pre-annotation an annotator then sees.

        (Label Studio deletes a task's predictions with their version.)
        """
        if shown:
            mapping = {str(task_id): json.dumps(list(choices)) for task_id, choices in shown.items()}
            self.client.hset(self._shown_key(project), mapping=mapping)

    def shown(self, project: str, task_ids: list[int]) -> dict[int, tuple[str, ...]]:
        """The last recorded pre-annotation of each of `task_ids` that has one."""
        if not task_ids:
            return {}
        raw = self.client.hmget(self._shown_key(project), [str(task_id) for task_id in task_ids])
        return {task_id: tuple(json.loads(value)) for task_id, value in zip(task_ids, raw, strict=True) if value}

    def count_event(self, project: str, action: str) -> bool:
        """Count a webhook event of a connected project (what `/metrics` shows) -> whether it was counted.

        Events of other projects are not: a deleted project's own PROJECT_DELETED, or the events that a removed
        backend's webhook keeps sending, must not bring back keys that `forget` deleted, nor a body posted to
        `/webhook` for a project id that was never set up leave a record of it."""
        keys = [PROJECTS_KEY, self._events_key(project)]
        return bool(self._count_event_if_connected(keys=keys, args=[project, action]))

    def event_counts(self, project: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(self._events_key(project)).items()}

    def _events_key(self, project: str) -> str:
        return self.key(project) + ":events"

    def _shown_key(self, project: str) -> str:
        return self.key(project) + ":shown"
