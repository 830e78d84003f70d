"""Logging set-up shared by the server and the worker, with secrets scrubbed from every record."""

from __future__ import annotations

import logging

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
            try:
                message = record.getMessage()
            except Exception:  # a malformed log call: keep its parts; logging must never raise in the caller
                message = f"{record.msg} (arguments that do not fit it: {record.args!r})"
            record.msg, record.args = self.redact(message), None
            if record.exc_info and not record.exc_text:  # the traceback, formatted once here, redacted
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
        return True

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def configure_logging(settings: Settings) -> None:
    """Root logger at LOG_LEVEL, one stream handler, secrets redacted."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactSecrets(settings.secrets()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
