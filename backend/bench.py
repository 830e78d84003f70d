"""Benchmarks that print figures (never timed tests).

python -m backend.bench encode [--model NAME | --model random:bert-base] [--texts N] [--batch-tokens T] [--device D]
    [--dtype auto|fp32|bf16|fp16]
python -m backend.bench rerank --tasks N [--dim D] [--classes K] [--strategy NAME]

`encode` also states the arithmetic of how close it runs to the hardware: the matrix-product FLOPs of the
encoder's forward passes over the texts (with and without padding), divided by the seconds, against the rate
of one large matrix product measured on the same device and dtype (or `--peak-tflops`, a data-sheet figure).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from backend.config import ENCODER_DTYPES
from backend.scoring.registry import STRATEGIES

DEFAULT_TEXTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news" / "test.csv"


RANDOM_SHAPES = {
    "minilm-l6": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
"""Shapes for `--model random:<shape>`: randomly initialised BERT encoders, for throughput where no hub is reachable
(the speed of a forward pass does not depend on the weights' values)."""


def encoder_matmul_flops(lengths: list[int], layers: int, hidden: int, intermediate: int) -> float:
    """Matrix-product FLOPs (a multiply-add = 2) of one BERT-style encoder forward pass per sequence.

    Per layer and sequence of L tokens: Q, K, V and output projections 4 x 2·L·d², attention scores and
    weighted values 2 x 2·L²·d, feed-forward 2 x 2·L·d·f. Embeddings, layer norms, softmax and pooling are
    left out (a few percent, and not matrix products).
    """
    total = 0.0
    for length in lengths:
        total += 8 * length * hidden**2 + 4 * length**2 * hidden + 4 * length * hidden * intermediate
    return layers * total


def tflops_of(device, work, flops: float, repeats: int = 10) -> float:
    """TFLOP/s of `work()`, which does `flops` floating-point operations on `device`: 3 warm-up calls, then
    `repeats` timed ones (the device synchronised before each clock read)."""
    import torch

    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # that GPU's queue, not the current device's (GPU 0 for cuda:1)

    for _ in range(3):
        work()
    synchronise()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    synchronise()
    return flops * repeats / (time.perf_counter() - started) / 1e12


def measured_matmul_tflops(device, dtype, size: int) -> float:
    """TFLOP/s of a size x size x size matrix product on `device` in `dtype`: what the hardware gives."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return tflops_of(device, lambda: a @ b, 2 * size**3)


def measured_linear_tflops(device, dtype, tokens: int, hidden: int, intermediate: int) -> float:
    """TFLOP/s of one encoder layer's weight matrix products (Q, K, V, output, feed-forward in and out) on a batch of
    `tokens` rows: the rate the hardware gives for this model's shapes, which are smaller than a large square
    product's."""
    import torch

    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    up = torch.randn(tokens, intermediate, device=device, dtype=dtype)
    square = torch.randn(hidden, hidden, device=device, dtype=dtype)
    w_in = torch.randn(intermediate, hidden, device=device, dtype=dtype)
    w_out = torch.randn(hidden, intermediate, device=device, dtype=dtype)

    def layer():
        for _ in range(4):
            torch.nn.functional.linear(x, square)
        torch.nn.functional.linear(x, w_in)
        torch.nn.functional.linear(up, w_out)

    return tflops_of(device, layer, 2 * tokens * (4 * hidden**2 + 2 * hidden * intermediate))


def random_model_folder(shape: str, tokenizer_path: str | None) -> str:
    """A randomly initialised BERT of `shape` with a real tokenizer (the bundled MiniLM's, or `tokenizer_path`),
    saved once under the system's temporary folder; returns the folder."""
    import tempfile

    from transformers import AutoTokenizer, BertConfig, BertModel

    from backend.config import DEFAULT_MODEL_NAME
    from backend.ml.model_files import resolve_model_path

    if shape not in RANDOM_SHAPES:
        raise SystemExit(f"--model random:<shape>: shape must be one of {', '.join(RANDOM_SHAPES)}, got {shape!r}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or resolve_model_path(DEFAULT_MODEL_NAME))
    dims = "-".join(str(value) for value in RANDOM_SHAPES[shape].values())
    source = hashlib.blake2b(str(tokenizer.name_or_path).encode(), digest_size=4).hexdigest()  # vocabularies
    folder = Path(tempfile.gettempdir()) / f"al-backend-random-{shape}-{dims}-{tokenizer.vocab_size}-{source}"
    if not folder.is_dir():  # saved aside and renamed: an interrupted save leaves no folder that looks whole
        config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **RANDOM_SHAPES[shape])
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        BertModel(config).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            partial.rename(folder)
        except OSError:  # another run saved it first
            shutil.rmtree(partial, ignore_errors=True)
    return str(folder)


def print_flop_rates(encoder, token_ids: list[list[int]], timings: dict[str, float], peak_tflops: float) -> None:
    """Useful and executed (padded) matrix-product TFLOP/s of the encode, per timing (e.g. end to end, forward
    passes only), and their share of `peak_tflops` (0: measured here)."""

    config = encoder.model.config
    shape = (config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    useful = encoder_matmul_flops([len(ids) for ids in token_ids], *shape)
    padded_lengths = []
    for batch in encoder.batches(token_ids):
        padded_lengths += [len(token_ids[batch[0]])] * len(batch)
    executed = encoder_matmul_flops(padded_lengths, *shape)
    dtype = encoder.autocast_dtype or encoder.weights_dtype
    size = 8192 if encoder.device.type == "cuda" else 2048
    peak = peak_tflops or measured_matmul_tflops(encoder.device, dtype, size)
    linear = measured_linear_tflops(encoder.device, dtype, encoder.batch_tokens, shape[1], shape[2])
    print(f"layers={shape[0]} hidden={shape[1]} intermediate={shape[2]} gflop/text={useful / len(token_ids) / 1e9:.3f}")
    print(f"peak_tflops={peak:.2f} ({'given' if peak_tflops else f'measured: {size}^3 {dtype} matrix product'})")
    print(f"linear_tflops={linear:.2f} (measured: one layer's weight products on {encoder.batch_tokens} tokens)")
    for label, seconds in timings.items():
        useful_rate, executed_rate = useful / seconds / 1e12, executed / seconds / 1e12
        print(f"{label}: useful_tflops={useful_rate:.3f} executed_tflops={executed_rate:.3f} (executed counts padding)")
        print(f"{label}: share_of_peak={useful_rate / peak:.1%} useful, {executed_rate / peak:.1%} executed")
        print(f"{label}: share_of_linear={useful_rate / linear:.1%} useful, {executed_rate / linear:.1%} executed")


def texts_of_csv(path: str, limit: int) -> list[str]:
    """The first `limit` texts of the CSV's `text` column; ValueError naming what is missing."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "text" not in (reader.fieldnames or []):
                raise ValueError(f"{path} has no 'text' column (columns: {reader.fieldnames or 'none'})")
            texts = [row["text"] for row in itertools.islice(reader, limit)]
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror or error}") from None
    if not texts:
        raise ValueError(f"{path} has no rows")
    return texts


def bench_encode(args: argparse.Namespace) -> None:
    import torch

    from backend.ml.encoder import Encoder

    texts = args.texts_read
    model = args.model
    if model.startswith("random:"):
        model = random_model_folder(model.removeprefix("random:"), args.tokenizer)
    encoder = Encoder(model, args.device, args.max_length, args.batch_tokens, args.dtype)
    encoder.encode(texts[: min(64, len(texts))])  # warm-up: kernels, allocator
    best = None
    for _ in range(args.repeat):
        if encoder.device.type == "cuda":
            torch.cuda.synchronize(encoder.device)
        encoder.encode(texts)
        stats = encoder.last_stats
        best = stats if best is None or stats.seconds < best.seconds else best
    lengths = [len(ids) for ids in encoder.token_ids(texts)]
    print(
        f"model={args.model} device={encoder.device} autocast={encoder.autocast_dtype} weights={encoder.weights_dtype}"
    )
    print(f"torch_threads={torch.get_num_threads()}")
    print(f"cpu={platform.processor() or platform.machine()} cores={os.cpu_count()}")
    print(
        f"texts={best.texts} tokens/text: mean={np.mean(lengths):.1f} median={np.median(lengths):.0f} "
        f"max={max(lengths)} (max_length={encoder.max_length})"
    )
    print(
        f"batch_tokens={encoder.batch_tokens} batches={best.batches} padding_overhead="
        f"{best.padded_tokens / best.tokens - 1:.1%}"
    )
    print(f"seconds={best.seconds:.3f} tokens/s={best.tokens / best.seconds:,.0f}")
    model_seconds = best.seconds - best.tokenize_seconds
    print(f"tokenize_seconds={best.tokenize_seconds:.3f} model_seconds={model_seconds:.3f} (both inside seconds)")
    timings = {"end_to_end": best.seconds, "model_only": model_seconds}
    print_flop_rates(encoder, encoder.token_ids(texts), timings, args.peak_tflops)
    print(f"texts_per_second={best.texts / best.seconds:.1f}")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def max_length_arg(text: str) -> int:
    """argparse type: a MAX_LENGTH, 0 (the model's own) or at least 8 tokens."""
    value = int(text)
    if value < 0 or 0 < value < 8:
        raise argparse.ArgumentTypeError(f"must be 0 (the model's own) or 8 or more, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="backend benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    encode = commands.add_parser("encode", help="encoder throughput (texts/s)")
    encode.add_argument(
        "--model",
        default="sentence-transformers/all-MiniLM-L6-v2",
        help=f"a model name or folder, or random:<shape> ({', '.join(RANDOM_SHAPES)})",
    )
    encode.add_argument("--csv", default=str(DEFAULT_TEXTS), help="CSV with a 'text' column")
    encode.add_argument("--texts", type=positive_int, default=2000)
    encode.add_argument(
        "--max-length", type=max_length_arg, default=0, help="as MAX_LENGTH; 0 = the model's own (256 for MiniLM)"
    )
    encode.add_argument("--batch-tokens", type=int, default=0, help="0 = auto")
    encode.add_argument("--device", default="auto")
    encode.add_argument("--dtype", choices=ENCODER_DTYPES, default="auto", help="as ENCODER_DTYPE (see the README)")
    encode.add_argument("--repeat", type=positive_int, default=2)
    encode.add_argument(
        "--tokenizer", help="tokenizer folder for --model random:<shape> (default: the bundled MiniLM's)"
    )
    encode.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the device's peak rate; 0 = measure a large matrix product"
    )
    encode.set_defaults(run=bench_encode)
    rerank = commands.add_parser("rerank", help="a full re-rank of N unlabelled tasks from cached embeddings")
    rerank.add_argument("--tasks", type=positive_int, default=1_000_000)
    rerank.add_argument("--dim", type=positive_int, default=384)
    rerank.add_argument("--classes", type=positive_int, default=4)
    rerank.add_argument("--labelled", type=positive_int, default=500)
    rerank.add_argument("--top-k", type=positive_int, default=20)
    rerank.add_argument("--strategy", default="hybrid", help=f"one of {', '.join(sorted(STRATEGIES))}")
    rerank.set_defaults(run=bench_rerank)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    args.run(args)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors argparse's types cannot see, before anything is loaded or synthesised."""
    if args.command == "encode":
        try:
            args.texts_read = texts_of_csv(args.csv, args.texts)
        except ValueError as error:
            parser.error(f"--csv: {error}")
        return
    if args.strategy not in STRATEGIES:
        parser.error(f"--strategy {args.strategy!r}: one of {', '.join(sorted(STRATEGIES))}")
    if args.classes < 2:
        parser.error(f"--classes must be at least 2, got {args.classes}")
    if args.labelled + args.top_k > args.tasks:
        parser.error(f"--labelled {args.labelled} + --top-k {args.top_k} must not exceed --tasks {args.tasks}")


def time_rerank_from_cache(
    n_tasks: int, dim: int, n_classes: int, n_labelled: int, top_k: int, strategy_name: str
) -> dict[str, float]:
    """Seconds per stage of a re-rank over synthetic cached embeddings (fp16, as the cache stores them)."""
    from backend.ml.head import choose_l2, fit_committee, fit_head, proba_of_heads
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
    # a worker has imported what torch's optimizers load on their first step (transformers imports it along with the
    # encoder it preloads, and forked work-horses inherit it): so does this process, outside the timed stages
    fit_head(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), False)
    stages["synthesise"] = time.perf_counter() - started

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        stages[name] = now - started
        started = now

    lap("synthesise")
    x_labelled = embeddings[labeled].astype(np.float32)
    l2 = choose_l2(x_labelled, targets[labeled], False)  # rounds do this only when the labels grew by 25%
    lap("choose_l2")
    head = fit_head(x_labelled, targets[labeled], False, l2=l2)
    committee = fit_committee(x_labelled, targets[labeled], False, 5, rng, l2=l2)
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
