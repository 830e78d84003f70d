#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: .venv with torch installed first (so pip never pulls CUDA builds),
# the pinned requirements, and redis-server from Debian when missing. Usage: scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -r "requirements${1:+-$1}.txt"
if ! command -v redis-server >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y -q redis-server >/dev/null || { $sudo apt-get update -q && $sudo apt-get install -y -q redis-server; }
fi
