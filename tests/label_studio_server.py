"""A real Label Studio 1.23.2 for end-to-end tests: fresh data dir, free port, legacy token, loopback allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "0123456789abcdef0123456789abcdef01234567"
START_TIMEOUT = 240


def label_studio_binary() -> str | None:
    """LABEL_STUDIO_BIN, else the repo's .ls-venv (test.sh installs it there), else PATH."""
    for candidate in (
        os.environ.get("LABEL_STUDIO_BIN"),
        str(ROOT / ".ls-venv/bin/label-studio"),
        shutil.which("label-studio"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@dataclass
class LabelStudioServer:
    url: str
    token: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_label_studio(binary: str, data_dir: Path, port: int) -> LabelStudioServer:
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "SSRF_PROTECTION_ENABLED": "false",
        "ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    }
    log_path = data_dir / "label-studio.log"
    process = subprocess.Popen(
        [
            binary,
            "start",
            "--no-browser",
            "--port",
            str(port),
            "--username",
            "e2e@example.com",
            "--password",
            "e2e-password-1",
            "--enable-legacy-api-token",
            "--user-token",
            TOKEN,
        ],
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        cwd=data_dir,
    )
    server = LabelStudioServer(f"http://127.0.0.1:{port}", TOKEN, process, log_path)
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {process.returncode}:\n{server.log_tail()}")
        try:
            response = requests.get(
                server.url + "/api/projects", headers={"Authorization": f"Token {TOKEN}"}, timeout=2
            )
            if response.status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"Label Studio did not answer within {START_TIMEOUT} s:\n{server.log_tail()}")
