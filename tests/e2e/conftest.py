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
        explicit = os.environ.get("LABEL_STUDIO_BIN")
        message = f"no label-studio executable in {explicit or 'LABEL_STUDIO_BIN, .ls-venv or PATH'}"
        message += ": run scripts/setup_label_studio.sh or set LABEL_STUDIO_BIN"
        if explicit:  # asked for (./test.sh names the one it installed): a run of skips would look green
            pytest.fail(message)
        pytest.skip(message)
    with running_label_studio(tmp_path_factory.mktemp("label-studio"), binary) as server:
        yield server
