"""Benchmarks that print figures (never timed tests).

python -m backend.bench encode [--model NAME] [--texts N] [--batch-tokens T] [--device D]
python -m backend.bench rerank --tasks N [--dim D] [--classes K] [--strategy NAME]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

DEFAULT_TEXTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news" / "test.csv"


def bench_encode(args: argparse.Namespace) -> None:
    import torch

    from backend.ml.encoder import Encoder

    with open(args.csv, newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)][: args.texts]
    encoder = Encoder(args.model, device=args.device, max_length=args.max_length, batch_tokens=args.batch_tokens)
    encoder.encode(texts[: min(64, len(texts))])  # warm-up: kernels, allocator
    best = None
    for _ in range(args.repeat):
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        encoder.encode(texts)
        stats = encoder.last_stats
        best = stats if best is None or stats.seconds < best.seconds else best
    lengths = [len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    print(f"model={args.model} device={encoder.device} autocast={encoder.autocast_dtype}")
    print(f"torch_threads={torch.get_num_threads()}")
    print(f"cpu={platform.processor() or platform.machine()} cores={os.cpu_count()}")
    print(
        f"texts={best.texts} tokens/text: mean={np.mean(lengths):.1f} median={np.median(lengths):.0f} "
        f"max={max(lengths)} (max_length={args.max_length})"
    )
    print(
        f"batch_tokens={encoder.batch_tokens} batches={best.batches} padding_overhead="
        f"{best.padded_tokens / best.tokens - 1:.1%}"
    )
    print(f"seconds={best.seconds:.3f} tokens/s={best.tokens / best.seconds:,.0f}")
    print(f"texts_per_second={best.texts / best.seconds:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="backend benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    encode = commands.add_parser("encode", help="encoder throughput (texts/s)")
    encode.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    encode.add_argument("--csv", default=str(DEFAULT_TEXTS), help="CSV with a 'text' column")
    encode.add_argument("--texts", type=int, default=2000)
    encode.add_argument("--max-length", type=int, default=256)
    encode.add_argument("--batch-tokens", type=int, default=0, help="0 = auto")
    encode.add_argument("--device", default="auto")
    encode.add_argument("--repeat", type=int, default=2)
    encode.set_defaults(run=bench_encode)
    rerank = commands.add_parser("rerank", help="a full re-rank of N unlabelled tasks from cached embeddings")
    rerank.add_argument("--tasks", type=int, default=1_000_000)
    rerank.add_argument("--dim", type=int, default=384)
    rerank.add_argument("--classes", type=int, default=4)
    rerank.add_argument("--labelled", type=int, default=500)
    rerank.add_argument("--top-k", type=int, default=20)
    rerank.add_argument("--strategy", default="hybrid")
    rerank.set_defaults(run=bench_rerank)
    args = parser.parse_args(argv)
    args.run(args)


def time_rerank_from_cache(
    n_tasks: int, dim: int, n_classes: int, n_labelled: int, top_k: int, strategy_name: str
) -> dict[str, float]:
    """Seconds per stage of a re-rank over synthetic cached embeddings (fp16, as the cache stores them)."""
    from backend.ml.head import fit_committee, fit_head, proba_of_heads
    from backend.scoring.base import Pool
    from backend.scoring.registry import get_strategy

    stages: dict[str, float] = {}
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(n_classes, dim)).astype(np.float32)
    classes = rng.integers(0, n_classes, n_tasks)
    embeddings = np.empty((n_tasks, dim), dtype=np.float16)
    for start in range(0, n_tasks, 100_000):  # chunked, so synthesis itself never holds an fp32 copy
        stop = min(start + 100_000, n_tasks)
        chunk = centers[classes[start:stop]] + 2.0 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        embeddings[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    labeled = np.zeros(n_tasks, dtype=bool)
    labeled[rng.choice(n_tasks, n_labelled, replace=False)] = True
    targets = np.zeros((n_tasks, n_classes), dtype=np.float32)
    targets[labeled, classes[labeled]] = 1.0
    stages["synthesise"] = time.perf_counter() - started

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        stages[name] = now - started
        started = now

    lap("synthesise")
    x_labelled = embeddings[labeled].astype(np.float32)
    head = fit_head(x_labelled, targets[labeled], False)
    committee = fit_committee(x_labelled, targets[labeled], False, 5, rng)
    lap("train_head_and_committee")
    all_probs = proba_of_heads([head, *committee], embeddings)
    probs, committee_probs = all_probs[0], all_probs[1:]
    lap("proba_head_and_committee")
    pool = Pool(embeddings, probs, labeled, committee_probs, False, targets, head.weights)
    picks = get_strategy(strategy_name).select(pool, top_k, rng)
    lap(f"select_{strategy_name}")
    assert len(set(picks.tolist())) == top_k and not labeled[picks].any()
    return stages


def bench_rerank(args: argparse.Namespace) -> None:
    stages = time_rerank_from_cache(args.tasks, args.dim, args.classes, args.labelled, args.top_k, args.strategy)
    print(
        f"tasks={args.tasks} dim={args.dim} classes={args.classes} labelled={args.labelled} top_k={args.top_k} "
        f"cores={os.cpu_count()}"
    )
    for name, seconds in stages.items():
        print(f"{name:>24}: {seconds:8.3f} s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak_rss_mb={peak_mb:.0f}")
    print(f"rerank_seconds={sum(v for k, v in stages.items() if k != 'synthesise'):.3f}")


if __name__ == "__main__":
    main()
