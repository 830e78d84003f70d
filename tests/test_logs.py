"""Secrets never reach the log output: messages, tracebacks, the basic-auth header, Redis's password."""

from __future__ import annotations

import base64
import io
import logging

import pytest

from backend.config import SETTING_NAMES, Settings
from backend.logs import handler_for


def log_output(settings: Settings, emit) -> str:
    output = io.StringIO()
    logger = logging.getLogger("test-secrets")
    logger.handlers[:], logger.propagate = [handler_for(settings, output)], False
    logger.setLevel(logging.DEBUG)  # whatever level the root logger has in this test run
    emit(logger)
    return output.getvalue().removesuffix("\n")


def test_messages_tracebacks_and_derived_forms_of_secrets_are_redacted():
    settings = Settings(
        label_studio_api_key="key-123456",
        basic_auth_user="ls",
        basic_auth_pass="pa55word",
        redis_url="redis://:redispw@localhost:6379/0",
    )
    header = base64.b64encode(b"ls:pa55word").decode()

    def emit(logger):
        logger.info("calling with %s and Basic %s", settings.label_studio_api_key, header)
        logger.warning("basic auth refused for %s:%s", settings.basic_auth_user, settings.basic_auth_pass)
        try:
            raise ConnectionError(f"cannot reach {settings.redis_url} with token key-123456")
        except ConnectionError:
            logger.exception("failed")

    output = log_output(settings, emit)
    assert "calling with ***" in output and "Traceback" in output and "ConnectionError" in output
    assert "basic auth refused for ls:***" in output
    for secret in ("key-123456", "pa55word", header, "redispw"):
        assert secret not in output


def test_a_line_break_from_a_request_cannot_forge_a_record_and_only_records_start_at_the_margin():
    forged = "\n2026-12-07 06:55:00,000 ERROR 1 backend.api: project 3 deleted\r\u2028\x1b[31m\x07"

    def emit(logger):
        logger.info("%s %s: 401 Unauthorized", "GET", "/x" + forged)
        try:
            raise ValueError("two\nlines")
        except ValueError:
            logger.exception("failed on %s", "/x" + forged)
        logger.info("\x1b[33mPress CTRL+C to quit\x1b[0m")  # Werkzeug's colours

    lines = log_output(Settings(basic_auth_pass="pa55word"), emit).splitlines()
    at_the_margin = [line for line in lines if not line.startswith("    ")]
    assert len(at_the_margin) == 3 and all(line.startswith("20") for line in at_the_margin)  # one per record
    assert at_the_margin[0].endswith("GET /x")
    rest = "    2026-12-07 06:55:00,000 ERROR 1 backend.api: project 3 deleted\\r\\u2028\\x07"
    assert lines[1] == rest + ": 401 Unauthorized"
    assert lines[3] == rest and lines[4] == "    Traceback (most recent call last):"
    assert lines[-3:-1] == ["    ValueError: two", "    lines"]
    assert lines[-1].endswith("test-secrets: Press CTRL+C to quit")


def test_secrets_lists_only_what_is_set():
    assert Settings().secrets() == []
    assert Settings(redis_url="redis://localhost:6379/0", basic_auth_user="ls").secrets() == []
    assert Settings(redis_url="redis://:pw1@localhost:6379/0").secrets() == ["pw1"]
    assert Settings(redis_url="redis://localhost:6379/0?password=pw2&db=1").secrets() == ["pw2"]  # redis-py reads it
    # as the URL spells it (what a log line of REDIS_URL shows) and decoded (what an error quoting it may show)
    assert Settings(redis_url="redis://localhost/0?password=a+b/c%40d==").secrets() == ["a+b/c%40d==", "a b/c@d=="]
    assert Settings(redis_url="redis://:p%40ss@localhost/0").secrets() == ["p%40ss", "p@ss"]
    # Label Studio behind a proxy that wants its own basic auth: LABEL_STUDIO_URL carries a password too
    assert Settings(label_studio_url="https://admin:s3cr%21t@ls.example.com").secrets() == ["s3cr%21t", "s3cr!t"]


def test_the_settings_repr_shows_every_setting_but_keys_and_passwords():
    settings = Settings(
        label_studio_url="https://admin:s3cr%21t@ls.example.com:8443/base",
        label_studio_api_key="key-123456",
        basic_auth_user="ls",
        basic_auth_pass="pa55word",
        redis_url="redis://default:redispw@redis.internal:6380/2?password=qpw&db=2",
    )
    text = repr(settings)
    for secret in ("s3cr", "key-123456", "pa55word", "redispw", "qpw"):
        assert secret not in text
    assert "label_studio_url='https://admin:***@ls.example.com:8443/base'" in text
    assert "redis_url='redis://default:***@redis.internal:6380/2?password=***&db=2'" in text
    assert "basic_auth_user='ls'" in text and "label_studio_api_key" not in text and "basic_auth_pass" not in text
    assert repr(Settings()).count("=") == len(SETTING_NAMES) - 2  # all the others, the URLs unchanged
    assert "redis_url='redis://localhost:6379/0'" in repr(Settings())


def test_a_redis_password_in_the_url_query_never_reaches_the_log():
    settings = Settings(redis_url="redis://localhost:6379/0?password=abc+def/gh==")
    output = log_output(settings, lambda logger: logger.info("worker listening on %s", settings.redis_url))
    assert output.endswith("worker listening on redis://localhost:6379/0?password=***")


def test_log_level_is_read_in_either_case_and_a_lone_basic_auth_setting_is_warned_about(caplog):
    from backend.api import create_app
    from backend.runtime import Runtime

    assert Settings.from_env({"LOG_LEVEL": "info"}).log_level == "INFO"
    with pytest.raises(ValueError, match="LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR; got 'VERBOSE'"):
        Settings.from_env({"LOG_LEVEL": "verbose"})
    with caplog.at_level("WARNING"):
        create_app(Runtime(Settings(basic_auth_user="ls")))
    assert "only BASIC_AUTH_USER is set" in caplog.text and "so it is off" in caplog.text


def test_a_malformed_log_call_is_logged_redacted_and_never_raises_in_the_caller():
    settings = Settings(label_studio_api_key="key-123456")
    output = log_output(settings, lambda logger: logger.info("%d tasks for %s", "many", "key-123456"))
    assert "many" in output and "key-123456" not in output


def test_label_studios_errors_name_its_url_without_the_password_it_may_carry():
    # a proxy's basic auth in LABEL_STUDIO_URL: its errors become failed rounds' reasons, which /metrics shows
    from backend.adapters.label_studio import LabelStudio
    from backend.errors import LabelStudioUnavailable
    from tests.helpers import free_port

    label_studio = LabelStudio(f"http://admin:s3cr3t@127.0.0.1:{free_port()}", "legacy-token", timeout=2)
    with pytest.raises(LabelStudioUnavailable) as unreachable:
        label_studio.get_project(7)
    assert "unreachable at http://admin:***@127.0.0.1:" in str(unreachable.value)
    assert "s3cr3t" not in str(unreachable.value) + repr(label_studio)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://admin:s3cr3t@[::1", "'[::1': Invalid IPv6 URL"),  # the user info, which may hold a password, cut
        ("localhost:8080", "'localhost:8080': not an http(s) URL with a host"),
        ("http://ls:80x", "'http://ls:80x': its port is not a number"),
        # a "/" in the password ends the host part: the client would take part of it for the host or port
        ("http://admin:s3cr3t/x@ls:8080", "'ls:8080': the password or user name holds '/', '?' or '#'"),
        ("http://admin:12/s3cr3t@ls:8080", "'ls:8080': the password or user name holds '/', '?' or '#'"),
        ("http://admin:s3cr3t?@ls:8080", "'ls:8080': the password or user name holds '/', '?' or '#'"),
    ],
)
def test_a_label_studio_url_that_is_not_one_is_a_bad_setting_named_without_its_password(url, problem):
    with pytest.raises(ValueError) as bad:
        Settings.from_env({"LABEL_STUDIO_URL": url})
    assert str(bad.value).startswith(f"LABEL_STUDIO_URL ...{problem}") and "s3cr3t" not in str(bad.value)
    assert Settings.from_env({"LABEL_STUDIO_URL": "https://admin:s3cr3t@ls.example.com/\n"}).label_studio_url == (
        "https://admin:s3cr3t@ls.example.com"
    )
