"""Predictions for Label Studio: the newest head of a project (or zero-shot) on cached embeddings."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from backend.adapters.embedding_cache import RedisEmbeddingCache
from backend.label_config import ClassificationConfig
from backend.ml.artifacts import ArtifactStore, HeadArtifact
from backend.ml.encoder import Encoder
from backend.scoring.uncertainty import confidence, labels_predicted
from backend.services.embeddings import embed_texts
from backend.services.train import zero_shot_artifact

log = logging.getLogger(__name__)

ZERO_SHOT_VERSION = "zero-shot"
INTERACTIVE_SUFFIX = "-predict"
"""Ends the model version of what /predict answers (see `interactive_version`)."""
CACHED_HEADS = 256
"""Heads a process keeps in memory (one per project, the most recently used): each is a few hundred kB at most,
and a long-running server that sees many projects, or many label configs in `/predict` bodies, must not grow."""

FALLBACK_RETRY_SECONDS = 30.0
"""How long a head loaded in place of an unreadable newest version serves before the newest is tried again."""


def model_version(prefix: str, artifact: HeadArtifact) -> str:
    """The `model_version` string Label Studio stores with predictions of this artifact.

    A zero-shot head (no version) is named by what it was built from: after the labels change, Label Studio's
    "Retrieve Predictions" must not take the old labels' zero-shot predictions for current ones (it skips tasks
    that already hold a prediction of the version `/setup` answered).
    """
    if not artifact.version:
        return "-".join(filter(None, (prefix, ZERO_SHOT_VERSION, artifact.meta.get("zero_shot_of"))))
    return f"{prefix}-{artifact.version}-{artifact.meta.get('created', '')}".rstrip("-")


def interactive_version(prefix: str, artifact: HeadArtifact) -> str:
    """The version /predict and /setup answer with: the artifact's, suffixed so it never equals a ranking's.

    Label Studio stores what /predict returns (e.g. the Data Manager's "Retrieve Predictions") under the
    version in the answer; under the live ranking's version, those confidence scores would mix into the
    priorities Uncertainty sampling serves by.
    """
    return model_version(prefix, artifact) + INTERACTIVE_SUFFIX


def version_number(version: str, prefix: str) -> int | None:
    """The round number in one of our model versions (`<prefix>-v000012-<time>` -> 12), else None."""
    match = re.fullmatch(rf"{re.escape(prefix)}-v(\d+)(-.*)?", version)
    return int(match.group(1)) if match else None


def is_our_version(version: str, prefix: str) -> bool:
    """Whether `version` names one of this backend's rankings or `/predict` answer sets (numbered or zero-shot)."""
    return bool(re.fullmatch(rf"{re.escape(prefix)}-(v\d+|{ZERO_SHOT_VERSION})(-.*)?", version))


def predicted_labels(probs: np.ndarray, labels: tuple[str, ...], multi_label: bool) -> list[list[str]]:
    """(n, k) probabilities -> chosen label names per row: the argmax, or every label with p >= 0.5."""
    if not multi_label:
        return [[labels[j]] for j in probs.argmax(axis=1)]
    return [[labels[j] for j in np.flatnonzero(row)] for row in labels_predicted(probs)]


@dataclass
class Predictor:
    """Turns tasks into Label Studio predictions. One per process; heads are cached by project and version."""

    encoder: Encoder
    store: ArtifactStore
    cache: RedisEmbeddingCache | None
    version_prefix: str = "al"

    def __post_init__(self):
        self._heads: OrderedDict[str, tuple[ClassificationConfig, str | None, HeadArtifact]] = OrderedDict()
        self._lock = threading.Lock()

    def artifact_for(
        self,
        project: str,
        config: ClassificationConfig,
        versions_are_another_projects: Callable[[], bool] = lambda: False,
    ) -> HeadArtifact:
        """The project's newest trained artifact for this config, else a zero-shot one (always, when
        `versions_are_another_projects()` says the versions kept under the project's id are another project's;
        asked only when there are versions, since it may cost a Redis call).

        Cached per process, one entry per project (the `CACHED_HEADS` most recently used): a newer version on
        disk (or one written anew under the same name, see ArtifactStore.identity), or another config, replaces it.
        A saved zero-shot version built from other label descriptions (hints edited since) is not served.
        """
        versions = self.store.versions(project) if project else []
        if versions and versions_are_another_projects():
            versions = []
        newest = self.store.identity(project, versions[-1]) if versions else None
        with self._lock:
            cached_config, cached_version, artifact, retry_at = self._heads.get(project, (None, None, None, 0.0))
            stale = cached_config != config or cached_version != newest or time.monotonic() >= retry_at
            if artifact is None or stale:
                trained = (
                    self.store.load_latest(project, config.labels, self.encoder.encoder_id, config.multi_label)
                    if versions
                    else None
                )
                zero_shot = None
                if trained is None or trained.meta.get("kind") == "zero-shot":
                    zero_shot = zero_shot_artifact(config, self.encoder, self.cache)
                    if trained is not None and trained.meta.get("zero_shot_of") != zero_shot.meta["zero_shot_of"]:
                        trained = None  # a round's zero-shot version, built from hints edited since
                artifact = trained or zero_shot
                # a fallback (the newest version unreadable, maybe only for a moment: a shared folder not yet
                # showing a renamed version) is kept a short while, then the newest is tried again
                fell_back = newest is not None and (trained is None or trained.version != versions[-1])
                retry_at = time.monotonic() + FALLBACK_RETRY_SECONDS if fell_back else float("inf")
                self._heads[project] = (config, newest, artifact, retry_at)
            self._heads.move_to_end(project)
            while len(self._heads) > CACHED_HEADS:
                self._heads.popitem(last=False)
            return artifact

    def predict(
        self,
        project: str,
        config: ClassificationConfig,
        tasks: list[dict],
        versions_are_another_projects: Callable[[], bool] = lambda: False,
    ) -> list[dict]:
        """One Label Studio prediction per task, in order: predicted choice(s) and the confidence as `score`.

        A task without the config's text field gets an empty prediction with no score (null: no confidence in
        Label Studio's score column, rather than the lowest), not an error for all (and one log line per request
        that counts such tasks).
        """
        artifact = self.artifact_for(project, config, versions_are_another_projects)
        version = interactive_version(self.version_prefix, artifact)
        texts, rows, unreadable = [], [], []
        for row, task in enumerate(tasks):
            try:
                texts.append(config.text_of(task))
                rows.append(row)
            except KeyError as exc:
                unreadable.append(exc.args[0])
        if unreadable:
            count = f"{len(unreadable)} of {len(tasks)}"
            log.warning("project %s: cannot predict %s tasks, e.g. %s", project or "?", count, unreadable[0])
        results: list[dict] = [{"result": [], "score": None, "model_version": version} for _ in tasks]
        if not texts:
            return results
        probs = artifact.head.predict_proba(embed_texts(texts, self.encoder, self.cache))
        scores = confidence(probs, config.multi_label)
        for row, chosen, score in zip(
            rows, predicted_labels(probs, config.labels, config.multi_label), scores, strict=True
        ):
            results[row] = {"result": config.result(chosen), "score": float(score), "model_version": version}
        return results
