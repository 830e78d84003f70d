#!/usr/bin/env bash
# One command: set up (first time), then serve the backend on :9090 with Redis and one RQ worker beside it.
# Settings come from the environment (see README), e.g. LABEL_STUDIO_URL=... LABEL_STUDIO_API_KEY=... ./run.sh
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python _wsgi.py --with-worker "$@"
