"""Time and memory of a multi-label pool's uncertainty scores (what the hybrid's margin reads every round).

    python -m benchmarks.multi_label_scores --tasks 1000000 --labels 40

Scores `--tasks` rows of `--labels` random float32 probabilities with per-label margin, as `uncertainty_scores`
does for a `choice="multiple"` project, and prints the seconds and the peak memory allocated beyond the input
(tracemalloc, which numpy reports its arrays to).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from backend.scoring.uncertainty import margin, per_label


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=40)
    args = parser.parse_args(argv)
    probs = np.random.default_rng(0).random((args.tasks, args.labels), dtype=np.float32)
    tracemalloc.start()
    started = time.perf_counter()
    per_label(margin, probs)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mib = peak / 2**20
    print(f"{args.tasks} rows x {args.labels} labels: per-label margin in {seconds:.2f} s, {mib:.0f} MiB at peak")


if __name__ == "__main__":
    main()
