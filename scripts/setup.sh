#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: .venv with torch installed first (so the requirements never pull another
# torch build), the pinned requirements, and redis-server from Debian when missing. Usage: scripts/setup.sh [dev]
# PyPI's Linux torch bundles CUDA (gigabytes): on a machine without a GPU, TORCH_INDEX_URL=
# https://download.pytorch.org/whl/cpu adds the index of the CPU build (its 2.13.0+cpu wins over PyPI's 2.13.0; torch's own
# dependencies still come from PyPI). Leave it unset where pip already finds a CPU wheel (a find-links folder).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "setup: no $python on PATH; PYTHON names the interpreter, e.g. PYTHON=python3.11" >&2; exit 1; }
new_enough='import sys; sys.exit(sys.version_info < (3, 11))'  # the pinned scipy, scikit-learn, matplotlib need it
"$python" -c "$new_enough" || { echo "setup: $("$python" -V 2>&1) is too old; Python 3.11 or newer, e.g. PYTHON=python3.11" >&2; exit 1; }
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if ! "$python" -c 'import ensurepip' 2>/dev/null && command -v apt-get >/dev/null; then
  # Debian's and Ubuntu's python3 makes a venv without pip until python3.X-venv is installed
  venv_package="python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
  $sudo apt-get install -y -q "$venv_package" >/dev/null || { $sudo apt-get update -q && $sudo apt-get install -y -q "$venv_package"; }
fi
# (re)created when missing, older than 3.11, or left without pip by a first run that lacked python3-venv
{ [ -x .venv/bin/pip ] && .venv/bin/python -c "$new_enough"; } 2>/dev/null || "$python" -m venv --clear .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
.venv/bin/pip install -q --disable-pip-version-check -r "requirements${1:+-$1}.txt"
# ./run.sh starts redis-server where REDIS_URL is local (the default); the tests (dev) always do
redis_is_local='import os, sys, urllib.parse as u; sys.exit(u.urlparse(os.environ.get("REDIS_URL") or "redis://localhost").hostname not in ("localhost", "127.0.0.1", None))'
# (a local one already answering, e.g. Redis in a container on localhost:6379, does for ./run.sh)
redis_answers='import os, redis; redis.Redis.from_url(os.environ.get("REDIS_URL") or "redis://localhost:6379/0", socket_connect_timeout=1, socket_timeout=1).ping()'
if ! command -v redis-server >/dev/null && { [ "${1:-}" = dev ] || { .venv/bin/python -c "$redis_is_local" && ! .venv/bin/python -c "$redis_answers" 2>/dev/null; }; }; then
  if command -v apt-get >/dev/null; then
    $sudo apt-get install -y -q redis-server >/dev/null || { $sudo apt-get update -q && $sudo apt-get install -y -q redis-server; }
  else  # not Debian or Ubuntu: a Redis already answering at REDIS_URL does for ./run.sh; the tests start redis-server
    echo "setup: no redis-server on PATH and no apt-get to install it: install Redis (brew install redis, dnf install redis)," \
      "or point REDIS_URL at a running one (./run.sh; the tests need redis-server)" >&2
  fi
fi
