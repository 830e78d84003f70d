"""Single-machine convenience for `python _wsgi.py --with-worker`: Redis and one RQ worker beside the server.

In production (docker/) each of these runs as its own service; this is for trying the backend with one command.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import redis
from redis.connection import parse_url as parse_redis_url

from backend.config import Settings, writable_model_dir

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal a process gets when its parent dies."""
PROJECT_ROOT = Path(__file__).resolve().parents[1]
WATCH_SECONDS = 2.0
"""How often the server looks whether Redis and the worker still run."""
GIVE_UP_WITHIN_SECONDS = 10.0
"""A child that fails again this soon after it was started is left down (it would fail for ever): the log says so."""
STOP_SECONDS = 30.0
"""How long the server waits for a child to stop before it kills it. An idle worker may notice its stop only when
its wait for jobs ends (up to 15 s): the signal can be taken by one of its other threads (torch's, rq's pub/sub
listener), which runs no Python handler and does not interrupt the main thread's wait."""


class LocalStackError(RuntimeError):
    """Redis cannot be had as REDIS_URL asks: what to do about it, for the user (printed without a traceback)."""


def _redis_answers(url: str) -> bool:
    """Whether a Redis at `url` answers a ping with the URL's credentials; LocalStackError when one answers there but
    refuses them (starting another on its port could only fail, and say less)."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.AuthenticationError as refused:
        where = urlparse(url)
        raise LocalStackError(
            f"the Redis at {where.hostname}:{where.port or 6379} refuses REDIS_URL's credentials ({refused}): "
            "give REDIS_URL the user and password it expects, e.g. redis://:PASSWORD@HOST:PORT/0"
        ) from None
    except redis.RedisError:
        return False


def redis_config(url: str, data_dir: Path, version: tuple[int, ...] = (7, 0)) -> str:
    """redis-server's configuration for `url`: its port on 127.0.0.1, persistence under `data_dir`, and the URL's
    user and password, if any, required from every client, in what redis-server `version` reads (Ubuntu 22.04's
    apt gives 6.0, whose users have no channel rules). Passed on stdin: a password on the command line would
    show in `ps`."""
    client = parse_redis_url(url)  # what redis-py reads: the user and password before the "@", or as ?password=
    lines = [
        f"port {client.get('port') or 6379}",
        "bind 127.0.0.1",
        f'dir "{data_dir}"',
        "appendonly yes",
        "save 60 1",
    ]
    user, password = client.get("username") or "", client.get("password") or ""
    for value in (user, password):
        if any(c.isspace() or c in "\"'\\" for c in value):
            raise LocalStackError("REDIS_URL: a user or password with spaces or quotes cannot be given to redis-server")
    if user and user != "default":
        if version < (6, 0):
            raise LocalStackError(f"REDIS_URL names a user, which redis-server {version[0]}.x lacks: leave it out")
        channels = " &*" if version >= (6, 2) else ""
        secret = f">{password}" if password else "nopass"
        lines += [f"user {user} on {secret} ~*{channels} +@all"]
        lines += ["user default off"]
    elif password:
        lines += [f"requirepass {password}"]
    return "\n".join(lines) + "\n"


def start_redis(settings: Settings) -> subprocess.Popen | None:
    """Start `redis-server` with persistence under MODEL_DIR when REDIS_URL is local and nothing answers."""
    if _redis_answers(settings.redis_url):
        return None
    url = urlparse(settings.redis_url)
    if url.hostname not in ("localhost", "127.0.0.1", None):
        raise LocalStackError(f"REDIS_URL={url.hostname}:{url.port} does not answer and is not local; start it first")
    if url.scheme != "redis":  # rediss:// (TLS) or unix:// (a socket): not what a plain local redis-server serves
        raise LocalStackError(
            f"REDIS_URL ({url.scheme}://) does not answer; only a redis:// one is started here: start it first"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        raise LocalStackError("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    data_dir = Path(settings.model_dir) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir.resolve() / "redis.log"  # its warnings only: why it could not start, or could not save
    logged_before = log_file.stat().st_size if log_file.is_file() else 0
    config = redis_config(settings.redis_url, data_dir.resolve(), redis_server_version(binary))  # may refuse the URL
    process = subprocess.Popen(
        [binary, "-"],  # the configuration comes on stdin
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=stop_with_parent,
        process_group=0,  # a Ctrl-C in the terminal stops the server, which stops Redis after the worker
    )
    logging_config = f'loglevel warning\nlogfile "{log_file}"\n'
    process.stdin.write(config + logging_config)
    process.stdin.close()
    for _ in range(50):
        if _redis_answers(settings.redis_url):
            log.info("started redis-server on port %d (data in %s)", url.port or 6379, data_dir)
            return process
        if process.poll() is not None:  # e.g. the port is taken by something that is not Redis
            why = _last_words(log_file, logged_before)
            raise LocalStackError(f"redis-server exited with code {process.returncode}: {why}")
        time.sleep(0.1)
    process.kill()
    raise LocalStackError("redis-server did not start within 5 s")


def redis_server_version(binary: str) -> tuple[int, ...]:
    """The version of the redis-server at `binary` ("Redis server v=7.0.15 sha=..."), e.g. (7, 0, 15)."""
    said = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", said)
    return tuple(int(part) for part in found.groups()) if found else (7, 0, 0)


REDIS_BANNER = ("Redis is starting", "Redis version=", "Configuration loaded")
"""The lines redis-server logs at every start, as warnings, whatever happens next."""


def _last_words(log_file: Path, offset: int) -> str:
    """What redis-server logged past `offset` (this start's), but its banner, without pids and times; and where
    the log is. A configuration it cannot read, or a log file it cannot open, it says on its stderr instead."""
    with contextlib.suppress(OSError), open(log_file, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
        messages = [line.split(" # ", 1)[-1].strip() for line in lines if not any(b in line for b in REDIS_BANNER)]
        if any(messages):
            return f"{'; '.join(filter(None, messages))} (its log: {log_file})"
    return f"nothing in {log_file}; its own output above says why"


def start_worker() -> subprocess.Popen:
    """One `python -m backend.worker` child with the same environment and working folder (a relative MODEL_DIR
    means the same folder to both); `backend` is found wherever the server was started from."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(PROJECT_ROOT), env.get("PYTHONPATH"))))
    return subprocess.Popen([sys.executable, "-m", "backend.worker"], env=env, preexec_fn=stop_with_parent)


def stop_with_parent() -> None:
    """Run in a child before it starts: on Linux, the child gets SIGTERM when the server that started it dies,
    even by SIGKILL or the OOM killer, where no atexit handler runs (a later `run.sh` would find the old worker
    and Redis still there). Elsewhere it does nothing."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
"""The C library, looked up once at import: not in a child just forked from a process with threads."""


@dataclass
class Child:
    """Redis or the worker, as the server started it: `start` starts it again (None: something else answers)."""

    name: str
    start: Callable[[], subprocess.Popen | None]
    process: subprocess.Popen | None = None
    started_at: float = 0.0

    def begin(self) -> None:
        self.process, self.started_at = self.start(), time.monotonic()

    def failed(self) -> bool:
        """Whether it exited on its own with an error (a stopped worker exits with 0, as after a Ctrl-C)."""
        return self.process is not None and self.process.poll() not in (None, 0)


def start_local_stack(settings: Settings) -> list[Child]:
    """Redis (if needed) and a worker, started again if they die while the server runs, stopped when it exits."""
    writable_model_dir(settings)  # Redis keeps its data there, the worker its head versions
    children = [Child("redis-server", lambda: start_redis(settings)), Child("worker", start_worker)]
    for child in children:
        child.begin()
    stopping, stopped, changing = threading.Event(), threading.Event(), threading.Lock()

    def stop_children() -> None:
        # one after the other, the worker first: its warm shut-down (the job it runs, then its registrations) needs
        # Redis, and without it the worker would wait for Redis to come back until it is killed
        stopping.set()
        with changing:
            for process in [child.process for child in reversed(children) if child.process is not None]:
                process.terminate()
                try:
                    process.wait(timeout=STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        stopped.set()

    atexit.register(stop_children)
    # SIGTERM (docker stop, kill, a supervisor) skips atexit by default: turn it into a normal exit
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

    def watch() -> None:
        restart_failed(children, stopping, changing)
        # a child's "stop with parent" signal comes when the THREAD that started it ends: this one, which starts
        # children again, lives until they are all stopped, in their order
        stopped.wait()

    threading.Thread(target=watch, daemon=True).start()
    return children


def restart_failed(children: list[Child], stopping: threading.Event, changing: threading.Lock) -> None:
    """Every `WATCH_SECONDS` until `stopping`: start again a child that exited with an error (a worker killed
    mid-round, or by the OOM killer), saying so, unless it failed right after it was started."""
    while not stopping.wait(WATCH_SECONDS):
        with changing:
            for child in [child for child in children if child.failed() and not stopping.is_set()]:
                code = child.process.returncode
                if time.monotonic() - child.started_at < GIVE_UP_WITHIN_SECONDS:
                    log.error("%s exited with code %s soon after it started; not starting it again", child.name, code)
                    child.process = None
                    continue
                log.error("%s exited with code %s; starting it again", child.name, code)
                try:
                    child.begin()
                except Exception as failure:  # noqa: BLE001 - the watcher must outlive any one failed start
                    log.error("%s could not be started again: %s", child.name, failure)
                    child.process = None
