"""The benchmarks' arithmetic, and `bench encode` on a random model built offline (figures are not asserted)."""

import re

import pytest

from backend import bench


def test_encoder_flops_count_projections_attention_and_feed_forward():
    # one layer, d = 2, f = 3, sequences of 1 and 2 tokens:
    # L=1: 8·1·4 + 4·1·2 + 4·1·2·3 = 32 + 8 + 24 = 64;  L=2: 8·2·4 + 4·4·2 + 4·2·2·3 = 64 + 32 + 48 = 144
    assert bench.encoder_matmul_flops([1, 2], layers=1, hidden=2, intermediate=3) == 64 + 144
    assert bench.encoder_matmul_flops([1, 2], layers=3, hidden=2, intermediate=3) == 3 * (64 + 144)
    # MiniLM-L6 on a 48-token text: ~1 GFLOP, twice its 10.6M non-embedding weights per token plus attention
    assert bench.encoder_matmul_flops([48], 6, 384, 1536) == pytest.approx(1.040e9, rel=1e-3)


def test_encode_on_a_random_shape_states_its_share_of_the_peak(tiny_bert, monkeypatch, capsys, tmp_path):
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    monkeypatch.setitem(bench.RANDOM_SHAPES, "test-tiny", shape)
    csv_path = tmp_path / "texts.csv"
    csv_path.write_text("text\n" + "\n".join(f"short text number {i} about markets" for i in range(40)) + "\n")
    bench.main(
        ["encode", "--model", "random:test-tiny", "--tokenizer", tiny_bert, "--csv", str(csv_path), "--repeat", "1"]
    )
    out = capsys.readouterr().out
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line.split()[0])
    assert lines["layers"].startswith("2 hidden=32 intermediate=64")
    assert "measured" in lines["peak_tflops"] and float(lines["texts_per_second"]) > 0
    shares = {}  # "<timing>: share_of_peak=12.3% useful, ..." for the whole call and for the forward passes
    for line in out.splitlines():
        timing, _, rest = line.partition(": share_of_peak=")
        if rest:
            shares[timing] = float(rest.split("%")[0])
    assert lines["texts"].startswith("40 ") and int(re.search(r"batches=(\d+)", out)[1]) >= 1
    tokenize, model = map(float, re.search(r"tokenize_seconds=([\d.]+) model_seconds=([\d.]+)", out).groups())
    assert model > 0 and tokenize + model == pytest.approx(float(lines["seconds"].split()[0]), abs=2e-3)
    assert set(shares) == {"end_to_end", "model_only"} and shares["end_to_end"] > 0


def test_rerank_times_each_stage_and_ends_with_their_sum(capsys):
    bench.main(["rerank", "--tasks", "3000", "--labelled", "60", "--top-k", "10"])
    lines = capsys.readouterr().out.splitlines()
    stages = dict(re.fullmatch(r"\s*(\w+):\s+([\d.]+) s", line).groups() for line in lines if line.endswith(" s"))
    assert list(stages) == ["synthesise", "choose_l2", "train_head_and_committee", "proba_head_and_committee"] + [
        "select_hybrid"
    ]
    last = re.fullmatch(r"rerank_seconds=([\d.]+)", lines[-1])
    timed = sum(float(seconds) for name, seconds in stages.items() if name != "synthesise")
    assert last and float(last[1]) == pytest.approx(timed, abs=3e-3)  # synthesising the embeddings is not timed
    assert lines[0].startswith("tasks=3000 ") and int(re.search(r"peak_rss_mb=(\d+)", "\n".join(lines))[1]) > 0


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["rerank", "--strategy", "nope"], "--strategy 'nope': one of badge, bald, "),
        (["rerank", "--tasks", "50", "--labelled", "40"], "--labelled 40 + --top-k 20 must not exceed --tasks 50"),
        (["rerank", "--classes", "1"], "--classes must be at least 2, got 1"),
        (["rerank", "--labelled", "0"], "argument --labelled: must be at least 1, got 0"),
        (["encode", "--csv", "/no/such.csv"], "--csv: /no/such.csv: No such file or directory"),
        (["encode", "--csv", "{label_only}"], "has no 'text' column (columns: ['label'])"),
        (["encode", "--csv", "{header_only}"], "has no rows"),
    ],
)
def test_bad_arguments_are_usage_errors_before_anything_is_loaded(tmp_path, capsys, arguments, expected):
    (tmp_path / "label_only.csv").write_text("label\nWorld\n")
    (tmp_path / "header_only.csv").write_text("text\n")
    files = {"label_only": tmp_path / "label_only.csv", "header_only": tmp_path / "header_only.csv"}
    with pytest.raises(SystemExit) as exit_:
        bench.main([argument.format(**files) for argument in arguments])
    assert exit_.value.code == 2  # argparse's usage error, not a traceback
    assert expected in capsys.readouterr().err


def test_an_unknown_random_shape_names_the_known_ones():
    with pytest.raises(SystemExit, match="shape must be one of minilm-l6, bert-base"):
        bench.random_model_folder("gpt-5", tokenizer_path=None)
