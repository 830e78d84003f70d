"""A real Label Studio 1.23.2 for the whole e2e session; each test creates its own project."""

from __future__ import annotations

import os

import pytest

from tests.label_studio_server import label_studio_binary, running_label_studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """The session's Label Studio (`.url`, `.token`), stopped when the session ends."""
    binary = label_studio_binary()
    if binary is None:
        where = os.environ.get("LABEL_STUDIO_BIN") or "LABEL_STUDIO_BIN, /work/ls-venv, .ls-venv or PATH"
        pytest.skip(f"no label-studio executable in {where}: run scripts/setup_label_studio.sh or set LABEL_STUDIO_BIN")
    with running_label_studio(tmp_path_factory.mktemp("label-studio"), binary) as server:
        yield server
