"""Basic auth end to end: every route guarded, and Label Studio's own webhook secured by the backend."""

import base64

import pytest
import requests

from tests.conftest import ROUTES
from tests.e2e.fixtures import annotate

pytestmark = pytest.mark.e2e
AUTH = {"BASIC_AUTH_USER": "ls-backend", "BASIC_AUTH_PASS": "pw-9f3b1c77e2"}


@pytest.mark.parametrize("backend", [AUTH], indirect=True)
def test_secured_backend_keeps_receiving_label_studio_webhooks(backend, project, secrets_never_logged):
    ls, project_id, truth = project
    for method, route in ROUTES:
        assert getattr(requests, method)(backend.url + route, timeout=5).status_code == 401
    ls.connect_ml_backend(
        project_id,
        backend.url,
        "al-backend",
        auth_method="BASIC_AUTH",
        basic_auth_user=AUTH["BASIC_AUTH_USER"],
        basic_auth_pass=AUTH["BASIC_AUTH_PASS"],
    )
    cold = backend.wait_for_round(project_id, annotations=0, auth=(AUTH["BASIC_AUTH_USER"], AUTH["BASIC_AUTH_PASS"]))

    (webhook,) = [w for w in ls.webhooks(project_id) if w["url"].startswith(backend.url)]
    credentials = f"{AUTH['BASIC_AUTH_USER']}:{AUTH['BASIC_AUTH_PASS']}".encode()
    assert webhook["headers"]["Authorization"] == "Basic " + base64.b64encode(credentials).decode()
    top = cold["top_task"]
    annotate(ls, top, truth[top])  # reaches the backend only through the now-authenticated webhook
    last = backend.wait_for_round(
        project_id, annotations=1, timeout=60, auth=(AUTH["BASIC_AUTH_USER"], AUTH["BASIC_AUTH_PASS"])
    )
    assert last["top_task"] != top
