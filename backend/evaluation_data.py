"""What `backend.evaluate` replays on: the labelled CSVs and their embeddings, cached between runs."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

CSV_FIELD_LIMIT = 2**31 - 1
"""The csv module refuses cells over 128 KiB by default; a long document is a text like any other (the encoder cuts
it at `--max-length`), so the limit is raised to what a C long holds on every platform."""

ENCODE_CHUNK = 2048
"""Texts per encoder call while filling the cache (the progress bar moves once per chunk)."""


@dataclass
class Dataset:
    embeddings: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int class index
    classes: tuple[str, ...]
    texts: list[str]


def read_labelled_csv(path: str, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Texts and labels of a CSV (a spreadsheet's byte-order mark allowed). A row with an empty (or blank) text or
    label is left out, and the run says how many and where the first was."""
    texts, labels, skipped = [], [], []
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {text_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path}: no column(s) {sorted(missing)}; columns are {reader.fieldnames}")
        for row in reader:
            text, label = row[text_column], (row[label_column] or "").strip()
            if not (text or "").strip() or not label:
                skipped.append(reader.line_num)
                continue
            texts.append(text)
            labels.append(label)
    if skipped:
        print(f"{path}: left out {len(skipped)} row(s) without a text or a label (the first ends on line {skipped[0]})")
    return texts, labels


def cached_embeddings(texts: list[str], model_name: str, cache_dir: Path, max_length: int) -> np.ndarray:
    """Embeddings of `texts`, from an .npy file keyed by encoder and texts, or encoded (and saved) now.

    The key holds the model folder's revision, as the backend's `encoder_id` does: other weights saved into the same
    `--model` folder (a fine-tuning run) are encoded again, not served the old vectors.
    """
    from backend.ml.encoder import Encoder, model_revision, resolve_model_path

    identity = [model_name, model_revision(resolve_model_path(model_name)), max_length, texts]
    key = hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:20]  # JSON: no two identities spell the same
    path = cache_dir / f"{key}.npy"
    if path.exists():
        return np.load(path).astype(np.float32)
    encoder = Encoder(model_name, max_length=max_length)
    chunks = range(0, len(texts), ENCODE_CHUNK)
    parts = [encoder.encode(texts[i : i + ENCODE_CHUNK]) for i in tqdm(chunks, desc=f"encoding {len(texts)} texts")]
    embeddings = np.concatenate(parts or [np.zeros((0, encoder.dim), np.float32)]).astype(np.float16)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    with open(partial, "wb") as handle:  # written aside, then renamed: an interrupted run leaves no half file
        np.save(handle, embeddings)
    os.replace(partial, path)
    return embeddings.astype(np.float32)
