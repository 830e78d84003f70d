"""What a round's writes cost Label Studio, by project size: the figures behind how the backend publishes.

    .venv/bin/python -m benchmarks.label_studio_writes --tasks 10000,100000 --predictions 20 --repeats 3

Starts Label Studio 1.23.2 (LABEL_STUDIO_BIN or .ls-venv) and, per project size, imports that many AG News pool
texts, then times (median of --repeats, each on a fresh model version): a bulk import of K predictions, K single
`POST /api/predictions/` (4 threads), the `PATCH` that switches `project.model_version`, `GET /next`, and the
deletion of a model version holding K predictions. Prints one line per operation and size.
`--fast-prediction-import` starts Label Studio with the flag that stops the bulk import recounting every task.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from backend.adapters.label_studio import LabelStudio
from benchmarks.common import (
    ag_news_project,
    median_and_spread,
    parse_with_fast_prediction_import,
    require_label_studio,
)
from tests.helpers import choices_result, free_port
from tests.label_studio_server import start_label_studio


def timed(call: Callable, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def predictions_for(task_ids: list[int], version: str) -> list[dict]:
    """One priority prediction per task, shaped as the backend writes them."""
    return [
        {
            "task": task_id,
            "model_version": version,
            "score": rank / len(task_ids),
            "result": choices_result("World"),
        }
        for rank, task_id in enumerate(task_ids)
    ]


def measure(ls: LabelStudio, n_tasks: int, k: int, repeats: int) -> dict[str, list[float]]:
    project, task_ids = ag_news_project(ls, f"writes-{n_tasks}", n_tasks)
    times: dict[str, list[float]] = {
        "bulk import": [],
        "single POSTs": [],
        "PATCH model_version": [],
        "GET /next": [],
        "DELETE version": [],
    }
    for repeat in range(repeats):
        ranked = task_ids[repeat * 2 * k : (repeat * 2 + 1) * k]
        others = task_ids[(repeat * 2 + 1) * k : (repeat * 2 + 2) * k]
        bulk, single = f"bench-bulk-{repeat}", f"bench-single-{repeat}"
        times["bulk import"].append(timed(ls.import_predictions, project, predictions_for(ranked, bulk)))
        times["single POSTs"].append(timed(ls.create_predictions, predictions_for(others, single)))
        times["PATCH model_version"].append(timed(ls.set_model_version, project, bulk))
        times["GET /next"].append(timed(ls.next_task, project))
        times["DELETE version"].append(timed(ls.delete_model_version, project, single))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="10000,100000")
    parser.add_argument("--predictions", type=int, default=20, help="K, the predictions a round writes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_with_fast_prediction_import(parser)
    smallest, needed = min(int(n) for n in args.tasks.split(",")), 2 * args.predictions * args.repeats
    if args.predictions < 1 or args.repeats < 1 or smallest < needed:
        parser.error(f"every --tasks must hold 2 x --predictions x --repeats = {needed} tasks (each repeat new ones)")
    binary = require_label_studio()
    with tempfile.TemporaryDirectory() as tmp:
        label_studio = start_label_studio(binary, Path(tmp), free_port())
        try:
            ls = LabelStudio(label_studio.url, label_studio.token)
            for n_tasks in [int(n) for n in args.tasks.split(",")]:
                started = time.perf_counter()
                times = measure(ls, n_tasks, args.predictions, args.repeats)
                seconds = time.perf_counter() - started
                print(f"\n{n_tasks} tasks ({seconds:.0f} s with the import), K={args.predictions}:")
                for operation, values in times.items():
                    print(f"  {operation:>20}: {median_and_spread(values)}")
        finally:
            label_studio.stop()


if __name__ == "__main__":
    main()
