"""What a round pays to learn a project's task list after an import: the whole list, or the imported tasks alone.

    .venv/bin/python -m benchmarks.task_list_reads --tasks 10000 --imported 100

Starts Label Studio 1.23.2 (LABEL_STUDIO_BIN or .ls-venv) on SQLite, imports `--tasks` AG News pool texts, then
`--imported` more, and times, `--repeats` times each, listing every task as a round did after each import
(`iter_tasks`, fields="task_only") and listing the imported ones alone as it does now (`iter_tasks_after`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from backend.adapters.label_studio import LabelStudio
from benchmarks.common import ag_news_project, median_and_spread, require_label_studio
from tests.helpers import free_port
from tests.label_studio_server import start_label_studio


def timed_list(tasks) -> tuple[float, int]:
    started = time.perf_counter()
    count = sum(1 for _ in tasks)
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--imported", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    binary = require_label_studio()
    with tempfile.TemporaryDirectory() as tmp:
        label_studio = start_label_studio(binary, Path(tmp), free_port())
        try:
            ls = LabelStudio(label_studio.url, label_studio.token)
            project, task_ids = ag_news_project(ls, "task list reads", args.tasks)
            newest = max(task_ids)
            ls.import_tasks(project, [{"text": f"imported later, number {i}"} for i in range(args.imported)])
            whole, alone = [], []
            for _ in range(args.repeats):
                seconds, count = timed_list(ls.iter_tasks(project, fields="task_only"))
                assert count == args.tasks + args.imported
                whole.append(seconds)
                seconds, count = timed_list(ls.iter_tasks_after(project, newest))
                assert count == args.imported
                alone.append(seconds)
            print(f"{args.tasks} tasks, then {args.imported} imported:")
            for name, values in (("whole task list", whole), ("imported tasks alone", alone)):
                print(f"  {name:>21}: {median_and_spread(values, digits=3)}")
        finally:
            label_studio.stop()


if __name__ == "__main__":
    main()
