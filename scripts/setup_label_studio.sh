#!/usr/bin/env bash
# Label Studio 1.23.2 in its own virtual environment (.ls-venv), for the end-to-end tests and benchmarks:
# its pins (Django, rq<2.7, redis<5.3) clash with the backend's.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
version=1.23.2
# Label Studio 1.23.2 leaves sentry-sdk unpinned, and sentry-sdk 3 (December 2026) refuses an option it passes at
# start-up ("Unknown option 'send_default_pii'"): Label Studio then exits at once
sentry='sentry-sdk<3'
installed=$(.ls-venv/bin/python -c 'import importlib.metadata as m; print(m.version("label-studio"), m.version("sentry-sdk").split(".")[0])' 2>/dev/null || true)
[ "$installed" = "$version 2" ] && [ -x .ls-venv/bin/label-studio ] && exit 0
"$python" -m venv --clear .ls-venv
.ls-venv/bin/pip install -q --disable-pip-version-check "label-studio==$version" "$sentry"
