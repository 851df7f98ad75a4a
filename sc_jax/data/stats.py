"""Pipeline counters that survive worker processes: the one registry of every task.

Example functions (in whatever thread or process runs them) add to a per-pipeline counter vector
in their own process; the last stage of the pipeline, in that same process, moves the counts made
since the previous batch into the batch (`STATS_KEY`). The iterator in the trainer's process pops
that key and sums: counts from every worker arrive with the batches they belong to.

Each task names its counters once (a `CounterSet`); saved iterator states store the vector in
that order, so new names only ever go at the end.
"""

from __future__ import annotations

import threading

import numpy as np

STATS_KEY = "_stats"
SOURCE_TOKENS_KEY = "_source_tokens"  # per source, the input tokens of the examples it made

# Pretraining: what the document builders count.
COUNTERS: tuple[str, ...] = (
    # what was produced
    "repos", "documents", "files", "fim_files", "spm_files", "tokens",
    # why inputs were dropped (read time; scan-time reasons are counted by the sources)
    "unreadable", "undecodable", "binary", "empty", "oversized", "long_lines", "malformed", "not_selected",
    "vendored", "hidden", "empty_repo", "repo_oversized", "duplicate_order", "held_out", "error",
    # Added later: new names go at the end, so the counters of a saved iterator state still line up.
    "bad_filename",
)
PRODUCED = COUNTERS[:6]
INDEX = {name: i for i, name in enumerate(COUNTERS)}

_lock = threading.Lock()
_registry: dict[str, np.ndarray] = {}  # pipeline id -> the counts not yet sent with a batch


class CounterSet:
    """The names one task counts, in their saved order; `other` (if any) takes unknown names."""

    def __init__(self, names: tuple[str, ...], other: str | None = None):
        self.names = tuple(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.other = other

    def zeros(self) -> np.ndarray:
        return np.zeros(len(self.names), np.int64)

    def add(self, pipeline_id: str, counts: dict[str, int]) -> None:
        with _lock:
            vec = _registry.get(pipeline_id)
            if vec is None:
                vec = _registry[pipeline_id] = self.zeros()
            for name, n in counts.items():
                vec[self.index[name] if self.other is None else self.index.get(name, self.index[self.other])] += n

    def take(self, pipeline_id: str) -> np.ndarray:
        """The counts since the last call (in this process), zeroing them."""
        with _lock:
            vec = _registry.get(pipeline_id)
            if vec is None:
                return self.zeros()
            out = vec.copy()
            vec[:] = 0
            return out

    def to_dict(self, vec) -> dict[str, int]:
        return {name: int(vec[i]) for i, name in enumerate(self.names)}

    def restore(self, saved) -> np.ndarray | None:
        """The vector of a saved state, or None when it cannot be ours (longer than our names).
        A shorter one was saved before names were appended: it lines up with the first ones."""
        if saved is None or len(saved) > len(self.names):
            return None
        vec = self.zeros()
        vec[:len(saved)] = np.asarray(saved, np.int64)
        return vec


PRETRAIN_COUNTERS = CounterSet(COUNTERS, other="error")


def merge_counts(dicts) -> dict[str, int]:
    """The sum of some {reason: count} dicts, sorted by reason."""
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


_source_sets: dict[int, CounterSet] = {}


def source_tokens(num_sources: int) -> CounterSet:
    """The counters of tokens made per source ("0", "1", ...): the realised mixture."""
    with _lock:
        if num_sources not in _source_sets:
            _source_sets[num_sources] = CounterSet(tuple(str(i) for i in range(num_sources)))
        return _source_sets[num_sources]


def source_key(pipeline_id: str) -> str:
    """Where a pipeline's per-source token counts sit in the registry (beside its task counters)."""
    return f"{pipeline_id}/sources"


class AttachStats:
    """Grain map: puts this process's new counts (and, with num_sources, its per-source token
    counts) into the batch."""

    def __init__(self, pipeline_id: str, counters: CounterSet, num_sources: int = 0):
        self.pipeline_id, self.counters, self.num_sources = pipeline_id, counters, num_sources

    def __call__(self, batch: dict) -> dict:
        out = {**batch, STATS_KEY: self.counters.take(self.pipeline_id)}
        if self.num_sources:
            out[SOURCE_TOKENS_KEY] = source_tokens(self.num_sources).take(source_key(self.pipeline_id))
        return out
