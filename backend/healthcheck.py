"""`python -m backend.healthcheck`: exit 0 when the server on this machine answers `/health`, 1 otherwise;
with `--worker`, exit 0 when an RQ worker started on this machine (container) is registered in Redis.

The containers' health checks. With `BASIC_AUTH_USER`/`BASIC_AUTH_PASS` set, `/health` needs them like every
route, so the check sends them too.
"""

from __future__ import annotations

import socket
import sys
import urllib.request

import redis

from backend.config import Settings


def healthy(settings: Settings, host: str = "127.0.0.1", timeout: float = 4.0) -> bool:
    """True when `GET /health` on `host:settings.port` answers 200."""
    request = urllib.request.Request(f"http://{host}:{settings.port}/health")
    if settings.basic_auth_enabled:
        request.add_header("Authorization", "Basic " + settings.basic_auth_token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except OSError as exc:  # HTTPError (a 401, say) and URLError (nothing listening) are OSErrors
        print(f"unhealthy: {type(exc).__name__}: {getattr(exc, 'code', '') or getattr(exc, 'reason', '')}")
        return False


def worker_registered(redis_url: str, hostname: str | None = None) -> bool:
    """True when a worker started on `hostname` (default: this one) is registered in Redis; a dead worker's
    registration expires about 90 s after its last heartbeat (backend.worker's worker_ttl of 30 s, plus the 60 s rq
    adds)."""
    from rq import Worker

    try:
        workers = Worker.all(connection=redis.Redis.from_url(redis_url, socket_timeout=4))
    except redis.RedisError as exc:
        print(f"unhealthy: Redis: {type(exc).__name__}")
        return False
    return any(worker.hostname == (hostname or socket.gethostname()) for worker in workers)


if __name__ == "__main__":
    settings = Settings.from_env_or_exit()
    if sys.argv[1:] == ["--worker"]:
        sys.exit(0 if worker_registered(settings.redis_url) else 1)
    sys.exit(0 if healthy(settings) else 1)
