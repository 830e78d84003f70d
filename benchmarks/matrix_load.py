"""How much memory and time a round spends reading a project's embeddings from Redis into its matrix.

    python -m benchmarks.matrix_load --tasks 1000000

Starts a throw-away redis-server on a free port (the tests' `RedisServer`), stores `--tasks` random 384-d fp16
vectors in the embedding cache, then reads them back as a round does (`cached_matrix`, with 500 spare rows for
labelled tasks). Prints the matrix size, the rise of this process's peak RSS while reading (filling the cache is
done in small pieces so that it stays below), and the seconds; the last line is `peak_rss_rise_mb=<float>`.
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
from backend.services.rerank import cached_matrix
from tests.conftest import RedisServer

DIM = 384
FILL_CHUNK = 5000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    args = parser.parse_args()
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
            before = peak_rss_mb()
            started = time.perf_counter()
            matrix = cached_matrix(cache, keys, spare_rows=500)
            seconds = time.perf_counter() - started
            rise = peak_rss_mb() - before
            print(f"tasks={args.tasks} matrix_mb={matrix.nbytes / 2**20:.1f} read_seconds={seconds:.2f}")
            print(f"peak_rss_rise_mb={rise:.1f}")
        finally:
            server.stop(kill=True)


if __name__ == "__main__":
    main()
