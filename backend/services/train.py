"""Train a project's head from its annotations and save it as a new artifact version."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from backend.adapters.embedding_cache import RedisEmbeddingCache
from backend.label_config import ClassificationConfig
from backend.ml.artifacts import ArtifactStore, HeadArtifact
from backend.ml.encoder import Encoder
from backend.ml.head import fit_committee, fit_head, l2_for, one_hot, tells_labels_apart, zero_shot_head
from backend.services.embeddings import embed_texts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledTask:
    """A task's text, the choices of its newest submitted annotation, and those of the prediction it carried."""

    task_id: int
    text: str
    choices: tuple[str, ...]
    shown: tuple[str, ...] | None = None
    """The pre-annotation the annotator was shown (the last prediction a round wrote for the task), when known."""

    @property
    def corrected(self) -> bool:
        """The annotation disagrees with the prediction shown: the model got this task wrong."""
        return self.shown is not None and set(self.shown) != set(self.choices)


def latest_choices(task: dict, config: ClassificationConfig) -> tuple[str, ...] | None:
    """The choices of the newest non-skipped annotation of `task` (Label Studio's task JSON) that holds a label,
    or None. Multi-label, an annotation that ticks none says that no label applies: (), a row with every label
    negative. Single choice, it holds no label, and neither does one whose choices the config no longer has, nor one
    with several (made while the config was `choice="multiple"`). Newest, not ground truth: Label Studio marks every
    annotation imported with its task as ground truth, so that flag would let an import outrank later corrections."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    for annotation in sorted(
        annotations, key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0), reverse=True
    ):
        result = annotation.get("result")
        known = config.choices_in(result)
        if len(known) > 1 and not config.multi_label:
            continue  # several choices, made while the config allowed them: not one label for a single choice
        if known:
            return known
        if config.multi_label and config.chose_nothing(result):
            return ()
    return None


def labelled_tasks(tasks: list[dict], config: ClassificationConfig) -> list[LabelledTask]:
    """Tasks (Label Studio JSON with `annotations`) carrying a usable annotation; bad tasks are logged, skipped."""
    labelled = []
    for task in tasks:
        try:
            choices = latest_choices(task, config)
            if choices is not None:
                labelled.append(LabelledTask(int(task["id"]), config.text_of(task), choices))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping annotated task: %s", exc)
    return labelled


def zero_shot_artifact(
    config: ClassificationConfig, encoder: Encoder, cache: RedisEmbeddingCache | None
) -> HeadArtifact:
    """Cold start: a head built from the label names (or hints), before any annotation exists.

    Its meta's `zero_shot_of` is a short digest of what it was built from (encoder, labels, their descriptions)
    and of what its predictions name and read (the Choices and text tags, the text's field), so that they carry a
    model version of their own (`backend.services.predict.model_version`): Label Studio re-asks for predictions
    only under a version it has not stored, so an edited config must not answer the old config's version.
    """
    label_embeddings = embed_texts(list(config.label_descriptions), encoder, cache)
    head = zero_shot_head(label_embeddings, config.multi_label)
    built_from = json.dumps(
        [encoder.encoder_id, config.labels, config.label_descriptions, config.multi_label]
        + [config.from_name, config.to_name, config.text_source]
    )
    digest = hashlib.blake2b(built_from.encode(), digest_size=4).hexdigest()
    meta = {"kind": "zero-shot", "annotations": 0, "zero_shot_of": digest}
    return HeadArtifact(head, [], config.labels, encoder.encoder_id, meta=meta)


def train_artifact(
    examples: list[LabelledTask],
    config: ClassificationConfig,
    encoder: Encoder,
    cache: RedisEmbeddingCache | None,
    committee_size: int = 5,
    min_annotations: int = 2,
    previous: HeadArtifact | None = None,
) -> HeadArtifact:
    """Fit the head (and its committee) on `examples`; zero-shot when there are fewer than `min_annotations`, or
    when they all teach the same labels (a head fit on one class answers it for any text, with a confidence of 1).

    The l2 penalty is chosen by cross-validation, or kept from `previous` (the project's last version) while the
    annotations have grown little since it was chosen (`backend.ml.head.l2_for`).
    """
    if len(examples) < min_annotations:
        return zero_shot_artifact(config, encoder, cache)
    targets = one_hot([list(example.choices) for example in examples], config.labels)
    if not tells_labels_apart(targets):
        log.info("all %d annotations teach %s: nothing to tell labels apart by yet", len(examples), examples[0].choices)
        return zero_shot_artifact(config, encoder, cache)
    started = time.perf_counter()
    embeddings = embed_texts([example.text for example in examples], encoder, cache)
    encoded = time.perf_counter()
    l2, chosen_at = l2_for(embeddings, targets, config.multi_label, previous_l2(previous))
    chosen = time.perf_counter()
    head = fit_head(embeddings, targets, config.multi_label, l2=l2)
    committee = fit_committee(
        embeddings, targets, config.multi_label, committee_size, np.random.default_rng(len(examples)), l2=l2
    )
    meta = {
        "kind": "trained",
        "annotations": len(examples),
        "labels_digest": labels_digest(examples),
        "l2": l2,
        "l2_chosen_at": chosen_at,
        "seconds_encode": round(encoded - started, 4),
        "seconds_choose_l2": round(chosen - encoded, 4),
        "seconds_fit": round(time.perf_counter() - chosen, 4),
    }
    return HeadArtifact(head, committee, config.labels, encoder.encoder_id, meta=meta)


def labels_digest(examples: list[LabelledTask]) -> str:
    """What a head was trained on, as a short digest of every (text, choices): two versions with the same digest
    saw the same labels (a round after an import, a deletion or "Start Training" retrains on them unchanged)."""
    pairs = sorted(json.dumps([example.text, list(example.choices)]) for example in examples)
    return hashlib.blake2b("\n".join(pairs).encode("utf-8", "replace"), digest_size=8).hexdigest()


def previous_l2(previous: HeadArtifact | None) -> tuple[float, int] | None:
    """(l2, annotations it was chosen on) recorded by a trained version; None for zero-shot or older versions."""
    meta = previous.meta if previous is not None else {}
    try:
        return float(meta["l2"]), int(meta["l2_chosen_at"])
    except (KeyError, TypeError, ValueError):
        return None


def train_project(
    project: str,
    tasks: list[dict],
    config: ClassificationConfig,
    encoder: Encoder,
    cache: RedisEmbeddingCache | None,
    store: ArtifactStore,
    committee_size: int = 5,
    min_annotations: int = 2,
) -> HeadArtifact:
    """Training entry point: Label Studio tasks (with annotations) in, a new saved artifact version out."""
    examples = labelled_tasks(tasks, config)
    previous = store.load_latest(project, config.labels, encoder.encoder_id, config.multi_label)
    artifact = train_artifact(examples, config, encoder, cache, committee_size, min_annotations, previous)
    return save_version(project, artifact, store)


def save_version(project: str, artifact: HeadArtifact, store: ArtifactStore) -> HeadArtifact:
    """Stamp `artifact` with its creation time, save it as the project's next version, return it with that name."""
    artifact.meta["created"] = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    version = store.save(project, artifact)
    log.info(
        "project %s: saved head %s (%s, %d annotations)",
        project,
        version,
        artifact.meta["kind"],
        artifact.meta["annotations"],
    )
    return dataclasses.replace(artifact, version=version)
