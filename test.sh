#!/usr/bin/env bash
# One command: set up (first time, Label Studio included), then run every test: unit, slow (real default
# model) and end-to-end (real Label Studio, redis-server, workers). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh dev
scripts/setup_label_studio.sh
export LABEL_STUDIO_BIN="$PWD/.ls-venv/bin/label-studio"
exec .venv/bin/python -m pytest -o addopts="--strict-markers" -q "$@"
