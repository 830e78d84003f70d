"""What the benchmarks against a real Label Studio share: finding it, and filling a project with AG News texts."""

from __future__ import annotations

from backend.adapters.label_studio import LabelStudio
from tests.conftest import AG_NEWS_CONFIG, read_csv
from tests.label_studio_server import label_studio_binary

IMPORT_CHUNK = 5000


def require_label_studio() -> str:
    """The label-studio executable, or exit saying how to install it."""
    binary = label_studio_binary()
    if binary is None:
        raise SystemExit("label-studio not found: run scripts/setup_label_studio.sh or set LABEL_STUDIO_BIN")
    return binary


def ag_news_project(ls: LabelStudio, title: str, n_tasks: int) -> tuple[int, list[int]]:
    """A topic project of `n_tasks` tasks, the AG News pool's texts in order (repeated past its 10,001 rows).

    Returns the project id and the new task ids, in import order.
    """
    rows = read_csv("ag_news/pool.csv")
    project = ls.create_project(title, AG_NEWS_CONFIG)["id"]
    task_ids: list[int] = []
    for start in range(0, n_tasks, IMPORT_CHUNK):
        batch = [{"text": rows[i % len(rows)]["text"]} for i in range(start, min(n_tasks, start + IMPORT_CHUNK))]
        task_ids += ls.import_tasks(project, batch)["task_ids"]
    return project, task_ids
