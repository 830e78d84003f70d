"""The project matrix file: a copy of the Redis embedding cache for one ordered task list, read in one go."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import redis

from backend.adapters import embedding_cache, matrix_file
from backend.adapters.embedding_cache import EmbeddingsMissing, RedisEmbeddingCache, text_key
from backend.adapters.matrix_file import MatrixFiles

DIM = 8


@pytest.fixture()
def cache(redis_url, monkeypatch):
    monkeypatch.setattr(embedding_cache, "CHUNK", 3)  # several round trips
    return RedisEmbeddingCache(redis.Redis.from_url(redis_url), "encoder-a", DIM)


@pytest.fixture()
def stored(cache):
    keys = [text_key(f"text {i}") for i in range(10)]
    vectors = np.random.default_rng(0).normal(size=(10, DIM)).astype(np.float16)
    cache.put_many(keys, vectors)
    return keys, vectors


def test_rows_come_back_in_order_with_zero_spare_rows(tmp_path, cache, stored, monkeypatch):
    monkeypatch.setattr(matrix_file, "COMPACT_ROWS", 2)  # several compaction steps
    keys, vectors = stored
    files = MatrixFiles(tmp_path)
    files.write("7", cache, keys)
    rows = np.array([1, 3, 4, 8, 9])
    matrix = files.read("7", cache, keys, rows, spare_rows=3)
    assert matrix.dtype == np.float16 and matrix.shape == (8, DIM)
    assert np.array_equal(matrix[:5], vectors[rows]) and not matrix[5:].any()
    assert np.array_equal(files.read("7", cache, keys, np.arange(10)), vectors)
    assert files.read("7", cache, keys, np.array([], dtype=np.int64), spare_rows=1).shape == (1, DIM)


def test_a_file_for_another_task_list_encoder_or_project_is_not_used(tmp_path, cache, stored, redis_url):
    keys, vectors = stored
    files = MatrixFiles(tmp_path)
    assert files.read("7", cache, keys, np.arange(10)) is None  # none written yet
    files.write("7", cache, keys)
    assert files.read("7", cache, keys[::-1], np.arange(10)) is None  # same texts, another order
    assert files.read("7", cache, keys[:9], np.arange(9)) is None  # a task deleted
    files.write("7-2", cache, keys[:9])  # another project, whose id starts like this one's
    assert np.array_equal(files.read("7", cache, keys, np.arange(10)), vectors)
    other_encoder = RedisEmbeddingCache(redis.Redis.from_url(redis_url), "encoder-b", DIM)
    assert files.read("7", other_encoder, keys, np.arange(10)) is None
    other_encoder.put_many(keys, vectors)
    files.write("7", other_encoder, keys)  # MODEL_NAME changed: the first encoder's file goes, not 7-2's
    remaining = sorted(path.name for path in tmp_path.iterdir())
    assert remaining == sorted([files.path("7", other_encoder).name, files.path("7-2", cache).name])


def test_a_file_cut_short_is_not_used(tmp_path, cache, stored):
    keys, _ = stored
    files = MatrixFiles(tmp_path)
    files.write("7", cache, keys)
    path = files.path("7", cache)
    path.write_bytes(path.read_bytes()[:-1])
    assert files.read("7", cache, keys, np.arange(10)) is None
    path.write_bytes(path.read_bytes()[:20])  # not even a header
    assert files.read("7", cache, keys, np.arange(10)) is None


def test_a_missing_vector_fails_the_write_and_keeps_the_previous_file(tmp_path, cache, stored):
    keys, vectors = stored
    files = MatrixFiles(tmp_path)
    files.write("7", cache, keys)
    with pytest.raises(EmbeddingsMissing, match="1 task embeddings missing"):
        files.write("7", cache, [*keys, text_key("never encoded")])
    assert [path.name for path in tmp_path.iterdir()] == [files.path("7", cache).name]  # no temporary left
    assert np.array_equal(files.read("7", cache, keys, np.arange(10)), vectors)


def test_rows_must_be_ascending_positions(tmp_path, cache, stored):
    keys, _ = stored
    files = MatrixFiles(tmp_path)
    files.write("7", cache, keys)
    for rows in ([3, 1], [2, 2], [-1, 0], [9, 10]):
        with pytest.raises(ValueError, match="ascending positions"):
            files.read("7", cache, keys, np.array(rows))


def test_deleting_a_project_deletes_only_its_files(tmp_path, cache, stored):
    keys, _ = stored
    files = MatrixFiles(tmp_path)
    files.write("7", cache, keys)
    files.write("77", cache, keys)
    files.delete_project("7")
    assert [path.name for path in tmp_path.iterdir()] == [files.path("77", cache).name]


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write_after_an_hour(tmp_path, cache, stored):
    keys, _ = stored
    files = MatrixFiles(tmp_path)
    target = files.path("7", cache)
    abandoned, recent = tmp_path / f".{target.name}.abc.tmp", tmp_path / f".{target.name}.def.tmp"
    of_another = tmp_path / f".{files.path('8', cache).name}.ghi.tmp"  # whose own file is not written again
    for leftover in (abandoned, of_another):
        leftover.write_bytes(b"half a matrix")
    recent.write_bytes(b"another worker writing now")
    two_hours_ago = time.time() - 7200
    for leftover in (abandoned, of_another):
        os.utime(leftover, (two_hours_ago, two_hours_ago))
    files.write("7", cache, keys)
    assert not abandoned.exists() and not of_another.exists() and recent.exists()
    files.delete_project("7")
    assert list(tmp_path.iterdir()) == []


def test_a_project_without_tasks_has_an_empty_matrix(tmp_path, cache):
    files = MatrixFiles(tmp_path)
    files.write("7", cache, [])
    assert files.read("7", cache, [], np.array([], dtype=np.int64)).shape == (0, DIM)
    assert files.read("7", cache, [], np.array([], dtype=np.int64), spare_rows=2).shape == (2, DIM)


def test_files_are_readable_by_workers_running_as_other_users(tmp_path, cache, stored):
    keys, _ = stored
    files = MatrixFiles(tmp_path)
    files.write("7", cache, keys)
    assert files.path("7", cache).stat().st_mode & 0o777 == 0o644


def test_project_ids_are_checked_before_any_file_is_touched(tmp_path, cache, stored):
    keys, vectors = stored
    files = MatrixFiles(tmp_path)
    files.write("7", cache, keys)
    for project in ("*", "../7", ""):
        with pytest.raises(ValueError, match="project id"):
            files.delete_project(project)
    assert np.array_equal(files.read("7", cache, keys, np.arange(10)), vectors)


def test_after_an_import_the_previous_rows_are_copied_and_only_the_new_ones_read_from_redis(tmp_path, cache, stored):
    keys, vectors = stored
    files = MatrixFiles(tmp_path)
    assert files.write("7", cache, keys[:6]) == 6
    cache.client.hdel(cache.key, *keys[:6])  # had the first six rows been read from Redis, they would be missing
    assert files.write("7", cache, keys) == 4  # four tasks imported: their keys come last
    assert np.array_equal(files.read("7", cache, keys, np.arange(10)), vectors)
    with pytest.raises(EmbeddingsMissing, match="task embeddings missing"):  # not a prefix: all from Redis
        files.write("7", cache, keys[1:])
