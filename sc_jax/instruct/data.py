"""SFT and DPO on the shared pipeline (sc_jax.data.pipeline): only the records, the example
functions and the packing are theirs.

    jsonl files --scan--> valid records (rows of a sc_jax.data.jsonl index; malformed lines skipped
                          and counted, or an error naming path:line under `data.strict`)
    the pipeline's source stage                  per source, reshuffled per epoch, mixed, sharded
      (index, record) -> example                 ChatML tokens (sc_jax.instruct.chat)
    SFT: first-fit packing (whole conversations, never split; segment ids and positions per
         conversation)  |  DPO: one pair per row, as built
      and the pipeline's batching, counts and workers

The iterator is sc_jax.data's `DataIterator`: `get_state()` is JSON-serialisable and `set_state`
on a fresh iterator built from the same config continues exactly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import zlib

import grain

from sc_jax.config import ConfigError
from sc_jax.data import pipeline, sources
from sc_jax.data.config import DataConfig, SourceConfig
from sc_jax.data.iterator import DataIterator, PipelineInfo, TaskSpec
from sc_jax.data.jsonl import JsonlIndex
from sc_jax.data.sources import DataError
from sc_jax.data.stats import CounterSet, merge_counts
from sc_jax.instruct.chat import ChatFormat, RecordError, dpo_example, sft_example
from sc_jax.instruct import duplicates
from sc_jax.instruct.duplicates import HashIndex, record_hash
from sc_jax.tokenizer import Tokenizer

# Mixed into each source's shuffle seed (kept: the same seed gives the same stream as before).
_SHUFFLE_SALT = 0x1257

# Counts made while examples are built (in whichever thread or worker process builds them).
COUNTERS = CounterSet(("examples", "truncated", "too_long", "malformed"))


# ----------------------------------------------------------------------------- records


expand_paths = duplicates.expand_paths


def parse_record(task: str, raw: bytes):
    """One line -> the parsed record (messages, or (prompt, chosen, rejected)); RecordError if malformed."""
    try:
        obj = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError("bad_json", f"bad JSON ({e})") from None
    return duplicates.parse_for_key(task, obj)


def _valid_rows(index: JsonlIndex, task: str, strict: bool, skipped: dict[str, int], wanted):
    """(row, wanted(raw), parsed record) of every valid record of the index, in order; the
    malformed ones counted in `skipped` by reason (or, strict, a DataError naming path:line)."""
    for row in range(len(index)):
        raw = index.read(row)
        if not raw.strip():
            continue  # blank lines are not records
        try:
            rec = parse_record(task, raw)
        except RecordError as e:
            if strict:
                raise DataError(f"{index.where(row)}: {e}") from None
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        yield row, wanted(raw), rec


def _holdout(raw: bytes, fraction: float) -> bool:
    """A record's side of the train/eval split: by its content, so duplicates land together."""
    return fraction > 0 and zlib.crc32(raw.strip()) / 2.0**32 < fraction


class Records:
    """The valid records of one source: rows of its JSONL index, read on demand."""

    def __init__(self, label: str, index: JsonlIndex, skipped: dict[str, int], duplicates: int = 0):
        self.label, self.index, self.skipped, self.duplicates = label, index, skipped, duplicates

    @classmethod
    def scan(cls, src: SourceConfig, task: str, *, strict: bool = False, holdout_fraction: float = 0.0,
             keep: str = "all", dedup: tuple[HashIndex, int] | None = None) -> "Records":
        """Reads every line once: parses and validates it, keeps where the valid ones are.

        keep: "all", "train" (records outside the holdout) or "eval" (the holdout). dedup: (the
        index of records seen in the sources before, this source's number): a record seen before
        is a duplicate, dropped and counted (before the holdout split, so it is dropped from both)."""
        if src.kind != "jsonl":
            raise ConfigError(f"instruction data reads jsonl sources: data.sources kind '{src.kind}' "
                              f"({src.path}); use {{kind: jsonl, path: FILE}}")
        index = JsonlIndex.build(expand_paths(src.path), lines=True)
        skipped: dict[str, int] = {}
        valid = _valid_rows(index, task, strict, skipped, lambda raw: keep == "all" or _holdout(
            raw, holdout_fraction) == (keep == "eval"))
        duplicates = 0
        if dedup is not None:
            seen, number = dedup
            kept = []
            for (row, wanted), first in seen.first_of(
                    (record_hash(task, rec), (number, 0, row), (row, wanted)) for row, wanted, rec in valid):
                duplicates += first is not None
                if first is None and wanted:
                    kept.append(row)
        else:
            kept = [row for row, wanted, _ in valid if wanted]
        return cls(src.label(), index.select(kept), skipped, duplicates)

    @property
    def files(self) -> list[str]:
        return self.index.files

    def digest(self) -> str:
        """Which record each index is (per file, how many valid records), for the state's fingerprint."""
        return sources.names_digest(sources.rows_per_file(self.index.files, self.index.fid))

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> bytes:
        return self.index.read(i)


class Examples:
    """grain map_with_index: (stream index, record) -> the task's example, or None (dropped, counted)."""

    def __init__(self, task: str, records: Records, fmt: ChatFormat, seq_len: int, pipeline_id: str):
        self.task, self.records, self.fmt, self.seq_len, self.pipeline_id = task, records, fmt, seq_len, pipeline_id

    def __call__(self, _index: int, record: int) -> dict | None:
        counts: dict[str, int] = {}
        ex = self._build(int(record), counts)
        COUNTERS.add(self.pipeline_id, counts)
        return ex

    def _build(self, record: int, counts: dict[str, int]) -> dict | None:
        try:
            rec = parse_record(self.task, self.records.read(record))
        except (RecordError, OSError):  # the file changed since the scan
            counts["malformed"] = 1
            return None
        if self.task == "sft":
            ex, note = sft_example(self.fmt, rec, self.seq_len)
        else:
            ex, note = dpo_example(self.fmt, *rec, self.seq_len)
        if note:
            counts[note] = 1
        if ex is not None:
            counts["examples"] = 1
        return ex


# ----------------------------------------------------------------------------- pipeline


def _scan(cfg: DataConfig, task: str, srcs: list[SourceConfig], *, strict: bool, keep: str, train: bool,
          verbose: bool) -> list[Records]:
    """Every source's records; DataError for a source without any."""
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        seen = stack.enter_context(HashIndex(cfg.dedup_dir)) if cfg.dedup else None
        records = [Records.scan(s, task, strict=strict, holdout_fraction=cfg.holdout_fraction, keep=keep,
                                dedup=None if seen is None else (seen, i)) for i, s in enumerate(srcs)]
    if verbose:
        skipped = merge_counts(r.skipped for r in records)
        print(f"{task} data ({'train' if train else 'eval'}): {sum(map(len, records)):,} records in "
              f"{sum(len(r.files) for r in records)} file(s) ({time.time() - t0:.1f}s); skipped "
              f"{sum(skipped.values())}" + (f" ({_fmt(skipped)})" if skipped else "")
              + (f"; duplicates removed {sum(r.duplicates for r in records)} ({_duplicates(records)})"
                 if cfg.dedup else ""), flush=True)
    for scfg, rec in zip(srcs, records):
        if len(rec) == 0:
            raise DataError(f"data source jsonl:{scfg.path} has no usable {task} records "
                            f"(skipped: {_fmt(rec.skipped) or 'none'}{', all held out' if keep != 'all' else ''})")
    return records


def build_dataset(cfg: DataConfig, task: str, *, seq_len: int, batch_size: int, seed: int, train: bool,
                  process_index: int = 0, process_count: int = 1, tokenizer: Tokenizer | None = None,
                  max_segments: int | None = None, strict: bool | None = None,
                  verbose: bool = False) -> tuple[grain.IterDataset, PipelineInfo]:
    """The batched grain dataset of this host (see the module docstring)."""
    if task not in TASKS:
        raise ConfigError(f"instruction data is for train.task sft or dpo, not '{task}'")
    pipeline.check_shape(seq_len, batch_size)
    pipeline.check_host(process_index, process_count)
    cfg.validate()
    tok = pipeline.configured_tokenizer(cfg, tokenizer)
    fmt = ChatFormat(tok)
    srcs, keep = pipeline.split_plan(cfg, train, task=task, what="records",
                                     hint="add the chat data, e.g. data.sources=[{kind: jsonl, path: FILE}]")
    pid = pipeline.new_pipeline_id()
    records = _scan(cfg, task, srcs, strict=cfg.strict if strict is None else strict, keep=keep, train=train,
                    verbose=verbose)
    makers = [Examples(task, rec, fmt, seq_len, pid) for rec in records]
    components = [pipeline.Component(m, len(rec), s.weight, rec.digest(), "records")
                  for m, rec, s in zip(makers, records, srcs)]
    remix = functools.partial(pipeline.mixture, components, srcs, cfg=cfg, seed=seed, salt=_SHUFFLE_SALT, train=train,
                              process_index=process_index, process_count=process_count, pipeline_id=pid,
                              counters=COUNTERS)
    examples, fp = remix()
    packer = None if task == "dpo" else functools.partial(
        pipeline.pack_first_fit, seq_len=seq_len, bins=cfg.first_fit_bins, seed=seed,
        shuffle_bins=cfg.shuffle and train, meta_features=("loss_mask",), max_sequences=max_segments)
    batches = functools.partial(pipeline.format_and_batch, pack=packer, cfg=cfg, batch_size=batch_size, train=train,
                                pipeline_id=pid, counters=COUNTERS, num_sources=len(records))
    info = PipelineInfo(TASKS[task], tok, records, makers, merge_counts(r.skipped for r in records), pid, train,
                        fp, cfg.on_source_change, restream=pipeline.restreamer(remix, batches), remix=remix)
    return batches(examples), info


def make_instruct_iterator(cfg: DataConfig, task: str, *, seq_len: int, batch_size: int, seed: int,
                           train: bool = True, process_index: int = 0, process_count: int = 1,
                           tokenizer: Tokenizer | None = None, max_batches: int | None = None,
                           max_segments: int | None = None, strict: bool | None = None,
                           verbose: bool = False) -> DataIterator:
    """Train: infinite, reshuffled per epoch. Eval (train=False): one pass in order, the last batch
    padded with empty rows; with `max_batches` exactly that many batches (empty ones after the end)."""
    ds, info = build_dataset(cfg, task, seq_len=seq_len, batch_size=batch_size, seed=seed, train=train,
                             process_index=process_index, process_count=process_count, tokenizer=tokenizer,
                             max_segments=max_segments, strict=strict, verbose=verbose)
    return DataIterator(ds.__iter__(), info, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)


def make_iterator(cfg, *, seq_len: int, batch_size: int, process_index: int, process_count: int,
                  tokenizer: Tokenizer | None = None, eval_: bool = False) -> DataIterator:
    """What `sc_jax.tasks.make_iterator` calls for train.task sft/dpo (cfg: the whole train Config)."""
    return make_instruct_iterator(
        cfg.data, cfg.train.task, seq_len=seq_len, batch_size=batch_size, seed=cfg.train.seed, train=not eval_,
        process_index=process_index, process_count=process_count, tokenizer=tokenizer,
        max_batches=(cfg.train.eval_batches or None) if eval_ else None, max_segments=cfg.model.max_segments,
        verbose=process_index == 0)


# ----------------------------------------------------------------------------- statistics


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if v)


def _duplicates(records: list[Records]) -> str:
    """Per source (in source order), the duplicates its scan removed."""
    return ", ".join(f"{r.label}={r.duplicates}" for r in records)


def report(it: DataIterator) -> dict:
    """`it.stats()` of an SFT or DPO iterator."""
    c, m = it.counts, it.metrics
    skipped = merge_counts([it.info.scan_skipped, {"too_long": c["too_long"], "malformed": c["malformed"]}])
    slots = m["batches"] * it.batch_size * it.seq_len * (1 if it.task == "sft" else 2)
    return {
        "task": it.task,
        "records": {r.label: len(r) for r in it.info.sources},  # valid records per source (scan)
        # data.dedup: per source, the records dropped as exact duplicates of earlier ones
        "duplicates": {r.label: r.duplicates for r in it.info.sources},
        "skipped": {k: v for k, v in skipped.items() if v},  # malformed (scan) and too long (built)
        "examples_built": c["examples"],  # conversations / pairs made (includes ones still buffered)
        "truncated": c["truncated"],  # SFT: end of a conversation cut; DPO: start of a prompt cut
        "batches": m["batches"],
        "rows": m["rows"],  # non-empty rows (SFT) / pairs (DPO) delivered
        "tokens": m["tokens"],
        "loss_tokens": m["loss_tokens"],
        "fill_rate": m["tokens"] / slots if slots else 0.0,
        "examples_per_row": m["segments"] / m["rows"] if m["rows"] else 0.0,
        "seconds_waiting": it.seconds_waiting,
        "padding_batches": m["padding_batches"],
        "mixture": it.mixture(),  # per source: target share, realised share of tokens
    }


def _starved(it: DataIterator) -> str:
    why = _fmt(report(it)["skipped"]) or "nothing recorded"
    return f"no usable {it.task} examples: every record was dropped ({why}); raise train.seq_len"


TASKS = {name: TaskSpec(name, COUNTERS, report, _starved) for name in ("sft", "dpo")}
