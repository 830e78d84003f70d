"""A project's task list (ids and text keys) in Redis, so a round need not re-read every task from Label Studio.

Reading 10,000 tasks through the API takes ~10-18 s on Label Studio 1.23 (SQLite), while the project's
header and its annotated tasks take ~0.1 s each. A round therefore re-reads the full task list only when the
project's task list stamp (number of tasks, newest task id) changed other than by an import (whose tasks alone
are read and appended), the label config reads the texts otherwise, or a TASKS_DELETED event marked the snapshot
stale; the embeddings themselves are in the embedding cache, keyed by the text keys kept here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

KEY_BYTES = 16


@dataclass(frozen=True)
class TaskSnapshot:
    task_ids: np.ndarray
    """(n,) int64 task ids."""
    text_keys: list[bytes]
    """n 16-byte text keys (see backend.adapters.embedding_cache.text_key)."""
    stamp: tuple[int, int]
    """(number of tasks, newest task id) when the snapshot was taken (see LabelStudio.task_list_stamp)."""
    text_source: str = ""
    """Where and how the texts were read (`ClassificationConfig.text_source`): a config that reads them otherwise
    makes another pool."""


class TaskSnapshots:
    def __init__(self, client: redis.Redis):
        self.client = client

    @staticmethod
    def key(project: str) -> str:
        return f"al:project:{project}:snapshot"

    @staticmethod
    def marks_key(project: str) -> str:
        return f"al:project:{project}:snapshot:marks"

    def marks(self, project: str) -> int:
        """How many times the project's task list was marked stale so far. A round reads it before it reads Label
        Studio and saves it with its snapshot: a mark that came while it read makes that snapshot stale too."""
        return int(self.client.get(self.marks_key(project)) or 0)

    def load(self, project: str) -> TaskSnapshot | None:
        """The stored snapshot, or None when there is none or it was marked stale since it was read."""
        with self.client.pipeline(transaction=False) as pipe:
            fields, marks = pipe.hgetall(self.key(project)).get(self.marks_key(project)).execute()
        if not fields or b"newest_task_id" not in fields:  # (one saved before stamps had the newest id is stale)
            return None
        if fields.get(b"stale") == b"1" or int(fields.get(b"marks_seen", 0)) != int(marks or 0):
            return None  # ("stale": how a snapshot saved by an earlier version was marked)
        keys = fields[b"text_keys"]
        return TaskSnapshot(
            np.frombuffer(fields[b"task_ids"], dtype=np.int64),
            [keys[i : i + KEY_BYTES] for i in range(0, len(keys), KEY_BYTES)],
            (int(fields[b"task_number"]), int(fields[b"newest_task_id"])),
            fields.get(b"text_source", b"").decode("utf-8"),
        )

    def stored_keys(self, project: str) -> list[bytes]:
        """The text keys of the stored snapshot, stale or not ([] when there is none)."""
        keys = self.client.hget(self.key(project), "text_keys") or b""
        return [keys[i : i + KEY_BYTES] for i in range(0, len(keys), KEY_BYTES)]

    def save(self, project: str, snapshot: TaskSnapshot, marks_seen: int | None = None) -> None:
        """Store `snapshot`, read after the project's task list had been marked stale `marks_seen` times (see
        `marks`; None: as many times as now)."""
        self.client.hset(
            self.key(project),
            mapping={
                "task_ids": np.asarray(snapshot.task_ids, dtype=np.int64).tobytes(),
                "text_keys": b"".join(snapshot.text_keys),
                "task_number": snapshot.stamp[0],
                "newest_task_id": snapshot.stamp[1],
                "text_source": snapshot.text_source,
                "marks_seen": self.marks(project) if marks_seen is None else marks_seen,
                "stale": "0",  # clears the mark of a snapshot saved by an earlier version (see `load`)
            },
        )

    def delete(self, project: str) -> None:
        self.client.delete(self.key(project), self.marks_key(project))

    def mark_stale(self, project: str) -> None:
        """The next round re-reads the whole task list, also when a round reading it now saves its snapshot after
        this (it read the marks before)."""
        self.client.incr(self.marks_key(project))
