"""Small helpers shared by the tests and the benchmarks: plain functions, no fixtures (those live in conftest)."""

from __future__ import annotations

import socket

import numpy as np


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choices_result(*labels: str, from_name: str = "topic", to_name: str = "text") -> list[dict]:
    """An annotation's (or prediction's) `result` as Label Studio stores it for the test projects' `Choices`."""
    return [{"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": list(labels)}}]


def unit(*degrees: float) -> np.ndarray:
    """Unit vectors at the given angles: cosine distance between rows i, j is 1 - cos(angle_i - angle_j)."""
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def chunk_encoded(runtime, project: str, job_id: str) -> None:
    """What a worker leaves when it has encoded a chunk: counted done, its job out of the queue and finished."""
    from rq.job import Job, JobStatus

    job = Job.fetch(job_id, connection=runtime.redis)
    runtime.encoding.queue.remove(job)
    runtime.encoding.chunk_done(project, job_id)
    job.set_status(JobStatus.FINISHED)
