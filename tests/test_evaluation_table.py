"""The README's evaluation table: runs on one data set merge, first run first."""

import json

import pytest

from benchmarks.evaluation_table import main


def write_results(
    folder,
    pool: str,
    strategies: dict[str, list[float]],
    budgets=(100, 200),
    test: str = "data/trec6/test.csv",
    **arguments: str,
) -> None:
    folder.mkdir()
    budgets = list(budgets)
    results = {
        "arguments": {"pool": pool, "test": test, **arguments},
        "full_pool_accuracy": 0.9,
        "target_accuracy": 0.855,
        "strategies": {
            name: {
                "budgets": budgets,
                "accuracy_mean": curve,
                "accuracy_per_seed": [curve],
                "labels_saved": None,
                "labels_saved_at_least": None,
                "labels_saved_at_budget": 1.5 if name == "margin" else None,
                "area_under_curve": sum(curve) / 2,
            }
            for name, curve in strategies.items()
        },
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_runs_on_one_data_set_merge_and_plot(tmp_path, capsys):
    write_results(tmp_path / "a", "data/trec6/train.csv", {"random": [0.5, 0.6], "margin": [0.55, 0.7]})
    write_results(tmp_path / "b", "data/trec6/train.csv", {"random": [0.1, 0.1], "hybrid:x=1": [0.4, 0.8]})
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| trec6", "random"],
        ["| trec6", "margin"],
        ["| trec6", "hybrid:x=1"],
    ]
    assert lines[0].split(" | ")[3] == "0.500@100, 0.600@200"  # the first run's random, not the repeat
    assert lines[2].endswith("| -0.100 |")  # worst gap to that random at budgets >= 100
    assert lines[1].split(" | ")[5:7] == ["1.50×", "+0.050 |"]  # labels saved at the last budget, then the gap
    assert (tmp_path / "plots" / "learning_curve_trec6.png").stat().st_size > 1000


def test_runs_with_other_budgets_do_not_merge(tmp_path):
    import pytest

    write_results(tmp_path / "a", "data/trec6/train.csv", {"random": [0.5, 0.6]})
    write_results(tmp_path / "b", "data/trec6/train.csv", {"random": [0.5, 0.6]}, budgets=(50, 100))
    with pytest.raises(SystemExit, match="budgets differ"):
        main([str(tmp_path / "a"), str(tmp_path / "b")])


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        (lambda results: results["arguments"].update(random_start=20), "random_start=20, unlike the first run"),
        # reported beside the arguments: embeddings made on a CPU with bf16 and on one without
        (lambda results: results.update(encoder_precision="fp32"), "encoder_precision='fp32', unlike the first run"),
    ],
)
def test_runs_replayed_with_other_settings_do_not_merge(tmp_path, setting, refusal):
    write_results(tmp_path / "a", "data/trec6/train.csv", {"random": [0.5, 0.6]})
    write_results(tmp_path / "b", "data/trec6/train.csv", {"random": [0.5, 0.6], "hybrid": [0.6, 0.7]})
    for folder in ("a", "b"):
        path = tmp_path / folder / "results.json"
        results = json.loads(path.read_text()) | {"encoder_precision": "bf16"}
        if folder == "b":
            setting(results)
        path.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=refusal):
        main([str(tmp_path / "a"), str(tmp_path / "b")])


def test_a_run_from_before_the_zero_shot_point_does_not_merge_with_a_newer_one(tmp_path):
    # labels saved counted from the zero-shot head's accuracy at 0 labels, or not: the figures would mix
    write_results(tmp_path / "old", "data/trec6/train.csv", {"random": [0.5, 0.6]})
    write_results(tmp_path / "new", "data/trec6/train.csv", {"random": [0.5, 0.6], "hybrid": [0.6, 0.7]})
    path = tmp_path / "new" / "results.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"zero_shot_accuracy": 0.4}))
    for order, older in ((["new", "old"], "this run"), (["old", "new"], "the first run")):
        with pytest.raises(SystemExit, match=f"{older} on data/trec6/train.csv predates the zero-shot point"):
            main([str(tmp_path / folder) for folder in order])


def test_runs_on_other_pools_or_test_sets_are_other_rows(tmp_path, capsys):
    write_results(tmp_path / "a", "data/trec6/train.csv", {"random": [0.5, 0.6]})
    write_results(tmp_path / "b", "data/trec6/small.csv", {"random": [0.4, 0.5]})
    write_results(tmp_path / "c", "data/trec6/small.csv", {"random": [0.3, 0.4]}, test="data/trec6/other.csv")
    write_results(tmp_path / "d", "data/ag_news/pool.csv", {"random": [0.7]}, budgets=(20,))
    main([*(str(tmp_path / name) for name in "abcd"), "--plot", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split(" | ")[0] for line in lines] == [
        "| trec6/train",
        "| trec6/small on test",
        "| trec6/small on other",
        "| ag_news",
    ]
    assert lines[3].endswith("| – |")  # no budget of 100 or more to compare at
    assert (tmp_path / "plots" / "learning_curve_trec6_small_on_other.png").exists()


def test_runs_on_other_columns_of_the_same_files_are_other_rows(tmp_path, capsys):
    # TREC-6's files hold a coarse and a fine label: margin on the fine one is no strategy beside coarse random
    write_results(tmp_path / "a", "data/trec6/train.csv", {"random": [0.5, 0.6]}, label_column="label")
    write_results(
        tmp_path / "b", "data/trec6/train.csv", {"random": [0.2, 0.3], "margin": [0.3, 0.4]}, label_column="fine"
    )
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split(" | ")[:3] for line in lines] == [
        ["| trec6 (text, label)", "random", "0.5500"],
        ["| trec6 (text, fine)", "random", "0.2500"],
        ["| trec6 (text, fine)", "margin", "0.3500"],
    ]
    assert sorted(path.name for path in (tmp_path / "plots").glob("*.png")) == [
        "learning_curve_trec6_text_fine.png",
        "learning_curve_trec6_text_label.png",
    ]


def test_the_same_files_spelled_two_ways_are_two_rows_not_one_lost(tmp_path, capsys):
    write_results(tmp_path / "a", "../data/trec6/train.csv", {"random": [0.5, 0.6]}, test="../data/trec6/test.csv")
    write_results(tmp_path / "b", "/home/me/data/trec6/train.csv", {"random": [0.4, 0.5], "margin": [0.5, 0.7]})
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| ../data/trec6/train.csv on ../data/trec6/test.csv", "random"],
        ["| /home/me/data/trec6/train.csv on data/trec6/test.csv", "random"],
        ["| /home/me/data/trec6/train.csv on data/trec6/test.csv", "margin"],
    ]
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2


def test_a_folder_without_results_is_left_out_saying_so(tmp_path, capsys):
    write_results(tmp_path / "a", "data/trec6/train.csv", {"random": [0.5, 0.6]})
    (tmp_path / "interrupted").mkdir()  # backend.evaluate makes --out first and writes results.json last
    main([str(tmp_path / "a"), str(tmp_path / "interrupted")])
    captured = capsys.readouterr()
    assert [line.split(" | ")[:2] for line in captured.out.splitlines()[2:]] == [["| trec6", "random"]]
    assert f"{tmp_path / 'interrupted'}: no results.json, left out" in captured.err


def test_accuracy_is_shown_at_the_last_budget_when_it_is_none_of_the_usual(tmp_path, capsys):
    write_results(tmp_path / "a", "data/small/train.csv", {"random": [0.5, 0.6, 0.65]}, budgets=(30, 60, 90))
    main([str(tmp_path / "a")])
    assert capsys.readouterr().out.splitlines()[2].split(" | ")[3] == "0.650@90"
