#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: .venv with torch installed first (so the requirements never pull another
# torch build), the pinned requirements, and redis-server from Debian when missing. Usage: scripts/setup.sh [dev]
# PyPI's Linux torch bundles CUDA (gigabytes): on a machine without a GPU, TORCH_INDEX_URL=
# https://download.pytorch.org/whl/cpu takes the CPU build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/pip install -q --disable-pip-version-check -r "requirements${1:+-$1}.txt"
if ! command -v redis-server >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y -q redis-server >/dev/null || { $sudo apt-get update -q && $sudo apt-get install -y -q redis-server; }
fi
