"""Markdown table of `python -m backend.evaluate` results: `python -m benchmarks.evaluation_table eval_out/*`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def rows(out: Path) -> list[str]:
    results = json.loads((out / "results.json").read_text())
    strategies = results["strategies"]
    budgets = np.array(strategies["random"]["budgets"])
    random_curve = np.array(strategies["random"]["accuracy_mean"])
    lines = []
    for name, result in strategies.items():
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
            f"| {out.name} | {name} | {result['area_under_curve']:.4f} | {accuracy} | {saved_text} | {worst:+.3f} |"
        )
    return lines


def main() -> None:
    print(
        "| data set | strategy | AUC | mean accuracy at budget | labels saved vs random "
        "| worst gap to random, budget ≥ 100 |"
    )
    print("|---|---|---|---|---|---|")
    for folder in sys.argv[1:]:
        print("\n".join(rows(Path(folder))))


if __name__ == "__main__":
    main()
