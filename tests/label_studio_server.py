"""A real Label Studio 1.23.2 for end-to-end tests and benchmarks (a helper, not a test).

Each server gets a fresh data dir, a free port on 127.0.0.1, loopback webhooks and ML backends allowed, and a
user with a known legacy token:

    with running_label_studio(tmp_path) as server:
        LabelStudio(server.url, server.token).create_project(...)

The first start on an empty data dir runs every migration (30-60 s on two shared cores).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BINARIES = (str(ROOT / ".ls-venv/bin/label-studio"),)
TOKEN = "0123456789abcdef0123456789abcdef01234567"
"""The legacy API token (`Authorization: Token ...`) of the test user: 40 hex characters, as Label Studio wants."""
USERNAME = "e2e@example.com"
PASSWORD = "e2e-password-1"
START_TIMEOUT = 180.0


def label_studio_binary() -> str | None:
    """`LABEL_STUDIO_BIN` if set (and only it), else the repo's .ls-venv, else PATH.

    None when there is none (or `LABEL_STUDIO_BIN` is not an executable file).
    """
    explicit = os.environ.get("LABEL_STUDIO_BIN")
    candidates = (explicit,) if explicit else (*DEFAULT_BINARIES, shutil.which("label-studio"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class LabelStudioServer:
    """A running Label Studio process: its base URL, the test user's token and credentials, and its log."""

    url: str
    token: str
    username: str
    password: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen
    binary: str

    def log_tail(self, chars: int = 4000) -> str:
        """The last `chars` characters of the server's combined stdout and stderr."""
        if not self.log_path.is_file():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, grace_seconds: float = 20.0) -> None:
        """SIGTERM the server's process group, then SIGKILL it if it is still alive after `grace_seconds`."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server again on the same data dir and port (projects, users and tokens survive a stop)."""
        self.stop()
        port = int(self.url.rsplit(":", 1)[1])
        self.process = start_label_studio(self.binary, self.data_dir, port=port, timeout=timeout).process


def start_label_studio(
    binary: str, data_dir: Path, port: int | None = None, timeout: float = START_TIMEOUT
) -> LabelStudioServer:
    """Start `label-studio start` on `data_dir` and return once it answers `/health` and accepts the token.

    Raises RuntimeError, with the tail of the server's log, if it exits or does not answer within `timeout`.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "SSRF_PROTECTION_ENABLED": "false",
        "ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    }
    command = [binary, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    command += ["--username", USERNAME, "--password", PASSWORD, "--enable-legacy-api-token", "--user-token", TOKEN]
    log_path = data_dir / "label-studio.log"
    with open(log_path, "ab") as log_file:  # a restart appends to the log of the earlier run
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=data_dir, start_new_session=True
        )
    server = LabelStudioServer(
        f"http://127.0.0.1:{port}", TOKEN, USERNAME, PASSWORD, data_dir, log_path, process, binary
    )
    try:
        _wait_until_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(server: LabelStudioServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        raise RuntimeError(f"Label Studio did not answer /health within {timeout:.0f} s:\n{server.log_tail()}")
    whoami = requests.get(
        f"{server.url}/api/current-user/whoami", headers={"Authorization": f"Token {server.token}"}, timeout=10
    )
    if whoami.status_code != 200:
        raise RuntimeError(f"Label Studio refused the test token: HTTP {whoami.status_code}:\n{server.log_tail()}")


@contextlib.contextmanager
def running_label_studio(tmp_dir: Path, binary: str | None = None) -> Iterator[LabelStudioServer]:
    """A Label Studio on a fresh data dir under `tmp_dir`, stopped on exit (terminate, then kill)."""
    binary = binary or label_studio_binary()
    if binary is None:
        raise FileNotFoundError("label-studio not found: set LABEL_STUDIO_BIN or run scripts/setup_label_studio.sh")
    server = start_label_studio(binary, Path(tmp_dir) / "label-studio-data")
    try:
        yield server
    finally:
        server.stop()
