"""Embedding cache in Redis: one hash per encoder, field = 16-byte hash of the text, value = fp16 vector.

Shared by the server, every worker and every worker machine; a text is encoded once per encoder.
fp16 halves the memory (a million 384-d vectors take about 770 MB) at no cost to ranking quality.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import numpy as np
import redis

log = logging.getLogger(__name__)

CHUNK = 5000
"""Fields per HMGET/HSET round trip: large enough to amortise latency, small enough not to block Redis."""
UNUSED_EXPIRE_SECONDS = 30 * 24 * 3600
"""An encoder's hash that no round ranked from and nothing was stored into for this long expires: the caches of
encoders replaced (a new MODEL_NAME, a fine-tuned model) do not pile up in Redis."""


class EmbeddingsMissing(LookupError):
    """Vectors a caller needed are not in the cache (still being encoded, or Redis lost them)."""

    def __init__(self, missing: int):
        super().__init__(f"{missing} task embeddings missing from the cache; refresh needed")


def zero_non_finite(vectors: np.ndarray, what: str) -> np.ndarray:
    """`vectors` (n, d) with rows holding NaN or infinity set to zero, with an error in the log naming `what`.

    A model that overflows (e.g. under fp16 autocast on a GPU) would otherwise put NaN into every score of every
    round. A zero vector keeps its task in the pool, ranked on the head's bias alone.
    """
    bad = ~np.isfinite(vectors).all(axis=1)
    if not bad.any():
        return vectors
    log.error(
        "%d of %d %s are NaN or infinite (the model overflowed?); zero vectors instead",
        int(bad.sum()),
        len(bad),
        what,
    )
    vectors = vectors.copy()
    vectors[bad] = 0
    return vectors


def text_key(text: str) -> bytes:
    """Stable 16-byte key of a text (BLAKE2b); invalid surrogates are replaced rather than rejected."""
    return hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=16).digest()


class RedisEmbeddingCache:
    """get/put fp16 embeddings of one encoder by text key."""

    def __init__(self, client: redis.Redis, encoder_id: str, dim: int):
        self.client = client
        self.dim = dim
        self.key = "al:emb:" + hashlib.sha1(encoder_id.encode()).hexdigest()[:16]

    def get_many(self, keys: list[bytes]) -> list[np.ndarray | None]:
        """Cached (d,) float16 vectors for `keys`, None where a key is missing."""
        found: list[np.ndarray | None] = []
        for chunk, present in self._chunks(keys):
            found += [vector if here else None for vector, here in zip(chunk, present, strict=True)]
        return found

    def iter_chunks(self, keys: list[bytes]) -> Iterator[tuple[np.ndarray, int]]:
        """The vectors of `keys` in order, as (chunk, missing) pairs: a (<= CHUNK, d) float16 array per round
        trip, zero rows where a key is missing, and how many were."""
        for chunk, present in self._chunks(keys):
            yield chunk, int((~present).sum())

    def _chunks(self, keys: list[bytes]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One HMGET per CHUNK keys: the (<= CHUNK, d) float16 vectors (zero rows for keys not cached, and for
        NaN or infinite vectors cached before such vectors were kept out) and which keys were cached."""
        for start in range(0, len(keys), CHUNK):
            values = self.client.hmget(self.key, keys[start : start + CHUNK])
            chunk = np.zeros((len(values), self.dim), dtype=np.float16)
            present = np.zeros(len(values), dtype=bool)
            for row, raw in enumerate(values):
                if raw is not None:
                    chunk[row] = np.frombuffer(raw, dtype=np.float16)
                    present[row] = True
            yield zero_non_finite(chunk, "cached vectors"), present

    def fill_matrix(self, keys: list[bytes], spare_rows: int = 0) -> tuple[np.ndarray, int]:
        """One (len(keys) + spare_rows, d) float16 matrix with the vectors of `keys` in order, filled chunk by
        chunk (never a list of a million small arrays, never a second copy), and how many keys were missing
        (their rows are zero). The spare rows at the end are the caller's (zeros)."""
        matrix = np.zeros((len(keys) + spare_rows, self.dim), dtype=np.float16)
        missing = 0
        start = 0
        for chunk, chunk_missing in self.iter_chunks(keys):
            matrix[start : start + len(chunk)] = chunk
            start += len(chunk)
            missing += chunk_missing
        return matrix, missing

    def missing(self, keys: list[bytes]) -> list[bytes]:
        """The keys with no vector cached, checked without downloading the vectors."""
        absent = []
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start : start + CHUNK]
            pipeline = self.client.pipeline(transaction=False)
            for key in chunk:
                pipeline.hexists(self.key, key)
            absent += [key for key, present in zip(chunk, pipeline.execute(), strict=True) if not present]
        return absent

    def put_many(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Store (n, d) vectors under `keys` (as fp16)."""
        vectors = np.asarray(vectors, dtype=np.float16)
        for start in range(0, len(keys), CHUNK):
            mapping = {key: vectors[start + i].tobytes() for i, key in enumerate(keys[start : start + CHUNK])}
            self.client.hset(self.key, mapping=mapping)
        self.touch()

    def touch(self) -> None:
        """Keep this encoder's hash for another `UNUSED_EXPIRE_SECONDS` (a round calls it; so does every store)."""
        self.client.expire(self.key, UNUSED_EXPIRE_SECONDS)

    def __len__(self) -> int:
        return int(self.client.hlen(self.key))
