"""Real backend processes for end-to-end tests: the server (`_wsgi.py`) and RQ workers (`backend.worker`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


class BackendProcesses:
    """A server and any number of workers sharing one environment; logs go to files under `log_dir`."""

    def __init__(self, env: dict[str, str], log_dir: Path, port: int):
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        # own process group: killing a worker's group also kills the work-horse it forked for a job
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_worker(self, index: int = 0) -> None:
        """SIGKILL a worker and its work-horse, as a crash or an OOM kill would."""
        os.killpg(self.workers[index].pid, signal.SIGKILL)
        self.workers[index].wait()

    def start_server(self, timeout: float = 120) -> None:
        self.server = self._spawn(["_wsgi.py", "--host", "127.0.0.1", "--port", str(self.port)], "server")
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=1).status_code in (200, 401):
                    return
            except requests.RequestException:
                pass
            if self.server.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"backend did not start:\n{self.logs('server')}")

    def start_worker(self) -> subprocess.Popen:
        worker = self._spawn(["-m", "backend.worker"], f"worker{len(self.workers)}")
        self.workers.append(worker)
        return worker

    def logs(self, name: str = "server", tail: int = 4000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.log_dir.glob("*.log")))

    def metrics(self, auth: tuple[str, str] | None = None) -> dict:
        return requests.get(self.url + "/metrics", timeout=5, auth=auth).json()

    def last_round(self, project: int, auth: tuple[str, str] | None = None) -> dict:
        return (self.metrics(auth)["projects"].get(str(project)) or {}).get("last_round") or {}

    def wait_for_round(
        self,
        project: int,
        annotations: int,
        timeout: float = 120,
        auth: tuple[str, str] | None = None,
        poll: float = 0.2,
    ) -> dict:
        """Wait until a published round has used at least `annotations` annotations; return its summary.

        `poll` seconds between reads of /metrics (a benchmark timing the round polls often). A read that fails
        (a slow answer, or Redis briefly away) is retried until the deadline."""
        deadline, last = time.time() + timeout, {}
        while time.time() < deadline:
            try:
                last = self.last_round(project, auth)
            except (requests.RequestException, KeyError, ValueError):
                last = {}
            if last.get("published") and last.get("annotations", -1) >= annotations:
                return last
            time.sleep(poll)
        raise AssertionError(f"no published round with {annotations} annotations; last: {last}\n{self.logs('worker0')}")

    def stop(self) -> None:
        """SIGTERM every process, then SIGKILL what is left of each one's process group: a work-horse or scheduler
        child outlives a worker whose warm shutdown did not finish in time, and would go on writing."""
        processes = [process for process in [*self.workers, self.server] if process is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
