import csv
import json

import numpy as np
import pytest
from tqdm import tqdm

from backend.evaluate import full_pool_accuracy, main
from backend.evaluation_data import Dataset, read_labelled_csv
from backend.evaluation_replay import baseline_replay_budgets, macro_f1, replay_budgets, run_one
from backend.evaluation_summary import labels_to_reach
from backend.scoring.registry import get_strategy
from tests.conftest import read_csv


def test_labels_to_reach_interpolates_between_budgets():
    assert labels_to_reach([20, 40, 60], [0.5, 0.7, 0.9], 0.8) == pytest.approx(50.0)
    assert labels_to_reach([20, 40], [0.9, 0.95], 0.8) == 20.0
    assert labels_to_reach([20, 40], [0.5, 0.6], 0.8) is None


def test_the_zero_shot_accuracy_is_every_curves_point_at_no_label():
    from backend.evaluation_summary import labels_saved_text, summarise

    # a curve already at the target at its first budget: measured from the zero-shot start, not "the first budget"
    assert labels_to_reach([20, 40], [0.9, 0.95], 0.8, zero_labels=0.6) == pytest.approx(20 * 0.2 / 0.3)
    assert labels_to_reach([20, 40], [0.9, 0.95], 0.8, zero_labels=0.85) == 0.0  # no label needed
    budgets = [20, 40]
    runs = {
        "random": [{"accuracy": [0.7, 0.9], "macro_f1": [0, 0]}],
        "fast": [{"accuracy": [0.9, 0.95], "macro_f1": [0, 0]}],
    }
    # target 0.8 (both past it by 40): random needs 20 + 20 * 0.1 / 0.2 = 30, fast 20 * 0.2 / 0.3 from 0.6 at 0
    measured = summarise(runs, budgets, full_accuracy=0.8 / 0.95, zero_shot_accuracy=0.6)
    assert measured["zero_shot_accuracy"] == 0.6
    assert measured["strategies"]["fast"]["labels_saved"] == pytest.approx(30 / (20 * 0.2 / 0.3))
    # without the point at 0 (an older results.json), fast counted as needing its first budget, 20: 1.5x
    older = summarise(runs, budgets, full_accuracy=0.8 / 0.95)["strategies"]["fast"]
    assert older["labels_saved"] == pytest.approx(1.5)
    # the zero-shot head at the target already: no labels to save, for any strategy, and no bound either
    nothing = summarise(runs, budgets, full_accuracy=0.8 / 0.95, zero_shot_accuracy=0.85)["strategies"]["fast"]
    assert nothing["labels_to_target_per_seed"] == [0.0]
    assert labels_saved_text(nothing) == "n/a"
    # fast ends at 0.95, which random never reaches: at least random's budget per label used
    assert labels_saved_text(nothing, "labels_saved_at_budget") == ">=1.00x"
    # a strategy that ends at or below the zero-shot head: random "needs" no label for that, and nothing is saved
    worse = {**runs, "worse": [{"accuracy": [0.5, 0.55], "macro_f1": [0, 0]}]}
    worse = summarise(worse, budgets, full_accuracy=0.8 / 0.95, zero_shot_accuracy=0.6)["strategies"]["worse"]
    assert worse["labels_saved_at_budget"] is None and worse["labels_saved_at_budget_at_least"] is None
    assert labels_saved_text(worse, "labels_saved_at_budget") == "n/a"  # not "0.00x"


def test_the_report_says_when_the_zero_shot_head_leaves_no_labels_to_save(capsys):
    from backend.evaluate import print_report
    from backend.evaluation_summary import summarise

    runs = {"random": [{"accuracy": [0.9, 0.95], "macro_f1": [0, 0]}]}
    summary = summarise(runs, [20, 40], full_accuracy=0.8 / 0.95, zero_shot_accuracy=0.85)
    print_report(summary | {"encoder_precision": "fp32"}, [20, 40], [20, 40], seeds=1)
    out = capsys.readouterr().out
    assert "zero-shot, before any label, 0.8500" in out
    assert "the zero-shot head reaches the target with no label: there are no labels to save (n/a)" in out
    assert "random reaches the target after [0] labels" in out  # 0 labels, not None ("never")


def test_macro_f1_by_hand():
    truth, predicted = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    # class 0: tp 1, fn 1 -> 2/3 ; class 1: tp 2, fp 1 -> 4/5
    assert macro_f1(truth, predicted) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # a class the test set lacks (2) is not averaged in, whether predicted or not; its wrong pick costs class 0
    assert macro_f1(truth, np.array([2, 0, 1, 1])) == pytest.approx((2 / 3 + 1.0) / 2)


def test_budgets_stop_at_the_pool_and_end_with_a_partial_batch():
    assert replay_budgets(60, 20, 1000) == [20, 40, 60]
    assert replay_budgets(50, 20, 1000) == [20, 40, 50]
    assert replay_budgets(100, 20, 30) == [20, 30]
    assert replay_budgets(10, 20, 1000) == [10]


def test_random_replayed_further_is_scored_at_the_strategies_budgets_first():
    # its accuracies are cut at len(budgets) for the shared curves: the first ones must be at the same budgets
    assert baseline_replay_budgets([20, 40, 50], 100, 20, 1000) == [20, 40, 50, 60, 80, 100]
    assert baseline_replay_budgets([20, 40, 60], 100, 20, 1000) == [20, 40, 60, 80, 100]
    assert baseline_replay_budgets([20, 40, 60], 60, 20, 1000) == [20, 40, 60]  # no further
    assert baseline_replay_budgets([20, 30], 100, 20, 30) == [20, 30]  # the pool ends it


def test_labels_of_one_class_keep_the_zero_shot_head_as_rounds_do():
    # two classes whose label embeddings are the test rows: zero-shot is always right; a head fit on class 0
    # alone would answer 0 for every row and score 0.5
    rng = np.random.default_rng(0)
    label_embeddings = np.eye(2, 8, dtype=np.float32)
    test = Dataset(np.repeat(label_embeddings, 5, axis=0), np.repeat([0, 1], 5), ("a", "b"), [""] * 10)
    pool_embeddings = rng.normal(size=(60, 8)).astype(np.float32)
    pool = Dataset(pool_embeddings, np.zeros(60, dtype=int), ("a", "b"), [""] * 60)  # every pool row is "a"
    with tqdm(disable=True) as progress:
        run = run_one("random", pool, test, label_embeddings, [20, 40], seed=0, progress=progress)
    assert run["accuracy"] == [1.0, 1.0]
    assert run["stability"] == []  # zero-shot heads are never compared


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": row["text"], "label": row["label"]} for row in rows)


def harness_arguments(tmp_path, tiny_bert, *extra: str) -> list[str]:
    """A small replay on TREC-6 rows with the tiny offline BERT: margin (and random), budgets 20, 40, 60."""
    write_csv(tmp_path / "pool.csv", read_csv("trec6/train.csv", 300))
    write_csv(tmp_path / "test.csv", read_csv("trec6/test.csv", 100))
    return [
        *("--pool", str(tmp_path / "pool.csv"), "--test", str(tmp_path / "test.csv")),
        *("--strategy", "margin", "--budget", "60", "--batch-size", "20", "--out", str(tmp_path / "out")),
        *("--model", tiny_bert, "--max-length", "32", "--cache-dir", str(tmp_path / "cache")),
        *extra,
    ]


def test_full_pool_accuracy_trains_on_every_pool_row():
    # four well-separated classes, the last two only in the second half of the pool: a head that saw part of the
    # pool could not name them
    rng = np.random.default_rng(0)
    centres = 5 * np.eye(4, 8)
    labels = np.repeat([0, 1, 2, 3], 30)
    embeddings = (centres[labels] + rng.normal(0, 0.3, (120, 8))).astype(np.float32)
    pool = Dataset(embeddings, labels, ("a", "b", "c", "d"), [""] * 120)
    test_labels = np.array([0, 1, 2, 3] * 5)
    test = Dataset(centres[test_labels].astype(np.float32), test_labels, pool.classes, [""] * 20)
    assert full_pool_accuracy(pool, test) == 1.0


def test_harness_writes_results_and_plot(tiny_bert, tmp_path):
    main(harness_arguments(tmp_path, tiny_bert, "--seeds", "2"))
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results["strategies"]) == {"random", "margin"}  # random always runs as the baseline
    margin = results["strategies"]["margin"]
    assert margin["budgets"] == [20, 40, 60]
    assert len(margin["accuracy_per_seed"]) == 2 and all(len(seed) == 3 for seed in margin["accuracy_per_seed"])
    assert all(0.0 <= value <= 1.0 for value in margin["accuracy_mean"] + margin["macro_f1_mean"])
    for result in results["strategies"].values():  # (random's seeds differ: a mean of one seed would show)
        for name in ("accuracy", "macro_f1"):  # the means over the seeds, budget by budget
            assert result[f"{name}_mean"] == pytest.approx(np.mean(result[f"{name}_per_seed"], axis=0))
        mean = result["accuracy_mean"]  # the area: the mean curve's, per label of the budget range (two trapezoids)
        assert result["area_under_curve"] == pytest.approx((mean[0] + 2 * mean[1] + mean[2]) * 20 / 2 / 40)
    assert 0.0 < results["full_pool_accuracy"] <= 1.0
    assert results["target_accuracy"] == pytest.approx(0.95 * results["full_pool_accuracy"])
    assert 0.0 <= results["zero_shot_accuracy"] <= 1.0  # every curve's point at 0 labels, for the labels needed
    assert margin["labels_to_target_per_seed"] == [
        labels_to_reach(margin["budgets"], seed, results["target_accuracy"], results["zero_shot_accuracy"])
        for seed in margin["accuracy_per_seed"]
    ]
    assert len(margin["stop_budget_per_seed"]) == 2  # the stopping signal: a budget, or None if never stable
    assert all(b is None or b in margin["budgets"] for b in margin["stop_budget_per_seed"])
    assert margin["finetuned_accuracy_mean"] == {}  # no fine-tuning unless asked
    assert (out / "learning_curve.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(path.name for path in out.iterdir()) == ["learning_curve.png", "results.json"]  # no partial left
    assert list((tmp_path / "cache").glob("*.npy"))  # embeddings reused on the next run
    from backend.evaluation_data import encoding_precision  # what another machine's results are compared by

    assert results["encoder_precision"] == encoding_precision()


def test_test_texts_that_are_in_the_pool_too_are_counted_and_said(tiny_bert, tmp_path, capsys):
    arguments = harness_arguments(tmp_path, tiny_bert)
    pool, test = read_csv_rows(tmp_path / "pool.csv"), read_csv_rows(tmp_path / "test.csv")
    write_csv(tmp_path / "test.csv", pool[:3] + [row for row in test if row not in pool])  # 3 repeated verbatim
    main(arguments)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["test_rows_in_pool"] == 3
    assert "test.csv: 3 of " in capsys.readouterr().out


def read_csv_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_an_interrupted_summary_leaves_the_earlier_results_whole(tmp_path, monkeypatch):
    from pathlib import Path

    from backend import evaluation_summary

    (tmp_path / "results.json").write_text('{"earlier": true}')
    write_text = Path.write_text

    def cut_off_halfway(path, text, *args, **kwargs):
        write_text(path, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", cut_off_halfway)
    with pytest.raises(KeyboardInterrupt):
        evaluation_summary.write_results(tmp_path, {"later": True, "strategies": {}})
    monkeypatch.undo()
    assert json.loads((tmp_path / "results.json").read_text()) == {"earlier": True}
    assert [path.name for path in tmp_path.iterdir()] == ["results.json"]


def test_harness_scores_a_finetuned_encoder_at_the_budgets_asked(tiny_bert, tmp_path, monkeypatch):
    from backend.ml import finetune

    tuned_runs = []  # (labels it was tuned on, its epochs, the test accuracy of what it returned)
    test_rows = read_csv("trec6/test.csv", 100)  # the rows harness_arguments writes
    test_texts, test_labels = [row["text"] for row in test_rows], [row["label"] for row in test_rows]
    classes = sorted({row["label"] for row in read_csv("trec6/train.csv", 300)})
    real_finetune = finetune.finetune_encoder

    def recording(encoder, texts, targets, probe, config):
        tuned, head = real_finetune(encoder, texts, targets, probe, config)
        predicted = head.predict_proba(tuned.encode(test_texts)).argmax(axis=1)
        accuracy = float(np.mean([classes[i] == label for i, label in zip(predicted, test_labels, strict=True)]))
        tuned_runs.append((len(texts), config.epochs, accuracy))
        return tuned, head

    monkeypatch.setattr(finetune, "finetune_encoder", recording)
    main(harness_arguments(tmp_path, tiny_bert, "--seeds", "1", "--finetune-at", "40,60", "--finetune-epochs", "1"))
    strategies = json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]
    assert [(labels, epochs) for labels, epochs, _ in tuned_runs] == [(40, 1), (60, 1)] * 2  # random, then margin
    margin = strategies["margin"]
    assert margin["finetuned_accuracy_per_seed"] == [{"40": tuned_runs[2][2], "60": tuned_runs[3][2]}]
    assert margin["finetuned_accuracy_mean"] == {"40": tuned_runs[2][2], "60": tuned_runs[3][2]}


def test_an_encoder_fine_tuning_cannot_load_is_a_usage_error_before_any_replay(tiny_bert, tmp_path, monkeypatch):
    # every embedding cached, so nothing loaded the model until fine-tuning needed it: e.g. a hub name, offline
    from backend import evaluate
    from backend.errors import ModelUnavailable
    from backend.ml import encoder

    def unavailable(name, **kwargs):
        raise ModelUnavailable(f"cannot load encoder MODEL_NAME={name!r}: no hub")

    monkeypatch.setattr(evaluate, "cached_embeddings", lambda texts, *args: np.ones((len(texts), 8), np.float32))
    monkeypatch.setattr(encoder, "Encoder", unavailable)
    monkeypatch.setattr(evaluate, "full_pool_accuracy", lambda *args: pytest.fail("the replay went on"))
    with pytest.raises(SystemExit) as usage_error:
        main(harness_arguments(tmp_path, tiny_bert, "--finetune-at", "40"))
    assert usage_error.value.code == 2


def test_finetune_budgets_must_be_among_the_replay_budgets(tiny_bert, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage_error:
        main(harness_arguments(tmp_path, tiny_bert, "--seeds", "1", "--finetune-at", "50"))
    assert usage_error.value.code == 2  # argparse's usage error
    assert "--finetune-at [50] is not among the budgets [20, 40, 60]" in capsys.readouterr().err


def test_random_start_draws_the_first_labels_at_random_for_every_strategy(tiny_bert, tmp_path):
    main(harness_arguments(tmp_path, tiny_bert, "--seeds", "2", "--random-start", "20"))
    strategies = json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]
    random, margin = strategies["random"]["accuracy_per_seed"], strategies["margin"]["accuracy_per_seed"]
    # budget 20 is the seed set: the same random rows, hence the same head, as the baseline of the same seed
    assert [seed[0] for seed in margin] == [seed[0] for seed in random]
    # and it differs between seeds, so margin, deterministic from one start, gets a band (whole curves compared:
    # one accuracy on 100 test rows can coincide)
    assert random[0] != random[1] and margin[0] != margin[1]
    assert strategies["margin"]["distinct_seed_curves"] == 2


def test_each_round_ranks_rank_top_k_rows_and_the_annotators_label_the_first_batch(tiny_bert, tmp_path, monkeypatch):
    margin_class = type(get_strategy("margin"))
    asked, original = [], margin_class.select

    def recorded(self, pool, n_instances, rng):
        picks = original(self, pool, n_instances, rng)
        asked.append((n_instances, int(pool.labeled.sum()), picks[0]))
        return picks

    monkeypatch.setattr(margin_class, "select", recorded)
    arguments = harness_arguments(tmp_path, tiny_bert, "--seeds", "1")
    main([*arguments, "--strategy", "margin", "--budget", "3", "--batch-size", "1", "--rank-top-k", "5"])
    # one annotator: every round ranks 5 rows, the top one is labelled, the next round ranks again
    assert [(n, labelled) for n, labelled, _ in asked] == [(5, 0), (5, 1), (5, 2)]
    assert len({top for _, _, top in asked}) == 3
    margin = json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]["margin"]
    assert margin["budgets"] == [1, 2, 3]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--strategy", "nope"], "--strategy nope: Unknown strategy 'nope'; known strategies"),
        (["--strategy", "hybrid:rare_share=2"], "--strategy hybrid:rare_share=2: "),
        (["--finetune-at", "abc"], "--finetune-at must be comma-separated label counts, got 'abc'"),
        (["--finetune-epochs", "0"], "--finetune-epochs must be 1 or more, got 0"),
        (["--baseline-budget", "300"], "--baseline-budget must be 0 (the same as --budget) or --budget (500) or more"),
        (["--max-length", "3"], "--max-length must be 0 (the model's own) or 8 or more (as MAX_LENGTH), got 3"),
        ([], "--pool x.csv: no such file"),
        (["--model", "./no/such/model"], "--model ./no/such/model: "),
    ],
)
def test_bad_arguments_fail_with_a_usage_error_before_encoding(tmp_path, capsys, arguments, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["--pool", "x.csv", "--test", "y.csv", "--out", str(tmp_path), *arguments])
    assert exit_.value.code == 2  # argparse's usage error, not a traceback
    assert expected in capsys.readouterr().err


def test_seeds_that_replayed_the_same_picks_count_as_one_curve():
    from backend.evaluation_summary import summarise

    same, other = {"accuracy": [0.5, 0.7], "macro_f1": [0, 0]}, {"accuracy": [0.5, 0.72], "macro_f1": [0, 0]}
    summary = summarise({"random": [same, other, same], "margin": [same, same, same]}, [20, 40], full_accuracy=0.8)
    assert summary["strategies"]["random"]["distinct_seed_curves"] == 2
    assert summary["strategies"]["margin"]["distinct_seed_curves"] == 1


def test_labels_saved_is_exact_or_a_lower_bound():
    from backend.evaluation_summary import summarise

    budgets = [100, 200, 300, 400]
    runs = {
        "random": [{"accuracy": [0.5, 0.6, 0.7, 0.8], "macro_f1": [0, 0, 0, 0]}],
        "fast": [{"accuracy": [0.5, 0.9, 0.95, 0.96], "macro_f1": [0, 0, 0, 0]}],
        "slow": [{"accuracy": [0.5, 0.6, 0.7, 0.81], "macro_f1": [0, 0, 0, 0]}],
    }
    # target 0.8: random needs 400; fast interpolates to 100 + 100 * 0.3 / 0.4 = 175
    exact = summarise(runs, budgets, full_accuracy=0.8 / 0.95)
    assert exact["strategies"]["fast"]["labels_saved"] == pytest.approx(400 / 175)
    # target 0.805: random never reaches it; slow needs 300 + 100 * 0.105 / 0.11, so saved >= 400 / that
    bound = summarise(runs, budgets, full_accuracy=0.805 / 0.95)
    assert bound["strategies"]["slow"]["labels_saved"] is None
    assert bound["strategies"]["slow"]["labels_saved_at_least"] == pytest.approx(400 / (300 + 100 * 0.105 / 0.11))


def test_a_strategy_that_never_reaches_the_target_or_ends_past_random_gets_a_bound():
    from backend.evaluation_summary import labels_saved_text, summarise

    budgets = [100, 200, 300, 400]
    runs = {
        "random": [{"accuracy": [0.5, 0.6, 0.8, 0.85], "macro_f1": [0] * 4}],
        "stuck": [{"accuracy": [0.5, 0.6, 0.7, 0.75], "macro_f1": [0] * 4}],
        "fast": [{"accuracy": [0.5, 0.9, 0.95, 0.96], "macro_f1": [0] * 4}],
    }
    summary = summarise(runs, budgets, full_accuracy=0.8 / 0.95)["strategies"]
    stuck, fast = summary["stuck"], summary["fast"]
    # target 0.8: random needs 300; stuck needs more than its 400, so saves at most 300 / 400
    assert stuck["labels_saved"] is None and stuck["labels_saved_at_most"] == pytest.approx(0.75)
    assert labels_saved_text(stuck) == "<=0.75x"
    # stuck ends at 0.75, which random has after 200 + 100 * 0.15 / 0.2 = 275 labels
    assert stuck["labels_saved_at_budget"] == pytest.approx(275 / 400)
    # fast ends at 0.96, which random never reaches in its 400: at least 400 / 400
    assert fast["labels_saved_at_budget"] is None and fast["labels_saved_at_budget_at_least"] == 1.0
    assert labels_saved_text(fast, "labels_saved_at_budget") == ">=1.00x"
    assert fast["labels_saved_at_most"] is None  # fast reached the target: its figure is exact
    assert labels_saved_text(fast) == f"{300 / (100 + 100 * 0.3 / 0.4):.2f}x"
    assert labels_saved_text({"labels_saved": None}, missing="–") == "–"


def test_unpaired_seeds_are_compared_with_every_seed_of_random():
    from backend.evaluation_summary import labels_saved_per_seed, summarise

    # random needs 400 or 200 labels, the strategy 100 or 200: seed numbers say nothing about which goes with which
    assert labels_saved_per_seed([400, 200], [100, 200], paired=False) == [3.0, 1.5]
    assert labels_saved_per_seed([400, 200], [100, 200], paired=True) == [4.0, 1.0]  # a shared random start
    assert labels_saved_per_seed([400, None], [100, 200], paired=False) == [None, None]
    assert labels_saved_per_seed([400, None], [100, 200], paired=False, random_budget=500) == [4.5, 2.25]
    budgets = [100, 200, 300, 400]
    runs = {
        "random": [
            {"accuracy": [0.5, 0.6, 0.7, 0.8], "macro_f1": [0] * 4},
            {"accuracy": [0.5, 0.8, 0.8, 0.8], "macro_f1": [0] * 4},
        ],
        "fast": [
            {"accuracy": [0.8, 0.9, 0.9, 0.9], "macro_f1": [0] * 4},
            {"accuracy": [0.5, 0.8, 0.9, 0.9], "macro_f1": [0] * 4},
        ],
    }
    unpaired = summarise(runs, budgets, full_accuracy=0.8 / 0.95)["strategies"]
    assert unpaired["fast"]["labels_saved"] == pytest.approx(2.25)  # the mean of 3.0 and 1.5
    assert unpaired["random"]["labels_saved"] == 1.0  # random against itself, seed by seed
    paired = summarise(runs, budgets, full_accuracy=0.8 / 0.95, paired_seeds=True)["strategies"]
    assert paired["fast"]["labels_saved"] == pytest.approx(2.5)  # 400 / 100 and 200 / 200


def test_a_longer_baseline_turns_the_lower_bound_into_a_measure():
    from backend.evaluation_summary import summarise

    budgets, baseline_budgets = [100, 200], [100, 200, 300, 400]
    runs = {
        "random": [{"accuracy": [0.5, 0.6, 0.7, 0.9], "macro_f1": [0.4, 0.5, 0.6, 0.8], "stop_budget": 400}],
        "fast": [{"accuracy": [0.7, 0.9], "macro_f1": [0, 0]}],
    }
    # target 0.8: random gets there at 300 + 100 * 0.1 / 0.2 = 350, fast at 100 + 100 * 0.1 / 0.2 = 150
    summary = summarise(runs, budgets, full_accuracy=0.8 / 0.95, baseline_budgets=baseline_budgets)
    random, fast = summary["strategies"]["random"], summary["strategies"]["fast"]
    assert fast["labels_saved"] == pytest.approx(350 / 150)
    assert random["labels_to_target_per_seed"] == [pytest.approx(350)] and random["labels_saved"] == 1.0
    # curves and areas stay on the budgets every strategy has; random's longer run is kept aside
    assert random["budgets"] == budgets and random["accuracy_mean"] == [0.5, 0.6]
    assert random["area_under_curve"] == pytest.approx(0.55)
    assert random["beyond_budget"]["budgets"] == [300, 400]
    assert random["beyond_budget"]["accuracy_mean"] == [0.7, 0.9]
    assert random["accuracy_at_stop_per_seed"] == [0.9]
    # at the end of the budget: fast has 0.9 after 200 labels, which random reaches after 400: 2x
    assert fast["labels_saved_at_budget"] == pytest.approx(2.0) and random["labels_saved_at_budget"] == 1.0
    # without the longer run, random never reaches 0.8 within 200 labels: only a bound, 200 / 150
    first_two = {"random": [{"accuracy": [0.5, 0.6], "macro_f1": [0, 0]}], "fast": runs["fast"]}
    bounded = summarise(first_two, budgets, full_accuracy=0.8 / 0.95)
    assert bounded["strategies"]["fast"]["labels_saved"] is None
    assert bounded["strategies"]["fast"]["labels_saved_at_least"] == pytest.approx(200 / 150)


def test_resummarise_keeps_random_beyond_the_budget(tmp_path):
    from backend.evaluation_summary import resummarise, summarise

    runs = {
        "random": [{"accuracy": [0.5, 0.6, 0.7, 0.9], "macro_f1": [0.4, 0.5, 0.6, 0.8]}],
        "fast": [{"accuracy": [0.7, 0.9], "macro_f1": [0, 0]}],
    }
    before = summarise(runs, [100, 200], full_accuracy=0.8 / 0.95, baseline_budgets=[100, 200, 300, 400])
    stale = json.loads(json.dumps(before))
    assert stale["strategies"]["fast"]["labels_saved"] == pytest.approx(350 / 150)  # needs random's 300 and 400
    stale["strategies"]["fast"]["labels_saved"] = 99.0  # a figure derived the old way: recomputed, not copied
    (tmp_path / "results.json").write_text(json.dumps(stale))
    assert resummarise(tmp_path) == json.loads(json.dumps(before))


def test_harness_replays_random_past_the_budget_when_asked(tiny_bert, tmp_path, capsys):
    main(harness_arguments(tmp_path, tiny_bert, "--seeds", "1", "--baseline-budget", "100"))
    strategies = json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]
    assert strategies["margin"]["budgets"] == strategies["random"]["budgets"] == [20, 40, 60]
    assert strategies["random"]["beyond_budget"]["budgets"] == [80, 100]
    assert "margin" not in {k for k, v in strategies.items() if "beyond_budget" in v}
    out = capsys.readouterr().out
    assert "random reaches the target after" in out
    margin_line = next(line for line in out.splitlines() if line.strip().startswith("margin:"))
    assert margin_line.endswith(f"{{60: {round(strategies['margin']['accuracy_mean'][2], 4)}}}")  # the last budget


def test_strategy_specs_carry_parameters():
    from backend.evaluation_replay import strategy_from_spec

    hybrid = strategy_from_spec("hybrid:uncertainty=badge:candidate_factor=1")
    assert hybrid.uncertainty == "badge" and hybrid.candidate_factor == 1
    assert strategy_from_spec("margin").name == "margin"
    with pytest.raises(ValueError, match="'candidate_factr'"):
        strategy_from_spec("hybrid:candidate_factr=2")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        strategy_from_spec("hybrid:badge")


def test_label_names_stand_in_for_csv_labels():
    from backend.evaluate import choice_names

    assert choice_names(("0", "1"), "0=negative,1=positive") == ["negative", "positive"]
    assert choice_names(("ABBR", "DESC"), "ABBR=abbreviation") == ["abbreviation", "DESC"]  # others keep theirs
    assert choice_names(("a", "b"), "") == ["a", "b"]
    with pytest.raises(ValueError, match="'2' is not in the pool"):
        choice_names(("0", "1"), "2=neutral")
    with pytest.raises(ValueError, match="not LABEL=NAME"):
        choice_names(("0", "1"), "0")


def test_bad_label_names_are_a_usage_error(tiny_bert, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage_error:
        main(harness_arguments(tmp_path, tiny_bert, "--seeds", "1", "--label-names", "NOPE=x"))
    assert usage_error.value.code == 2  # argparse's usage error
    assert "--label-names: label 'NOPE' is not in the pool" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no empty output folder left by a run that never started


def test_lists_of_strategies_and_label_names_may_have_spaces_after_their_commas():
    from backend.evaluate import argument_parser, choice_names, strategies_to_replay

    assert strategies_to_replay(argument_parser(), "margin, entropy ,") == ["random", "margin", "entropy"]
    assert choice_names(("0", "1"), "0 = negative, 1=positive") == ["negative", "positive"]


def test_stopping_compares_successive_models_on_unlabelled_rows(tiny_bert, tmp_path, monkeypatch):
    import backend.evaluation_replay as replay

    compared: list[int] = []
    changes: list[float] = []  # how far each comparison's two models' probabilities are apart
    stability = replay.prediction_stability

    def recording(previous, current, multi_label):
        compared.append(len(previous))
        changes.append(float(np.abs(previous - current).max()))
        return stability(previous, current, multi_label)

    monkeypatch.setattr(replay, "prediction_stability", recording)
    monkeypatch.setattr(replay, "should_stop", lambda history: len(history) >= 2)  # stable after two comparisons
    main(harness_arguments(tmp_path, tiny_bert, "--seeds", "1", "--strategy", "margin"))
    margin = json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]["margin"]
    # budgets 20, 40, 60 on a 300-row pool: the model at 40 vs the one at 20 on the 260 rows still unlabelled,
    # then 60 vs 40 on 240 (zero-shot is never compared), for random and margin
    assert compared == [260, 240, 260, 240]
    assert min(changes) > 1e-4  # two models trained on other labels, never one model compared with itself
    assert margin["stop_budget_per_seed"] == [60]
    assert margin["accuracy_at_stop_per_seed"] == [margin["accuracy_per_seed"][0][2]]


def test_resummarise_keeps_stops_and_finetuned_figures(tmp_path):
    from backend.evaluation_summary import resummarise, summarise

    budgets = [20, 40]
    runs = {
        name: [
            {
                "accuracy": [0.5, 0.8],
                "macro_f1": [0.4, 0.7],
                "stop_budget": 40,
                "finetuned_accuracy": {200: 0.9, 1000: 0.95},
            }
        ]
        for name in ("random", "hybrid")
    }
    before = summarise(runs, budgets, full_accuracy=0.8)
    (tmp_path / "results.json").write_text(json.dumps(before))
    after = resummarise(tmp_path)["strategies"]["hybrid"]
    assert after["stop_budget_per_seed"] == [40] and after["accuracy_at_stop_per_seed"] == [0.8]
    assert after["finetuned_accuracy_mean"] == {200: 0.9, 1000: 0.95}
    assert list(resummarise(tmp_path)["strategies"]["hybrid"]["finetuned_accuracy_mean"]) == [200, 1000]


def test_a_pool_smaller_than_the_budget_stops_the_budgets_at_its_size(tiny_bert, tmp_path, capsys):
    arguments = harness_arguments(tmp_path, tiny_bert, "--seeds", "1")
    write_csv(tmp_path / "pool.csv", read_csv("trec6/train.csv", 50))
    main(arguments)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["strategies"]["margin"]["budgets"] == [20, 40, 50]
    assert "the pool has 50 rows: budgets stop there" in capsys.readouterr().out


def test_test_rows_with_labels_the_pool_lacks_count_as_errors(tiny_bert, tmp_path, capsys):
    arguments = harness_arguments(tmp_path, tiny_bert, "--seeds", "1")
    pool, test = read_csv("trec6/train.csv", 300), read_csv("trec6/test.csv", 100)
    missing = test[0]["label"]
    write_csv(tmp_path / "pool.csv", [row for row in pool if row["label"] != missing])
    main(arguments)
    count = sum(row["label"] == missing for row in test)
    assert f"{count} of 100 rows have labels the pool lacks ['{missing}']: errors" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["full_pool_accuracy"] <= (100 - count) / 100


def test_spreadsheet_csvs_and_rows_without_a_label_are_read(tiny_bert, tmp_path, capsys):
    arguments = harness_arguments(tmp_path, tiny_bert, "--seeds", "1")
    rows = read_csv("trec6/train.csv", 300)
    rows[5] = {"text": rows[5]["text"], "label": " "}
    rows[8] = {"text": "  ", "label": rows[8]["label"]}
    write_csv(tmp_path / "pool.csv", rows)
    data = (tmp_path / "pool.csv").read_bytes()
    (tmp_path / "pool.csv").write_bytes(b"\xef\xbb\xbf" + data + b"a short row without a label\r\n")
    main(arguments)
    assert "left out 3 row(s) without a text or a label (the first ends on line 7)" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["strategies"]["margin"]["budgets"] == [20, 40, 60]


def test_a_document_longer_than_the_csv_modules_default_cell_is_read(tmp_path):
    long_text = "word " * 40_000  # 200,000 characters: csv's default limit is 131,072
    write_csv(tmp_path / "long.csv", [{"text": long_text, "label": "a"}, {"text": "short", "label": "b"}])
    assert read_labelled_csv(str(tmp_path / "long.csv"), "text", "label") == ([long_text, "short"], ["a", "b"])


def test_a_csv_saved_in_latin_1_or_windows_1252_is_read_saying_so(tmp_path, capsys):
    rows = 'text,label\r\n"Café crème, naïve",français\r\n\u201cQuoted\u201d smart text,other\r\n'
    (tmp_path / "spreadsheet.csv").write_bytes(rows.encode("cp1252"))
    texts, labels = read_labelled_csv(str(tmp_path / "spreadsheet.csv"), "text", "label")
    assert texts == ["Café crème, naïve", "\u201cQuoted\u201d smart text"] and labels == ["français", "other"]
    said = capsys.readouterr().out
    assert "spreadsheet.csv: 6 byte(s) not UTF-8, read as Windows-1252 (cp1252); the first in " in said
    assert "Caf\\\\xe9 cr" in said  # the byte itself, in its context


def test_one_stray_byte_in_a_utf_8_csv_garbles_only_its_own_line(tmp_path, capsys):
    rows = 'text,label\r\nnaïve “quoted”,a\r\n"two\r\nlines",b\r\n'.encode() + b"caf\xe9 cr\xe8me,c\r\n"
    (tmp_path / "mixed.csv").write_bytes(b"\xef\xbb\xbf" + rows)
    texts, labels = read_labelled_csv(str(tmp_path / "mixed.csv"), "text", "label")
    assert texts == ["naïve “quoted”", "two\r\nlines", "café crème"] and labels == ["a", "b", "c"]
    said = capsys.readouterr().out
    assert "mixed.csv: 2 byte(s) not UTF-8, read as Windows-1252 (cp1252); the first in " in said
    assert "caf\\\\xe9 cr" in said


def test_a_stray_quote_that_merges_rows_into_one_text_is_flagged_by_the_class_it_makes(tiny_bert, tmp_path, capsys):
    arguments = harness_arguments(tmp_path, tiny_bert, "--seeds", "1", "--budget", "20", "--batch-size", "10")
    rows = read_csv("trec6/train.csv", 80)
    write_csv(tmp_path / "pool.csv", rows)
    lines = (tmp_path / "pool.csv").read_text().splitlines(keepends=True)
    lines[3] = '"' + lines[3]  # an opening quote the rows below it never close until a quote in some text
    (tmp_path / "pool.csv").write_text("".join(lines))
    main(arguments)
    assert "classes have fewer than 3 rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model", "cache_dir", "expected"),
    [
        ("model", "cache", "holds no config.json: not a Hugging Face model folder"),
        (None, "pool.csv", "--cache-dir {tmp_path}/pool.csv: a file, not a folder"),  # checked before encoding
        (None, "pool.csv/cache", "--cache-dir {tmp_path}/pool.csv/cache: Not a directory"),
    ],
)
def test_a_model_folder_holding_no_model_or_an_unusable_cache_dir_is_a_usage_error(
    tiny_bert, tmp_path, capsys, model, cache_dir, expected
):
    (tmp_path / "pool.csv").write_text("text,label\na,b\nc,d\n")
    (tmp_path / "model").mkdir()
    arguments = ["--pool", str(tmp_path / "pool.csv"), "--test", str(tmp_path / "pool.csv"), "--out", str(tmp_path)]
    model_folder = str(tmp_path / model) if model else tiny_bert
    with pytest.raises(SystemExit) as exit_:
        main([*arguments, "--model", model_folder, "--cache-dir", str(tmp_path / cache_dir)])
    assert exit_.value.code == 2
    assert expected.format(tmp_path=tmp_path) in capsys.readouterr().err


def test_an_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "pool.csv").write_text("text,label\na,b\n")
    (tmp_path / "results").write_text("not a folder")
    arguments = ["--pool", str(tmp_path / "pool.csv"), "--test", str(tmp_path / "pool.csv")]
    with pytest.raises(SystemExit) as usage_error:
        main([*arguments, "--out", str(tmp_path / "results")])
    assert usage_error.value.code == 2  # argparse's usage error
    said = capsys.readouterr().err
    assert f"--out {tmp_path / 'results'}: a file, not a folder" in said
    assert (tmp_path / "results").read_text() == "not a folder"


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_split_at_semicolons_or_tabs_is_read(tmp_path, delimiter):
    with open(tmp_path / "data.csv", "w", newline="", encoding="utf-8-sig") as handle:  # as a spreadsheet saves it
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerows([["id", "text", "label"], ["1", "Hello, world; again", "a"], ["2", "Line one\nline two", "b"]])
    texts, labels = read_labelled_csv(str(tmp_path / "data.csv"), "text", "label")
    assert texts == ["Hello, world; again", "Line one\nline two"] and labels == ["a", "b"]
    with pytest.raises(SystemExit, match="no column"):  # a header that splits out neither pair still says so
        read_labelled_csv(str(tmp_path / "data.csv"), "text", "category")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--budget", "0"), "--budget must be 1 or more, got 0"),
        (("--batch-size", "0"), "--batch-size must be 1 or more, got 0"),
        (("--seeds", "0"), "--seeds must be 1 or more, got 0"),
        (("--rank-top-k", "0"), "--rank-top-k must be 1 or more, got 0"),
        (("--random-start", "-20"), "--random-start must be 0 or a multiple of --batch-size, got -20"),
        (("--random-start", "30"), "--random-start must be 0 or a multiple of --batch-size, got 30"),
    ],
)
def test_budgets_batches_and_seeds_are_checked_first(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as usage_error:
        main(["--pool", "x.csv", "--test", "y.csv", "--out", str(tmp_path), *extra])
    assert usage_error.value.code == 2  # argparse's usage error
    assert message in capsys.readouterr().err


def test_a_pool_with_one_label_is_a_usage_error(tiny_bert, tmp_path, capsys):
    arguments = harness_arguments(tmp_path, tiny_bert, "--seeds", "1")
    write_csv(tmp_path / "pool.csv", [{"text": f"text {i}", "label": "only"} for i in range(30)])
    with pytest.raises(SystemExit) as usage_error:
        main(arguments)
    assert usage_error.value.code == 2  # argparse's usage error
    assert "classification needs at least two labels" in capsys.readouterr().err


def test_embeddings_cached_for_a_model_folder_are_not_served_once_other_weights_are_saved_there(tiny_bert, tmp_path):
    import shutil

    import torch
    from transformers import BertModel

    from backend.evaluation_data import cached_embeddings

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    texts = ["Stocks rallied on Friday", "The team won the cup"]
    before = cached_embeddings(texts, str(folder), tmp_path / "cache", 32)
    assert np.array_equal(cached_embeddings(texts, str(folder), tmp_path / "cache", 32), before)  # from the file
    torch.manual_seed(1)
    BertModel(BertModel.from_pretrained(folder).config).save_pretrained(folder)  # e.g. fine-tuned into it
    after = cached_embeddings(texts, str(folder), tmp_path / "cache", 32)
    assert not np.allclose(after, before, atol=1e-2)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_embeddings_an_overflowing_model_made_nan_are_zero_rows_as_in_the_backend(tiny_bert, tmp_path, monkeypatch):
    # fp16 autocast on a GPU without bf16 can overflow: one NaN row stopped the full-pool head with a traceback
    from backend.evaluation_data import cached_embeddings
    from backend.ml.encoder import Encoder

    real_encode = Encoder.encode

    def overflowing(self, texts):
        vectors = real_encode(self, texts)
        vectors[1] = np.nan
        return vectors

    monkeypatch.setattr(Encoder, "encode", overflowing)
    texts = ["Stocks rallied on Friday", "The team won the cup", "Rain is due"]
    embeddings = cached_embeddings(texts, tiny_bert, tmp_path, 32)
    assert np.isfinite(embeddings).all() and not embeddings[1].any() and embeddings[[0, 2]].any(axis=1).all()
    (saved,) = tmp_path.glob("*.npy")
    assert np.array_equal(np.load(saved).astype(np.float32), embeddings)  # the file holds the zero row too


def test_the_embedding_cache_keeps_max_length_and_texts_apart(tiny_bert, tmp_path):
    from backend.evaluation_data import cached_embeddings

    cached_embeddings(["8 killed in a storm"], tiny_bert, tmp_path, 12)
    cached_embeddings([" killed in a storm"], tiny_bert, tmp_path, 128)  # the old key joined both into one string
    assert len(list(tmp_path.glob("*.npy"))) == 2
    cached_embeddings(["8 killed in a storm"], tiny_bert, tmp_path, 128)  # the same text at another length
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_the_embedding_cache_keeps_the_precision_of_the_machine_that_encoded_apart(tiny_bert, tmp_path, monkeypatch):
    from backend import evaluation_data

    monkeypatch.setattr(evaluation_data, "encoding_precision", lambda: "fp32")
    evaluation_data.cached_embeddings(["a storm hit the coast"], tiny_bert, tmp_path, 32)
    evaluation_data.cached_embeddings(["a storm hit the coast"], tiny_bert, tmp_path, 32)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    monkeypatch.setattr(evaluation_data, "encoding_precision", lambda: "bf16")  # a cache copied from such a CPU
    evaluation_data.cached_embeddings(["a storm hit the coast"], tiny_bert, tmp_path, 32)
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_the_models_own_max_length_and_auto_share_one_cache_file(tiny_bert, tmp_path):
    from backend.evaluation_data import cached_embeddings

    auto = cached_embeddings(["a storm hit the coast"], tiny_bert, tmp_path, 0)  # says nothing: 256
    assert np.array_equal(cached_embeddings(["a storm hit the coast"], tiny_bert, tmp_path, 256), auto)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_a_strategy_named_twice_is_replayed_once(tiny_bert, tmp_path, monkeypatch):
    import backend.evaluate as evaluate

    replayed, real_run_one = [], evaluate.run_one
    monkeypatch.setattr(
        evaluate, "run_one", lambda name, *rest, **kw: replayed.append(name) or real_run_one(name, *rest, **kw)
    )
    main(harness_arguments(tmp_path, tiny_bert, "--seeds", "1", "--strategy", "margin,random,margin"))
    assert replayed == ["random", "margin"]
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]) == {"random", "margin"}


def test_a_spreadsheets_unicode_text_export_is_read(tmp_path):
    with open(tmp_path / "unicode.txt", "w", newline="", encoding="utf-16") as handle:  # UTF-16 with its BOM, tabs
        handle.write("text\tlabel\r\nCafé crème, naïve\tfrançais\r\n日本語のテキスト\tother\r\n")
    texts, labels = read_labelled_csv(str(tmp_path / "unicode.txt"), "text", "label")
    assert texts == ["Café crème, naïve", "日本語のテキスト"] and labels == ["français", "other"]


def test_a_test_set_sharing_no_label_with_the_pool_is_a_usage_error(tiny_bert, tmp_path, capsys):
    arguments = harness_arguments(tmp_path, tiny_bert, "--seeds", "1")
    test = read_csv("trec6/test.csv", 100)
    write_csv(tmp_path / "test.csv", [{"text": row["text"], "label": row["label"].lower()} for row in test])
    with pytest.raises(SystemExit) as usage_error:
        main(arguments)
    assert usage_error.value.code == 2  # argparse's usage error
    assert "--test: none of the labels of" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
