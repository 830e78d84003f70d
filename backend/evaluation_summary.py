"""What `backend.evaluate` makes of its replays: labels saved, area under the curve, the stop, the plot.

Works on per-seed runs ({"accuracy": [...], "macro_f1": [...], "stop_budget", "finetuned_accuracy"}, one value
per budget) and on the results.json it writes, so a summary can be recomputed without replaying.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from backend.evaluation_data import replaced_whole

TARGET_FRACTION = 0.95
"""Labels saved is measured at this fraction of the full-pool accuracy."""


def labels_to_reach(
    budgets: list[int], curve: list[float], target: float, zero_labels: float | None = None
) -> float | None:
    """Labels at which `curve` first reaches `target`, interpolated between budgets; None if never.

    `zero_labels`, the accuracy before any label (the zero-shot head every replay starts from), is the curve's
    point at 0 labels: a curve already at the target at its first budget then needs a measured number of labels
    (0 if the zero-shot head is there already), not "the first budget", which is only a bound."""
    if zero_labels is not None:
        budgets, curve = [0, *budgets], [zero_labels, *curve]
    for i, value in enumerate(curve):
        if value >= target:
            if i == 0:
                return float(budgets[0])
            b0, b1, v0 = budgets[i - 1], budgets[i], curve[i - 1]
            return float(b0 + (b1 - b0) * (target - v0) / (value - v0))
    return None


def area_under_curve(budgets: list[int], curve: np.ndarray) -> float:
    """Mean accuracy over the budget range (trapezoids); the single value when there is one budget."""
    if len(budgets) == 1:
        return float(curve[0])
    return float(np.trapezoid(curve, budgets) / (budgets[-1] - budgets[0]))


def labels_saved_per_seed(
    random_needs: list[float | None],
    needs: list[float | None],
    paired: bool,
    random_budget: float | None = None,
    own_budget: float | None = None,
) -> list[float | None]:
    """Per seed of a strategy: the labels random needs to reach the target ÷ the labels this seed needed.

    Paired seeds (replays that share a seeded random start) compare seed i with random's seed i. Otherwise the
    two replays of seed i share nothing, so pairing them by number would be arbitrary (on TREC-6 the six ways to
    pair three seeds give 2.52-2.66x): each seed is compared with every seed of random, and the ratios averaged.
    A seed of random that never reached the target counts as needing `random_budget` (the figure is then a lower
    bound), or, without it, makes the figure None; a seed of the strategy that never reached it counts as needing
    `own_budget` (an upper bound), or, without it, makes its figure None. Where no label is needed (the zero-shot
    head reaches the target), nothing can be saved: None.
    """
    random_labels = [random_budget if r is None else r for r in random_needs]
    own_labels = [own_budget if n is None else n for n in needs]
    saved = []
    for seed, labels in enumerate(own_labels):
        compared = [random_labels[seed]] if paired else random_labels
        saved.append(float(np.mean([r / labels for r in compared])) if labels and all(compared) else None)
    return saved


def summarise(
    runs: dict[str, list[dict]],
    budgets: list[int],
    full_accuracy: float,
    baseline_budgets: list[int] | None = None,
    paired_seeds: bool = False,
    zero_shot_accuracy: float | None = None,
) -> dict:
    """Per strategy: curves, area under them, labels saved against random; `runs[name]` is one run per seed.

    `baseline_budgets`, when longer than `budgets`, are the budgets of random's runs, replayed past the others so
    that the labels random needs are measured rather than bounded; curves and areas stay on the shared `budgets`,
    and random's rounds beyond them are kept under `beyond_budget`. `paired_seeds`: seed i of every strategy
    started as seed i of random did (see `labels_saved_per_seed`). `zero_shot_accuracy`: every curve's point at 0
    labels (see `labels_to_reach`); without it (a results.json written before it was recorded) a curve at the
    target at its first budget counts as needing that budget.
    """
    baseline_budgets = baseline_budgets or budgets
    target = TARGET_FRACTION * full_accuracy

    def reach(budgets_: list[int], curve: list[float], target_: float) -> float | None:
        return labels_to_reach(budgets_, curve, target_, zero_shot_accuracy)

    random_needs = [reach(baseline_budgets, run["accuracy"], target) for run in runs["random"]]
    random_mean = np.mean([run["accuracy"] for run in runs["random"]], axis=0).tolist()
    shared = len(budgets)
    results = {}
    for name, seed_runs in runs.items():
        own_budgets = baseline_budgets if name == "random" else budgets
        accuracy = np.array([run["accuracy"][:shared] for run in seed_runs])
        macro_f1 = [run["macro_f1"][:shared] for run in seed_runs]
        needs = [reach(own_budgets, run["accuracy"], target) for run in seed_runs]
        paired = paired_seeds or name == "random"
        saved = labels_saved_per_seed(random_needs, needs, paired)
        # where random never reached the target within its budget, its budget / labels needed is a lower bound
        at_least = labels_saved_per_seed(random_needs, needs, paired, random_budget=baseline_budgets[-1])
        # where this strategy never reached it within its budget, random's labels / its budget is an upper bound
        at_most = labels_saved_per_seed(random_needs, needs, paired, own_budget=own_budgets[-1])
        # the same question at the end of the budget, on mean curves (seeds of random and of a strategy are not
        # pairs): the labels random needs for the accuracy this strategy has there, per label it used; when random
        # never gets there, at least all of random's budget per label used; none ("n/a") when it ends at or below
        # the zero-shot head, which random's curve starts from with no label
        matched = reach(baseline_budgets, random_mean, float(accuracy[:, -1].mean()))
        results[name] = {
            "budgets": budgets,
            "accuracy_per_seed": accuracy.tolist(),
            "accuracy_mean": accuracy.mean(axis=0).tolist(),
            "distinct_seed_curves": len({tuple(curve) for curve in accuracy.tolist()}),
            "macro_f1_per_seed": macro_f1,
            "macro_f1_mean": np.mean(macro_f1, axis=0).tolist(),
            "labels_to_target_per_seed": needs,
            "labels_saved_per_seed": saved,
            "labels_saved": _mean_if_all(saved),
            "labels_saved_at_least": _mean_if_all(at_least),
            "labels_saved_at_most": _mean_if_all(at_most) if None in needs else None,
            "labels_saved_at_budget": matched / budgets[-1] if matched else None,
            "labels_saved_at_budget_at_least": baseline_budgets[-1] / budgets[-1] if matched is None else None,
            "area_under_curve": area_under_curve(budgets, accuracy.mean(axis=0)),
            "stop_budget_per_seed": [run.get("stop_budget") for run in seed_runs],
            "finetuned_accuracy_per_seed": [run.get("finetuned_accuracy") or {} for run in seed_runs],
            "finetuned_accuracy_mean": _mean_per_budget([run.get("finetuned_accuracy") or {} for run in seed_runs]),
            "accuracy_at_stop_per_seed": [
                run["accuracy"][own_budgets.index(run["stop_budget"])] if run.get("stop_budget") else None
                for run in seed_runs
            ],
        }
    if len(baseline_budgets) > shared:
        beyond = [run["accuracy"][shared:] for run in runs["random"]]
        results["random"]["beyond_budget"] = {
            "budgets": baseline_budgets[shared:],
            "accuracy_per_seed": beyond,
            "accuracy_mean": np.mean(beyond, axis=0).tolist(),
            "macro_f1_per_seed": [run["macro_f1"][shared:] for run in runs["random"]],
        }
    return {
        "full_pool_accuracy": full_accuracy,
        "target_accuracy": target,
        "zero_shot_accuracy": zero_shot_accuracy,
        "strategies": results,
    }


def labels_saved_text(result: dict, figure: str = "labels_saved", times: str = "x", missing: str = "n/a") -> str:
    """One strategy's labels-saved `figure` for a report: "2.31x", or the bound results.json has where a curve never
    reached the target in its budget (">=1.80x": random did not; "<=0.90x": the strategy did not), or `missing`."""
    if result.get(figure) is not None:
        return f"{result[figure]:.2f}{times}"
    if result.get(f"{figure}_at_least"):
        return f">={result[f'{figure}_at_least']:.2f}{times}"
    if result.get(f"{figure}_at_most"):
        return f"<={result[f'{figure}_at_most']:.2f}{times}"
    return missing


def _mean_if_all(values: list[float | None]) -> float | None:
    return float(np.mean(values)) if all(value is not None for value in values) else None


def _mean_per_budget(per_seed: list[dict[int, float]]) -> dict[int, float]:
    """{budget: accuracy} per seed -> {budget: mean over the seeds that have it}."""
    budgets = sorted({budget for seed in per_seed for budget in seed})
    return {b: float(np.mean([seed[b] for seed in per_seed if b in seed])) for b in budgets}


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for name, result in summary["strategies"].items():
        accuracy = np.array(result["accuracy_per_seed"])
        mean, std = accuracy.mean(axis=0), accuracy.std(axis=0)
        axis.plot(result["budgets"], mean, label=f"{name} (AUC {result['area_under_curve']:.3f})")
        axis.fill_between(result["budgets"], mean - std, mean + std, alpha=0.2)
    axis.axhline(summary["full_pool_accuracy"], color="grey", linestyle=":", label="full pool")
    axis.axhline(summary["target_accuracy"], color="grey", linestyle="--", label="95% of full pool")
    axis.set(xlabel="labels", ylabel="test accuracy", title=title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    with replaced_whole(path) as partial:
        figure.savefig(partial, dpi=120)
    plt.close(figure)


def write_results(out: Path, summary: dict) -> None:
    with replaced_whole(out / "results.json") as partial:
        partial.write_text(json.dumps(summary, indent=1))


def resummarise(out: Path) -> dict:
    """Recompute the summary of an existing results.json (e.g. after a change to the figures derived)."""
    old = json.loads((out / "results.json").read_text())
    some = next(iter(old["strategies"].values()))
    runs = {name: _seed_runs(r) for name, r in old["strategies"].items()}
    beyond = old["strategies"]["random"].get("beyond_budget", {}).get("budgets", [])
    paired = bool(old.get("arguments", {}).get("random_start"))
    zero_shot = old.get("zero_shot_accuracy")
    summary = summarise(runs, some["budgets"], old["full_pool_accuracy"], some["budgets"] + beyond, paired, zero_shot)
    summary.update({k: old[k] for k in ("arguments", "seconds", "test_rows_in_pool", "encoder_precision") if k in old})
    write_results(out, summary)
    return summary


def _seed_runs(result: dict) -> list[dict]:
    """One strategy's summary in results.json -> its per-seed runs, everything `summarise` reads kept (random's
    rounds beyond the shared budgets appended to its curves)."""
    seeds = len(result["accuracy_per_seed"])
    stops = result.get("stop_budget_per_seed") or [None] * seeds
    tuned = [  # JSON made the budgets text: back to numbers, which sort as numbers
        {int(budget): accuracy for budget, accuracy in per_budget.items()}
        for per_budget in result.get("finetuned_accuracy_per_seed") or [{}] * seeds
    ]
    beyond = result.get("beyond_budget") or {"accuracy_per_seed": [[]] * seeds, "macro_f1_per_seed": [[]] * seeds}
    return [
        {"accuracy": acc + acc_beyond, "macro_f1": f1 + f1_beyond, "stop_budget": stop, "finetuned_accuracy": tuned_}
        for acc, f1, stop, tuned_, acc_beyond, f1_beyond in zip(
            result["accuracy_per_seed"],
            result["macro_f1_per_seed"],
            stops,
            tuned,
            beyond["accuracy_per_seed"],
            beyond["macro_f1_per_seed"],
            strict=True,
        )
    ]
