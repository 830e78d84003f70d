"""What `backend.evaluate` replays on: the labelled CSVs and their embeddings, cached between runs."""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

CSV_FIELD_LIMIT = 2**31 - 1
"""The csv module refuses cells over 128 KiB by default; a long document is a text like any other (the encoder cuts
it at `--max-length`), so the limit is raised to what a C long holds on every platform."""

DELIMITERS = ",;\t|"
"""Column separators tried, in this order, on the header: the first that splits out both columns is used."""

ENCODE_CHUNK = 2048
"""Texts per encoder call while filling the cache (the progress bar moves once per chunk)."""


@dataclass
class Dataset:
    embeddings: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int class index
    classes: tuple[str, ...]
    texts: list[str]


def read_labelled_csv(path: str, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Texts and labels of a CSV (read as `csv_text` says). A row with an empty (or blank) text or label is left
    out, and the run says how many and where the first was. A file whose header holds both columns when split at
    semicolons, tabs or bars (a spreadsheet in a locale with decimal commas, a TSV) is split there."""
    texts, labels, skipped = [], [], []
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with csv_text(path) as handle:
        header = handle.readline()
        delimiter = next(
            (d for d in DELIMITERS if {text_column, label_column} <= set(next(csv.reader([header], delimiter=d), []))),
            ",",
        )
        reader = csv.DictReader(itertools.chain([header], handle), delimiter=delimiter)  # each line decoded once
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


CP1252_FALLBACK = "backend.evaluation_data.cp1252"
"""The codec error handler `csv_text` registers: undecodable bytes read as Windows-1252."""


@contextlib.contextmanager
def csv_text(path: str) -> Iterator[TextIO]:
    """A CSV file opened as text, streamed: UTF-8 (a spreadsheet's byte-order mark allowed), or UTF-16 after its
    byte-order mark (a spreadsheet's "Unicode text"). Bytes that are not UTF-8 are read as Windows-1252 (what a
    spreadsheet saves as CSV on Windows; latin-1 letters read the same), each on its own, so that one stray byte
    does not garble the UTF-8 around it; the run says how many and where the first was."""
    with open(path, "rb") as handle:
        if handle.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            with open(path, newline="", encoding="utf-16") as text:
                yield text
            return
    not_utf8: list[str] = []  # per undecodable run of bytes, the text around the first

    def as_cp1252(error: UnicodeDecodeError) -> tuple[str, int]:
        bad = error.object[error.start : error.end]
        around = error.object[max(0, error.start - 20) : error.end + 20] if not not_utf8 else b""
        not_utf8.extend([around.decode("utf-8", errors="backslashreplace")] + [""] * (len(bad) - 1))
        return bad.decode("cp1252", errors="replace"), error.end

    codecs.register_error(CP1252_FALLBACK, as_cp1252)
    with open(path, newline="", encoding="utf-8-sig", errors=CP1252_FALLBACK) as text:
        yield text
    if not_utf8:
        print(f"{path}: {len(not_utf8)} byte(s) not UTF-8, read as Windows-1252 (cp1252); the first in {not_utf8[0]!r}")


def cached_embeddings(texts: list[str], model_name: str, cache_dir: Path, max_length: int) -> np.ndarray:
    """Embeddings of `texts`, from an .npy file keyed by encoder and texts, or encoded (and saved) now.

    The key holds the model folder's revision, as the backend's `encoder_id` does: other weights saved into the same
    `--model` folder (a fine-tuning run) are encoded again, not served the old vectors. (A hub name is keyed by the
    name alone: these are development caches, `--cache-dir`, to delete when the model changes.) It holds the length
    asked for, auto (0) resolved, so that `--max-length 0` and the model's own length share one file, and the
    precision this machine encodes in (`encoding_precision`), so that a run's results.json names the one its
    embeddings were made in: replays diverge from the first pick that a last-digit difference changes.
    """
    from backend.adapters.embedding_cache import zero_non_finite
    from backend.ml.encoder import Encoder
    from backend.ml.model_files import max_length_asked, model_revision, resolve_model_path

    model_path = resolve_model_path(model_name)
    asked = max_length_asked(model_path, max_length)
    identity = [model_name, model_revision(model_path), asked, texts, encoding_precision()]
    key = hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:20]  # JSON: no two identities spell the same
    path = cache_dir / f"{key}.npy"
    if path.exists():
        return zero_non_finite(np.load(path).astype(np.float32), f"cached embeddings in {path}")
    encoder = Encoder(model_name, max_length=max_length)
    chunks = range(0, len(texts), ENCODE_CHUNK)
    parts = [encoder.encode(texts[i : i + ENCODE_CHUNK]) for i in tqdm(chunks, desc=f"encoding {len(texts)} texts")]
    embeddings = np.concatenate(parts or [np.zeros((0, encoder.dim), np.float32)])
    # as the backend: a model overflowing under fp16 autocast (a pre-Ampere GPU) gives NaN, which no head trains on
    embeddings = zero_non_finite(embeddings, "texts encoded").astype(np.float16)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with replaced_whole(path) as partial, open(partial, "wb") as handle:  # an interrupted run leaves no half file
        np.save(handle, embeddings)
    return embeddings.astype(np.float32)


def encoding_precision() -> str:
    """The precision the encoder runs in on this machine with ENCODER_DTYPE auto, as `backend.ml.encoder.precision`
    picks it: "bf16" on a CPU that multiplies bf16 in hardware, "fp32" on other CPUs, "fp32+bf16 autocast" (or
    fp16) on a GPU."""
    from backend.ml.encoder import pick_device, precision

    weights, autocast = precision("auto", pick_device("auto"))
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    return names[str(weights)] + (f"+{names[str(autocast)]} autocast" if autocast else "")


@contextlib.contextmanager
def replaced_whole(path: Path) -> Iterator[Path]:
    """A file to write `path`'s new content to, renamed over `path` once written: an interrupted run leaves the
    earlier file whole (and no partial one), never half of the new one."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")  # the suffix names the format
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
