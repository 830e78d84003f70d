"""A project's embedding matrix as one file, in task-list order, so that a round reads it in one go.

Reading a million vectors out of Redis takes ~10 s on a 2-core machine (HMGET in chunks, one small array per
vector); reading the same 733 MB from a file that the OS keeps in its page cache takes well under a second
(`python -m benchmarks.matrix_load`). The file is a copy of what the Redis embedding cache holds for one ordered
list of text keys, whose digest is in its header: a round whose task list changed finds the digest different
and writes the file again from Redis. It can be deleted at any time.

Layout: <folder>/<project>-<encoder>.f16 = a 64-byte header (magic, BLAKE2b-256 of the keys, rows, dimension),
then rows x dimension float16, row after row. A file is written under a temporary name and renamed into place,
so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.adapters.embedding_cache import EmbeddingsMissing

MAGIC = b"ALMATRX1"
HEADER = struct.Struct("<8s32sqq")
HEADER_BYTES = 64
COMPACT_ROWS = 16_384
"""Rows moved per step when the labelled rows are squeezed out (a 12 MB temporary at 384 dimensions)."""
ABANDONED_AFTER_SECONDS = 3600
COPY_BYTES = 16 * 2**20
ENCODER_GLOB = "[0-9a-f]" * 16


def keys_digest(keys: list[bytes]) -> bytes:
    return hashlib.blake2b(b"".join(keys), digest_size=32).digest()


class MatrixFiles:
    """Per-project matrix files under one folder (MODEL_DIR/matrices), one file per project and encoder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, project: str, cache) -> Path:
        encoder = cache.key.rsplit(":", 1)[-1]  # the Redis cache's key names the encoder (16 hex digits)
        return self.folder / f"{_checked(project)}-{encoder}.f16"

    def _project_files(self, project: str) -> list[Path]:
        """The project's matrix files, whatever their encoder (not those of a project "<project>-...")."""
        return list(self.folder.glob(f"{_checked(project)}-{ENCODER_GLOB}.f16"))

    def write(self, project: str, cache, keys: list[bytes]) -> int:
        """Write the file for `keys` from `cache`, chunk by chunk (never the whole matrix in memory); the rows
        of the previous file that hold the first of `keys` (tasks were imported since: their keys come last) are
        copied from it instead of read from Redis. Returns how many rows came from Redis.

        Raises EmbeddingsMissing, and leaves the previous file alone, when a vector is missing from the cache.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(project, cache)
        self._remove_abandoned_writes()
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(HEADER.pack(MAGIC, keys_digest(keys), len(keys), cache.dim).ljust(HEADER_BYTES, b"\0"))
                kept = _copy_rows_held(target, keys, cache.dim, file)
                for chunk, missing in cache.iter_chunks(keys[kept:]):
                    if missing:
                        raise EmbeddingsMissing(missing)
                    file.write(chunk.data)
                file.flush()
                os.fsync(file.fileno())  # before the rename: after a crash, the file is whole or absent
            os.chmod(temporary, 0o644)  # (mkstemp makes it 0600) readable by workers running as other users
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        for other_encoder in self._project_files(project):  # MODEL_NAME changed: its file is of no use
            if other_encoder != target:
                with contextlib.suppress(OSError):
                    other_encoder.unlink()
        return len(keys) - kept

    def read(self, project: str, cache, keys: list[bytes], rows: np.ndarray, spare_rows: int = 0) -> np.ndarray | None:
        """The (len(rows) + spare_rows, d) float16 matrix of rows `rows` (ascending positions in `keys`), then
        `spare_rows` zero rows; None when there is no file for exactly these keys (or it is cut short).

        The whole file is read into one array and the rows not asked for are squeezed out in place: one copy
        of the matrix in this process, whatever the size.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[0] < 0 or rows[-1] >= len(keys) or np.any(np.diff(rows) <= 0)):
            raise ValueError("rows must be ascending positions in keys")
        try:
            file = open(self.path(project, cache), "rb")  # noqa: SIM115 (closed below; absent is not an error)
        except FileNotFoundError:
            return None
        with file:
            n, dim = len(keys), cache.dim
            if _rows_held(file, keys, dim) != n:
                return None
            matrix = np.empty((max(n, len(rows) + spare_rows), dim), dtype=np.float16)
            if n and not _read_into(file, memoryview(matrix[:n]).cast("B")):  # (a view of 0 rows has no bytes)
                return None
        if len(rows) < n:
            for start in range(0, len(rows), COMPACT_ROWS):  # rows[i] >= i: each step reads rows not yet written
                step = rows[start : start + COMPACT_ROWS]
                matrix[start : start + len(step)] = matrix[step]
        matrix[len(rows) : len(rows) + spare_rows] = 0
        return matrix[: len(rows) + spare_rows]

    def _remove_abandoned_writes(self) -> None:
        """Delete temporary files left by a worker killed while writing (older than an hour: a million rows take
        ~10 s to write), of any project and encoder: a file written again within the hour, and unchanged after,
        would otherwise keep its leftover for good."""
        for leftover in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime > ABANDONED_AFTER_SECONDS:
                    leftover.unlink()

    def delete_project(self, project: str) -> None:
        temporaries = self.folder.glob(f".{_checked(project)}-{ENCODER_GLOB}.f16.*.tmp")
        for path in [*self._project_files(project), *temporaries]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _checked(project: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(project)):
        raise ValueError(f"project id must be letters, digits, '_', '.' or '-', got {project!r}")
    return str(project)


def _rows_held(file, keys: list[bytes], dim: int) -> int | None:
    """How many of the first `keys` the open matrix `file` holds (its header names them by digest, and it has all
    their bytes), positioned after the header; None when it is not a matrix file for a prefix of `keys`."""
    header = file.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        return None
    magic, digest, n, file_dim = HEADER.unpack(header[: HEADER.size])
    if magic != MAGIC or file_dim != dim or not 0 <= n <= len(keys) or digest != keys_digest(keys[:n]):
        return None
    if os.fstat(file.fileno()).st_size != HEADER_BYTES + n * dim * 2:
        return None
    return n


def _copy_rows_held(path: Path, keys: list[bytes], dim: int, out) -> int:
    """Copy to `out` the rows of the matrix file at `path` that hold the first of `keys`; returns how many."""
    try:
        with open(path, "rb") as previous:
            held = _rows_held(previous, keys, dim) or 0
            if held:
                shutil.copyfileobj(previous, out, COPY_BYTES)
            return held
    except FileNotFoundError:
        return 0


def _read_into(file, view: memoryview) -> bool:
    """Fill `view` from `file` (a read may return less than asked); False when the file ends first."""
    done = 0
    while done < len(view):
        count = file.readinto(view[done:])
        if not count:
            return False
        done += count
    return True
