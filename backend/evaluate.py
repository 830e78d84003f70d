"""Replay annotation on a labelled CSV, as the backend runs it, and compare strategies with random order.

    python -m backend.evaluate --pool ../shared/data/ag_news/pool.csv --test ../shared/data/ag_news/test.csv \
        --strategy hybrid,margin --budget 500 --batch-size 20 --seeds 3 --out eval_out/ag_news

Each replay (backend.evaluation_replay) starts from the zero-shot head, as a project's cold start does, and
retrains the production head after every round. Writes DIR/results.json and DIR/learning_curve.png. Embeddings
are cached under --cache-dir.

Labels saved compares the labels random order needs to reach 95% of the full-pool accuracy with the labels a
strategy needs. When random does not get there within --budget, the figure is only a lower bound;
--baseline-budget N replays random alone further, to N labels, so that it is measured. Labels saved at the budget
asks the same at the end of the budget, for strategies that do not reach the 95% either: the labels random needs
for the accuracy the strategy has after --budget labels, divided by --budget.

With --finetune-at 500 the encoder is also fine-tuned (backend.ml.finetune) on the labels each replay has at
500, and the fine-tuned encoder and head are scored on the test set; the replay itself goes on with the frozen
encoder, as the backend's rounds do.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from backend.config import DEFAULT_MODEL_NAME
from backend.errors import ModelUnavailable
from backend.evaluation_data import Dataset, cached_embeddings, encoding_precision, read_labelled_csv
from backend.evaluation_replay import (
    baseline_replay_budgets,
    finetuned_accuracy_on,
    one_hot_indices,
    replay_budgets,
    run_one,
    strategy_from_spec,
)
from backend.evaluation_summary import labels_saved_text, plot, summarise, write_results
from backend.ml.head import choose_l2, fit_head, zero_shot_head
from backend.ml.model_files import max_length_asked, resolve_model_path
from backend.scoring.registry import STRATEGIES


def choice_names(classes: tuple[str, ...], spec: str) -> list[str]:
    """The choice value an annotator would see for each class: `spec` is `LABEL=NAME,...`, others keep the label.

    Zero-shot cold start embeds these names, so a CSV with labels such as `0`/`1` can be replayed as the project
    with `Negative`/`Positive` choices it stands for. Raises ValueError for a pair that is malformed or names a
    label the pool does not have.
    """
    names = dict.fromkeys(classes)
    for pair in filter(None, (pair.strip() for pair in spec.split(","))):
        label, equals, name = (part.strip() for part in pair.partition("="))
        if not equals or not name:
            raise ValueError(f"label name {pair!r} is not LABEL=NAME")
        if label not in names:
            raise ValueError(f"label {label!r} is not in the pool; its labels are {list(classes)}")
        names[label] = name
    return [name or label for label, name in names.items()]


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument(
        "--strategy",
        default="hybrid",
        help=f"comma-separated NAME or NAME:KEY=VALUE:...; known: {', '.join(STRATEGIES)}",
    )
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument(
        "--baseline-budget",
        type=int,
        default=0,
        help="replay random order up to N labels (more than --budget) so that the labels it needs to reach the "
        "target are measured, not bounded by --budget; default: --budget",
    )
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument(
        "--rank-top-k",
        type=int,
        default=20,
        help="rows each round ranks, as RANK_TOP_K in the backend; annotators label the first --batch-size of "
        "them (--batch-size 1: one annotator, a new ranking after every annotation); default 20",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME)
    parser.add_argument(
        "--max-length",
        type=int,
        default=0,
        help="tokens kept per text, as MAX_LENGTH; default 0: the model's own (256 for MiniLM)",
    )
    parser.add_argument("--cache-dir", default=".cache/embeddings")
    parser.add_argument(
        "--finetune-at",
        default="",
        help="comma-separated budgets at which the encoder is also fine-tuned on the labels so far and scored",
    )
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument(
        "--random-start",
        type=int,
        default=0,
        help="the first N labels of every replay are drawn at random (a seed set), so that strategies that are "
        "deterministic from the zero-shot start vary with the seed too; default 0: the strategy picks from round 0, "
        "as the backend does",
    )
    parser.add_argument(
        "--label-names",
        default="",
        help="comma-separated LABEL=NAME: the choice a CSV label stands for (zero-shot uses it), e.g. 0=negative",
    )
    return parser


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error (exit 2) for a count or length out of range, before anything is read or encoded."""
    for option in ("budget", "batch_size", "seeds", "rank_top_k", "finetune_epochs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be 1 or more, got {getattr(args, option)}")
    if args.baseline_budget < 0 or 0 < args.baseline_budget < args.budget:
        parser.error(
            f"--baseline-budget must be 0 (the same as --budget) or --budget ({args.budget}) or more, got "
            f"{args.baseline_budget}"
        )
    if args.random_start < 0 or args.random_start % args.batch_size:
        parser.error(f"--random-start must be 0 or a multiple of --batch-size, got {args.random_start}")
    if args.max_length < 0 or 0 < args.max_length < 8:
        parser.error(f"--max-length must be 0 (the model's own) or 8 or more (as MAX_LENGTH), got {args.max_length}")


def strategies_to_replay(parser: argparse.ArgumentParser, spec: str) -> list[str]:
    """Random first, then each strategy of the comma-separated `spec` once; a usage error names a bad one."""
    names = list(dict.fromkeys(["random", *filter(None, (name.strip() for name in spec.split(",")))]))
    for name in names:
        try:
            strategy_from_spec(name)
        except ValueError as error:
            parser.error(f"--strategy {name}: {error}")
    return names


def finetune_budgets(parser: argparse.ArgumentParser, spec: str) -> frozenset[int]:
    """The label counts of the comma-separated `--finetune-at`; a usage error for anything else."""
    try:
        return frozenset(int(b) for b in spec.split(",") if b)
    except ValueError:
        parser.error(f"--finetune-at must be comma-separated label counts, got {spec!r}")


def class_indices(
    parser: argparse.ArgumentParser, args: argparse.Namespace, classes: tuple[str, ...], test_labels: list[str]
) -> dict[str, int]:
    """Label -> class index: the pool's classes in order, then the test set's labels the pool lacks. Their rows stay
    in the test set, as errors (the head cannot predict an index past the pool's); none shared is a usage error."""
    index = {label: i for i, label in enumerate(classes)}
    unseen = sorted(set(test_labels) - set(index))
    index.update({label: len(classes) + i for i, label in enumerate(unseen)})
    if unseen:
        count = sum(label in unseen for label in test_labels)
        if count == len(test_labels):  # e.g. ids in one file and names in the other: every score would be 0
            parser.error(
                f"--test: none of the labels of {args.test} {unseen[:5]} is among the pool's {list(classes[:5])}"
            )
        print(f"{args.test}: {count} of {len(test_labels)} rows have labels the pool lacks {unseen[:5]}: errors")
    return index


def accuracy_on_test(head, test: Dataset) -> float:
    """The share of test rows whose most probable class under `head` is their label."""
    return float(np.mean(head.predict_proba(test.embeddings).argmax(axis=1) == test.labels))


def full_pool_accuracy(pool: Dataset, test: Dataset) -> float:
    """Test accuracy of the head trained on every pool label: what "95% of the full pool" is 95% of."""
    targets = one_hot_indices(pool.labels, len(pool.classes))
    full = fit_head(pool.embeddings, targets, False, l2=choose_l2(pool.embeddings, targets, False))
    return accuracy_on_test(full, test)


def zero_shot_accuracy(test: Dataset, label_embeddings: np.ndarray) -> float:
    """Test accuracy before any label: of the zero-shot head every replay starts from (each curve's 0-label point)."""
    return accuracy_on_test(zero_shot_head(label_embeddings, False), test)


def print_report(summary: dict, budgets: list[int], baseline_budgets: list[int], seeds: int) -> None:
    """The summary's headline figures: the target, when random reaches it, and per strategy labels saved and AUC."""
    print(
        f"full-pool accuracy {summary['full_pool_accuracy']:.4f}; target {summary['target_accuracy']:.4f} "
        f"(embeddings in {summary['encoder_precision']}: another precision, another machine, gives other replays); "
        f"zero-shot, before any label, {summary['zero_shot_accuracy']:.4f}"
    )
    if summary["zero_shot_accuracy"] >= summary["target_accuracy"]:
        print("the zero-shot head reaches the target with no label: there are no labels to save (n/a)")
    needs = summary["strategies"]["random"]["labels_to_target_per_seed"]
    print(
        f"random reaches the target after {[None if n is None else round(n) for n in needs]} labels (None: not by "
        f"{baseline_budgets[-1]})"
    )
    for name, result in summary["strategies"].items():
        at = {
            b: round(a, 4)
            for b, a in zip(budgets, result["accuracy_mean"], strict=True)
            if b in (100, 200, 500, budgets[-1])
        }
        saved_text = labels_saved_text(result)
        at_budget_text = labels_saved_text(result, "labels_saved_at_budget")
        if name == "random":  # 1.00x on a smooth curve: how far the noise of a mean curve moves these figures
            at_budget_text += " (against itself: the noise of its mean curve)"
        print(
            f"{name:>24}: labels saved {saved_text}, at {budgets[-1]} labels {at_budget_text}, "
            f"AUC {result['area_under_curve']:.4f}, {at}"
        )
        if result["distinct_seed_curves"] == 1 < seeds:
            print(f"{'':>24}  the same curve under every seed (deterministic picks): --random-start N gives it a band")
        if result["finetuned_accuracy_mean"]:
            tuned = {b: round(a, 4) for b, a in result["finetuned_accuracy_mean"].items()}
            print(f"{'':>24}  fine-tuned encoder: {tuned}")


def classes_and_names(
    parser: argparse.ArgumentParser, args: argparse.Namespace, pool_labels: list[str], test_rows: int
) -> tuple[tuple[str, ...], list[str]]:
    """(classes, the choice name zero-shot embeds for each) of the pool; a usage error for a pool of fewer than two
    labels, an empty test set or bad --label-names."""
    classes = tuple(sorted(set(pool_labels)))
    if len(classes) < 2:
        parser.error(f"--pool: classification needs at least two labels; {args.pool} has {list(classes) or 'none'}")
    if not test_rows:
        parser.error(f"--test: {args.test} has no labelled rows")
    try:
        return classes, choice_names(classes, args.label_names)
    except ValueError as error:
        parser.error(f"--label-names: {error}")


RARE_CLASS_ROWS = 3
"""A pool class with fewer rows than this is named in a warning."""


def warn_of_rare_classes(path: str, labels: list[str]) -> None:
    """Name the pool's classes of fewer than `RARE_CLASS_ROWS` rows: a class the replays can hardly learn, or no
    class at all but a piece of text (a stray quote in the CSV makes one text of the rows up to the next quote, and
    reads a label from wherever that text ends)."""
    counts = Counter(labels)
    rare = sorted((label for label, n in counts.items() if n < RARE_CLASS_ROWS), key=lambda label: counts[label])
    if rare:
        named = ", ".join(f"{label[:40]!r} ({counts[label]})" for label in rare[:10])
        print(
            f"{path}: {len(rare)} of {len(counts)} classes have fewer than {RARE_CLASS_ROWS} rows: {named}; if one "
            "is not a label, a stray quote in the CSV has merged rows into one text"
        )


def count_test_rows_in_pool(test_path: str, pool_texts: list[str], test_texts: list[str]) -> int:
    """How many test rows have a text the pool holds too, verbatim (data sets often repeat a few): a replay that
    picks one, and the full-pool head, are scored on a text they trained on. Said when there are any, and kept in
    results.json, so that figures are read knowing it."""
    pool = set(pool_texts)
    count = sum(text in pool for text in test_texts)
    if count:
        print(
            f"{test_path}: {count} of {len(test_texts)} test texts are in the pool too: a head that trained on one "
            "is scored on it (results.json: test_rows_in_pool)"
        )
    return count


def budgets_of(
    parser: argparse.ArgumentParser, args: argparse.Namespace, pool_size: int, finetune_at: frozenset[int]
) -> tuple[list[int], list[int]]:
    """(the strategies' budgets, random's) for a pool of `pool_size` rows; a usage error for a --finetune-at that is
    not among them."""
    budgets = replay_budgets(args.budget, args.batch_size, pool_size)
    if budgets[-1] < args.budget:
        print(f"the pool has {pool_size} rows: budgets stop there")
    if finetune_at - set(budgets):
        parser.error(f"--finetune-at {sorted(finetune_at - set(budgets))} is not among the budgets {budgets}")
    return budgets, baseline_replay_budgets(budgets, args.baseline_budget, args.batch_size, pool_size)


def replay_all(
    names: list[str],
    pool: Dataset,
    test: Dataset,
    label_embeddings: np.ndarray,
    budgets: list[int],
    baseline_budgets: list[int],
    args: argparse.Namespace,
    finetune_at: frozenset[int],
    finetune,
) -> dict[str, list[dict]]:
    """Every strategy of `names` under every seed (random to its own, longer, budgets), with one progress bar; the
    encoder is also fine-tuned (by `finetune`) and scored at the budgets of --finetune-at."""
    rounds = args.seeds * ((len(names) - 1) * len(budgets) + len(baseline_budgets))
    with tqdm(total=rounds, desc="rounds") as progress:
        return {
            name: [
                run_one(
                    name,
                    pool,
                    test,
                    label_embeddings,
                    baseline_budgets if name == "random" else budgets,
                    seed,
                    progress,
                    finetune,
                    finetune_at,
                    random_start=args.random_start,
                    rank_top_k=args.rank_top_k,
                )
                for seed in range(args.seeds)
            ]
            for name in names
        }


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    names = strategies_to_replay(parser, args.strategy)  # every usage error comes before anything is encoded
    try:
        args.max_length = max_length_asked(resolve_model_path(args.model), args.max_length)  # recorded as used
    except ValueError as error:  # neither a folder nor a hub name
        parser.error(f"--model {args.model}: {error}")
    finetune_at = finetune_budgets(parser, args.finetune_at)
    for option in ("pool", "test"):
        if not Path(getattr(args, option)).is_file():
            parser.error(f"--{option} {getattr(args, option)}: no such file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: a file, not a folder")
    if Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        parser.error(f"--cache-dir {args.cache_dir}: a file, not a folder")
    try:  # now, not after the pool is encoded
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--cache-dir {args.cache_dir}: {error.strerror or error}")
    if not os.access(args.cache_dir, os.W_OK):
        parser.error(f"--cache-dir {args.cache_dir}: not writable")

    started = time.time()
    pool_texts, pool_labels = read_labelled_csv(args.pool, args.text_column, args.label_column)
    test_texts, test_labels = read_labelled_csv(args.test, args.text_column, args.label_column)
    classes, names_of_choices = classes_and_names(parser, args, pool_labels, len(test_texts))
    warn_of_rare_classes(args.pool, pool_labels)
    in_pool = count_test_rows_in_pool(args.test, pool_texts, test_texts)
    budgets, baseline_budgets = budgets_of(parser, args, len(pool_texts), finetune_at)
    index = class_indices(parser, args, classes, test_labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # once the arguments and both files passed every check: no empty folder

    def dataset(texts: list[str], labels: list[str]) -> Dataset:
        embeddings = cached_embeddings(texts, args.model, Path(args.cache_dir), args.max_length)
        return Dataset(embeddings, np.array([index[label] for label in labels]), classes, texts)

    try:
        pool, test = dataset(pool_texts, pool_labels), dataset(test_texts, test_labels)
        label_embeddings = cached_embeddings(names_of_choices, args.model, Path(args.cache_dir), args.max_length)
        finetune = None
        if finetune_at:  # loads the encoder, which cached embeddings did not need
            overrides = {"epochs": args.finetune_epochs}
            finetune = finetuned_accuracy_on(pool, test, args.model, args.max_length, overrides)
    except ModelUnavailable as error:  # e.g. a hub name while the hub is out of reach
        parser.error(f"--model: {error}")
    full_accuracy = full_pool_accuracy(pool, test)  # first: a failure here must not come after hours of replays
    runs = replay_all(names, pool, test, label_embeddings, budgets, baseline_budgets, args, finetune_at, finetune)
    summary = summarise(
        runs,
        budgets,
        full_accuracy,
        baseline_budgets,
        paired_seeds=args.random_start > 0,
        zero_shot_accuracy=zero_shot_accuracy(test, label_embeddings),
    )
    summary["arguments"] = vars(args)
    summary["test_rows_in_pool"] = in_pool
    summary["encoder_precision"] = encoding_precision()
    summary["seconds"] = round(time.time() - started, 1)
    write_results(out, summary)
    plot(summary, out / "learning_curve.png", Path(args.pool).parent.name or args.pool)
    print_report(summary, budgets, baseline_budgets, args.seeds)


if __name__ == "__main__":
    main()
