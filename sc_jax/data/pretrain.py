"""Pretraining on the shared pipeline (sc_jax.data.pipeline): repository or file documents with
FIM (`DocumentMaker`, one per source), packed by concat-then-split or first fit.

    it = make_train_iterator(cfg, seq_len=4096, batch_size=8, seed=0)   # infinite, reshuffled per epoch
    it = make_eval_iterator(cfg, seq_len=4096, batch_size=8, seed=0)    # one pass over the held-out data
"""

from __future__ import annotations

import functools

import grain

from sc_jax.config import ConfigError
from sc_jax.data import pipeline, stats
from sc_jax.data.config import DataConfig, SourceConfig
from sc_jax.data.documents import DocumentMaker
from sc_jax.data.iterator import DataIterator, PipelineInfo, TaskSpec
from sc_jax.data.sources import DataError, open_source
from sc_jax.tokenizer import EOS, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, REPO_NAME, Tokenizer

# Mixed into each source's shuffle seed (kept: the same seed gives the same stream as before).
_SHUFFLE_SALT = 0x5EED


def load_tokenizer(cfg: DataConfig, sources: list[SourceConfig] | None = None,
                   tokenizer: Tokenizer | None = None) -> Tokenizer:
    """The configured tokenizer (`tokenizer` when given and configured alike), checked for the
    special tokens this config will write."""
    tok = pipeline.configured_tokenizer(cfg, tokenizer)
    needed = [EOS]
    srcs = cfg.sources + cfg.eval_sources if sources is None else sources
    if any((s.fim_rate if s.fim_rate is not None else cfg.fim_rate) > 0 for s in srcs):
        needed += [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]
    if any((s.document or cfg.document) == "repository" for s in srcs):
        needed += [REPO_NAME, FILE_SEP]
    tok.require(*needed)
    return tok


# ----------------------------------------------------------------------------- examples


def _maker(cfg: DataConfig, scfg: SourceConfig, s_idx: int, tok: Tokenizer, *, seed: int, train: bool, keep: str,
           pipeline_id: str) -> DocumentMaker:
    """The document function of one source (opened and scanned here); DataError when it has none."""
    mode = scfg.document or cfg.document
    src = open_source(scfg, cfg, group_repos=(mode == "repository"))
    maker = DocumentMaker(
        src, tok, mode=mode, repo_orders=cfg.repo_orders if train else 1,
        fim_rate=cfg.fim_rate if scfg.fim_rate is None else scfg.fim_rate, spm_rate=cfg.spm_rate,
        fim_repo_rate=cfg.fim_repo_rate, seed=seed, salt=s_idx, holdout_fraction=cfg.holdout_fraction,
        keep=keep, pipeline_id=pipeline_id)
    if maker.num_units == 0:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(src.scan_skipped.items())) or "nothing found"
        what = "repositories" if mode == "repository" else "files"
        raise DataError(f"data source {scfg.kind}:{scfg.path} has no usable {what} (skipped: {detail})")
    return maker


def build_document_dataset(cfg: DataConfig, *, seed: int, train: bool = True, process_index: int = 0,
                           process_count: int = 1, pipeline_id: str = "",
                           tokenizer: Tokenizer | None = None) -> tuple[grain.MapDataset, PipelineInfo]:
    """The documents (before packing) this host reads: a MapDataset of {"input_ids", "targets"} or None.

    Train: infinite, shuffled per epoch, mixed by weight. Eval: one pass, in order, sources one after
    the other, one file order per repository."""
    cfg.validate()
    if cfg.dedup:
        raise ConfigError("data.dedup removes duplicate SFT/DPO records (train.task sft or dpo), not pretraining "
                          "documents: set data.dedup=false")
    pipeline.check_host(process_index, process_count)
    srcs, keep = pipeline.split_plan(cfg, train, task="pretrain", what="sources",
                                     hint="add at least one source, e.g. {kind: dir, path: /path/to/repos}")
    tok = load_tokenizer(cfg, srcs, tokenizer)
    makers = [_maker(cfg, scfg, i, tok, seed=seed, train=train, keep=keep, pipeline_id=pipeline_id)
              for i, scfg in enumerate(srcs)]
    components = [pipeline.Component(m, m.num_units, scfg.weight, m.source.unit_digest(files=m.mode == "file"),
                                     "files" if m.mode == "file" else "repositories x repo_orders")
                  for m, scfg in zip(makers, srcs)]
    remix = functools.partial(pipeline.mixture, components, srcs, cfg=cfg, seed=seed, salt=_SHUFFLE_SALT, train=train,
                              process_index=process_index, process_count=process_count, pipeline_id=pipeline_id,
                              counters=TASK.counters)
    ds, fp = remix()
    sources = [m.source for m in makers]
    scan_skipped = stats.merge_counts(s.scan_skipped for s in sources)
    info = PipelineInfo(TASK, tok, sources, makers, scan_skipped, pipeline_id, train, fp, cfg.on_source_change)
    info.remix = remix
    return ds, info


# ----------------------------------------------------------------------------- packing


class _Chunk(grain.experimental.FlatMapTransform):
    """Cuts documents longer than seq_len for first-fit packing (which never splits)."""

    max_fan_out = 1 << 30

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, element):
        n = len(element["input_ids"])
        if n <= self.seq_len:
            return [element]
        return [{k: v[i:i + self.seq_len] for k, v in element.items()} for i in range(0, n, self.seq_len)]


def pack(ds: grain.IterDataset, *, packing: str, seq_len: int, seed: int, shuffle_bins: bool,
         first_fit_bins: int = 64) -> grain.IterDataset:
    """Documents -> rows of `BATCH_KEYS`, each [seq_len]."""
    if packing == "first_fit":
        ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(seq_len))
        return pipeline.pack_first_fit(ds, seq_len=seq_len, bins=first_fit_bins, seed=seed, shuffle_bins=shuffle_bins)
    return pipeline.pack_concat(ds, seq_len=seq_len)


# ----------------------------------------------------------------------------- iterators


def _iterator(cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, train: bool, process_index: int,
              process_count: int, max_batches: int | None = None, tokenizer: Tokenizer | None = None) -> DataIterator:
    pipeline.check_shape(seq_len, batch_size)
    pid = pipeline.new_pipeline_id()
    docs, info = build_document_dataset(cfg, seed=seed, train=train, process_index=process_index,
                                        process_count=process_count, pipeline_id=pid, tokenizer=tokenizer)
    packer = functools.partial(pack, packing=cfg.packing, seq_len=seq_len, seed=seed,
                               shuffle_bins=cfg.shuffle and train, first_fit_bins=cfg.first_fit_bins)
    batches = functools.partial(pipeline.format_and_batch, pack=packer, cfg=cfg, batch_size=batch_size, train=train,
                                pipeline_id=pid, counters=TASK.counters, num_sources=len(info.sources))
    info.restream = pipeline.restreamer(info.remix, batches)
    return DataIterator(batches(docs).__iter__(), info, batch_size=batch_size, seq_len=seq_len,
                        max_batches=max_batches)


def make_train_iterator(cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, tokenizer: Tokenizer | None = None) -> DataIterator:
    """Infinite training batches ([batch_size, seq_len] for this process), epochs reshuffled by seed.
    `tokenizer`: data.tokenizer already loaded (else it is loaded here)."""
    return _iterator(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed, train=True,
                     process_index=process_index, process_count=process_count, tokenizer=tokenizer)


def make_eval_iterator(cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1, max_batches: int | None = None,
                       tokenizer: Tokenizer | None = None) -> DataIterator:
    """One finite pass over the held-out data (see DataConfig.eval_sources / holdout_fraction).

    The last batch is padded with empty rows (loss_mask 0). With several hosts pass `max_batches`:
    every host then yields exactly that many batches (padding with empty ones), so collectives match."""
    return _iterator(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed, train=False,
                     process_index=process_index, process_count=process_count, max_batches=max_batches,
                     tokenizer=tokenizer)


# ----------------------------------------------------------------------------- statistics


def skipped(it: DataIterator) -> dict[str, int]:
    """Inputs dropped, by reason: at scan time and while building documents."""
    dropped = {name: n for name, n in it.counts.items() if name not in stats.PRODUCED and n}
    return stats.merge_counts([it.info.scan_skipped, dropped])


def report(it: DataIterator) -> dict:
    """`it.stats()` of a pretraining iterator."""
    c, m = it.counts, it.metrics
    slots = m["batches"] * it.batch_size * it.seq_len
    return {
        "batches": m["batches"],
        "tokens": m["tokens"],  # non-padding input tokens delivered
        "fill_rate": m["tokens"] / slots if slots else 0.0,
        "documents_per_row": m["segments"] / m["rows"] if m["rows"] else 0.0,
        "fim_fraction": c["fim_files"] / c["files"] if c["files"] else 0.0,
        "spm_fraction": c["spm_files"] / c["fim_files"] if c["fim_files"] else 0.0,
        "tokens_per_second": m["tokens"] / it.seconds_waiting if it.seconds_waiting > 0 else 0.0,
        "seconds_waiting": it.seconds_waiting,
        "documents_built": c["documents"], "repos_built": c["repos"], "files_built": c["files"],
        "skipped": skipped(it),
        "padding_batches": m["padding_batches"],
        "mixture": it.mixture(),  # per source: target share, realised share of tokens
    }


def _starved(it: DataIterator) -> str:
    text = ", ".join(f"{k}={v}" for k, v in skipped(it).items()) or "nothing recorded"
    return f"no usable documents: every input was skipped ({text})"


TASK = TaskSpec("pretrain", stats.PRETRAIN_COUNTERS, report, _starved)
