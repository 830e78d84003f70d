"""Fine-tuning the encoder (LP-FT) on the tiny offline BERT: it learns, leaves the original alone, is repeatable."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModel

from backend.ml.encoder import Encoder
from backend.ml.finetune import FineTuneConfig, finetune_encoder
from backend.ml.head import fit_head
from tests.conftest import read_csv
from tests.helpers import choices_result

FAST = FineTuneConfig(epochs=12, batch_size=8, learning_rate=1e-3, head_learning_rate=1e-2)
"""A tiny random BERT needs a larger step than a pretrained one to move in a few epochs."""


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder(tiny_bert, max_length=32, batch_tokens=256)


@pytest.fixture(scope="module")
def sports_or_business():
    rows = [row for row in read_csv("ag_news/pool.csv", 400) if row["label"] in ("Sports", "Business")][:48]
    texts = [row["text"] for row in rows]
    targets = np.array([[row["label"] == "Sports", row["label"] == "Business"] for row in rows], dtype=np.float32)
    return texts, targets


def cross_entropy(head, embeddings, targets) -> float:
    logits = torch.as_tensor(head.logits(embeddings))
    return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(targets.argmax(axis=1))))


def test_finetuning_fits_the_labelled_texts_better_than_the_probe(encoder, sports_or_business):
    texts, targets = sports_or_business
    frozen = encoder.encode(texts)
    probe = fit_head(frozen, targets, multi_label=False, l2=1e-1)
    tuned, head = finetune_encoder(encoder, texts, targets, probe, FAST)
    before = cross_entropy(probe, frozen, targets)
    after = cross_entropy(head, tuned.encode(texts), targets)
    assert after < 0.5 * before, (before, after)
    assert np.mean(head.predict_proba(tuned.encode(texts)).argmax(axis=1) == targets.argmax(axis=1)) == 1.0


def test_finetuning_leaves_the_original_encoder_alone_and_names_its_copy(encoder, sports_or_business):
    texts, targets = sports_or_business
    frozen = encoder.encode(texts)
    probe = fit_head(frozen, targets, multi_label=False)
    tuned, _ = finetune_encoder(encoder, texts[:16], targets[:16], probe, FineTuneConfig(epochs=1, batch_size=8))
    np.testing.assert_array_equal(encoder.encode(texts), frozen)
    assert tuned.encoder_id != encoder.encoder_id  # its embeddings never share a cache entry with the frozen ones
    assert not np.allclose(tuned.encode(texts), frozen)


def test_finetuning_is_deterministic_under_a_seed(encoder, sports_or_business):
    texts, targets = sports_or_business
    probe = fit_head(encoder.encode(texts), targets, multi_label=False)
    config = FineTuneConfig(epochs=1, batch_size=8, seed=3)
    first, _ = finetune_encoder(encoder, texts[:16], targets[:16], probe, config)
    second, _ = finetune_encoder(encoder, texts[:16], targets[:16], probe, config)
    np.testing.assert_allclose(first.encode(texts), second.encode(texts), atol=1e-6)


@pytest.mark.parametrize(
    "field, value", [("epochs", 0), ("batch_size", -1), ("learning_rate", 0.0), ("head_learning_rate", -1e-3)]
)
def test_bad_finetune_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FineTuneConfig(**{field: value})


def test_the_commands_bad_numbers_are_a_usage_error_before_label_studio_is_read(capsys, monkeypatch):
    from backend import finetune

    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")  # nothing listens there: a read would fail
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "key")
    with pytest.raises(SystemExit) as exit_:
        finetune.main(["--project", "1", "--out", "unused", "--epochs", "0"])
    assert exit_.value.code == 2 and "epochs must be a positive integer, got 0" in capsys.readouterr().err


def test_mismatched_texts_and_targets_are_refused(encoder, sports_or_business):
    texts, targets = sports_or_business
    probe = fit_head(encoder.encode(texts), targets, multi_label=False)
    with pytest.raises(ValueError, match="matching"):
        finetune_encoder(encoder, texts[:3], targets[:5], probe)


def annotated_task(task_id: int, text: str, label: str) -> dict:
    """A task as Label Studio's export returns it, with one submitted annotation."""
    return {"id": task_id, "data": {"text": text}, "annotations": [{"id": task_id, "result": choices_result(label)}]}


def test_project_finetuning_writes_a_model_folder_that_loads_as_the_encoder(encoder, sports_or_business, tmp_path):
    from backend.finetune import finetune_on_tasks
    from backend.label_config import parse_label_config
    from tests.conftest import AG_NEWS_CONFIG

    texts, targets = sports_or_business
    tasks = [
        annotated_task(i, text, "Sports" if row[0] else "Business")
        for i, (text, row) in enumerate(zip(texts, targets, strict=True))
    ]
    tasks.append({"id": 999, "data": {"text": "not annotated"}, "annotations": []})
    out = str(tmp_path / "tuned")
    summary = finetune_on_tasks(tasks, parse_label_config(AG_NEWS_CONFIG), encoder, out, FineTuneConfig(epochs=1))
    assert summary["annotations"] == len(texts)
    loaded = Encoder(out, max_length=32)
    assert loaded.pooling == encoder.pooling and loaded.dim == encoder.dim
    assert Encoder(out).max_length == encoder.max_length == 32  # MAX_LENGTH auto: the length it was tuned at
    assert loaded.encoder_id != encoder.encoder_id
    assert not np.allclose(loaded.encode(texts[:4]), encoder.encode(texts[:4]))
    finetune_on_tasks(tasks[:20], parse_label_config(AG_NEWS_CONFIG), encoder, out, FineTuneConfig(epochs=1))
    again = Encoder(out, max_length=32)  # tuned again into the same folder: new weights, so a new cache space
    assert again.encoder_id not in (loaded.encoder_id, encoder.encoder_id)
    assert Encoder(out, max_length=32).encoder_id == again.encoder_id  # and every process agrees on it


def test_project_finetuning_needs_annotations(encoder, tmp_path):
    from backend.finetune import finetune_on_tasks
    from backend.label_config import parse_label_config
    from tests.conftest import AG_NEWS_CONFIG

    with pytest.raises(SystemExit, match="at least 2 annotated tasks"):
        finetune_on_tasks(
            [annotated_task(1, "one", "Sports")], parse_label_config(AG_NEWS_CONFIG), encoder, str(tmp_path), FAST
        )


def test_an_encoder_running_in_bf16_is_tuned_from_its_exact_fp32_weights(tiny_bert, sports_or_business):
    texts, targets = sports_or_business
    half = Encoder(tiny_bert, device="cpu", max_length=32, batch_tokens=256, dtype="bf16")
    probe = fit_head(half.encode(texts), targets, multi_label=False, l2=1e-1)
    still = FineTuneConfig(epochs=1, batch_size=8, learning_rate=1e-9, head_learning_rate=1e-9)  # barely moves
    tuned, _ = finetune_encoder(half, texts, targets, probe, still)
    assert tuned.weights_dtype == torch.float32 and half.weights_dtype == torch.bfloat16  # the original untouched
    name = "encoder.layer.0.attention.self.query.weight"
    exact = Encoder(tiny_bert, device="cpu", dtype="fp32").model.state_dict()[name]
    rounded = exact.to(torch.bfloat16).float()
    assert torch.max(torch.abs(rounded - exact)).item() > 1e-5  # what starting from the bf16 copy would leave
    assert torch.max(torch.abs(tuned.model.state_dict()[name] - exact)).item() < 1e-6


@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "lasttoken"])
def test_a_saved_encoder_loads_again_with_its_pooling(encoder, tmp_path, monkeypatch, pooling):
    from backend.ml.finetune import save_encoder

    monkeypatch.setattr(encoder, "pooling", pooling)
    save_encoder(encoder, str(tmp_path / pooling))
    assert Encoder(str(tmp_path / pooling), max_length=32).pooling == pooling


def test_a_folder_tuned_into_while_a_process_loads_it_is_loaded_again_whole(
    encoder, sports_or_business, tmp_path, monkeypatch, caplog
):
    """New weights land in the folder after a process read its revision and before it read the weights (tuning
    again into the folder the servers load from). The process must end with one model's weights and that model's
    revision, else it would cache one model's embeddings under the other's id, for every process after it."""
    import backend.ml.encoder as encoder_module
    from backend.ml.finetune import save_encoder

    texts, targets = sports_or_business
    probe = fit_head(encoder.encode(texts), targets, multi_label=False)
    first, _ = finetune_encoder(encoder, texts[:16], targets[:16], probe, replace(FAST, epochs=1, seed=1))
    second, _ = finetune_encoder(encoder, texts[:16], targets[:16], probe, replace(FAST, epochs=1, seed=2))
    folder = tmp_path / "tuned"
    save_encoder(first, str(folder))
    loads = []

    def load_while_tuned_again(path):
        model = AutoModel.from_pretrained(path)
        loads.append(path)
        if len(loads) == 1:
            save_encoder(second, str(folder))  # another process writes its new model into the folder just now
        return model

    monkeypatch.setattr(encoder_module, "AutoModel", SimpleNamespace(from_pretrained=load_while_tuned_again))
    loaded = Encoder(str(folder), max_length=32, batch_tokens=256, dtype="fp32")
    assert len(loads) == 2 and "loading it again" in caplog.text
    assert loaded.revision.startswith(f"{second.revision}-") and second.revision != first.revision  # + files' hash
    assert not np.allclose(first.encode(texts[:4]), second.encode(texts[:4]), atol=1e-3)
    np.testing.assert_allclose(loaded.encode(texts[:4]), second.encode(texts[:4]), atol=1e-5)
    assert not list(folder.glob(".staging-*"))  # nothing of the writer's left behind
