"""Instruction data as grain pipelines (the pretraining pipeline's pattern and packers).

    jsonl files --scan--> valid records (byte ranges; malformed lines skipped and counted, or an
                          error naming path:line under `data.strict`)
    MapDataset.range(n).repeat().map_with_index(EpochShuffle)   per source, reshuffled per epoch
      .map(build example)                                       ChatML tokens, choices from the index
    MapDataset.mix(sources, weights)[host::hosts].filter(kept)  this host's share
      .to_iter_dataset()
    SFT: FirstFitPackIterDataset (whole conversations, never split; segment ids and positions per
         conversation)  |  DPO: one pair per row, padded
      .batch(batch_size).map(attach counts)

`InstructIterator.get_state()` is JSON-serialisable and `set_state` on a fresh iterator built
from the same config continues exactly (the grain state of the whole chain).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
import time
import uuid
import zlib

import grain
import numpy as np

from sc_jax.config import ConfigError
from sc_jax.data.config import DataConfig, SourceConfig
from sc_jax.data.pipeline import EpochShuffle, decode_state, encode_state, sub_seed
from sc_jax.data import sources
from sc_jax.data.sources import DataError
from sc_jax.instruct.chat import ChatFormat, RecordError, dpo_example, parse_chat, parse_pair, sft_example
from sc_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TASKS = ("sft", "dpo")
SFT_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
DPO_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in SFT_KEYS)
JSONL_PATTERNS = ("*.jsonl", "*.ndjson")

# ----------------------------------------------------------------------------- counters

# Counts made while examples are built (in whichever thread or worker process builds them) travel
# to the trainer's process inside the batches (as sc_jax.data.stats does for pretraining).
STATS_KEY = "_instruct_stats"
COUNTERS = ("examples", "truncated", "too_long", "malformed")
_INDEX = {name: i for i, name in enumerate(COUNTERS)}
_lock = threading.Lock()
_registry: dict[str, np.ndarray] = {}


def _count(pipeline_id: str, name: str) -> None:
    with _lock:
        vec = _registry.get(pipeline_id)
        if vec is None:
            vec = _registry[pipeline_id] = np.zeros(len(COUNTERS), np.int64)
        vec[_INDEX[name]] += 1


def _take(pipeline_id: str) -> np.ndarray:
    with _lock:
        vec = _registry.get(pipeline_id)
        if vec is None:
            return np.zeros(len(COUNTERS), np.int64)
        out, vec[:] = vec.copy(), 0
        return out


class _AttachCounts:
    def __init__(self, pipeline_id: str):
        self.pipeline_id = pipeline_id

    def __call__(self, batch: dict) -> dict:
        return {**batch, STATS_KEY: _take(self.pipeline_id)}


# ----------------------------------------------------------------------------- records


def expand_paths(path: str) -> list[str]:
    """A file, a glob, or a directory (its *.jsonl / *.ndjson files, recursively), sorted."""
    return sources.expand_paths(path, JSONL_PATTERNS, "jsonl")


def parse_record(task: str, raw: bytes):
    """One line -> the parsed record (messages, or (prompt, chosen, rejected)); RecordError if malformed."""
    try:
        obj = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError("bad_json", f"bad JSON ({e})") from None
    return parse_chat(obj) if task == "sft" else parse_pair(obj)


def _holdout(raw: bytes, fraction: float) -> bool:
    """A record's side of the train/eval split: by its content, so duplicates land together."""
    return fraction > 0 and zlib.crc32(raw.strip()) / 2.0**32 < fraction


class Records:
    """The valid records of one source: (file, byte range, line) each, read on demand."""

    def __init__(self, label: str, files: list[str], fid, start, end, line, skipped: dict[str, int]):
        self.label, self.files, self.skipped = label, files, skipped
        self.fid, self.start, self.end, self.line = fid, start, end, line
        self._local = threading.local()

    @classmethod
    def scan(cls, src: SourceConfig, task: str, *, strict: bool = False, holdout_fraction: float = 0.0,
             keep: str = "all") -> "Records":
        """Reads every line once: parses and validates it, keeps where the valid ones are.

        keep: "all", "train" (records outside the holdout) or "eval" (the holdout)."""
        if src.kind != "jsonl":
            raise ConfigError(f"instruction data reads jsonl sources: data.sources kind '{src.kind}' "
                              f"({src.path}); use {{kind: jsonl, path: FILE}}")
        files = expand_paths(src.path)
        fid, start, end, line = [], [], [], []
        skipped: dict[str, int] = {}
        for f_idx, path in enumerate(files):
            offset = 0
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    begin, offset = offset, offset + len(raw)
                    if not raw.strip():
                        continue  # blank lines are not records
                    try:
                        parse_record(task, raw)
                    except RecordError as e:
                        if strict:
                            raise DataError(f"{path}:{lineno}: {e}") from None
                        skipped[e.reason] = skipped.get(e.reason, 0) + 1
                        continue
                    if keep != "all" and _holdout(raw, holdout_fraction) != (keep == "eval"):
                        continue
                    fid.append(f_idx), start.append(begin), end.append(offset), line.append(lineno)
        arr = lambda x: np.asarray(x, np.int64)  # noqa: E731
        return cls(src.label(), files, arr(fid), arr(start), arr(end), arr(line), skipped)

    def __len__(self) -> int:
        return len(self.start)

    def where(self, i: int) -> str:
        return f"{self.files[int(self.fid[i])]}:{int(self.line[i])}"

    def read(self, i: int) -> bytes:
        fds = self._local.__dict__.setdefault("fds", {})
        f = int(self.fid[i])
        if f not in fds:
            fds[f] = os.open(self.files[f], os.O_RDONLY)
        return os.pread(fds[f], int(self.end[i] - self.start[i]), int(self.start[i]))

    def __getstate__(self):  # worker processes open their own files
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


class _Build:
    """grain map: record index -> example (or None: dropped, counted)."""

    def __init__(self, task: str, records: Records, fmt: ChatFormat, seq_len: int, pipeline_id: str):
        self.task, self.records, self.fmt, self.seq_len, self.pipeline_id = task, records, fmt, seq_len, pipeline_id

    def __call__(self, i) -> dict | None:
        try:
            rec = parse_record(self.task, self.records.read(int(i)))
        except (RecordError, OSError):  # the file changed since the scan
            _count(self.pipeline_id, "malformed")
            return None
        if self.task == "sft":
            ex, note = sft_example(self.fmt, rec, self.seq_len)
        else:
            ex, note = dpo_example(self.fmt, *rec, self.seq_len)
        if note:
            _count(self.pipeline_id, note)
        if ex is not None:
            _count(self.pipeline_id, "examples")
        return ex


def _kept(x) -> bool:
    return x is not None


# ----------------------------------------------------------------------------- batches


def _finalize_sft(row: dict) -> dict:
    seg = np.asarray(row["input_ids_segment_ids"], np.int32)
    return {"input_ids": np.asarray(row["input_ids"], np.int32), "targets": np.asarray(row["targets"], np.int32),
            "segment_ids": seg, "positions": np.asarray(row["input_ids_positions"], np.int32),
            "loss_mask": np.asarray(row["loss_mask"], np.float32) * (seg > 0)}


def empty_batch(task: str, batch_size: int, seq_len: int) -> dict:
    keys = SFT_KEYS if task == "sft" else DPO_KEYS
    return {k: np.zeros((batch_size, seq_len), np.float32 if k.endswith("loss_mask") else np.int32) for k in keys}


def _stack(rows, *, task: str, batch_size: int, seq_len: int) -> dict:
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if len(rows) < batch_size:  # the last batch of a finite pass: pad with empty rows
        pad = empty_batch(task, batch_size - len(rows), seq_len)
        out = {k: np.concatenate([v, pad[k]]) for k, v in out.items()}
    return out


@dataclasses.dataclass
class InstructInfo:
    task: str
    tokenizer: Tokenizer
    records: list[Records]
    pipeline_id: str
    train: bool


def build_dataset(cfg: DataConfig, task: str, *, seq_len: int, batch_size: int, seed: int, train: bool,
                  process_index: int = 0, process_count: int = 1, tokenizer: Tokenizer | None = None,
                  max_segments: int | None = None, strict: bool | None = None,
                  verbose: bool = False) -> tuple[grain.IterDataset, InstructInfo]:
    """The batched grain dataset of this host (see the module docstring)."""
    if task not in TASKS:
        raise ConfigError(f"instruction data is for train.task sft or dpo, not '{task}'")
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"seq_len ({seq_len}) must be >= 2 and batch_size ({batch_size}) >= 1")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not within [0, process_count={process_count})")
    cfg.validate()
    strict = cfg.strict if strict is None else strict
    tok = tokenizer if tokenizer is not None and not cfg.special_tokens else \
        Tokenizer.from_file(cfg.tokenizer, aliases=cfg.special_tokens)
    fmt = ChatFormat(tok)
    srcs, keep = _plan(cfg, train)
    pid = uuid.uuid4().hex
    t0 = time.time()
    records = [Records.scan(s, task, strict=strict, holdout_fraction=cfg.holdout_fraction, keep=keep) for s in srcs]
    if verbose:
        skipped = _merge(r.skipped for r in records)
        print(f"{task} data ({'train' if train else 'eval'}): {sum(map(len, records)):,} records in "
              f"{sum(len(r.files) for r in records)} file(s) ({time.time() - t0:.1f}s); skipped "
              f"{sum(skipped.values())}" + (f" ({_fmt(skipped)})" if skipped else ""), flush=True)
    components, weights = [], []
    for s_idx, (scfg, rec) in enumerate(zip(srcs, records)):
        if len(rec) == 0:
            raise DataError(f"data source jsonl:{scfg.path} has no usable {task} records "
                            f"(skipped: {_fmt(rec.skipped) or 'none'}{', all held out' if keep != 'all' else ''})")
        ds = grain.MapDataset.range(len(rec))
        if train:
            ds = ds.repeat().map_with_index(EpochShuffle(len(rec), sub_seed(seed, s_idx, 0x1257), cfg.shuffle))
        components.append(ds.map(_Build(task, rec, fmt, seq_len, pid)))
        weights.append(scfg.weight)
    if len(components) == 1:
        ds = components[0]
    elif train:
        ds = grain.MapDataset.mix(components, weights)
    else:
        ds = grain.MapDataset.concatenate(components)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.filter(_kept).to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                            prefetch_buffer_size=cfg.read_buffer))
    if task == "sft":
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"input_ids": seq_len, "targets": seq_len, "loss_mask": seq_len},
            num_packing_bins=cfg.first_fit_bins, seed=sub_seed(seed, 0xB1D5), shuffle_bins=cfg.shuffle and train,
            meta_features=("loss_mask",), max_sequences_per_bin=max_segments)
        ds = ds.map(_finalize_sft)
    ds = ds.batch(batch_size, drop_remainder=train,
                  batch_fn=functools.partial(_stack, task=task, batch_size=batch_size, seq_len=seq_len))
    ds = ds.map(_AttachCounts(pid))
    # Records dropped while building (too long) are expected: no warnings; a training stream that
    # drops every record would spin forever: an error.
    ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(
        filter_warn_threshold_ratio=None, filter_raise_threshold_ratio=1.0 if train else None))
    if cfg.num_workers > 0:
        from sc_jax.data.pipeline import _absl_flags_with_defaults, _init_worker

        _absl_flags_with_defaults()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size),
                            worker_init_fn=_init_worker)
    return ds, InstructInfo(task, tok, records, pid, train)


def _plan(cfg: DataConfig, train: bool) -> tuple[list[SourceConfig], str]:
    if train:
        srcs, keep = cfg.sources, ("train" if cfg.holdout_fraction > 0 else "all")
    elif cfg.eval_sources:
        srcs, keep = cfg.eval_sources, "all"
    elif cfg.holdout_fraction > 0:
        srcs, keep = cfg.sources, "eval"
    else:
        log.warning("data: no eval_sources and holdout_fraction = 0: the eval iterator makes one pass over the "
                    "training records (set data.holdout_fraction for a held-out split)")
        srcs, keep = cfg.sources, "all"
    if not srcs:
        raise ConfigError("data.sources is empty: add the chat data, e.g. data.sources=[{kind: jsonl, path: FILE}]")
    return srcs, keep


def _merge(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if v)


# ----------------------------------------------------------------------------- iterator


class InstructIterator(grain.DatasetIterator):
    """SFT batches {input_ids, targets, segment_ids, positions, loss_mask} or DPO batches
    {chosen_*, rejected_*} (the same five each), all [batch_size, seq_len] (int32; loss_mask
    float32). `get_state()` is a JSON-serialisable dict; `set_state` continues exactly."""

    def __init__(self, inner: grain.DatasetIterator, info: InstructInfo, *, batch_size: int, seq_len: int,
                 max_batches: int | None = None):
        super().__init__(inner)
        self._inner, self.info, self.task, self.tokenizer = inner, info, info.task, info.tokenizer
        self.batch_size, self.seq_len, self.max_batches = batch_size, seq_len, max_batches
        self._counts = np.zeros(len(COUNTERS), np.int64)
        self._m = {"batches": 0, "rows": 0, "tokens": 0, "loss_tokens": 0, "segments": 0, "padding_batches": 0}
        self._wait = 0.0

    def __next__(self) -> dict:
        if self.max_batches is not None and self._m["batches"] >= self.max_batches:
            raise StopIteration
        t = time.perf_counter()
        try:
            batch = next(self._inner)
        except StopIteration:
            if self.max_batches is None:
                raise
            self._m["padding_batches"] += 1  # every host yields exactly max_batches
            batch = empty_batch(self.task, self.batch_size, self.seq_len)
        except ValueError as e:
            if "skipped" in str(e) and "elements" in str(e):
                self._counts += _take(self.info.pipeline_id)
                why = _fmt(self.stats()["skipped"]) or "nothing recorded"
                raise DataError(f"no usable {self.task} examples: every record was dropped ({why}); "
                                "raise train.seq_len") from None
            raise
        self._wait += time.perf_counter() - t
        counts = batch.pop(STATS_KEY, None)
        if counts is not None:
            self._counts += np.asarray(counts, np.int64)
        m = self._m
        m["batches"] += 1
        if self.task == "sft":
            seg = batch["segment_ids"]
            m["rows"] += int((seg > 0).any(axis=1).sum())
            m["segments"] += int(seg.max(axis=1).sum())
            m["tokens"] += int((seg > 0).sum())
            m["loss_tokens"] += int(batch["loss_mask"].sum())
        else:
            valid = (batch["chosen_loss_mask"].sum(1) > 0) & (batch["rejected_loss_mask"].sum(1) > 0)
            m["rows"] += int(valid.sum())
            m["segments"] += int(valid.sum())
            m["tokens"] += int((batch["chosen_segment_ids"] > 0).sum() + (batch["rejected_segment_ids"] > 0).sum())
            m["loss_tokens"] += int(batch["chosen_loss_mask"].sum() + batch["rejected_loss_mask"].sum())
        return batch

    # -- state
    def get_state(self) -> dict:
        return {"version": 1, "task": self.task, "grain": encode_state(self._inner.get_state()),
                "counts": self._counts.tolist(), "metrics": dict(self._m)}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError("not a sc_jax data iterator state (missing 'grain')")
        if state.get("task", self.task) != self.task:
            raise ValueError(f"the saved data state is for task '{state.get('task')}', this run is '{self.task}'")
        self._inner.set_state(decode_state(state["grain"]))
        counts = state.get("counts")
        if counts is not None and len(counts) == len(self._counts):
            self._counts = np.asarray(counts, np.int64)
        self._m.update(state.get("metrics", {}))

    # -- statistics
    def stats(self) -> dict:
        c = {name: int(self._counts[i]) for i, name in enumerate(COUNTERS)}
        skipped = _merge([r.skipped for r in self.info.records] + [{"too_long": c["too_long"],
                                                                     "malformed": c["malformed"]}])
        m, slots = self._m, self._m["batches"] * self.batch_size * self.seq_len * (1 if self.task == "sft" else 2)
        return {
            "task": self.task,
            "records": {r.label: len(r) for r in self.info.records},  # valid records per source (scan)
            "skipped": {k: v for k, v in skipped.items() if v},  # malformed (scan) and too long (built)
            "examples_built": c["examples"],  # conversations / pairs made (includes ones still buffered)
            "truncated": c["truncated"],  # SFT: end of a conversation cut; DPO: start of a prompt cut
            "batches": m["batches"],
            "rows": m["rows"],  # non-empty rows (SFT) / pairs (DPO) delivered
            "tokens": m["tokens"],
            "loss_tokens": m["loss_tokens"],
            "fill_rate": m["tokens"] / slots if slots else 0.0,
            "examples_per_row": m["segments"] / m["rows"] if m["rows"] else 0.0,
            "seconds_waiting": self._wait,
            "padding_batches": m["padding_batches"],
        }

    def close(self) -> None:
        super().close()

    def __str__(self) -> str:
        return f"InstructIterator(task={self.task}, batch_size={self.batch_size}, seq_len={self.seq_len})"


def make_instruct_iterator(cfg: DataConfig, task: str, *, seq_len: int, batch_size: int, seed: int,
                           train: bool = True, process_index: int = 0, process_count: int = 1,
                           tokenizer: Tokenizer | None = None, max_batches: int | None = None,
                           max_segments: int | None = None, strict: bool | None = None,
                           verbose: bool = False) -> InstructIterator:
    """Train: infinite, reshuffled per epoch. Eval (train=False): one pass in order, the last batch
    padded with empty rows; with `max_batches` exactly that many batches (empty ones after the end)."""
    ds, info = build_dataset(cfg, task, seq_len=seq_len, batch_size=batch_size, seed=seed, train=train,
                             process_index=process_index, process_count=process_count, tokenizer=tokenizer,
                             max_segments=max_segments, strict=strict, verbose=verbose)
    return InstructIterator(ds.__iter__(), info, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)


def make_iterator(cfg, *, seq_len: int, batch_size: int, process_index: int, process_count: int,
                  tokenizer: Tokenizer | None = None, eval_: bool = False) -> InstructIterator:
    """What `sc_jax.tasks.make_iterator` calls for train.task sft/dpo (cfg: the whole train Config)."""
    return make_instruct_iterator(
        cfg.data, cfg.train.task, seq_len=seq_len, batch_size=batch_size, seed=cfg.train.seed, train=not eval_,
        process_index=process_index, process_count=process_count, tokenizer=tokenizer,
        max_batches=(cfg.train.eval_batches or None) if eval_ else None, max_segments=cfg.model.max_segments,
        verbose=process_index == 0)
