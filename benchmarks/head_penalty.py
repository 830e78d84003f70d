"""Test accuracy of the linear head with a fixed l2 penalty against the cross-validated one, on random subsets.

    python -m benchmarks.head_penalty --pool ../shared/data/banking77/train.csv \
        --test ../shared/data/banking77/test.csv --sizes 20,100,500,2000 --seeds 3

For each size, `--seeds` random subsets of the pool are labelled; the head is fit on each with every fixed
penalty of `--fixed` and with `choose_l2`'s pick, and scored on the test CSV. Prints the mean accuracies, the
penalties chosen and the seconds cross-validation took. Embeddings come from backend.evaluate's cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from backend.config import DEFAULT_MODEL_NAME
from backend.evaluation_data import cached_embeddings, read_labelled_csv
from backend.evaluation_replay import one_hot_indices
from backend.ml.head import choose_l2, fit_head


def labelled_matrix(path: str, model: str, cache: Path, classes: list[str] | None = None):
    """(embeddings, class indices, classes) of a CSV; test labels the pool lacks get index -1 (always wrong)."""
    texts, labels = read_labelled_csv(path, "text", "label")
    classes = classes or sorted(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    return cached_embeddings(texts, model, cache, 0), np.array([index.get(label, -1) for label in labels]), classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--sizes", default="20,100,500,2000")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fixed", default="1e-3,1e-4")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--cache-dir", default=".cache/embeddings")
    args = parser.parse_args()
    cache = Path(args.cache_dir)
    x, y, classes = labelled_matrix(args.pool, args.model, cache)
    test_x, test_y, _ = labelled_matrix(args.test, args.model, cache, classes)
    fixed = [float(value) for value in args.fixed.split(",")]
    print(f"{args.pool}: {len(y)} rows, {len(classes)} classes; test {len(test_y)} rows")
    for size in (int(value) for value in args.sizes.split(",")):
        accuracy: dict[str, list[float]] = {**{f"l2={value:g}": [] for value in fixed}, "cross-validated": []}
        chosen, seconds = [], []
        for seed in range(args.seeds):
            rows = np.random.default_rng(seed).permutation(len(y))[:size]
            targets = one_hot_indices(y[rows], len(classes))
            started = time.perf_counter()
            chosen.append(choose_l2(x[rows], targets, False))
            seconds.append(time.perf_counter() - started)
            penalties = {f"l2={value:g}": value for value in fixed} | {"cross-validated": chosen[-1]}
            for name, l2 in penalties.items():
                head = fit_head(x[rows], targets, False, l2=l2)
                accuracy[name].append(float(np.mean(head.predict_proba(test_x).argmax(axis=1) == test_y)))
        figures = ", ".join(f"{name} {np.mean(values):.3f}" for name, values in accuracy.items())
        print(f"{size:>6} labels: {figures}; chosen {[f'{c:g}' for c in chosen]} in {np.mean(seconds):.2f} s")


if __name__ == "__main__":
    main()
