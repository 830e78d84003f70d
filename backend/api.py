"""The Label Studio ML backend routes. Thin: parse the request, call a service, shape the answer."""

from __future__ import annotations

import hmac
import json
import logging
import time

import redis
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from backend import __version__
from backend.errors import BackendError, MalformedRequest, Unauthorized
from backend.label_config import parse_label_config
from backend.protocol import parse_predict, parse_setup, parse_webhook
from backend.runtime import Runtime
from backend.services.predict import interactive_version

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request body accepted (a /predict batch of a few thousand long texts fits)."""


def create_app(runtime: Runtime) -> Flask:
    """The Flask app serving /setup, /predict, /webhook, /health and /metrics for `runtime`."""
    app = Flask("al-backend")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["runtime"] = runtime
    _register_auth(app, runtime)
    _register_errors(app)
    _register_routes(app, runtime)
    return app


def _json_body() -> object:
    raw = request.get_data(cache=True)
    if not raw:
        raise MalformedRequest(f"{request.path} needs a JSON body, got an empty one")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise MalformedRequest(f"{request.path} body is not valid UTF-8 JSON ({len(raw)} bytes)") from None


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
        runtime.projects.setup(setup_request)
        artifact = runtime.predictor.artifact_for(setup_request.project, config)
        return jsonify(model_version=interactive_version(runtime.settings.model_version_prefix, artifact))

    @app.post("/predict")
    def predict():
        started = time.perf_counter()
        predict_request = parse_predict(_json_body())
        label_config = predict_request.label_config or runtime.projects.label_config(predict_request.project)
        config = parse_label_config(label_config)
        results = runtime.predictor.predict(predict_request.project, config, predict_request.tasks)
        log.info(
            "project %s: predicted %d tasks in %.3f s",
            predict_request.project or "?",
            len(results),
            time.perf_counter() - started,
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
        return

    @app.before_request
    def require_basic_auth():
        auth = request.authorization
        user_ok = auth is not None and _same_secret(auth.username, settings.basic_auth_user)
        pass_ok = auth is not None and _same_secret(auth.password, settings.basic_auth_pass)
        if not (user_ok and pass_ok):
            raise Unauthorized("this backend requires HTTP basic auth (BASIC_AUTH_USER/BASIC_AUTH_PASS)")


def _same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of UTF-8 bytes (compare_digest on str refuses anything but ASCII)."""
    given_bytes = (given or "").encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given_bytes, expected.encode("utf-8", "surrogatepass"))


def _register_errors(app: Flask) -> None:
    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError):
        response = jsonify(error=type(exc).__name__, message=str(exc))
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Basic realm="al-backend"'
        return response, exc.status_code

    @app.errorhandler(redis.RedisError)
    def redis_unavailable(exc: redis.RedisError):
        log.warning("Redis unavailable on %s: %s", request.path, type(exc).__name__)
        message = "Redis is unavailable; the backend recovers this event by reconciliation once Redis is back"
        return jsonify(error="RedisUnavailable", message=message), 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=exc.name, message=exc.description), exc.code

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):  # process boundary: log the trace, answer without internals
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error="InternalError", message=f"{type(exc).__name__} while handling {request.path}"), 500
