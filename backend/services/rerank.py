"""One ranking round: read Label Studio, retrain, score the pool, publish the new order.

Label Studio's Uncertainty sampling serves, among tasks with a prediction of `project.model_version`, the one
with the lowest `score`. A round therefore writes one prediction per top-K task under a fresh model version,
score = rank / K (0 = serve first), each carrying the predicted choice as a pre-annotation, then switches the
project to that version. Old versions are deleted afterwards by a separate job, never the current one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from backend.label_config import ClassificationConfig, parse_label_config
from backend.ml.artifacts import HeadArtifact
from backend.ml.head import one_hot, proba_of_heads
from backend.scoring.base import Pool
from backend.scoring.registry import get_strategy
from backend.services.embeddings import embed_texts
from backend.services.predict import model_version, predicted_labels
from backend.services.train import LabelledTask, labelled_tasks, train_artifact

log = logging.getLogger(__name__)


@dataclass
class ProjectState:
    """What a round reads from Label Studio: the config, every task's text, and the annotated ones."""

    config: ClassificationConfig
    model_version: str
    task_ids: list[int]
    texts: list[str]
    labelled: list[LabelledTask]
    fingerprint: str


@dataclass
class Stopwatch:
    """Seconds per named stage, in order."""

    stages: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(now - self._last, 4)
        self._last = now


def annotation_fingerprint(tasks: list[dict]) -> str:
    """A digest of every task id and its annotations' ids and update times: changes whenever labels do."""
    digest = hashlib.sha1()
    for task in sorted(tasks, key=lambda t: t["id"]):
        stamps = sorted(
            (a.get("id") or 0, str(a.get("updated_at") or ""), bool(a.get("was_cancelled")))
            for a in task.get("annotations") or []
        )
        digest.update(repr((task["id"], stamps)).encode())
    return digest.hexdigest()


def read_project_state(label_studio, project: int) -> ProjectState:
    """Read the project through the API (paged): config, all task texts, annotations. Bad tasks are skipped."""
    info = label_studio.get_project(project)
    config = parse_label_config(info["label_config"])
    tasks = list(label_studio.iter_tasks(project))
    labelled = labelled_tasks(tasks, config)
    annotated_ids = {task["id"] for task in tasks if task.get("annotations")}
    task_ids, texts = [], []
    for task in tasks:
        if task["id"] in annotated_ids:
            continue
        try:
            texts.append(config.text_of(task))
            task_ids.append(int(task["id"]))
        except KeyError as exc:
            log.warning("project %s: task left out of the ranking: %s", project, exc)
    return ProjectState(
        config, info.get("model_version") or "", task_ids, texts, labelled, annotation_fingerprint(tasks)
    )


def build_pool(
    state: ProjectState, artifact: HeadArtifact, unlabelled_embeddings: np.ndarray, labelled_embeddings: np.ndarray
) -> Pool:
    """Stack unlabelled rows (first) and labelled rows into the arrays strategies work on."""
    embeddings = np.concatenate([unlabelled_embeddings, labelled_embeddings]).astype(np.float32)
    n_unlabelled = len(unlabelled_embeddings)
    labeled = np.zeros(len(embeddings), dtype=bool)
    labeled[n_unlabelled:] = True
    targets = np.zeros((len(embeddings), len(state.config.labels)), dtype=np.float32)
    if state.labelled:
        targets[n_unlabelled:] = one_hot([list(example.choices) for example in state.labelled], state.config.labels)
    all_probs = proba_of_heads([artifact.head, *artifact.committee], embeddings)  # one pass over the matrix
    return Pool(
        embeddings=embeddings,
        probs=all_probs[0],
        labeled=labeled,
        committee_probs=all_probs[1:] if artifact.committee else None,
        multi_label=state.config.multi_label,
        targets=targets,
        head_weights=artifact.head.weights,
    )


def priority_predictions(state: ProjectState, pool: Pool, picks: np.ndarray, version: str) -> list[dict]:
    """Label Studio predictions for the picked rows: score = rank / K, so the first pick is served first."""
    chosen = predicted_labels(pool.probs[picks], state.config.labels, state.config.multi_label)
    return [
        {
            "task": state.task_ids[row],
            "result": state.config.result(labels),
            "score": round(rank / len(picks), 6),
            "model_version": version,
        }
        for rank, (row, labels) in enumerate(zip(picks, chosen, strict=True))
    ]


def rerank(project: str, runtime, generation: int) -> dict:
    """Run one round for `project` and return its summary (also recorded for /metrics)."""
    settings = runtime.settings
    watch = Stopwatch()
    state = read_project_state(runtime.label_studio, int(project))
    watch.lap("read_label_studio")
    encoder, cache = runtime.encoder, runtime.embedding_cache
    labelled_embeddings = embed_texts([example.text for example in state.labelled], encoder, cache)
    unlabelled_embeddings = embed_texts(state.texts, encoder, cache)
    watch.lap("encode")
    artifact = train_artifact(
        state.labelled, state.config, encoder, cache, settings.committee_size, settings.min_annotations_to_train
    )
    artifact.meta["created"] = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    version_name = runtime.artifacts.save(project, artifact)
    artifact = runtime.artifacts.load(project, version_name)
    version = model_version(settings.model_version_prefix, artifact)
    watch.lap("train")
    params = runtime.registry.params(project)
    strategy = get_strategy(params.get("strategy", settings.strategy), **params.get("strategy_params", {}))
    pool = build_pool(state, artifact, unlabelled_embeddings, labelled_embeddings)
    top_k = int(params.get("rank_top_k", settings.rank_top_k))
    picks = strategy.select(pool, min(top_k, len(state.task_ids)), np.random.default_rng(generation))
    watch.lap("score")
    summary = {
        "model_version": version,
        "generation": generation,
        "annotations": len(state.labelled),
        "unlabelled": len(state.task_ids),
        "ranked": int(len(picks)),
        "strategy": repr(strategy),
        "top_task": state.task_ids[picks[0]] if len(picks) else None,
        "fingerprint": state.fingerprint,
        "published": False,
        "finished_at": time.time(),
    }
    if len(picks) and runtime.queue.may_publish(project, generation):
        runtime.label_studio.create_predictions(priority_predictions(state, pool, picks, version))
        runtime.label_studio.set_model_version(int(project), version)
        runtime.registry.set_live_version(project, version)
        summary["published"] = True
        watch.lap("publish")
        runtime.queue.enqueue_cleanup(project, version)
    summary["seconds"] = watch.stages
    summary["seconds_total"] = round(sum(watch.stages.values()), 4)
    runtime.registry.record_round(project, summary)
    log.info(
        "project %s: round %s %s",
        project,
        version,
        {k: summary[k] for k in ("annotations", "unlabelled", "top_task", "published", "seconds_total")}
        | {"stages": watch.stages},
    )
    return summary
