"""Markdown table of `python -m backend.evaluate` results: `python -m benchmarks.evaluation_table eval_out/*`.

Runs on the same data set (the same --pool file) are merged, first come first: a later run adds only the
strategies not shown yet (e.g. a run of strategy variants, whose random baseline repeats the first run's).
With `--plot DIR`, writes DIR/learning_curve_<data set>.png of the merged curves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def data_set_name(results: dict, folder: Path) -> str:
    """The folder holding the pool file (../shared/data/<name>/...), else the results folder's name."""
    pool = (results.get("arguments") or {}).get("pool")
    return Path(pool).parent.name if pool else folder.name


def merged_results(folders: list[Path]) -> dict[str, dict]:
    """Data set name -> one results dict whose strategies are those of every run on it, first run first."""
    merged: dict[str, dict] = {}
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        name = data_set_name(results, folder)
        if name not in merged:
            merged[name] = results
        else:
            first_budgets = merged[name]["strategies"]["random"]["budgets"]
            if results["strategies"]["random"]["budgets"] != first_budgets:
                raise SystemExit(f"{folder}: budgets differ from the first {name} run's; not comparable")
            for strategy, result in results["strategies"].items():
                merged[name]["strategies"].setdefault(strategy, result)
    return merged


def rows(name: str, results: dict) -> list[str]:
    strategies = results["strategies"]
    budgets = np.array(strategies["random"]["budgets"])
    random_curve = np.array(strategies["random"]["accuracy_mean"])
    lines = []
    for strategy, result in strategies.items():
        curve = np.array(result["accuracy_mean"])
        saved = result["labels_saved"]
        saved_text = (
            f"{saved:.2f}×"
            if saved
            else (f"≥ {result['labels_saved_at_least']:.2f}×" if result.get("labels_saved_at_least") else "–")
        )
        worst = float(np.min((curve - random_curve)[budgets >= 100]))
        at = {b: curve[list(budgets).index(b)] for b in (100, 200, 500, 1000) if b in budgets}
        accuracy = ", ".join(f"{a:.3f}@{b}" for b, a in at.items())
        lines.append(
            f"| {name} | {strategy} | {result['area_under_curve']:.4f} | {accuracy} | {saved_text} | {worst:+.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="output folders of backend.evaluate")
    parser.add_argument("--plot", type=Path, help="write learning_curve_<data set>.png of the merged runs here")
    args = parser.parse_args(argv)
    merged = merged_results(args.folders)
    print(
        "| data set | strategy | AUC | mean accuracy at budget | labels saved vs random "
        "| worst gap to random, budget ≥ 100 |"
    )
    print("|---|---|---|---|---|---|")
    for name, results in merged.items():
        print("\n".join(rows(name, results)))
    if args.plot:
        from backend.evaluation_summary import plot

        args.plot.mkdir(parents=True, exist_ok=True)
        for name, results in merged.items():
            plot(results, args.plot / f"learning_curve_{name}.png", name)


if __name__ == "__main__":
    main()
