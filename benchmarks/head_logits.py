"""How long scoring a pool's fp16 matrix with a head and its committee takes, by chunk size and library.

    python -m benchmarks.head_logits --tasks 1000000

Scores `--tasks` random 384-d fp16 rows with 6 heads of 4 labels (a head and a committee of 5) three ways and
prints the best of `--repeats` seconds of each: numpy in chunks of 65,536 rows (how `LinearHead.logits` did it
before 2026-12-06), numpy in chunks of `CHUNK_ROWS`, and `proba_of_heads` as the backend runs it (torch, chunks of
`CHUNK_ROWS`, probabilities computed while each chunk is in the CPU's caches); the last line is
`proba_of_heads_seconds=<float>`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from backend.ml.head import CHUNK_ROWS, LinearHead, proba_of_heads

HEADS, LABELS, DIM = 6, 4, 384


def numpy_logits(embeddings: np.ndarray, weights: np.ndarray, chunk_rows: int) -> np.ndarray:
    """The logits of every head side by side, each chunk converted to fp32 by numpy."""
    logits = np.empty((len(embeddings), weights.shape[1]), dtype=np.float32)
    for start in range(0, len(embeddings), chunk_rows):
        logits[start : start + chunk_rows] = np.asarray(embeddings[start : start + chunk_rows], np.float32) @ weights
    return logits


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: thread pools, first-touch of the output
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((args.tasks, DIM), dtype=np.float32).astype(np.float16)
    heads = [
        LinearHead(0.1 * rng.standard_normal((DIM, LABELS), dtype=np.float32), np.zeros(LABELS, np.float32), False)
        for _ in range(HEADS)
    ]
    stacked = np.concatenate([head.weights for head in heads], axis=1)
    print(f"tasks={args.tasks} dim={DIM} heads={HEADS} labels={LABELS}")
    for chunk_rows in (65_536, CHUNK_ROWS):
        seconds = best_seconds(lambda rows=chunk_rows: numpy_logits(embeddings, stacked, rows), args.repeats)
        print(f"numpy logits, chunks of {chunk_rows:>6} rows: {seconds:.3f} s")
    seconds = best_seconds(lambda: proba_of_heads(heads, embeddings), args.repeats)
    print(f"proba_of_heads (torch, chunks of {CHUNK_ROWS} rows, logits and probabilities): {seconds:.3f} s")
    print(f"proba_of_heads_seconds={seconds:.3f}")


if __name__ == "__main__":
    main()
