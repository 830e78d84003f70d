"""Single-machine convenience for `python _wsgi.py --with-worker`: Redis and one RQ worker beside the server.

In production (docker/) each of these runs as its own service; this is for trying the backend with one command.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

from backend.config import Settings

log = logging.getLogger(__name__)


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(settings: Settings) -> subprocess.Popen | None:
    """Start `redis-server` with persistence under MODEL_DIR when REDIS_URL is local and nothing answers."""
    if _redis_answers(settings.redis_url):
        return None
    url = urlparse(settings.redis_url)
    if url.hostname not in ("localhost", "127.0.0.1", None):
        raise RuntimeError(f"REDIS_URL={url.hostname}:{url.port} does not answer and is not local; start it first")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    data_dir = Path(settings.model_dir) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(url.port or 6379),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--save",
            "60 1",
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(50):
        if _redis_answers(settings.redis_url):
            log.info("started redis-server on port %d (data in %s)", url.port or 6379, data_dir)
            return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("redis-server did not start within 5 s")


def start_worker() -> subprocess.Popen:
    """One `python -m backend.worker` child with the same environment."""
    return subprocess.Popen([sys.executable, "-m", "backend.worker"], env=os.environ.copy())


def start_local_stack(settings: Settings) -> list[subprocess.Popen]:
    """Redis (if needed) and a worker, stopped when the server exits."""
    children = [p for p in (start_redis(settings), start_worker()) if p is not None]

    def stop_children() -> None:
        for child in reversed(children):
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()

    atexit.register(stop_children)
    # SIGTERM (docker stop, kill, a supervisor) skips atexit by default: turn it into a normal exit
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    return children
