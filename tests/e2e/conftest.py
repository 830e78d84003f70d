import pytest

from tests.conftest import free_port
from tests.label_studio_server import label_studio_binary, start_label_studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One real Label Studio for the whole session; each test creates its own project."""
    binary = label_studio_binary()
    if binary is None:
        pytest.fail("label-studio not found: run ./test.sh (installs it in .ls-venv) or set LABEL_STUDIO_BIN")
    server = start_label_studio(binary, tmp_path_factory.mktemp("label-studio"), free_port())
    yield server
    server.stop()
