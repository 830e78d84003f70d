"""Time and memory of a multi-label pool's uncertainty scores (what the hybrid's margin reads every round), and
of the committee measures (vote entropy, BALD) that the `vote_entropy` and `bald` strategies read.

    python -m benchmarks.multi_label_scores --tasks 1000000 --labels 40

Scores `--tasks` rows of `--labels` random float32 probabilities with per-label margin, as `uncertainty_scores`
does for a `choice="multiple"` project, and prints the seconds and the peak memory allocated beyond the input
(tracemalloc, which numpy reports its arrays to); then the committee measures of `--heads` such heads, in the
blocks of `COMMITTEE_BLOCK_ROWS` rows the strategies score them in.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from backend.scoring.strategies import COMMITTEE_BLOCK_ROWS, committee_scores
from backend.scoring.uncertainty import bald, margin, per_label, vote_entropy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=40)
    parser.add_argument("--heads", type=int, default=5, help="committee members (COMMITTEE_SIZE)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    probs = rng.random((args.tasks, args.labels), dtype=np.float32)
    tracemalloc.start()
    started = time.perf_counter()
    per_label(margin, probs)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mib = peak / 2**20
    print(f"{args.tasks} rows x {args.labels} labels: per-label margin in {seconds:.2f} s, {mib:.0f} MiB at peak")
    committee = rng.random((args.heads, args.tasks, args.labels), dtype=np.float32)
    for measure in (vote_entropy, bald):
        started = time.perf_counter()
        for start in range(0, args.tasks, COMMITTEE_BLOCK_ROWS):
            committee_scores(committee[:, start : start + COMMITTEE_BLOCK_ROWS], True, measure)
        print(f"{measure.__name__} of {args.heads} heads: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
