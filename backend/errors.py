"""The backend's exceptions. Each maps to one HTTP status and carries a message that names the bad value."""

from __future__ import annotations

SUPPORTED_CONFIG_EXAMPLE = """<View>
  <Text name="text" value="$text"/>
  <Choices name="label" toName="text" choice="single">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
  </Choices>
</View>"""


class BackendError(Exception):
    """Base class: an error the backend reports to its caller instead of crashing."""

    status_code = 400


class MalformedRequest(BackendError):
    """The request body is not what the protocol expects (bad JSON, missing or mistyped field)."""

    status_code = 400


class UnsupportedEncoding(BackendError):
    """The request body is compressed (Content-Encoding); Label Studio sends plain JSON."""

    status_code = 415


class UnsupportedLabelConfig(BackendError):
    """The project's labeling config is not a text classification this backend can serve."""

    status_code = 422

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(
            # what is supported first: Label Studio shows only the reason phrase, its first 300 characters
            f"Unsupported labeling config (needs a <Choices> over a <Text> or <HyperText>): {reason}. "
            "This backend supports text classification: one <Choices> "
            f'(choice="single", "single-radio" or "multiple") whose toName points at a <Text> or <HyperText> '
            f"tag. For example:\n{SUPPORTED_CONFIG_EXAMPLE}"
        )


class UnknownProject(BackendError):
    """A request names a project this backend has never been set up for."""

    status_code = 404


class Unauthorized(BackendError):
    """Basic auth is configured and the request did not carry the right credentials."""

    status_code = 401


class ModelUnavailable(BackendError):
    """The encoder or a classifier artifact could not be loaded."""

    status_code = 503


class LabelStudioUnavailable(BackendError):
    """Label Studio could not be reached or refused a call (jobs retry on this)."""

    status_code = 502


class LabelStudioRejected(LabelStudioUnavailable):
    """Label Studio refused a call with a 4xx (bad request, unknown object, refused key): retrying won't help."""


class LabelStudioNotFound(LabelStudioRejected):
    """Label Studio answered 404: the object (a project, a task) does not exist, or no longer does."""


class LabelStudioForbidden(LabelStudioRejected):
    """Label Studio answered 401 or 403: the API key is refused, or may not do this (say, write predictions)."""
