"""The entry points: gunicorn serving `_wsgi:app`, and how the server and the worker start on bad settings."""

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
        deadline = time.time() + 120  # torch, transformers and the model, on a loaded 2-core machine
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
        said = r"422 Client Error: Unsupported labeling config \(needs a <Choices> over a <Text> or <HyperText>\): "
        with pytest.raises(requests.HTTPError, match=said):
            refused.raise_for_status()  # the text Label Studio shows for a refused /setup
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "abc"}, "PORT must be an integer, got 'abc'"),
        ({"PORT": "70000"}, "PORT must be <= 65535, got 70000"),
        ({"REDIS_URL": "localhost:6379"}, "one of the following schemes (redis://, rediss://, unix://)"),
        ({"REDIS_URL": "redis://:s3cret@localhost:abc/0"}, "REDIS_URL ...'localhost:abc/0' is not a Redis URL (Port"),
        ({"REDIS_URL": "redis://h:abc/0?password=s3cret"}, "REDIS_URL ...'redis://h:abc/0' is not a Redis URL"),
        ({"REDIS_URL": "redis://:s3cret@[::1:6379"}, "REDIS_URL ...'[::1:6379' is not a Redis URL (Invalid IPv6 URL)"),
        # a password with "/", "?" or "#" not percent-encoded: redis-py would take part of it for the host or port
        ({"REDIS_URL": "redis://:12/s3cret@redis:6379/0"}, "REDIS_URL: the password or user name holds '/'"),
        ({"REDIS_URL": "redis://:Xy7#s3cret@redis:6379/0"}, "percent-encode them (%2F, %3F, %23)"),
        ({"REDIS_URL": "redis://u:Xy7?s3cret@redis:6379/0"}, "percent-encode them (%2F, %3F, %23)"),
        # a byte that is not UTF-8 in the environment (b"s3cret\xe9"): Python holds it as a lone surrogate
        ({"BASIC_AUTH_PASS": "s3cret\udce9"}, "BASIC_AUTH_PASS is not valid UTF-8"),
    ],
)
def test_a_bad_setting_is_named_without_the_credentials_in_it(env, message):
    from backend.config import Settings

    with pytest.raises(ValueError) as bad:
        Settings.from_env(env)
    assert message in str(bad.value) and "s3cret" not in str(bad.value)


def test_a_label_studio_key_or_url_read_from_a_file_loses_its_newline():
    from backend.config import Settings

    # e.g. LABEL_STUDIO_API_KEY="$(cat secret)" keeps no newline, but a compose env_file or a Kubernetes secret may
    settings = Settings.from_env({"LABEL_STUDIO_API_KEY": " k3y\n", "LABEL_STUDIO_URL": "http://ls:8080/\n"})
    assert settings.label_studio_api_key == "k3y" and settings.label_studio_url == "http://ls:8080"


@pytest.mark.parametrize(
    ("command", "env"),
    [(["_wsgi.py"], {"PORT": "abc"}), (["-m", "backend.worker"], {"REDIS_URL": "redis://:s3cret@h:x"})],
)
def test_a_bad_setting_stops_the_server_or_the_worker_with_its_message_not_a_traceback(command, env):
    done = subprocess.run([sys.executable, *command], env=os.environ | env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "bad setting: " in done.stderr
    assert list(env)[0] in done.stderr and "Traceback" not in done.stderr and "s3cret" not in done.stderr


@pytest.mark.parametrize("command", [["_wsgi.py", "--port", "0"], ["-m", "backend.worker"]])
def test_a_model_that_cannot_be_loaded_stops_the_server_or_the_worker_with_its_message(command, tmp_path):
    env = os.environ | {"MODEL_NAME": str(tmp_path), "MODEL_DIR": str(tmp_path / "model_dir")}  # no model there
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"cannot load encoder MODEL_NAME='{tmp_path}'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_in_use_stops_the_server_before_it_starts_anything():
    import socket

    with socket.socket() as taken:  # another backend's server
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "_wsgi.py", "--with-worker", "--host", "127.0.0.1", "--port", str(port)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr and "loading encoder" not in done.stderr + done.stdout  # nor Redis, a worker


def test_a_redis_that_cannot_be_had_stops_the_server_with_what_to_do_not_a_traceback():
    from tests.helpers import free_port

    url = f"rediss://127.0.0.1:{free_port()}/0"  # TLS, which a local redis-server started here does not serve
    command = [sys.executable, "_wsgi.py", "--with-worker", "--host", "127.0.0.1", "--port", "0"]
    env = os.environ | {"REDIS_URL": url}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "REDIS_URL (rediss://) does not answer; only a redis:// one is started" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_sh_reads_a_relative_model_dir_from_where_it_is_called(tmp_path):
    # run.sh works in its own folder: MODEL_DIR=./models given elsewhere would land in the checkout, unsaid
    (tmp_path / "run.sh").write_text("a file, as in the checkout: no folder can be made below it either")
    env = os.environ | {"MODEL_DIR": "run.sh/models"}
    command = [str(ROOT / "run.sh"), "--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and f"MODEL_DIR={tmp_path}/run.sh/models is not a folder" in done.stderr


def test_gunicorn_stops_on_a_bad_setting_instead_of_restarting_its_workers():
    # gunicorn restarts a worker that exits (SystemExit) but stops, exit status 3, when one fails to boot
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{free_port()}", "--workers", "1", "_wsgi:app"]
    done = subprocess.run(
        command, cwd=ROOT, env=os.environ | {"PORT": "abc"}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3 and "PORT must be an integer, got 'abc'" in done.stderr
