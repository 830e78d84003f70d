"""Embed texts through the cache: look up, encode only what is missing, store it, return one matrix."""

from __future__ import annotations

import logging

import numpy as np
import redis

from backend.adapters.embedding_cache import RedisEmbeddingCache, text_key, zero_non_finite
from backend.ml.encoder import Encoder

log = logging.getLogger(__name__)

STORE_EVERY = 2048
"""Texts encoded between two stores into the cache, so that a long `/predict` (Label Studio gives up after 100 s
and may be asked again meanwhile) has its first texts cached before it ends: a request asked again skips them, and
a request that dies keeps them. Above a chunk job's texts (`ENCODE_CHUNK`, 2,000), so a job is one encoder call."""


def embed_texts(
    texts: list[str], encoder: Encoder, cache: RedisEmbeddingCache | None, must_store: bool = False
) -> np.ndarray:
    """(n texts) -> (n, d) float32 embeddings, rounded through fp16 whether cached or not.

    With the cache unreachable the texts are encoded directly, so predictions keep flowing while Redis is away;
    with `must_store` (an encoding job, whose whole point is the cache) the Redis error is raised instead.
    """
    keys = [text_key(text) for text in texts]
    unique = dict.fromkeys(keys)  # insertion-ordered set: duplicate texts are encoded once
    vectors: dict[bytes, np.ndarray] = {}
    if cache is not None:
        try:
            found = cache.get_many(list(unique))
            vectors = {key: vec for key, vec in zip(unique, found, strict=True) if vec is not None}
        except redis.RedisError as exc:
            if must_store:
                raise
            log.warning("embedding cache unavailable (%s: %s); encoding without it", type(exc).__name__, exc)
            cache = None
    missing = [key for key in unique if key not in vectors]
    if missing:
        first_text: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            first_text.setdefault(key, text)
        missing.sort(key=lambda key: len(first_text[key]))  # like lengths together in each chunk: less padding
        for start in range(0, len(missing), STORE_EVERY):
            chunk = missing[start : start + STORE_EVERY]
            encoded = encoder.encode([first_text[key] for key in chunk]).astype(np.float16)
            encoded = zero_non_finite(encoded, "texts encoded")
            vectors.update(zip(chunk, encoded, strict=True))
            cache = _store(cache, chunk, encoded, must_store)
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.stack([vectors[key] for key in keys]).astype(np.float32)


def _store(
    cache: RedisEmbeddingCache | None, keys: list[bytes], encoded: np.ndarray, must_store: bool
) -> RedisEmbeddingCache | None:
    """Store a chunk's vectors; return the cache to store the next chunks into: None once a store failed, so that a
    Redis gone away is not waited for again at every chunk (with `must_store` the error is raised instead)."""
    if cache is None:
        return None
    try:
        cache.put_many(keys, encoded)
        return cache
    except redis.RedisError as exc:
        if must_store:
            raise
        log.warning("could not store %d embeddings in the cache (%s: %s)", len(keys), type(exc).__name__, exc)
        return None
