"""The production entry point: gunicorn serving `_wsgi:app`."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_gunicorn_workers_load_the_encoder_before_they_answer(tiny_bert, redis_url, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "MODEL_NAME": tiny_bert,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(tmp_path),
        "LOG_LEVEL": "INFO",
    }
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "_wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and server.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise AssertionError(f"gunicorn did not answer:\n{log_path.read_text()}")
        # /health needs no model: the encoder was loaded when the worker imported the app
        assert f"encoder {tiny_bert} loaded" in log_path.read_text()
        image = '<View><Image name="i" value="$img"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
        refused = requests.post(f"http://127.0.0.1:{port}/setup", json={"project": "1", "schema": image}, timeout=10)
        with pytest.raises(requests.HTTPError, match="422 Client Error: Unsupported labeling config: <Choices"):
            refused.raise_for_status()  # the text Label Studio shows for a refused /setup
    finally:
        server.terminate()
        server.wait(timeout=30)
