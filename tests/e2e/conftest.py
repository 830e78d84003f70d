"""A real Label Studio 1.23.2 for the whole e2e session; each test creates its own project."""

from __future__ import annotations

import pytest

from tests.label_studio_server import label_studio_binary, running_label_studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """The session's Label Studio (`.url`, `.token`), stopped when the session ends."""
    binary = label_studio_binary()
    if binary is None:
        pytest.skip(
            "label-studio executable not found: set LABEL_STUDIO_BIN, or run scripts/setup_label_studio.sh "
            "(installs it in .ls-venv)"
        )
    with running_label_studio(tmp_path_factory.mktemp("label-studio"), binary) as server:
        yield server
