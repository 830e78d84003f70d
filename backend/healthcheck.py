"""`python -m backend.healthcheck`: exit 0 when the server on this machine answers `/health`, 1 otherwise.

The container health check. With `BASIC_AUTH_USER`/`BASIC_AUTH_PASS` set, `/health` needs them like every route,
so the check sends them too.
"""

from __future__ import annotations

import sys
import urllib.request

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


if __name__ == "__main__":
    sys.exit(0 if healthy(Settings.from_env()) else 1)
