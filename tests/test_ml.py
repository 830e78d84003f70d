import numpy as np
import pytest
import torch

from backend.ml.artifacts import ArtifactStore, HeadArtifact
from backend.ml.encoder import Encoder
from backend.ml.head import fit_committee, fit_head, one_hot, zero_shot_head


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder(tiny_bert, max_length=32, batch_tokens=128)


def test_encoder_rows_are_normalised_and_keep_input_order(encoder):
    texts = ["short", "a much longer text about markets and stocks and bonds", "mid length text here", "short"]
    together = encoder.encode(texts)
    one_by_one = np.concatenate([encoder.encode([text]) for text in texts])
    assert together.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)  # sorting and padding change nothing
    np.testing.assert_allclose(together[0], together[3])


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


def test_committee_members_differ_but_agree_on_easy_points():
    x = np.array([[1.0, 0.0], [0.0, 1.0]] * 10)
    targets = np.array([[1, 0], [0, 1]] * 10, dtype=np.float32)
    committee = fit_committee(x, targets, False, size=3, rng=np.random.default_rng(1))
    assert len(committee) == 3
    assert all((member.predict_proba(x[:2]).argmax(axis=1) == [0, 1]).all() for member in committee)


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
    latest = store.load_latest("7", ("a", "b"), "enc")
    assert latest.version == "v000002" and latest.meta == {"seed": 2} and len(latest.committee) == 1
    assert store.load_latest("7", ("a", "c"), "enc") is None  # labels changed: zero-shot again


@pytest.mark.parametrize("damage", ["replaced", "truncated"])
def test_a_corrupt_artifact_falls_back_to_the_previous_version(tmp_path, caplog, damage):
    store = ArtifactStore(tmp_path)
    store.save("7", _artifact(1))
    store.save("7", _artifact(2))
    head = store.project_dir("7") / "v000002" / "head.npz"
    head.write_bytes(b"not an npz" if damage == "replaced" else head.read_bytes()[: head.stat().st_size // 2])
    assert store.load_latest("7", ("a", "b"), "enc").version == "v000001"
    assert "v000002 is unreadable" in caplog.text


def test_project_ids_cannot_escape_model_dir(tmp_path):
    with pytest.raises(ValueError, match="project id"):
        ArtifactStore(tmp_path).project_dir("../etc")


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
