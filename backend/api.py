"""The Label Studio ML backend routes. Thin: parse the request, call a service, shape the answer."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time

import redis
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from backend import __version__
from backend.config import Settings
from backend.errors import BackendError, MalformedRequest, Unauthorized, UnsupportedEncoding
from backend.label_config import parse_label_config
from backend.protocol import parse_predict, parse_setup, parse_webhook
from backend.runtime import Runtime
from backend.services.predict import interactive_version

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request body accepted (a /predict batch of a few thousand long texts fits)."""

LABEL_STUDIO_PREDICT_WAIT = 100.0
"""Seconds Label Studio waits for a `/predict` answer (its `ML_TIMEOUT_PREDICT`); it stores nothing from a later
one, and does not ask again."""


def create_app(runtime: Runtime) -> Flask:
    """The Flask app serving /setup, /predict, /webhook, /health and /metrics for `runtime`."""
    app = Flask("al-backend")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["runtime"] = runtime
    _register_auth(app, runtime)
    _register_errors(app, runtime.settings)
    _register_routes(app, runtime)
    return app


def _json_body() -> object:
    if (request.content_encoding or "identity").lower() != "identity":
        raise UnsupportedEncoding(
            f"{request.path} reads plain JSON; a body with Content-Encoding {request.content_encoding!r:.40} is not "
            "supported"
        )
    raw = _body_bytes()
    if request.content_length is None and len(raw) >= MAX_BODY_BYTES:  # a chunked body, cut at the limit
        raise RequestEntityTooLarge()
    if not raw:
        raise MalformedRequest(f"{request.path} needs a JSON body, got an empty one")
    try:
        return json.loads(raw)
    except ValueError as error:  # (json's own errors say where; Python's limit on integer digits says which)
        raise MalformedRequest(f"{request.path} body is not valid UTF-8 JSON ({len(raw)} bytes): {error}") from None
    except RecursionError:  # nesting deeper than the parser's stack
        raise MalformedRequest(f"{request.path} body is JSON nested too deeply to read ({len(raw)} bytes)") from None


def _body_bytes() -> bytes:
    """The request's body as the server hands it over; one it cannot read (a chunked body with a bad chunk size
    or cut short, a client gone mid-body) is the request's fault, whatever the server's reader raises."""
    try:
        return request.get_data(cache=True)
    except (RequestEntityTooLarge, MemoryError):
        raise
    except Exception as unreadable:
        raise MalformedRequest(
            f"{request.path} body could not be read ({type(unreadable).__name__}): cut short, or its chunked "
            "encoding is broken"
        ) from None


def _register_routes(app: Flask, runtime: Runtime) -> None:
    @app.get("/health")
    @app.get("/")
    def health():
        return jsonify(
            status="UP",
            model_class="ActiveLearningBackend",
            version=__version__,
            model_name=runtime.settings.model_name,
        )

    @app.post("/setup")
    def setup():
        setup_request = parse_setup(_json_body(), runtime.settings.strategy)
        config = parse_label_config(setup_request.label_config)  # reject unsupported configs, with the reason
        another_projects_files = runtime.projects.setup(setup_request)
        artifact = runtime.predictor.artifact_for(setup_request.project, config, lambda: another_projects_files)
        return jsonify(model_version=interactive_version(runtime.settings.model_version_prefix, artifact))

    @app.post("/predict")
    def predict():
        started = time.perf_counter()
        predict_request = parse_predict(_json_body())
        label_config = predict_request.label_config or runtime.projects.label_config(predict_request.project)
        config = parse_label_config(label_config)
        results = runtime.predictor.predict(
            predict_request.project,
            config,
            predict_request.tasks,
            lambda: runtime.projects.keeps_another_projects_files(predict_request),
        )
        seconds, project = time.perf_counter() - started, predict_request.project or "?"
        log.info("project %s: predicted %d tasks in %.3f s", project, len(results), seconds)
        if seconds > LABEL_STUDIO_PREDICT_WAIT:
            log.warning(
                "project %s: /predict took %.0f s, longer than Label Studio waits by default (ML_TIMEOUT_PREDICT=%.0f "
                "s), so it has probably stored none of these %d predictions; their texts are cached now (unless Redis "
                "is away): ask again (e.g. Retrieve Predictions) and the answer is quick",
                project,
                seconds,
                LABEL_STUDIO_PREDICT_WAIT,
                len(results),
            )
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        event = parse_webhook(_json_body())
        outcome = runtime.projects.on_event(event)
        return jsonify(status="ok", action=event.action, project=event.project, **outcome), 201

    @app.get("/metrics")
    def metrics():
        return jsonify(runtime.projects.metrics())


def _register_auth(app: Flask, runtime: Runtime) -> None:
    settings = runtime.settings
    if not settings.basic_auth_enabled:
        if settings.basic_auth_user or settings.basic_auth_pass:
            only = "BASIC_AUTH_USER" if settings.basic_auth_user else "BASIC_AUTH_PASS"
            log.warning("only %s is set: basic auth needs BASIC_AUTH_USER and BASIC_AUTH_PASS, so it is off", only)
        return

    accepted = _credential_encodings(settings.basic_auth_user, settings.basic_auth_pass)

    @app.before_request
    def require_basic_auth():
        given = _basic_credentials(request.headers.get("Authorization", ""))
        if not any(hmac.compare_digest(given, credentials) for credentials in accepted):
            raise Unauthorized("this backend requires HTTP basic auth (BASIC_AUTH_USER/BASIC_AUTH_PASS)")


def _credential_encodings(user: str, password: str) -> list[bytes]:
    """ "user:password" as UTF-8 (browsers, curl, this backend's own webhook header) and as Latin-1 where it
    encodes (Label Studio calls backends through requests' HTTPBasicAuth, which encodes Latin-1)."""
    credentials = f"{user}:{password}"
    encodings = [credentials.encode("utf-8")]  # Settings.from_env refuses credentials that are not UTF-8
    try:
        encodings.append(credentials.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return encodings


def _basic_credentials(header: str) -> bytes:
    """The decoded "user:password" bytes of a basic-auth header; b"" for anything else."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return b""
    try:
        return base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""


REASON_PHRASE_LIMIT = 300


def reason_phrase(message: str) -> str:
    """`message` as an HTTP reason phrase: one line of printable latin-1 (others become "?"), at most
    `REASON_PHRASE_LIMIT` characters."""
    line = " ".join(message.split()).encode("latin-1", "replace").decode("latin-1")
    phrase = "".join(char if char.isprintable() else "?" for char in line)
    return phrase[:REASON_PHRASE_LIMIT] or "Error"


def error_response(status_code: int, kind: str, message: str):
    """The JSON error body, with `message` also as the reason phrase: of a refused request Label Studio keeps
    only requests' "<code> Client Error: <reason phrase> for url: ..." (a refused /setup or /predict, or the
    answer to Start Training), so the phrase is what its user reads."""
    response = jsonify(error=kind, message=message)
    response.status = f"{status_code} {reason_phrase(message)}"
    return response


def _register_errors(app: Flask, settings: Settings) -> None:
    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError):
        level = logging.INFO if isinstance(exc, Unauthorized) else logging.WARNING
        log.log(level, "%s %s: %d %s: %s", request.method, request.path, exc.status_code, type(exc).__name__, exc)
        response = error_response(exc.status_code, type(exc).__name__, str(exc))
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Basic realm="al-backend"'
        return response

    @app.errorhandler(redis.RedisError)
    def redis_unavailable(exc: redis.RedisError):
        log.warning("Redis unavailable on %s: %s: %s", request.path, type(exc).__name__, exc)
        if request.path != "/webhook":
            message = "Redis is unavailable; try again once Redis is back"
        elif settings.reconcile_interval:
            message = (
                "Redis is unavailable; reconciliation recovers this event's changes once Redis is back (a Start "
                "Training, which changes nothing reconciliation can see: click it again then)"
            )
        else:  # RECONCILE_INTERVAL=0: no pass comes to find it
            message = (
                "Redis is unavailable, and reconciliation is off (RECONCILE_INTERVAL=0): this event is lost until"
                " the project's next event or Start Training"
            )
        return error_response(503, "RedisUnavailable", message)

    @app.errorhandler(RequestEntityTooLarge)
    def body_too_large(exc: RequestEntityTooLarge):  # e.g. Retrieve Predictions on thousands of selected tasks
        message = (
            f"{request.path} body is over the {MAX_BODY_BYTES // 2**20} MiB this backend reads "
            f"({request.content_length or 'unknown'} bytes); send fewer tasks per request"
        )
        log.warning("%s %s: 413 %s", request.method, request.path, message)
        return error_response(413, "RequestEntityTooLarge", message)

    @app.errorhandler(MethodNotAllowed)
    def method_not_allowed(exc: MethodNotAllowed):
        allowed = [method for method in exc.valid_methods or [] if method not in ("HEAD", "OPTIONS")]
        message = f"{request.path} takes {' or '.join(allowed)}, not {request.method}"
        response = error_response(405, exc.name, message)
        response.headers["Allow"] = ", ".join(exc.valid_methods or [])
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.name, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):  # process boundary: log the trace, answer without internals
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "InternalError", f"{type(exc).__name__} while handling {request.path}")
