"""Embedding through the cache."""

import numpy as np
import pytest
import redis

from backend.adapters.embedding_cache import text_key
from backend.services.embeddings import embed_texts


class OverflowingEncoder:
    """Encodes like a model whose fp16 activations overflow on one text."""

    dim = 4

    def encode(self, texts):
        vectors = np.tile(np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32), (len(texts), 1))
        vectors[[i for i, text in enumerate(texts) if "overflow" in text]] = np.nan
        return vectors


def test_non_finite_vectors_are_cached_as_zeros_with_an_error(runtime, caplog):
    from backend.adapters.embedding_cache import RedisEmbeddingCache

    cache = RedisEmbeddingCache(runtime.redis, "overflowing", OverflowingEncoder.dim)
    vectors = embed_texts(["fine", "overflow here", "fine too"], OverflowingEncoder(), cache)
    assert np.isfinite(vectors).all() and not vectors[1].any() and (vectors[[0, 2]] == 0.5).all()
    assert "1 of 3 texts encoded are NaN or infinite" in caplog.text
    cached = cache.get_many([text_key("overflow here")])[0]
    assert cached is not None and not cached.any()


def test_non_finite_vectors_cached_earlier_are_read_as_zeros(runtime, caplog):
    from backend.adapters.embedding_cache import RedisEmbeddingCache

    cache = RedisEmbeddingCache(runtime.redis, "overflowed-before", 4)
    keys = [text_key("fine"), text_key("overflowed")]
    cache.put_many(keys, np.array([[0.5] * 4, [np.nan, 0.5, 0.5, 0.5]], dtype=np.float16))  # as an older version did
    fine, overflowed = cache.get_many(keys)
    assert (fine == 0.5).all() and not overflowed.any()
    (chunk, missing), *_ = list(cache.iter_chunks(keys))
    assert missing == 0 and (chunk[0] == 0.5).all() and not chunk[1].any()
    assert caplog.text.count("1 of 2 cached vectors are NaN or infinite") == 2  # once per read, for its chunk


def test_an_encoders_cache_expires_unless_stored_into_or_ranked_from(runtime):
    from backend.adapters.embedding_cache import UNUSED_EXPIRE_SECONDS, RedisEmbeddingCache

    cache = RedisEmbeddingCache(runtime.redis, "replaced-later", OverflowingEncoder.dim)
    embed_texts(["a text"], OverflowingEncoder(), cache)
    assert UNUSED_EXPIRE_SECONDS - 5 < runtime.redis.ttl(cache.key) <= UNUSED_EXPIRE_SECONDS == 30 * 24 * 3600
    runtime.redis.expire(cache.key, 60)  # as if unused for 30 days less a minute
    cache.touch()  # what every round does first
    assert runtime.redis.ttl(cache.key) > UNUSED_EXPIRE_SECONDS - 5


def test_texts_partly_cached_come_back_each_with_its_own_vector_in_order(runtime):
    from backend.adapters.embedding_cache import RedisEmbeddingCache

    encoder = runtime.encoder
    cache = RedisEmbeddingCache(runtime.redis, "partly-cached", encoder.dim)
    embed_texts(["stocks fell", "a late goal"], encoder, cache)  # cached before
    texts = ["rain tomorrow", "stocks fell", "rain tomorrow", "new chip"]  # new, cached, new again, new
    expected = encoder.encode(texts).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(embed_texts(texts, encoder, cache), expected, atol=2e-3)
    np.testing.assert_allclose(cache.get_many([text_key(text) for text in texts]), expected, atol=2e-3)  # stored


class CountingEncoder:
    """Encodes a text to (its length, 1, 1, 1), remembering each call's texts; fails from call `fail_at` on."""

    dim = 4

    def __init__(self, fail_at: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def encode(self, texts):
        self.calls.append(list(texts))
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            raise RuntimeError("the request was cut short")
        return np.array([[len(text), 1, 1, 1] for text in texts], dtype=np.float32).reshape(-1, self.dim)


def test_a_request_cut_short_keeps_what_it_encoded_so_far(runtime, monkeypatch):
    # Label Studio gives up on /predict after 100 s: asking again must not encode everything again
    from backend.adapters.embedding_cache import RedisEmbeddingCache
    from backend.services import embeddings

    monkeypatch.setattr(embeddings, "STORE_EVERY", 2)
    cache = RedisEmbeddingCache(runtime.redis, "cut-short", CountingEncoder.dim)
    texts = ["a much longer text", "mid text", "a", "bb", "a long text"]
    with pytest.raises(RuntimeError):
        embed_texts(texts, CountingEncoder(fail_at=2), cache)
    assert [vec is not None for vec in cache.get_many([text_key(text) for text in texts])] == [
        False, False, True, True, False  # the first chunk, the shortest texts, was stored
    ]  # fmt: skip
    again = CountingEncoder()
    vectors = embed_texts(texts, again, cache)
    assert vectors[:, 0].tolist() == [len(text) for text in texts]  # each text its own vector, in the order asked
    assert again.calls == [["mid text", "a long text"], ["a much longer text"]]  # the rest only, shortest first


def test_after_a_failed_store_the_other_chunks_are_encoded_without_storing(runtime, monkeypatch, caplog):
    from backend.adapters.embedding_cache import RedisEmbeddingCache
    from backend.services import embeddings

    class RedisGoneAfterReading(RedisEmbeddingCache):
        stores = 0

        def put_many(self, keys, vectors):
            self.stores += 1
            raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(embeddings, "STORE_EVERY", 1)
    cache = RedisGoneAfterReading(runtime.redis, "gone-after-reading", CountingEncoder.dim)
    vectors = embed_texts(["one", "three", "two"], CountingEncoder(), cache)
    assert vectors[:, 0].tolist() == [3, 5, 3]
    assert cache.stores == 1  # not waited for again at every chunk
    assert caplog.text.count("could not store 1 embeddings in the cache (ConnectionError: Redis went away)") == 1
    with pytest.raises(redis.ConnectionError):  # an encoding job's whole point is the cache: its job fails, retried
        embed_texts(["four"], CountingEncoder(), cache, must_store=True)
