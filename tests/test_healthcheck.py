import subprocess
import sys
import threading
from dataclasses import replace

import pytest
from werkzeug.serving import make_server

from backend.api import create_app
from backend.healthcheck import healthy
from backend.runtime import Runtime


@pytest.fixture()
def secured_server(settings):
    """The backend with basic auth on, served over real HTTP on a free port."""
    secured = replace(settings, basic_auth_user="ls", basic_auth_pass="s3cret")
    server = make_server("127.0.0.1", 0, create_app(Runtime(secured)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield replace(secured, port=server.server_port)
    server.shutdown()
    thread.join()


def test_the_container_health_check_passes_with_basic_auth_on(secured_server):
    assert healthy(secured_server)


def test_the_container_health_check_fails_on_a_401_or_no_server(secured_server, capsys):
    assert not healthy(replace(secured_server, basic_auth_pass="wrong"))
    assert "401" in capsys.readouterr().out
    assert not healthy(replace(secured_server, port=1), timeout=1)


def test_the_health_check_does_not_import_the_strategies():
    # Docker runs it every 30 s: importing scikit-learn through the strategy registry would cost 1.4 s each time.
    code = "import sys, backend.healthcheck; print(sorted({'sklearn', 'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_worker_health_check_sees_a_worker_of_this_host_only_while_it_is_registered(runtime, redis_url):
    from rq import Worker

    from backend.healthcheck import worker_registered

    assert not worker_registered(redis_url)
    worker = Worker([runtime.queue.queue], connection=runtime.redis)
    worker.register_birth()
    assert worker_registered(redis_url) and not worker_registered(redis_url, hostname="another-container")
    worker.register_death()
    assert not worker_registered(redis_url)
    assert not worker_registered("redis://127.0.0.1:1/0")  # Redis unreachable: unhealthy, not a crash
