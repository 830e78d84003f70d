"""The composition root: builds each adapter and service once per process from `Settings`.

The web app and the RQ worker both hold one `Runtime`; nothing else constructs Redis clients, encoders or stores.
Heavy parts (the encoder) load on first use, so importing the app stays fast.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import redis
from rq import Queue

from backend.adapters.embedding_cache import RedisEmbeddingCache
from backend.adapters.encoding_jobs import EncodingJobs
from backend.adapters.matrix_file import MatrixFiles
from backend.adapters.project_registry import ProjectRegistry
from backend.adapters.queue import JobQueue
from backend.adapters.task_snapshot import TaskSnapshots
from backend.config import Settings
from backend.errors import LabelStudioUnavailable
from backend.ml.artifacts import ArtifactStore
from backend.ml.encoder import Encoder, get_encoder
from backend.services.predict import Predictor
from backend.services.projects import ProjectService

log = logging.getLogger(__name__)

REDIS_TIMEOUTS = {"socket_connect_timeout": 2.0, "socket_timeout": 10.0, "health_check_interval": 30}
"""Fail fast when Redis is away (predictions then go on without the cache) and notice dead connections."""


class Runtime:
    """Lazily built, process-wide adapters and services for one `Settings`."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @functools.cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, **REDIS_TIMEOUTS)

    @functools.cached_property
    def encoder(self) -> Encoder:
        s = self.settings
        return get_encoder(s.model_name, s.device, s.max_length, s.batch_tokens, s.encoder_dtype)

    @functools.cached_property
    def embedding_cache(self) -> RedisEmbeddingCache:
        return RedisEmbeddingCache(self.redis, self.encoder.encoder_id, self.encoder.dim)

    @functools.cached_property
    def matrix_files(self) -> MatrixFiles:
        return MatrixFiles(Path(self.settings.model_dir) / "matrices")

    @functools.cached_property
    def artifacts(self) -> ArtifactStore:
        return ArtifactStore(self.settings.model_dir)

    @functools.cached_property
    def predictor(self) -> Predictor:
        return Predictor(self.encoder, self.artifacts, self.embedding_cache, self.settings.model_version_prefix)

    @functools.cached_property
    def registry(self) -> ProjectRegistry:
        return ProjectRegistry(self.redis)

    @functools.cached_property
    def snapshots(self) -> TaskSnapshots:
        return TaskSnapshots(self.redis)

    @functools.cached_property
    def queue(self) -> JobQueue:
        return JobQueue(self.redis, self.settings.queue_name, self.settings.job_timeout)

    @functools.cached_property
    def encoding(self) -> EncodingJobs:
        return EncodingJobs(self.queue)

    @property
    def queues(self) -> list[Queue]:
        """The RQ queues a worker listens to, in the order it takes jobs from them: rounds and the rest of the
        backend's jobs first, chunk jobs only when none of those waits."""
        return [self.queue.queue, self.encoding.queue]

    @functools.cached_property
    def projects(self) -> ProjectService:
        return ProjectService(
            self.registry,
            self.queue,
            self.encoding,
            self.snapshots,
            self.settings.reconcile_interval,
            self.settings.reranking_unavailable,
        )

    @property
    def without_label_studio(self) -> str:
        """Why this process has no Label Studio client to work with (no LABEL_STUDIO_URL and _API_KEY: the
        backend only predicts), or "". A client that could not be built otherwise (an expired personal access
        token) is not this: jobs then fail, visibly."""
        try:
            self.label_studio  # noqa: B018
        except LabelStudioUnavailable:
            return self.settings.reranking_unavailable
        return ""

    @functools.cached_property
    def label_studio(self):
        """The Label Studio API client (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)."""
        from backend.adapters.label_studio import LabelStudio

        if self.settings.reranking_unavailable:
            raise LabelStudioUnavailable(self.settings.reranking_unavailable)
        return LabelStudio(self.settings.label_studio_url, self.settings.label_studio_api_key)
