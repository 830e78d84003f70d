#!/usr/bin/env bash
# One command: set up (first time), then serve the backend on :9090 with Redis and one RQ worker beside it.
# Settings come from the environment (see README), e.g. LABEL_STUDIO_URL=... LABEL_STUDIO_API_KEY=... ./run.sh
set -euo pipefail
# relative paths in MODEL_DIR and MODEL_NAME are the caller's, not this folder's, which the rest runs in
case "${MODEL_DIR:-}" in "" | /*) ;; *) export MODEL_DIR="$PWD/$MODEL_DIR" ;; esac
if [ -n "${MODEL_NAME:-}" ] && [ "${MODEL_NAME#/}" = "$MODEL_NAME" ] && [ -e "$MODEL_NAME" ]; then
  export MODEL_NAME="$PWD/$MODEL_NAME"  # a folder there; else a hub name, as it is
fi
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python _wsgi.py --with-worker "$@"
