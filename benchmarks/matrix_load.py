"""How much memory and time a round spends reading a project's embeddings into its matrix.

    python -m benchmarks.matrix_load --tasks 1000000 --source file
    python -m benchmarks.matrix_load --tasks 1000000 --source redis

Starts a throw-away redis-server on a free port (the tests' `RedisServer`), stores `--tasks` random 384-d fp16
vectors in the embedding cache, then reads them back as a round does, 500 of them being labelled tasks (their
rows left out, 500 spare rows at the end): `--source redis` straight from the cache (`cached_matrix`), `--source
file` from the project's matrix file (`MatrixFiles`), written from the cache first (timed apart: a round pays it
once per change of the task list) without the last `--imported` tasks, then again with them as after an import
(the previous file's rows copied, the imported ones read from Redis), then read as every other round reads it,
from the OS's page cache. Prints
the matrix size, the seconds of each of `--reads` reads one after another, each matrix freed before the next
(as a worker's successive rounds; on this VM, memory that a process touches for the first time costs ~0.5 s
per 150 MB whatever fills it, so the first read pays more), and the rise of this process's peak RSS during the
first read (filling the cache and writing the file are done in small pieces so that they stay below); the last
line is `peak_rss_rise_mb=<float>`.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

from backend.adapters.embedding_cache import RedisEmbeddingCache, text_key
from backend.adapters.matrix_file import MatrixFiles
from backend.services.pool import cached_matrix
from tests.conftest import RedisServer

DIM = 384
FILL_CHUNK = 5000
LABELLED = 500


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--source", choices=("file", "redis"), default="file")
    parser.add_argument("--reads", type=int, default=3, help="reads one after another, as in successive rounds")
    parser.add_argument("--imported", type=int, default=1000, help="(file) tasks imported after the first write")
    args = parser.parse_args()
    if args.reads < 1:
        parser.error("--reads must be at least 1")
    if not 0 <= args.imported < args.tasks:
        parser.error(f"--imported must be at least 0 and below --tasks ({args.tasks}), got {args.imported}")
    with tempfile.TemporaryDirectory(prefix="matrix-load-") as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            cache = RedisEmbeddingCache(redis.Redis.from_url(server.url), "benchmark", DIM)
            keys = [text_key(f"task {i}") for i in range(args.tasks)]
            rng = np.random.default_rng(0)
            for start in range(0, args.tasks, FILL_CHUNK):
                part = rng.standard_normal((len(keys[start : start + FILL_CHUNK]), DIM), dtype=np.float32)
                cache.put_many(keys[start : start + FILL_CHUNK], part.astype(np.float16))
            labelled = np.unique(np.linspace(0, args.tasks - 1, LABELLED).astype(np.int64))  # fewer below 500 tasks
            unlabelled_rows = np.setdiff1d(np.arange(args.tasks), labelled)
            unlabelled_keys = [keys[row] for row in unlabelled_rows]
            files = MatrixFiles(Path(folder) / "matrices")
            if args.source == "file":
                started = time.perf_counter()
                files.write("1", cache, keys[: len(keys) - args.imported])
                print(f"file_write_seconds={time.perf_counter() - started:.2f}")
                started = time.perf_counter()
                from_redis = files.write("1", cache, keys)
                seconds = time.perf_counter() - started
                print(f"file_write_after_import_seconds={seconds:.2f} (rows from Redis: {from_redis})")

            def read() -> np.ndarray:
                if args.source == "file":
                    return files.read("1", cache, keys, unlabelled_rows, spare_rows=len(labelled))
                return cached_matrix(cache, unlabelled_keys, spare_rows=len(labelled))

            before = peak_rss_mb()
            seconds = []
            for _ in range(args.reads):  # each matrix freed before the next read, as at the end of a round
                started = time.perf_counter()
                size_mb = read().nbytes / 2**20
                seconds.append(time.perf_counter() - started)
                if len(seconds) == 1:
                    rise = peak_rss_mb() - before
            print(f"tasks={args.tasks} source={args.source} matrix_mb={size_mb:.1f}")
            print("read_seconds=" + ",".join(f"{s:.2f}" for s in seconds))
            print(f"peak_rss_rise_mb={rise:.1f}")
        finally:
            server.stop(kill=True)


if __name__ == "__main__":
    main()
