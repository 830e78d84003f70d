"""Markdown table of `python -m backend.evaluate` results: `python -m benchmarks.evaluation_table eval_out/*`.

Runs on the same data set (the same --pool and --test files, read in the same columns) are merged, first come
first: a later run adds only the strategies not shown yet (e.g. a run of strategy variants, whose random baseline
repeats the first run's); runs replayed otherwise (other budgets, seeds, --random-start, --rank-top-k, model, the
embeddings' precision) are refused, not merged, and so is a run from before results.json recorded the zero-shot
accuracy beside a newer one (their labels saved are counted from different points at 0 labels).
A data set is named after the folder of its pool file, with the file names added when two differ only there, and
the columns when only they differ.
With `--plot DIR`, writes DIR/learning_curve_<data set>.png of the merged curves.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from backend.evaluation_summary import labels_saved_text


def data_set_key(results: dict, folder: Path) -> tuple[str, str, str, str]:
    """(pool file, test file, text column, label column) of a run (TREC-6's files hold a coarse and a fine label:
    two data sets); a results.json without its arguments is a data set of its own."""
    arguments = results.get("arguments") or {}
    columns = (arguments.get("text_column") or "text", arguments.get("label_column") or "label")
    return (arguments.get("pool") or str(folder), arguments.get("test") or "", *columns)


REPLAY_SETTINGS = ("seeds", "random_start", "rank_top_k", "model", "max_length", "label_names")
"""Arguments of `backend.evaluate` that change what random's baseline is; runs merge only when they agree."""


def replay_settings(results: dict) -> dict:
    arguments = results.get("arguments") or {}
    # and the embeddings' precision, which the run reports beside its arguments: bf16 and fp32 replays part from
    # the first pick a last-digit difference changes
    return {name: arguments.get(name) for name in REPLAY_SETTINGS} | {
        "encoder_precision": results.get("encoder_precision")
    }


def data_set_names(keys: list[tuple[str, str, str, str]]) -> dict[tuple[str, str, str, str], str]:
    """The pool's folder name (../shared/data/<name>/...), made longer where two data sets would share it: the
    columns read, when only they differ."""
    runs_on = Counter(key[:2] for key in keys)  # data sets per (pool file, test file)
    names = file_names(list(runs_on))
    return {key: names[key[:2]] + (f" ({key[2]}, {key[3]})" if runs_on[key[:2]] > 1 else "") for key in keys}


def file_names(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The name of each (pool file, test file): the pool's folder name, longer where two would share it."""
    short = {key: Path(key[0]).parent.name or key[0] for key in keys}
    names = {}
    for key in keys:
        namesakes = [other for other in keys if short[other] == short[key]]
        same_pool_file = [other for other in namesakes if Path(other[0]).name == Path(key[0]).name]
        if len(namesakes) == 1:
            names[key] = short[key]
        elif len(same_pool_file) == 1:
            names[key] = f"{short[key]}/{Path(key[0]).stem}"
        else:
            names[key] = f"{short[key]}/{Path(key[0]).stem} on {Path(key[1]).stem}"
    # still shared (the same files spelled two ways, ../data/x.csv and /home/.../data/x.csv): the paths in full
    clashes = {name for name in names.values() if list(names.values()).count(name) > 1}
    return {key: f"{key[0]} on {key[1]}" if name in clashes else name for key, name in names.items()}


def merged_results(folders: list[Path]) -> dict[str, dict]:
    """Data set name -> one results dict whose strategies are those of every run on it, first run first."""
    merged: dict[tuple[str, str], dict] = {}
    for folder in folders:
        if not (folder / "results.json").is_file():  # e.g. eval_out/* holding a run that failed or was interrupted
            print(f"{folder}: no results.json, left out", file=sys.stderr)
            continue
        results = json.loads((folder / "results.json").read_text())
        key = data_set_key(results, folder)
        if key not in merged:
            merged[key] = results
        else:
            first_budgets = merged[key]["strategies"]["random"]["budgets"]
            if results["strategies"]["random"]["budgets"] != first_budgets:
                raise SystemExit(f"{folder}: budgets differ from the first run's on {key[0]}; not comparable")
            if ("zero_shot_accuracy" in results) != ("zero_shot_accuracy" in merged[key]):
                older = "this run" if "zero_shot_accuracy" not in results else "the first run"
                raise SystemExit(
                    f"{folder}: {older} on {key[0]} predates the zero-shot point at 0 labels (its results.json has no "
                    "zero_shot_accuracy), so its labels saved are counted otherwise; rerun it to compare"
                )
            differing = replay_settings(results).items() - replay_settings(merged[key]).items()
            if differing:  # its strategies would be shown beside another replay's random baseline
                settings = ", ".join(f"{name}={value!r}" for name, value in sorted(differing))
                raise SystemExit(
                    f"{folder}: replayed with {settings}, unlike the first run on {key[0]}; not comparable"
                )
            for strategy, result in results["strategies"].items():
                merged[key]["strategies"].setdefault(strategy, result)
    names = data_set_names(list(merged))
    return {names[key]: results for key, results in merged.items()}


def rows(name: str, results: dict) -> list[str]:
    strategies = results["strategies"]
    budgets = np.array(strategies["random"]["budgets"])
    random_curve = np.array(strategies["random"]["accuracy_mean"])
    lines = []
    for strategy, result in strategies.items():
        curve = np.array(result["accuracy_mean"])
        saved_text = labels_saved_text(result, times="×", missing="–")
        at_budget_text = labels_saved_text(result, "labels_saved_at_budget", times="×", missing="–")
        gaps = (curve - random_curve)[budgets >= 100]
        worst = f"{float(np.min(gaps)):+.3f}" if len(gaps) else "–"  # (no budget of 100 or more)
        # the README's budgets and the last (a small pool, or batches of 30, may have none of the others)
        at = {b: curve[list(budgets).index(b)] for b in (100, 200, 500, 1000, budgets[-1]) if b in budgets}
        accuracy = ", ".join(f"{a:.3f}@{b}" for b, a in at.items())
        lines.append(
            f"| {name} | {strategy} | {result['area_under_curve']:.4f} | {accuracy} | {saved_text} "
            f"| {at_budget_text} | {worst} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="output folders of backend.evaluate")
    parser.add_argument("--plot", type=Path, help="write learning_curve_<data set>.png of the merged runs here")
    args = parser.parse_args(argv)
    merged = merged_results(args.folders)
    print(
        "| data set | strategy | AUC | mean accuracy at budget | labels saved vs random (to 95% of full pool) "
        "| labels saved at the last budget | worst gap to random, budget ≥ 100 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, results in merged.items():
        print("\n".join(rows(name, results)))
    if args.plot:
        from backend.evaluation_summary import plot

        args.plot.mkdir(parents=True, exist_ok=True)
        for name, results in merged.items():
            file_name = re.sub(r"[^\w.-]+", "_", name).strip("_")  # "trec6 (text, fine)": trec6_text_fine
            plot(results, args.plot / f"learning_curve_{file_name}.png", name)


if __name__ == "__main__":
    main()
