"""The one data iterator of every task: grain's iterator, plus counts, metrics and a JSON state.

State (what a checkpoint keeps for each process in meta["data_states"]; process 0's also in
meta["data_state"], the one key older code reads):

    {"version": 1, "task": "pretrain" | "sft" | "dpo", "grain": <grain's state, JSON-tagged>,
     "counters": [the task's CounterSet, in order], "metrics": {"batches": ..., ...},
     "fingerprint": {what the grain indices point at: pipeline.fingerprint}}

`set_state` compares the saved fingerprint with this iterator's: a state saved over other data
(a source's unit count or names, weights, host count, num_workers, seed, split) raises
`SourceChangedError`, or with data.on_source_change = "warn" logs what changed and continues.

States saved before the pipelines were one still load: pretraining ones have no "task" (and may
have fewer counters: new names are appended), instruction ones spell the counters "counts".
States without a fingerprint (saved before it existed) restore unchecked.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import logging
import time
from typing import Callable

import grain
import numpy as np

from sc_jax.data import pipeline
from sc_jax.data.batches import batch_keys, batch_metrics, empty_batch
from sc_jax.data.sources import DataError
from sc_jax.data.config import LEGACY_WEIGHT_UNIT
from sc_jax.data.stats import SOURCE_TOKENS_KEY, STATS_KEY, CounterSet
from sc_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

METRICS = ("batches", "rows", "tokens", "loss_tokens", "segments", "padding_batches")


class SourceChangedError(DataError):
    """A saved iterator state whose grain indices point into other data than this iterator's."""


# ----------------------------------------------------------------------------- state encoding

# Grain states hold tuples (ConcatThenSplit's slices) that JSON would turn into lists, which the
# packer then misreads on restore: tag them so that set_state gets back exactly what get_state gave.


def encode_state(x):
    if isinstance(x, tuple):
        return {"__tuple__": [encode_state(v) for v in x]}
    if isinstance(x, list):
        return [encode_state(v) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: encode_state(v) for k, v in x.items()}
        return {"__items__": [[encode_state(k), encode_state(v)] for k, v in x.items()]}
    if isinstance(x, bytes):
        return {"__bytes__": base64.b64encode(x).decode()}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return {"__array__": x.tolist(), "dtype": str(x.dtype)}
    return x


def decode_state(x):
    if isinstance(x, list):
        return [decode_state(v) for v in x]
    if isinstance(x, dict):
        if "__tuple__" in x and len(x) == 1:
            return tuple(decode_state(v) for v in x["__tuple__"])
        if "__items__" in x and len(x) == 1:
            return {decode_state(k): decode_state(v) for k, v in x["__items__"]}
        if "__bytes__" in x and len(x) == 1:
            return base64.b64decode(x["__bytes__"])
        if "__array__" in x and len(x) == 2:
            return np.asarray(x["__array__"], dtype=x["dtype"])
        return {k: decode_state(v) for k, v in x.items()}
    return x


# ----------------------------------------------------------------------------- what a pipeline is


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What differs between the tasks that share the pipeline: the rest is the same code."""

    name: str  # train.task: pretrain | sft | dpo
    counters: CounterSet  # what its example functions count
    report: Callable[["DataIterator"], dict]  # its stats()
    starved: Callable[["DataIterator"], str]  # why no example came out of a whole training stream

    @property
    def keys(self) -> tuple[str, ...]:
        return batch_keys(self.name)


@dataclasses.dataclass
class PipelineInfo:
    spec: TaskSpec
    tokenizer: Tokenizer
    sources: list  # per source, what reads it: sources.Source (pretrain), instruct.data.Records (sft, dpo)
    makers: list  # per source, its example function
    scan_skipped: dict[str, int]  # inputs dropped while the sources were scanned, by reason
    pipeline_id: str
    train: bool
    fingerprint: dict | None = None  # pipeline.fingerprint: stored in every state, checked on restore
    on_source_change: str = "error"  # data.on_source_change
    # (weight_unit, rates=None) -> (a fresh inner iterator over the same scanned sources, its
    # fingerprint): what a state saved before data.weight_unit existed (mixed by documents), or with
    # another estimate of tokens per unit, is restored onto.
    restream: Callable[..., tuple[grain.DatasetIterator, dict]] | None = None
    remix: Callable | None = None  # weight_unit -> (the examples, their fingerprint): pipeline.mixture


# ----------------------------------------------------------------------------- iterator


def _label(src, i: int) -> str:
    """A source's name in statistics: its label, numbered when two share one."""
    label = getattr(src, "label", None)
    return f"{i}:{label}" if label else str(i)


def _every_input_dropped(e: ValueError) -> bool:
    """grain's error for a stream whose filter ratio reached filter_raise_threshold_ratio."""
    return "skipped" in str(e) and "elements" in str(e)


class DataIterator(grain.DatasetIterator):
    """The training/eval iterator of every task (a grain DatasetIterator: works with Orbax /
    grain.checkpoint too).

    Yields the task's batch keys (sc_jax.data.batches), each [batch_size, seq_len]. `get_state()`
    is a JSON-serialisable dict; `set_state` on a fresh iterator built with the same arguments
    continues exactly (a state saved over other data: `SourceChangedError`, or a warning: see
    the module docstring). With `max_batches` (eval on several hosts) it yields exactly that many batches, empty
    ones after the data ends, so every host's collectives match."""

    def __init__(self, inner: grain.DatasetIterator, info: PipelineInfo, *, batch_size: int, seq_len: int,
                 max_batches: int | None = None):
        super().__init__(inner)
        self._inner, self.info = inner, info
        self.task, self.tokenizer = info.spec.name, info.tokenizer
        self.batch_size, self.seq_len, self.max_batches = batch_size, seq_len, max_batches
        self._counts = info.spec.counters.zeros()
        self._source_tokens = np.zeros(len(info.sources), np.int64)
        self._m = dict.fromkeys(METRICS, 0)
        self.seconds_waiting = 0.0

    def __next__(self) -> dict:
        if self.max_batches is not None and self._m["batches"] >= self.max_batches:
            raise StopIteration
        t = time.perf_counter()
        batch = self._next_batch()
        self.seconds_waiting += time.perf_counter() - t
        extra = batch.pop(STATS_KEY, None)
        if extra is not None:
            self._counts += np.asarray(extra, np.int64)
        made = batch.pop(SOURCE_TOKENS_KEY, None)
        if made is not None:
            self._source_tokens += np.asarray(made, np.int64)
        self._m["batches"] += 1
        for name, n in batch_metrics(batch).items():
            self._m[name] += n
        return batch

    def _next_batch(self) -> dict:
        try:
            return next(self._inner)
        except StopIteration:
            if self.max_batches is None:
                raise
            self._m["padding_batches"] += 1
            return empty_batch(self.batch_size, self.seq_len, self.info.spec.keys)
        except ValueError as e:
            if not _every_input_dropped(e):
                raise
            self._counts += self.info.spec.counters.take(self.info.pipeline_id)  # counts made in this process
            raise DataError(self.info.spec.starved(self)) from None

    # -- state
    def get_state(self) -> dict:
        state = {"version": 1, "task": self.task, "grain": encode_state(self._inner.get_state()),
                 "counters": self._counts.tolist(), "metrics": dict(self._m),
                 "source_tokens": self._source_tokens.tolist()}
        if self.info.fingerprint is not None:
            state["fingerprint"] = copy.deepcopy(self.info.fingerprint)
        return state

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError("not a sc_jax data iterator state (missing 'grain')")
        if state.get("task", self.task) != self.task:
            raise ValueError(f"the saved data state is for task '{state.get('task')}', this run is '{self.task}'")
        self._restream_if_older(state.get("fingerprint"))
        changed = self._check_fingerprint(state.get("fingerprint"))
        try:
            self._inner.set_state(decode_state(state["grain"]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            if not changed:
                raise
            raise SourceChangedError(f"the saved data state does not fit this pipeline ({changed}): {e}; resume "
                                     "with the original data and settings, or start a new run (--restart)") from None
        saved = self.info.spec.counters.restore(state.get("counters", state.get("counts")))
        if saved is not None:
            self._counts = saved
        self._m.update(state.get("metrics", {}))
        made = state.get("source_tokens")
        self._source_tokens = (np.asarray(made, np.int64) if made is not None and len(made) == len(self._source_tokens)
                               else np.zeros_like(self._source_tokens))

    def _restream_if_older(self, saved) -> None:
        """A state saved before data.weight_unit existed indexes a stream mixed by documents, and one
        whose token mixture's estimate of tokens per unit differs (another sampling rule: older code
        read a fixed sample) a stream with its own rates: this iterator is rebuilt so (same sources,
        no rescan) for the state to resume exactly where it was saved."""
        now = self.info.fingerprint
        if now is None or self.info.restream is None or not pipeline.mixes(now):
            return
        if isinstance(saved, dict) and "weight_unit" in saved:
            rates = pipeline.saved_rates(saved, now)
            if rates is None:
                return
            log.info("data: this state's token mixture was estimated at %s tokens per unit (now %s): it resumes "
                     "its stream with those", [round(t, 1) for t in rates],
                     [round(s["tokens_per_unit"], 1) for s in now["sources"]])
            self._rebuild(*self.info.restream("tokens", rates))
            return
        if now.get("weight_unit") == LEGACY_WEIGHT_UNIT:
            return
        log.info("data: this state was saved before data.weight_unit existed: it resumes its stream, mixed by "
                 "documents (weight_unit=documents)")
        self._rebuild(*self.info.restream(LEGACY_WEIGHT_UNIT))

    def _rebuild(self, inner, fp: dict) -> None:
        """Reads from `inner` (a fresh iterator of another stream over the same sources) from now on."""
        old = self._inner
        self._inner = inner
        self.info = dataclasses.replace(self.info, fingerprint=fp)
        grain.DatasetIterator.__init__(self, self._inner)
        close = getattr(old, "close", None)
        if close is not None:
            close()

    def _check_fingerprint(self, saved) -> str:
        """'' when `saved` (a state's fingerprint; None: saved before fingerprints) indexes this
        iterator's data; else what differs, after raising or warning per data.on_source_change."""
        now = self.info.fingerprint
        if not isinstance(saved, dict) or now is None:
            return ""
        note = pipeline.other_host(saved, now)
        if note:
            log.warning(note)
        diff = pipeline.changes(saved, now)
        if not diff:
            return ""
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        if self.info.on_source_change != "warn":
            raise SourceChangedError(
                f"the saved data state indexes other data than this run reads: {shown}; its positions would now "
                "read other inputs (some repeated, some skipped). Resume with the original data, set "
                "data.on_source_change=warn to continue on the changed data, or start a new run (--restart)")
        log.warning(f"data: resuming on changed data (data.on_source_change=warn): {shown}; the data order from "
                    "here on is not the saved run's (some inputs of this epoch repeat, others are skipped)")
        return shown

    # -- statistics
    @property
    def counts(self) -> dict[str, int]:
        """The task's counters (made in whichever process built the examples), by name."""
        return self.info.spec.counters.to_dict(self._counts)

    @property
    def metrics(self) -> dict[str, int]:
        """What was delivered: batches, rows, tokens, loss_tokens, segments, padding_batches."""
        return dict(self._m)

    @property
    def source_tokens(self) -> dict[str, int]:
        """Input tokens made per source (by label; includes examples still buffered in the packer)."""
        return {_label(src, i): int(n) for i, (src, n) in enumerate(zip(self.info.sources, self._source_tokens))}

    def mixture(self) -> list[dict]:
        """Per source: its label, the target share (of tokens or of documents, per weight_unit) and
        the realised share of tokens so far."""
        fp = self.info.fingerprint or {}
        weights = [float(s.get("weight", 1.0)) for s in fp.get("sources", [])] or [1.0] * len(self._source_tokens)
        total_w, total_t = sum(weights) or 1.0, int(self._source_tokens.sum())
        return [{"source": label, "target": w / total_w, "unit": fp.get("weight_unit", LEGACY_WEIGHT_UNIT),
                 "tokens": n, "realised": n / total_t if total_t else 0.0}
                for (label, n), w in zip(self.source_tokens.items(), weights)]

    def stats(self) -> dict:
        return self.info.spec.report(self)

    def __str__(self) -> str:
        return f"DataIterator(task={self.task}, batch_size={self.batch_size}, seq_len={self.seq_len})"
