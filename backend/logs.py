"""Logging set-up shared by the server and the worker: secrets scrubbed from every record, each on one line."""

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


LINE_BREAKS_AND_CONTROLS = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, 0x85] if code != ord("\t")},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class OneLinePerRecord(logging.Filter):
    """Escapes line breaks and other control characters in a record's message (not its traceback), so that text
    from a request, such as a path or a value quoted in an error, cannot forge log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = final_message(record)
        escaped = message.translate(LINE_BREAKS_AND_CONTROLS)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


def final_message(record: logging.LogRecord) -> str:
    """The record's message with its arguments; logging must never raise in the caller, so a malformed log call
    keeps its parts."""
    try:
        return record.getMessage()
    except Exception:
        return f"{record.msg} (arguments that do not fit it: {record.args!r})"


def record_filters(settings: Settings) -> list[logging.Filter]:
    """What every log record passes through: secrets redacted, then made one line."""
    return [RedactSecrets(settings.secrets()), OneLinePerRecord()]


def configure_logging(settings: Settings) -> None:
    """Root logger at LOG_LEVEL, one stream handler, secrets redacted, one line per record."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    for record_filter in record_filters(settings):
        handler.addFilter(record_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
