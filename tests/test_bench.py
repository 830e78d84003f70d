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
    tokenize, model = map(float, re.search(r"tokenize_seconds=([\d.]+) model_seconds=([\d.]+)", out).groups())
    assert tokenize > 0 and model > 0 and float(lines["seconds"].split()[0]) >= model
    assert set(shares) == {"end_to_end", "model_only"} and shares["model_only"] >= shares["end_to_end"]


def test_an_unknown_random_shape_names_the_known_ones():
    with pytest.raises(SystemExit, match="shape must be one of minilm-l6, bert-base"):
        bench.random_model_folder("gpt-5", tokenizer_path=None)
