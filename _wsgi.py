"""Entry point of the backend, as in every Label Studio ML backend.

gunicorn _wsgi:app                      # production (docker/)
python _wsgi.py --host 0.0.0.0 --port 9090
python _wsgi.py --with-worker           # also start Redis (if none answers) and an RQ worker: one command
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from dataclasses import replace

from backend.api import create_app
from backend.config import Settings
from backend.errors import ModelUnavailable
from backend.logs import configure_logging
from backend.runtime import Runtime

# a bad setting: its message alone when run as a command; an error under gunicorn, which then stops (exit 3) rather
# than start worker after worker (it restarts one that exits)
settings = Settings.from_env_or_exit() if __name__ == "__main__" else Settings.from_env()
configure_logging(settings)
runtime = Runtime(settings)
app = create_app(runtime)
log = logging.getLogger("al-backend")
if settings.reranking_unavailable:
    log.warning("%s", settings.reranking_unavailable)

if __name__ != "__main__":  # imported by gunicorn: load the encoder before this worker takes requests, so that
    runtime.encoder  # noqa: B018 - Label Studio's first /setup (3 s timeout) never waits for it


def refuse_a_port_in_use(parser: argparse.ArgumentParser, host: str, port: int) -> None:
    """Exit with a usage error when the server could not listen on host:port (another backend runs there, or the
    host is not this machine's), as Werkzeug would bind it: "::" on IPv6 and IPv4 both. A Unix socket is left to
    Werkzeug."""
    if host.startswith("unix://"):
        return
    ipv6 = ":" in host
    try:
        socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ipv6 else socket.AF_INET,
            dualstack_ipv6=ipv6 and host == "::" and socket.has_dualstack_ipv6(),
        ).close()
    except OSError as exc:
        hint = "; PORT or --port picks another port" if exc.errno == errno.EADDRINUSE else ""
        reason = (exc.strerror or str(exc)).split(" (while attempting")[0]  # create_server adds the address
        parser.exit(1, f"cannot listen on {host}:{port}: {reason}{hint}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Active-learning ML backend for Label Studio")
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("-p", "--port", type=int, default=settings.port)
    parser.add_argument(
        "--with-worker",
        action="store_true",
        help="start redis-server (if REDIS_URL does not answer) and one RQ worker beside the server",
    )
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    refuse_a_port_in_use(parser, args.host, args.port)  # before Redis, a worker and the model: not after them
    if args.with_worker:
        from backend.local_stack import LocalStackError, start_local_stack

        try:
            start_local_stack(settings)
        except LocalStackError as exc:  # e.g. redis-server not installed: what to do, not a traceback
            parser.exit(1, f"{exc}\n")
    log.info("loading encoder %s", settings.model_name)
    try:
        runtime.encoder  # noqa: B018 - load once at start, so the first /predict is fast
    except ModelUnavailable as exc:  # MODEL_NAME wrong, or a hub name without the network: its message alone
        parser.exit(1, f"{exc}\n")
    log.info("serving on http://%s:%d with %r", args.host, args.port, replace(settings, host=args.host, port=args.port))
    app.run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
