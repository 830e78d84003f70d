"""One frozen `Settings`, read once from the environment.

Every field names the environment variable it comes from; the README's settings table mirrors this file.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from backend.scoring.names import DEFAULT_STRATEGY, STRATEGY_NAMES

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _redis_url(environ: Mapping[str, str], default: str) -> str:
    """REDIS_URL, checked as redis-py reads it (redis://[[user]:password@]host[:port][/db], rediss://, unix://); the
    error shows the URL without its credentials and query (which may hold a password)."""
    url = environ.get("REDIS_URL", "") or default
    if _user_info_cut_short(url):
        raise ValueError(
            "REDIS_URL: the password or user name holds '/', '?' or '#': percent-encode them (%2F, %3F, %23)"
        )
    from redis.connection import parse_url as parse_redis_url  # here: `backend.bench encode` runs without redis

    try:
        parse_redis_url(url)
    except ValueError as bad:
        shown = url.rsplit("@", 1)[-1].split("?", 1)[0]
        raise ValueError(f"REDIS_URL ...{shown!r} is not a Redis URL ({bad}); e.g. redis://localhost:6379/0") from None
    return url


def _label_studio_url(environ: Mapping[str, str]) -> str:
    """LABEL_STUDIO_URL (may be empty: the backend then only predicts), checked to be an http(s) URL with a host;
    the error shows it without its user info, which may hold a proxy's password."""
    url = environ.get("LABEL_STUDIO_URL", "").strip().rstrip("/")
    if not url:
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as bad:  # its words may quote the URL's host part, cut short by a password's "/", say
        problem = "its port is not a number" if "Port" in str(bad) else str(bad).split(":", 1)[0]
    else:
        problem = "" if parts.scheme in ("http", "https") and parts.hostname else "not an http(s) URL with a host"
    if _user_info_cut_short(url):
        problem = "the password or user name holds '/', '?' or '#': percent-encode them (%2F, %3F, %23)"
    if problem:
        shown = url.rsplit("@", 1)[-1]
        raise ValueError(f"LABEL_STUDIO_URL ...{shown!r:.100}: {problem}; e.g. http://localhost:8080")
    return url


def _user_info_cut_short(url: str) -> bool:
    """Whether a redis:// or http(s):// URL's password or user name holds a "/", "?" or "#", which ends the host
    part early: an "@" then shows up past it (outside a redis:// `password=` query value). The client would read
    part of the password as the host or port, and the URL's password would go unrecognised, so shown in the log."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[": the caller's check names it
        return False
    if parts.scheme not in ("redis", "rediss", "http", "https") or "@" in parts.netloc:
        return False
    fields = [f for f in parts.query.split("&") if _parameter_name(f) not in ("password", "username")]
    return any("@" in part for part in (parts.path, parts.fragment, *fields))


def _max_length(environ: Mapping[str, str], default: int) -> int:
    """MAX_LENGTH: 0 (auto) or at least 8 tokens (a [CLS], a [SEP] and a few words)."""
    value = _int(environ, "MAX_LENGTH", default)
    if 0 < value < 8:
        raise ValueError(f"MAX_LENGTH must be 0 (auto: the model's own) or >= 8, got {value}")
    return value


def _choice(
    environ: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...], fold: Callable[[str], str] = str
) -> str:
    """The setting `name`, passed through `fold` (e.g. `str.upper` for a case-insensitive one), if it is `allowed`."""
    value = fold(environ.get(name, "") or default)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _credential(environ: Mapping[str, str], name: str) -> str:
    """A key, user name or password: text that encodes to UTF-8 (an environment holding other bytes gives Python
    str with lone surrogates, which no client's header could match). Never shown in the error."""
    value = environ.get(name, "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{name} is not valid UTF-8 (check the locale or the encoding of the file that sets it)"
        ) from None
    return value


def _device(environ: Mapping[str, str], default: str) -> str:
    """DEVICE: `auto`, `cpu`, `cuda` or `cuda:N` (case-insensitive); the encoder runs on nothing else."""
    value = (environ.get("DEVICE", "") or default).strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"DEVICE must be auto, cpu, cuda or cuda:N (e.g. cuda:1); got {value!r}")
    return value


PREDICTION_WRITES = ("auto", "bulk", "single")
ENCODER_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Settings:
    """Backend configuration. Secrets are kept out of `repr` so settings can be logged: see `__repr__`."""

    label_studio_url: str = ""
    """LABEL_STUDIO_URL: where the backend reaches Label Studio's API (e.g. http://localhost:8080)."""
    label_studio_api_key: str = field(default="", repr=False)
    """LABEL_STUDIO_API_KEY: legacy token or personal access token used for the API."""
    model_dir: str = "./model_dir"
    """MODEL_DIR: versioned classifier artifacts, shared by the server and every worker."""
    basic_auth_user: str = ""
    """BASIC_AUTH_USER: when set with BASIC_AUTH_PASS, every route requires HTTP basic auth."""
    basic_auth_pass: str = field(default="", repr=False)
    """BASIC_AUTH_PASS: the password for BASIC_AUTH_USER."""
    log_level: str = "INFO"
    """LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""
    host: str = "0.0.0.0"
    """HOST: interface the server binds."""
    port: int = 9090
    """PORT: port the server listens on."""
    workers: int = 1
    """WORKERS: gunicorn worker processes."""
    threads: int = 8
    """THREADS: threads per gunicorn worker."""
    redis_url: str = "redis://localhost:6379/0"
    """REDIS_URL: the Redis holding RQ's queues and the embedding cache."""
    queue_name: str = "al-backend"
    """QUEUE_NAME: the RQ queue the backend enqueues on and the workers listen to (chunk jobs: `<QUEUE_NAME>-encoding`,
    taken only when this one is empty)."""
    model_name: str = DEFAULT_MODEL_NAME
    """MODEL_NAME: Hugging Face model name or local path of the sentence encoder."""
    device: str = "auto"
    """DEVICE: auto (CUDA when present), cpu, cuda, or cuda:N."""
    max_length: int = 0
    """MAX_LENGTH: tokens kept per text, longer texts are truncated; 0 = auto (what a sentence-transformers model
    was trained with, its max_seq_length; else 256), always at most the model's positions."""
    batch_tokens: int = 0
    """BATCH_TOKENS: padded tokens per encoder batch, after sorting by length; 0 = auto (4096 CPU, 65536 GPU)."""
    encoder_dtype: str = "auto"
    """ENCODER_DTYPE: auto (fp32 weights under bf16/fp16 autocast on CUDA; bf16 weights on a CPU with native bf16,
    else fp32), or fp32, bf16, fp16 (weights cast, no autocast)."""
    committee_size: int = 5
    """COMMITTEE_SIZE: bootstrap heads trained beside the main head, for disagreement scores."""
    strategy: str = DEFAULT_STRATEGY
    """STRATEGY: default query strategy name (see backend.scoring.registry)."""
    rank_top_k: int = 20
    """RANK_TOP_K: tasks that get a priority prediction per round (see README: Label Studio's write costs)."""
    prediction_writes: str = "auto"
    """PREDICTION_WRITES: how a round writes its predictions: "bulk" (one import), "single" (one POST each) or
    "auto" (bulk on small projects, single on large ones: Label Studio's bulk import recounts every task unless it
    runs with the flag named in the README, with which "bulk" is cheapest at any size)."""
    reconcile_interval: int = 60
    """RECONCILE_INTERVAL: seconds between reconciliation passes per connected project (0 disables)."""
    model_version_prefix: str = "al"
    """MODEL_VERSION_PREFIX: prefix of the model versions the backend writes into Label Studio."""
    min_annotations_to_train: int = 2
    """MIN_ANNOTATIONS_TO_TRAIN: below this, predictions come from the zero-shot head."""
    job_timeout: int = 600
    """JOB_TIMEOUT: seconds an RQ job may run."""
    rerank_lock_timeout: int = 120
    """RERANK_LOCK_TIMEOUT: seconds before a dead worker's per-project re-rank lock expires; a live worker renews
    its lock however long the round (the generation fence, not the lock, keeps an older round from publishing
    over a newer one)."""

    @classmethod
    def from_env_or_exit(cls) -> Settings:
        """`from_env` for a command's start: a bad setting ends the process with its message (SystemExit), not a
        traceback."""
        try:
            return cls.from_env()
        except ValueError as bad:
            raise SystemExit(f"bad setting: {bad}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment); raise ValueError naming a bad one."""
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            label_studio_url=_label_studio_url(env),
            label_studio_api_key=_credential(env, "LABEL_STUDIO_API_KEY").strip(),  # e.g. a secret file's newline
            model_dir=env.get("MODEL_DIR", "") or defaults.model_dir,
            basic_auth_user=_credential(env, "BASIC_AUTH_USER"),
            basic_auth_pass=_credential(env, "BASIC_AUTH_PASS"),
            log_level=_choice(env, "LOG_LEVEL", defaults.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"), str.upper),
            host=env.get("HOST", "") or defaults.host,
            port=_int(env, "PORT", defaults.port, minimum=1, maximum=65535),
            workers=_int(env, "WORKERS", defaults.workers, minimum=1),
            threads=_int(env, "THREADS", defaults.threads, minimum=1),
            redis_url=_redis_url(env, defaults.redis_url),
            queue_name=env.get("QUEUE_NAME", "") or defaults.queue_name,
            model_name=env.get("MODEL_NAME", "") or defaults.model_name,
            device=_device(env, defaults.device),
            max_length=_max_length(env, defaults.max_length),
            batch_tokens=_int(env, "BATCH_TOKENS", defaults.batch_tokens, minimum=0),
            encoder_dtype=_choice(env, "ENCODER_DTYPE", defaults.encoder_dtype, ENCODER_DTYPES, str.lower),
            committee_size=_int(env, "COMMITTEE_SIZE", defaults.committee_size, minimum=0),
            strategy=_choice(env, "STRATEGY", defaults.strategy, STRATEGY_NAMES, str.lower),
            rank_top_k=_int(env, "RANK_TOP_K", defaults.rank_top_k, minimum=1),
            prediction_writes=_choice(
                env, "PREDICTION_WRITES", defaults.prediction_writes, PREDICTION_WRITES, str.lower
            ),
            reconcile_interval=_int(env, "RECONCILE_INTERVAL", defaults.reconcile_interval),
            model_version_prefix=env.get("MODEL_VERSION_PREFIX", "") or defaults.model_version_prefix,
            min_annotations_to_train=_int(env, "MIN_ANNOTATIONS_TO_TRAIN", defaults.min_annotations_to_train, 1),
            job_timeout=_int(env, "JOB_TIMEOUT", defaults.job_timeout, minimum=10),
            rerank_lock_timeout=_int(env, "RERANK_LOCK_TIMEOUT", defaults.rerank_lock_timeout, minimum=5),
        )

    @property
    def reranking_unavailable(self) -> str:
        """Why the workers cannot re-rank (they reach Label Studio with LABEL_STUDIO_URL and _API_KEY); "" when
        they can. Without them the backend only answers /predict."""
        if self.label_studio_url and self.label_studio_api_key:
            return ""
        return (
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set for re-ranking "
            "(the key is in Label Studio under Account & Settings); until then the backend only answers /predict"
        )

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def basic_auth_token(self) -> str:
        """base64 of "user:password", what follows "Basic " in an Authorization header; "" without a password."""
        credentials = f"{self.basic_auth_user}:{self.basic_auth_pass}".encode()
        return base64.b64encode(credentials).decode() if self.basic_auth_pass else ""

    def __repr__(self) -> str:
        """Every setting but the API key and the basic-auth password, with a password in REDIS_URL or
        LABEL_STUDIO_URL shown as ***: the line the server logs as it starts."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("redis_url", "label_studio_url"):
                value = url_without_password(value)
            if f.repr:
                shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def secrets(self) -> list[str]:
        """Values that must never reach logs or error messages."""
        values = [
            self.label_studio_api_key,
            self.basic_auth_pass,
            self.basic_auth_token,
            *url_passwords(self.redis_url),
            *url_passwords(self.label_studio_url),
        ]
        return list(dict.fromkeys(v for v in values if v))


def url_passwords(address: str) -> list[str]:
    """The password in a URL as it is spelled there (what a log line of the URL shows) and percent-decoded (what a
    client sends): in the user info, `redis://:pw@host` or `https://user:pw@host`, or in the query, `?password=pw`."""
    url = urlsplit(address)
    forms = [url.password or "", unquote(url.password or "")]
    for part in url.query.split("&"):
        if _is_password_parameter(part):
            value = part.partition("=")[2]
            forms += [value, unquote_plus(value)]
    return forms


def _is_password_parameter(part: str) -> bool:
    """A URL query's `password=...` (as redis-py reads it, the name percent-decoded)."""
    return _parameter_name(part) == "password"


def _parameter_name(part: str) -> str:
    """The name of one `name=value` part of a URL query, percent-decoded."""
    return unquote_plus(part.partition("=")[0])


def url_without_password(address: str) -> str:
    """The URL with the password of its user info and of a `password=` query parameter replaced by ***."""
    url = urlsplit(address)
    netloc, query = url.netloc, url.query
    if url.password is not None:
        user_info, _, host = netloc.rpartition("@")
        netloc = f"{user_info.partition(':')[0]}:***@{host}"
    if query:
        parts = query.split("&")
        query = "&".join("password=***" if _is_password_parameter(part) else part for part in parts)
    if (netloc, query) == (url.netloc, url.query):
        return address  # nothing to hide: as written
    return urlunsplit(url._replace(netloc=netloc, query=query))


SETTING_NAMES = [f.name for f in fields(Settings)]


def writable_model_dir(settings: Settings) -> Path:
    """MODEL_DIR, created when missing; SystemExit naming the setting when this process cannot write there.

    Checked when a worker (which writes head versions and matrix files there) or `--with-worker` starts: otherwise
    every round would fail in its last step, retried and then parked in rq's failed registry, with nothing else
    showing why no ranking appears.
    """
    path = Path(settings.model_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise SystemExit(
            f"MODEL_DIR={settings.model_dir} is not a folder this process (uid {os.getuid()}) can write to: "
            f"{exc.strerror or exc}. Point MODEL_DIR at one, or make it writable (in docker/, a bind mount is "
            "created owned by root: chown it to uid 1000)"
        ) from None
    return path
