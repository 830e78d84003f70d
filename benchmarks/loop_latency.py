"""Annotation -> re-rank -> Label Studio serves the new top task: latency against real processes.

    .venv/bin/python -m benchmarks.loop_latency --tasks 1000,10000 --rounds 10

Starts Label Studio 1.23.2 (LABEL_STUDIO_BIN or .ls-venv), redis-server, the backend server and one worker
(default model), and for each project size: imports AG News pool texts, connects the backend, then per round
annotates the task `/next` served and measures (a) seconds from the annotation's POST until the backend has
published the new ranking, (b) the same plus the `/next` call that then serves the new top task, checking it
is ours. Finally it times webhook acknowledgements for the last project (connected, so rounds run meanwhile),
2,000 from one client (Label Studio posts each event from inside the request that caused it) and 2,000 from 8
concurrent clients. Prints medians and p90/p99.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from backend.adapters.label_studio import LabelStudio
from benchmarks.common import ag_news_project, parse_with_fast_prediction_import, require_label_studio
from tests.conftest import RedisServer, read_csv
from tests.helpers import choices_result, free_port
from tests.label_studio_server import start_label_studio
from tests.processes import BackendProcesses


def measure_project(ls: LabelStudio, backend: BackendProcesses, n_tasks: int, rounds: int) -> dict:
    rows = read_csv("ag_news/pool.csv")
    project, task_ids = ag_news_project(ls, f"bench-{n_tasks}", n_tasks)
    row_of = {task_id: i % len(rows) for i, task_id in enumerate(task_ids)}  # ids continue across projects
    started = time.time()
    ls.connect_ml_backend(project, backend.url, "al-backend")
    cold = backend.wait_for_round(project, annotations=0, timeout=900)
    cold_seconds = time.time() - started
    published, served, stages = [], [], []
    top = cold["top_task"]
    for round_number in range(1, rounds + 1):
        task = ls.next_task(project)
        assert task["id"] == top, f"served {task['id']}, expected {top}"
        label = rows[row_of[task["id"]]]["label"]
        t0 = time.perf_counter()
        ls.create_annotation(task["id"], choices_result(label))
        last = backend.wait_for_round(project, annotations=round_number, timeout=300, poll=0.01)
        published.append(time.perf_counter() - t0)
        top = last["top_task"]
        assert ls.next_task(project)["id"] == top
        served.append(time.perf_counter() - t0)
        stages.append(last["seconds"])
        # the /next above locked `top` for this user: the next round annotates exactly that task
    return {
        "project": project,
        "tasks": n_tasks,
        "cold_start_seconds": cold_seconds,
        "published": published,
        "served": served,
        "stages": stages,
    }


def time_webhook_acks(url: str, project: int, threads: int, n: int = 2000) -> list[float]:
    event = {"action": "ANNOTATION_CREATED", "project": {"id": project}, "annotation": {"id": 1}, "task": {"id": 1}}
    session = requests.Session()

    def one(_):
        t0 = time.perf_counter()
        response = session.post(url + "/webhook", json=event, timeout=5)
        response.raise_for_status()
        return time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def describe(values: list[float]) -> str:
    v = np.array(values)
    return f"median {np.median(v):.3f} s, p90 {np.percentile(v, 90):.3f} s, max {v.max():.3f} s (n={len(v)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="1000,10000")
    parser.add_argument("--rounds", type=int, default=10)
    args = parse_with_fast_prediction_import(parser, also=" and the backend with PREDICTION_WRITES=bulk")
    binary = require_label_studio()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "redis").mkdir()
        (tmp / "ls").mkdir()
        redis_server = RedisServer(tmp / "redis")
        redis_server.start()
        label_studio = start_label_studio(binary, tmp / "ls", free_port())
        backend = BackendProcesses(
            {
                "LABEL_STUDIO_URL": label_studio.url,
                "LABEL_STUDIO_API_KEY": label_studio.token,
                "REDIS_URL": redis_server.url,
                "MODEL_DIR": str(tmp / "models"),
                "RECONCILE_INTERVAL": "3600",
                "PREDICTION_WRITES": "bulk" if args.fast_prediction_import else "auto",
            },
            tmp,
            free_port(),
        )
        try:
            backend.start_server()
            backend.start_worker()
            ls = LabelStudio(label_studio.url, label_studio.token)
            for n_tasks in [int(n) for n in args.tasks.split(",")]:
                result = measure_project(ls, backend, n_tasks, args.rounds)
                project = result["project"]
                cold = result["cold_start_seconds"]
                print(f"\n{n_tasks} tasks: cold start (connect -> first ranking live) {cold:.1f} s")
                print(f"  annotation POST -> new ranking published: {describe(result['published'])}")
                print(f"  annotation POST -> /next serves new top:  {describe(result['served'])}")
                for stage in result["stages"][0]:
                    median = statistics.median(s.get(stage, 0) for s in result["stages"])
                    print(f"    stage {stage:>18}: median {median:.3f} s")
            for threads in (1, 8):
                acks = time_webhook_acks(backend.url, project, threads)
                print(
                    f"webhook ack ({threads} client{'s' if threads > 1 else ''}): median {np.median(acks) * 1000:.1f}"
                    f" ms, p99 {np.percentile(acks, 99) * 1000:.1f} ms (n={len(acks)})"
                )
        finally:
            backend.stop()
            label_studio.stop()
            redis_server.stop()


if __name__ == "__main__":
    main()
