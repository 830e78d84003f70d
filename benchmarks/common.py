"""What the benchmarks against a real Label Studio share: finding it, and filling a project with AG News texts."""

from __future__ import annotations

import argparse
import os
import statistics

from backend.adapters.label_studio import FAST_PREDICTION_IMPORT_FLAG, LabelStudio
from tests.conftest import AG_NEWS_CONFIG, read_csv
from tests.label_studio_server import label_studio_binary

IMPORT_CHUNK = 5000


def parse_with_fast_prediction_import(parser: argparse.ArgumentParser, also: str = "") -> argparse.Namespace:
    """Add `--fast-prediction-import` and parse; with it, the Label Studio started next (which inherits this
    process's environment) runs with `FAST_PREDICTION_IMPORT_FLAG` on. `also` ends the option's help."""
    parser.add_argument(
        "--fast-prediction-import",
        action="store_true",
        help=f"start Label Studio with {FAST_PREDICTION_IMPORT_FLAG}=true{also}",
    )
    args = parser.parse_args()
    if args.fast_prediction_import:
        os.environ[FAST_PREDICTION_IMPORT_FLAG] = "true"
    return args


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


def median_and_spread(values: list[float], digits: int = 2) -> str:
    """'median M s (v1, v2, ...)': a few timings of one operation, every value shown."""
    spread = ", ".join(f"{value:.{digits}f}" for value in values)
    return f"median {statistics.median(values):.{digits}f} s ({spread})"
