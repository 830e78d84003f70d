"""`python _wsgi.py --with-worker` (run.sh): Redis and a worker beside the server, gone when the server is."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from backend import local_stack
from backend.local_stack import redis_config, redis_server_version, start_redis
from tests.helpers import free_port
from tests.processes import ROOT


def test_children_die_with_the_server_even_when_it_is_killed():
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, time; from backend.local_stack import stop_with_parent; "
            "child = subprocess.Popen(['sleep', '60'], preexec_fn=stop_with_parent); print(child.pid, flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)  # no atexit handler runs
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def start_stack_with_worker(tiny_bert: str, tmp_path, cwd: Path = ROOT) -> tuple[subprocess.Popen, str, Path]:
    """`_wsgi.py --with-worker` on the tiny model, in a process group of its own (as a terminal gives ./run.sh),
    started in `cwd`, once its worker listens: (server, Redis URL, log path). Nothing is at the URL before: the
    server starts its own redis-server."""
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**os.environ, "MODEL_NAME": tiny_bert, "REDIS_URL": redis_url, "MODEL_DIR": str(tmp_path)}
    env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp_path / "stack.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "_wsgi.py"), "--with-worker", "--port", str(free_port())],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_in_log(log_path, "worker listening", server=server)
    except BaseException:
        os.killpg(server.pid, signal.SIGKILL)
        raise
    return server, redis_url, log_path


def wait_in_log(log_path: Path, text: str, *, times: int = 1, seconds: float = 120, server=None) -> str:
    """Until `text` is in the log `times` times, while `server` (when given) runs -> the log; fails on time-out."""
    deadline = time.monotonic() + seconds
    while (output := log_path.read_text()).count(text) < times and time.monotonic() < deadline:
        assert server is None or server.poll() is None, output
        time.sleep(0.2)
    assert output.count(text) >= times, output  # not a silent time-out
    return output


def wait_for_the_scheduler_fork(log_path: Path) -> None:
    """Until the worker has forked rq's scheduler (it logs "Scheduler for <queues> started")."""
    wait_in_log(log_path, "Scheduler for ", seconds=30)


def test_ctrl_c_stops_the_worker_before_the_redis_it_needs_to_shut_down(tiny_bert, tmp_path):
    server, redis_url, log_path = start_stack_with_worker(tiny_bert, tmp_path)
    try:
        wait_for_the_scheduler_fork(log_path)  # settled: a Ctrl-C in the middle of forking it prints a traceback
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C reaches every process of the terminal's group
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert "warm shut down requested" in output and "Scheduler with PID" in output, output  # both stopped cleanly
    assert "lost Redis" not in output and "could not connect to Redis" not in output, output
    assert "Traceback" not in output, output
    with pytest.raises(redis.ConnectionError):  # and Redis went too, after the worker
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()


def test_a_worker_that_dies_is_started_again_wherever_the_server_was_started_from(tiny_bert, tmp_path):
    from backend.local_stack import GIVE_UP_WITHIN_SECONDS

    elsewhere = tmp_path / "elsewhere"  # not the repository: the worker must find `backend` all the same
    elsewhere.mkdir()
    server, redis_url, log_path = start_stack_with_worker(tiny_bert, tmp_path, cwd=elsewhere)
    try:
        time.sleep(GIVE_UP_WITHIN_SECONDS)  # a child that fails sooner after its start is left down
        wait_for_the_scheduler_fork(log_path)
        killed = worker_pid(log_path)
        forked = child_pids(killed)  # rq's scheduler, forked at the worker's start
        assert forked
        os.kill(killed, signal.SIGKILL)  # e.g. the OOM killer
        output = wait_in_log(log_path, "worker listening", times=2)
        assert "worker exited with code -9; starting it again" in output and output.count("worker listening") == 2
        # the killed worker's scheduler went with it: left alive it held the scheduler lock, and the worker's
        # Redis connection, on which a job could be handed over and never run
        assert not [pid for pid in forked if _alive(pid)]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)


def test_a_child_started_again_is_stopped_by_the_stack_in_its_order_not_before(settings, tmp_path, monkeypatch):
    import atexit

    from backend import local_stack

    log = tmp_path / "log"

    def child(name: str, seconds_to_stop: float):  # a stand-in for the worker's warm shut-down, or Redis
        trap = f'trap "sleep {seconds_to_stop}; echo {name} >> {log}; exit 0" TERM; while true; do sleep 0.05; done'
        return lambda: subprocess.Popen(["bash", "-c", trap], preexec_fn=local_stack.stop_with_parent)

    monkeypatch.setattr(local_stack, "start_redis", lambda settings: child("redis", 0)())
    monkeypatch.setattr(local_stack, "start_worker", child("worker", 1))
    monkeypatch.setattr(local_stack, "WATCH_SECONDS", 0.05)
    monkeypatch.setattr(local_stack, "GIVE_UP_WITHIN_SECONDS", 0)
    stops = []
    monkeypatch.setattr(atexit, "register", stops.append)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    redis_child, worker = local_stack.start_local_stack(replace(settings, model_dir=str(tmp_path)))
    first = redis_child.process
    first.kill()  # Redis dies while the server runs: the watcher thread starts it again
    deadline = time.monotonic() + 10
    while redis_child.process is first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_child.process is not first and redis_child.process.poll() is None
    stops[0]()  # the server exits
    assert log.read_text().split() == ["worker", "redis"]  # the restarted Redis outlived the worker's shut-down


def test_the_watcher_starts_again_only_a_child_that_failed_a_while_after_its_start(monkeypatch, caplog):
    from backend import local_stack
    from backend.local_stack import Child, restart_failed

    monkeypatch.setattr(local_stack, "WATCH_SECONDS", 0.05)
    monkeypatch.setattr(local_stack, "GIVE_UP_WITHIN_SECONDS", 5)
    starts = {"early": 0, "late": 0, "clean": 0, "unstartable": 0}

    def exiting_with(name: str, code: int):
        def start() -> subprocess.Popen:
            starts[name] += 1
            if name == "unstartable" and starts[name] > 1:
                raise RuntimeError("redis-server is not installed")
            return subprocess.Popen(["bash", "-c", f"exit {code}"])

        return start

    children = {name: Child(name, exiting_with(name, 0 if name == "clean" else 3)) for name in starts}
    for name, child in children.items():
        child.begin()
        child.process.wait()
        if name != "early":  # it ran a while before it exited
            child.started_at -= 10
    stopping = threading.Event()
    watcher = threading.Thread(target=restart_failed, args=(list(children.values()), stopping, threading.Lock()))
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while any(children[name].process for name in ("early", "late", "unstartable")):
            assert time.monotonic() < deadline, {name: child.process for name, child in children.items()}
            time.sleep(0.05)
    finally:
        stopping.set()
        watcher.join()
    # "late" was started again, and left down when its new start failed at once, as "early" was; "clean" exited
    # with 0, as a worker stopped with Ctrl-C does: not a failure
    assert starts == {"early": 1, "late": 2, "clean": 1, "unstartable": 2}
    assert children["clean"].process.returncode == 0
    assert "early exited with code 3 soon after it started; not starting it again" in caplog.text
    assert "late exited with code 3; starting it again" in caplog.text
    assert "unstartable could not be started again: redis-server is not installed" in caplog.text


def test_an_unwritable_model_dir_is_named_at_start(settings, tmp_path):
    from backend.config import writable_model_dir

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=f"MODEL_DIR={tmp_path}/file/models is not a folder this process"):
        writable_model_dir(replace(settings, model_dir=str(tmp_path / "file" / "models")))
    assert writable_model_dir(replace(settings, model_dir=str(tmp_path / "new"))).is_dir()


def child_pids(pid: int) -> list[int]:
    """The processes `pid` forked (Linux: /proc/PID/task/*/children)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


def worker_pid(log_path: Path) -> int:
    """The pid of the worker whose "worker listening" line is the last in the log ("DATE TIME LEVEL PID ...")."""
    line = [line for line in log_path.read_text().splitlines() if "worker listening" in line][-1]
    return int(line.split()[3])


def test_a_port_taken_by_something_else_is_reported_at_once(settings, tmp_path, monkeypatch):
    pings = []
    real_ping = local_stack._redis_answers
    monkeypatch.setattr(local_stack, "_redis_answers", lambda url: pings.append(url) or real_ping(url))
    with socket.socket() as taken:  # listens, never answers: each ping ends on its 1 s timeout
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = f"redis-server exited with code 1: .*{port}: bind: Address already in use.*redis.log"  # its own words
        with pytest.raises(RuntimeError, match=said):
            start_redis(replace(settings, redis_url=f"redis://127.0.0.1:{port}/0", model_dir=str(tmp_path)))
    assert len(pings) <= 3  # reported as soon as redis-server exits, not after 50 tries


def test_a_password_in_redis_url_is_required_by_the_redis_it_starts_and_kept_out_of_ps(settings, tmp_path):
    port = free_port()
    url = f"redis://:s3cret%21@127.0.0.1:{port}/0"  # quoted in the URL, as "s3cret!"
    process = start_redis(replace(settings, redis_url=url, model_dir=str(tmp_path)))
    try:
        assert redis.Redis.from_url(url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").ping()
        assert b"s3cret" not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
        with pytest.raises(RuntimeError, match="refuses REDIS_URL's credentials") as refused:  # a later ./run.sh
            start_redis(replace(settings, redis_url=f"redis://:wrong@127.0.0.1:{port}/0", model_dir=str(tmp_path)))
        assert "wrong" not in str(refused.value)
        user_url = f"redis://al:pw@127.0.0.1:{free_port()}/0"  # a named user, the default one switched off
        # and the same credentials in the query, which redis-py reads too
        query_url = f"redis://127.0.0.1:{free_port()}/0?username=al&password=p%40w"
        for url, data in ((user_url, "other"), (query_url, "query")):
            other = start_redis(replace(settings, redis_url=url, model_dir=str(tmp_path / data)))
            try:
                assert redis.Redis.from_url(url).ping()
                with pytest.raises(redis.AuthenticationError):
                    redis.Redis.from_url(url.split("?")[0].replace("al:pw@", "")).ping()
            finally:
                other.terminate()
                other.wait()
    finally:
        process.terminate()
        process.wait()


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ((7, 0, 15), ["user al on >pw ~* &* +@all", "user default off"]),
        ((6, 0, 16), ["user al on >pw ~* +@all", "user default off"]),  # Ubuntu 22.04's: no channel rules yet
    ],
)
def test_a_named_redis_user_is_configured_in_what_the_installed_redis_server_reads(tmp_path, version, expected):
    config = redis_config("redis://al:pw@localhost:6390/0", tmp_path, version).splitlines()
    assert [line for line in config if line.startswith("user ")] == expected
    with pytest.raises(RuntimeError, match="REDIS_URL names a user, which redis-server 5.x lacks"):
        redis_config("redis://al:pw@localhost:6390/0", tmp_path, (5, 0, 7))
    assert redis_server_version(shutil.which("redis-server")) >= (5, 0, 0)  # read from `redis-server --version`


@pytest.mark.parametrize("scheme", ["rediss", "unix"])
def test_a_redis_url_a_plain_local_redis_server_cannot_serve_is_not_started(settings, tmp_path, scheme):
    url = f"rediss://127.0.0.1:{free_port()}/0" if scheme == "rediss" else f"unix://{tmp_path}/redis.sock"
    with pytest.raises(RuntimeError, match=rf"REDIS_URL \({scheme}://\) does not answer; only a redis:// one"):
        start_redis(replace(settings, redis_url=url, model_dir=str(tmp_path)))
    assert not (tmp_path / "redis").exists()  # nothing started, nothing written


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_server_takes_an_idle_worker_and_its_redis_with_it(tiny_bert, tmp_path):
    # SIGKILL (or the OOM killer): no atexit handler runs, and the worker and Redis get SIGTERM at the same moment,
    # so the worker's warm shut-down finds Redis gone; it must still stop, not wait for a Redis nobody will start
    server, redis_url, log_path = start_stack_with_worker(tiny_bert, tmp_path)
    worker = worker_pid(log_path)
    redis_pid = int(redis.Redis.from_url(redis_url).info("server")["process_id"])
    try:
        server.kill()
        server.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (_alive(worker) or _alive(redis_pid)):
            time.sleep(0.1)
        assert not _alive(redis_pid)
        assert not _alive(worker), log_path.read_text()
    finally:
        for pid in (worker, redis_pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
