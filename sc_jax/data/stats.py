"""Pipeline counters that survive worker processes.

Document builders (in whatever process runs them) add to a per-pipeline counter vector in their
own process; the last stage of the pipeline, in that same process, moves the counts accumulated
since the previous batch into the batch (`STATS_KEY`). The iterator in the trainer's process pops
that key and sums: counts from every worker arrive with the batches they belong to.
"""

from __future__ import annotations

import threading

import numpy as np

STATS_KEY = "_stats"

COUNTERS: tuple[str, ...] = (
    # what was produced
    "repos", "documents", "files", "fim_files", "spm_files", "tokens",
    # why inputs were dropped (read time; scan-time reasons are counted by the sources)
    "unreadable", "undecodable", "binary", "empty", "oversized", "long_lines", "malformed", "not_selected",
    "vendored", "hidden", "empty_repo", "repo_oversized", "duplicate_order", "held_out", "error",
)
PRODUCED = COUNTERS[:6]
INDEX = {name: i for i, name in enumerate(COUNTERS)}

_lock = threading.Lock()
_registry: dict[str, np.ndarray] = {}


def add(pipeline_id: str, counts: dict[str, int]) -> None:
    with _lock:
        vec = _registry.get(pipeline_id)
        if vec is None:
            vec = _registry[pipeline_id] = np.zeros(len(COUNTERS), np.int64)
        for key, n in counts.items():
            vec[INDEX.get(key, INDEX["error"])] += n


def take(pipeline_id: str) -> np.ndarray:
    """The counts since the last call (in this process), zeroing them."""
    with _lock:
        vec = _registry.get(pipeline_id)
        if vec is None:
            return np.zeros(len(COUNTERS), np.int64)
        out = vec.copy()
        vec[:] = 0
        return out


def to_dict(vec) -> dict[str, int]:
    return {name: int(vec[i]) for i, name in enumerate(COUNTERS)}


class AttachStats:
    """Grain map: puts this process's new counts into the batch."""

    def __init__(self, pipeline_id: str):
        self.pipeline_id = pipeline_id

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        batch[STATS_KEY] = take(self.pipeline_id)
        return batch
