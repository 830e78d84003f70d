"""The arrays a strategy ranks: the project's embedding matrix (from its matrix file, else from Redis) with the
labelled rows at the end, and the head's and committee's probabilities over all of it.
"""

from __future__ import annotations

import logging

import numpy as np

from backend.adapters.embedding_cache import EmbeddingsMissing
from backend.ml.artifacts import HeadArtifact
from backend.ml.head import one_hot, proba_of_heads
from backend.scoring.base import Pool
from backend.services.project_state import ProjectState

log = logging.getLogger(__name__)


def build_pool(
    state: ProjectState, artifact: HeadArtifact, embeddings: np.ndarray, labelled_embeddings: np.ndarray
) -> Pool:
    """The arrays strategies work on: `embeddings` holds the unlabelled rows first and spare rows for the
    labelled ones (see `cached_matrix`), which are written in place: one copy of the matrix."""
    n_unlabelled = len(state.text_keys)
    embeddings[n_unlabelled:] = labelled_embeddings
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
        mistakes=np.concatenate([np.zeros(n_unlabelled, bool), np.array([e.corrected for e in state.labelled], bool)]),
    )


def cached_matrix(cache, keys: list[bytes], spare_rows: int = 0) -> np.ndarray:
    """(n + spare_rows, d) float16 matrix: the cached embeddings of `keys`, then `spare_rows` zero rows (for the
    labelled tasks); a missing embedding means the snapshot is stale."""
    matrix, missing = cache.fill_matrix(keys, spare_rows)
    if missing:
        raise EmbeddingsMissing(missing)
    return matrix


def pool_matrix(runtime, project: str, state: ProjectState) -> tuple[np.ndarray, str]:
    """`cached_matrix` of the unlabelled tasks, read from the project's matrix file (`MatrixFiles`), which is
    written first when the task list changed since it was last written (from the embedding cache; after an
    import, from the previous file and, for the imported tasks, the cache); and where the vectors came from:
    "file", "file and cache, then file" (after an import), "cache, then file" or, when the file cannot be
    written or read, "cache"."""
    files, cache, spare_rows = runtime.matrix_files, runtime.embedding_cache, len(state.labelled)
    try:
        matrix = files.read(project, cache, state.snapshot_keys, state.unlabelled_rows, spare_rows)
        if matrix is not None:
            return matrix, "file"
        from_cache = files.write(project, cache, state.snapshot_keys)  # EmbeddingsMissing when vectors are missing
        matrix = files.read(project, cache, state.snapshot_keys, state.unlabelled_rows, spare_rows)
        if matrix is not None:
            return matrix, "cache, then file" if from_cache == len(state.snapshot_keys) else "file and cache, then file"
    except OSError as exc:
        log.warning("project %s: matrix file unusable, reading the embeddings from Redis: %s", project, exc)
    return cached_matrix(cache, state.text_keys, spare_rows), "cache"
