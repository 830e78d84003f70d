"""`python -m backend.worker`: an RQ worker, with rq's scheduler, on REDIS_URL and QUEUE_NAME.

Run as many as you like, on one machine or many: a project is re-ranked by one worker at a time, and an
older round never publishes over a newer one (see backend.adapters.queue).
"""

from __future__ import annotations

import argparse
import logging

from rq import Worker

from backend import jobs
from backend.config import Settings
from backend.logs import configure_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty (tests, batch runs)")
    parser.add_argument("--no-preload", action="store_true", help="do not load the encoder before the first job")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings)
    runtime = jobs.runtime()
    if not args.no_preload:
        runtime.encoder  # noqa: B018 - load the model once, before the first job, not inside it
    worker = Worker([runtime.queue.queue], connection=runtime.redis, name=None)
    log.info("worker listening on %s (queue %r)", settings.redis_url.split("@")[-1], settings.queue_name)
    worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level)


if __name__ == "__main__":
    main()
