"""Versioned classifier artifacts under MODEL_DIR, shared by the server and every worker.

Layout: MODEL_DIR/projects/<project>/v000123/{head.npz, meta.json}. A version is written into a
temporary folder and renamed into place, so readers never see half an artifact; the newest version
whose files load is the live one, and a corrupt or missing one falls back to the version before it.
Arrays are stored with numpy's npz (no pickle), metadata as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.ml.head import LinearHead

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^v(\d{6,})$")
"""A head version's folder: v000001, v000002, ..., v999999, v1000000 (ordered by number, not by name)."""


@dataclass(frozen=True)
class HeadArtifact:
    """A trained head and its committee, with what they were trained on."""

    head: LinearHead
    committee: list[LinearHead]
    labels: tuple[str, ...]
    encoder_id: str
    version: str = ""
    meta: dict = field(default_factory=dict)
    """Free-form facts about the round (annotation count, timings, strategy), for /metrics and logs."""


class ArtifactStore:
    """Reads and writes `HeadArtifact` versions of one MODEL_DIR. Safe for many processes at once."""

    def __init__(self, model_dir: str | os.PathLike):
        self.root = Path(model_dir)

    def project_dir(self, project: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(project)):
            raise ValueError(f"project id must be letters, digits, '_', '.' or '-', got {project!r}")
        return self.root / "projects" / str(project)

    def projects(self) -> list[str]:
        """The projects with a folder of head versions (kept on disk, where Redis's records may be lost)."""
        folder = self.root / "projects"
        names = os.listdir(folder) if folder.is_dir() else []
        return sorted(name for name in names if name.isdigit() and (folder / name).is_dir())

    def versions(self, project: str) -> list[str]:
        """Existing versions of a project, oldest first."""
        folder = self.project_dir(project)
        if not folder.is_dir():
            return []
        names = [name for name in os.listdir(folder) if VERSION_PATTERN.match(name)]
        return sorted(names, key=_version_number)

    def identity(self, project: str, version: str) -> str:
        """`version` and when its folder was written: a project deleted and then connected again under the same id
        numbers its versions from 1 again, and a process that cached the old project's v000001 must see another."""
        try:
            return f"{version}@{(self.project_dir(project) / version).stat().st_mtime_ns}"
        except OSError:  # pruned meanwhile: the next look finds the newer one
            return version

    def save(self, project: str, artifact: HeadArtifact) -> str:
        """Write `artifact` as the project's next version and return the version name."""
        folder = self.project_dir(project)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        os.chmod(staging, 0o755)  # (mkdtemp makes it 0700) readable by workers running as other users
        try:
            _write_artifact(staging, artifact)
        except BaseException:  # a full disk, the worker stopped: no half-written folder stays behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        while True:  # another process may take the number we computed: try the next one
            version = _next_version(self.versions(project))
            try:
                os.rename(staging, folder / version)
                return version
            except OSError:
                if not (folder / version).exists():
                    shutil.rmtree(staging, ignore_errors=True)
                    raise

    def load_latest(
        self, project: str, labels: tuple[str, ...], encoder_id: str, multi_label: bool
    ) -> HeadArtifact | None:
        """The newest loadable version trained for these labels, encoder and kind of choice (a single-choice
        softmax head read with multi-label's 0.5 threshold would predict nothing), or None (zero-shot). The newer
        versions trained otherwise (e.g. before a choice was added) are passed over with one log line."""
        passed_over: list[str] = []
        found = None
        for version in reversed(self.versions(project)):
            try:
                artifact = self.load(project, version)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "project %s: artifact %s is unreadable (%s); falling back to the previous version",
                    project,
                    version,
                    exc,
                )
                continue
            trained_for = (artifact.labels, artifact.encoder_id, artifact.head.multi_label)
            if trained_for == (tuple(labels), encoder_id, multi_label):
                found = artifact
                break
            passed_over.append(version)
        if passed_over:
            log.info(
                "project %s: head version(s) %s trained for other labels, encoder or kind of choice passed over; "
                "using %s",
                project,
                ", ".join(passed_over),
                found.version if found else "zero-shot",
            )
        return found

    def load(self, project: str, version: str) -> HeadArtifact:
        """One version; raises OSError when its files are missing, ValueError, KeyError or TypeError when they are
        damaged."""
        folder = self.project_dir(project) / version
        meta = json.loads((folder / "meta.json").read_text())
        try:
            with np.load(folder / "head.npz", allow_pickle=False) as arrays:
                multi_label = bool(meta["multi_label"])
                head = LinearHead(arrays["weights"], arrays["bias"], multi_label)
                committee = [
                    LinearHead(arrays[f"committee_{i}_weights"], arrays[f"committee_{i}_bias"], multi_label)
                    for i in range(int(meta["committee_size"]))
                ]
        except (zipfile.BadZipFile, EOFError, NotImplementedError) as exc:  # a truncated or garbled file (a full
            # disk, a copy cut short; NotImplementedError: a damaged byte naming an unknown compression method)
            raise ValueError(f"{folder / 'head.npz'} is damaged: {exc}") from exc
        shapes = {(member.weights.shape, member.bias.shape) for member in (head, *committee)}
        expected = (head.weights.shape[:1] + (len(meta["labels"]),), (len(meta["labels"]),))
        if shapes != {expected}:  # e.g. a file from another version that still reads as a valid npz
            raise ValueError(f"head arrays of shapes {sorted(shapes)} for {len(meta['labels'])} labels")
        return HeadArtifact(head, committee, tuple(meta["labels"]), meta["encoder_id"], version, meta.get("round", {}))

    def delete_project(self, project: str) -> None:
        """Delete every version of `project`."""
        shutil.rmtree(self.project_dir(project), ignore_errors=True)

    def prune(self, project: str, keep: int = 5) -> None:
        """Delete all but the `keep` newest versions."""
        for version in self.versions(project)[:-keep]:
            shutil.rmtree(self.project_dir(project) / version, ignore_errors=True)


def _write_artifact(folder: Path, artifact: HeadArtifact) -> None:
    arrays = {"weights": artifact.head.weights, "bias": artifact.head.bias}
    for i, member in enumerate(artifact.committee):
        arrays[f"committee_{i}_weights"] = member.weights
        arrays[f"committee_{i}_bias"] = member.bias
    np.savez(folder / "head.npz", **arrays)
    meta = {
        "labels": list(artifact.labels),
        "encoder_id": artifact.encoder_id,
        "multi_label": artifact.head.multi_label,
        "committee_size": len(artifact.committee),
        "round": artifact.meta,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _version_number(version: str) -> int:
    return int(VERSION_PATTERN.match(version).group(1))


def _next_version(existing: list[str]) -> str:
    last = _version_number(existing[-1]) if existing else 0
    return f"v{last + 1:06d}"
