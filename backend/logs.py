"""Logging set-up shared by the server and the worker: secrets scrubbed from every record, and only a record's
first line at the margin."""

from __future__ import annotations

import logging
import re

from backend.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


class RedactSecrets(logging.Filter):
    """Replaces any configured secret (`Settings.secrets`) in a record's final message and its traceback."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        # longest first, so that a secret containing another (an API key that holds the password) goes whole
        self.secrets = sorted((secret for secret in secrets if secret), key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self.redact(final_message(record)), None
            if record.exc_info and not record.exc_text:  # the traceback, formatted once here, redacted
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
        return True

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


COLOURS = re.compile(r"\x1b\[[0-9;]*m")
"""ANSI colour codes, which Werkzeug's development server puts in its lines."""
CONTROLS = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, 0x85] if chr(code) not in "\t\n"},
    ord("\r"): "\\r",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
"""Control characters, and line breaks other than "\\n", escaped."""
CONTINUATION = "\n    "


class RecordAtTheMargin(logging.Formatter):
    """Only a record's first line starts at the margin (with its time): its further lines (a message's line
    breaks, a traceback) are indented, control characters escaped and colours dropped. So text from a request,
    such as a path with a line break, cannot pass for a record of its own."""

    def format(self, record: logging.LogRecord) -> str:
        text = COLOURS.sub("", super().format(record))
        return text.replace("\r\n", "\n").translate(CONTROLS).replace("\n", CONTINUATION)


def final_message(record: logging.LogRecord) -> str:
    """The record's message with its arguments; logging must never raise in the caller, so a malformed log call
    keeps its parts."""
    try:
        return record.getMessage()
    except Exception:
        return f"{record.msg} (arguments that do not fit it: {record.args!r})"


def handler_for(settings: Settings, stream=None) -> logging.StreamHandler:
    """A handler writing FORMAT to `stream` (stderr by default), records at the margin, secrets redacted."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RecordAtTheMargin(FORMAT))
    handler.addFilter(RedactSecrets(settings.secrets()))
    return handler


def configure_logging(settings: Settings) -> None:
    """Root logger at LOG_LEVEL, one stream handler (`handler_for`)."""
    root = logging.getLogger()
    root.handlers[:] = [handler_for(settings)]
    root.setLevel(settings.log_level)
