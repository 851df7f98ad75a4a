"""The grain pipeline: sources -> documents (+FIM) -> mixture -> host slice -> pack -> batch.

    MapDataset.range(units).shuffle(seed).repeat()        per source; epochs reshuffled by seed
      .map_with_index(DocumentMaker)                     tokens + FIM, choices from (seed, index)
    MapDataset.mix(sources, weights)[host::hosts]         weighted mixture, then this host's share
      .to_iter_dataset()                                  document building in `read_threads` threads
    ConcatThenSplitIterDataset | FirstFitPackIterDataset  packing to seq_len (grain's packers)
      .map(finalize).batch(batch_size).map(AttachStats)
      .mp_prefetch(num_workers)                           worker processes, each packing a slice

Each document carries `input_ids = tokens[:-1]` and `targets = tokens[1:]`, and the packers split
both at the same places, so a document cut across rows keeps its true next-token targets.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import threading
import time
import uuid

import grain
import numpy as np

from sc_jax.config import ConfigError
from sc_jax.data import stats as stats_lib
from sc_jax.data.config import DataConfig, SourceConfig
from sc_jax.data.documents import DocumentMaker
from sc_jax.data.sources import DataError, Source, open_source
from sc_jax.tokenizer import EOS, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, REPO_NAME, Tokenizer

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


class EpochShuffle:
    """grain map_with_index: stream index -> unit id, a new permutation of range(n) every epoch.

    Drawn from (seed, epoch) alone, so any index can be computed without the ones before it (what a
    resumed or re-sliced pipeline needs). Small sources use a cached numpy permutation: grain's
    `index_shuffle` costs milliseconds per call when n is small."""

    _DENSE_MAX = 1 << 22

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n).astype(np.int64)
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def __call__(self, index: int, _element=None) -> int:
        epoch, i = divmod(int(index), self.n)
        if not self.shuffle:
            return i
        if self.n <= self._DENSE_MAX:
            return int(self._perm(epoch)[i])
        from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

        return int(index_shuffle_module.index_shuffle(i, max_index=self.n - 1, seed=sub_seed(self.seed, epoch),
                                                      rounds=4))

    def __getstate__(self):
        return {"n": self.n, "seed": self.seed, "shuffle": self.shuffle}

    def __setstate__(self, state):
        self.__init__(**state)


def sub_seed(*xs: int) -> int:
    """A uint32 seed mixed from integers (grain shuffles take seeds < 2**32)."""
    return int(np.random.SeedSequence([abs(int(x)) for x in xs]).generate_state(1)[0])


@dataclasses.dataclass
class PipelineInfo:
    tokenizer: Tokenizer
    sources: list[Source]
    makers: list[DocumentMaker]
    scan_skipped: dict[str, int]
    pipeline_id: str
    train: bool


# ----------------------------------------------------------------------------- documents


def load_tokenizer(cfg: DataConfig, sources: list[SourceConfig] | None = None) -> Tokenizer:
    """The configured tokenizer, checked for the special tokens this config will write."""
    tok = Tokenizer.from_file(cfg.tokenizer, aliases=cfg.special_tokens)
    needed = [EOS]
    srcs = cfg.sources + cfg.eval_sources if sources is None else sources
    if any((s.fim_rate if s.fim_rate is not None else cfg.fim_rate) > 0 for s in srcs):
        needed += [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]
    if any((s.document or cfg.document) == "repository" for s in srcs):
        needed += [REPO_NAME, FILE_SEP]
    tok.require(*needed)
    return tok


def _eval_plan(cfg: DataConfig) -> tuple[list[SourceConfig], str]:
    if cfg.eval_sources:
        return cfg.eval_sources, "all"
    if cfg.holdout_fraction > 0:
        return cfg.sources, "eval"
    log.warning("data: no eval_sources and holdout_fraction = 0: the eval iterator makes one pass over the "
                "training sources (set data.holdout_fraction for a held-out split)")
    return cfg.sources, "all"


def build_document_dataset(cfg: DataConfig, *, seed: int, train: bool = True, process_index: int = 0,
                           process_count: int = 1, pipeline_id: str = "",
                           tokenizer: Tokenizer | None = None) -> tuple[grain.MapDataset, PipelineInfo]:
    """The documents (before packing) this host reads: a MapDataset of {"input_ids", "targets"} or None.

    Train: infinite, shuffled per epoch, mixed by weight. Eval: one pass, in order, sources one after
    the other, one file order per repository."""
    cfg.validate()
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not within [0, process_count={process_count})")
    srcs, keep = (cfg.sources, "train" if cfg.holdout_fraction > 0 else "all") if train else _eval_plan(cfg)
    if not srcs:
        raise ConfigError("data.sources is empty: add at least one source, e.g. {kind: dir, path: /path/to/repos}")
    tok = tokenizer or load_tokenizer(cfg, srcs)
    components, weights, sources, makers = [], [], [], []
    scan_skipped: dict[str, int] = {}
    for s_idx, scfg in enumerate(srcs):
        mode = scfg.document or cfg.document
        src = open_source(scfg, cfg, group_repos=(mode == "repository"))
        for k, v in src.scan_skipped.items():
            scan_skipped[k] = scan_skipped.get(k, 0) + v
        maker = DocumentMaker(
            src, tok, mode=mode, repo_orders=cfg.repo_orders if train else 1,
            fim_rate=cfg.fim_rate if scfg.fim_rate is None else scfg.fim_rate, spm_rate=cfg.spm_rate,
            fim_repo_rate=cfg.fim_repo_rate, seed=seed, salt=s_idx, holdout_fraction=cfg.holdout_fraction,
            keep=keep, pipeline_id=pipeline_id)
        if maker.num_units == 0:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(src.scan_skipped.items())) or "nothing found"
            raise DataError(f"data source {scfg.kind}:{scfg.path} has no usable {'repositories' if mode == 'repository' else 'files'} "
                            f"(skipped: {detail})")
        ds = grain.MapDataset.range(maker.num_units)
        if train:  # infinite; every epoch a new order
            ds = ds.repeat().map_with_index(EpochShuffle(maker.num_units, sub_seed(seed, s_idx, 0x5EED), cfg.shuffle))
        components.append(ds.map_with_index(maker))
        weights.append(scfg.weight)
        sources.append(src)
        makers.append(maker)
    if len(components) == 1:
        ds = components[0]
    elif train:
        ds = grain.MapDataset.mix(components, weights)
    else:
        ds = grain.MapDataset.concatenate(components)
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds, PipelineInfo(tok, sources, makers, scan_skipped, pipeline_id, train)


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


def _finalize(row: dict) -> dict:
    seg = np.asarray(row["input_ids_segment_ids"], np.int32)
    return {
        "input_ids": np.asarray(row["input_ids"], np.int32),
        "targets": np.asarray(row["targets"], np.int32),
        "segment_ids": seg,
        "positions": np.asarray(row["input_ids_positions"], np.int32),
        # Every packed token has its true next token as target (documents are shifted before
        # packing), so only padding is masked.
        "loss_mask": (seg > 0).astype(np.float32),
    }


def _stack(rows, *, batch_size: int) -> dict:
    out = {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}
    if len(rows) < batch_size:  # the last batch of a finite pass: pad with empty rows
        out = {k: np.concatenate([v, np.zeros((batch_size - len(rows),) + v.shape[1:], v.dtype)]) for k, v in out.items()}
    return out


def empty_batch(batch_size: int, seq_len: int) -> dict:
    z = np.zeros((batch_size, seq_len), np.int32)
    return {"input_ids": z, "targets": z.copy(), "segment_ids": z.copy(), "positions": z.copy(),
            "loss_mask": np.zeros((batch_size, seq_len), np.float32)}


def pack(ds: grain.IterDataset, *, packing: str, seq_len: int, seed: int, shuffle_bins: bool,
         first_fit_bins: int = 64) -> grain.IterDataset:
    """Documents -> rows of `BATCH_KEYS`, each [seq_len]."""
    length = {"input_ids": seq_len, "targets": seq_len}
    if packing == "first_fit":
        ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(seq_len))
        ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=length, num_packing_bins=first_fit_bins,
                                                        seed=sub_seed(seed, 0xB1D5), shuffle_bins=shuffle_bins)
    else:
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=length)
    return ds.map(_finalize)


def build_dataset(cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, train: bool,
                  process_index: int = 0, process_count: int = 1) -> tuple[grain.IterDataset, PipelineInfo]:
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"seq_len ({seq_len}) must be >= 2 and batch_size ({batch_size}) >= 1")
    pid = uuid.uuid4().hex
    docs, info = build_document_dataset(cfg, seed=seed, train=train, process_index=process_index,
                                        process_count=process_count, pipeline_id=pid)
    ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
    ds = pack(ds, packing=cfg.packing, seq_len=seq_len, seed=seed, shuffle_bins=cfg.shuffle and train,
              first_fit_bins=cfg.first_fit_bins)
    ds = ds.batch(batch_size, drop_remainder=train, batch_fn=functools.partial(_stack, batch_size=batch_size))
    ds = ds.map(stats_lib.AttachStats(pid))
    # Filtered documents (bad input, held-out repositories) are expected: no warnings. A training
    # stream where *every* document is dropped would spin forever: make that an error.
    ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(
        filter_warn_threshold_ratio=None, filter_raise_threshold_ratio=1.0 if train else None))
    if cfg.num_workers > 0:
        _absl_flags_with_defaults()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size),
                            worker_init_fn=_init_worker)
    return ds, info


def _init_worker(worker_index: int, worker_count: int) -> None:
    """In each worker process: one tokenizer thread per worker (no oversubscription), unless set."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _absl_flags_with_defaults() -> None:
    """Grain's worker processes read absl flags; outside an absl app they were never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


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


# ----------------------------------------------------------------------------- iterator


class DataIterator(grain.DatasetIterator):
    """The training/eval iterator: grain's, plus statistics and a JSON-safe state.

    Yields {input_ids, targets, segment_ids, positions (int32), loss_mask (float32)}, each
    [batch_size, seq_len]. `get_state()` is a JSON-serialisable dict; `set_state` on a fresh
    iterator built with the same arguments continues exactly. Works with Orbax / grain.checkpoint
    (it is a grain DatasetIterator)."""

    def __init__(self, inner: grain.DatasetIterator, info: PipelineInfo, *, batch_size: int, seq_len: int,
                 max_batches: int | None = None):
        super().__init__(inner)
        self._inner = inner
        self.info = info
        self.tokenizer = info.tokenizer
        self.batch_size, self.seq_len, self.max_batches = batch_size, seq_len, max_batches
        self._counters = np.zeros(len(stats_lib.COUNTERS), np.int64)
        self._m = {"batches": 0, "rows": 0, "tokens": 0, "segments": 0, "padding_batches": 0}
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
            batch = empty_batch(self.batch_size, self.seq_len)
        except ValueError as e:
            if "skipped" in str(e) and "elements" in str(e):
                self._counters += stats_lib.take(self.info.pipeline_id)  # counts made in this process
                raise DataError(f"no usable documents: every input was skipped ({self._skipped_text()})") from None
            raise
        self._wait += time.perf_counter() - t
        extra = batch.pop(stats_lib.STATS_KEY, None)
        if extra is not None:
            self._counters += np.asarray(extra, np.int64)
        seg = batch["segment_ids"]
        self._m["batches"] += 1
        self._m["rows"] += int((seg > 0).any(axis=1).sum())
        self._m["tokens"] += int((seg > 0).sum())
        self._m["segments"] += int(seg.max(axis=1).sum())
        return batch

    # -- state
    def get_state(self) -> dict:
        return {"version": 1, "grain": encode_state(self._inner.get_state()),
                "counters": self._counters.tolist(), "metrics": dict(self._m)}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError("not a sc_jax data iterator state (missing 'grain')")
        self._inner.set_state(decode_state(state["grain"]))
        counters = state.get("counters")
        if counters is not None and len(counters) == len(self._counters):
            self._counters = np.asarray(counters, np.int64)
        self._m.update(state.get("metrics", {}))

    # -- statistics
    def _skipped(self) -> dict[str, int]:
        out = dict(self.info.scan_skipped)
        for name, n in stats_lib.to_dict(self._counters).items():
            if name not in stats_lib.PRODUCED and n:
                out[name] = out.get(name, 0) + n
        return dict(sorted(out.items()))

    def _skipped_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._skipped().items()) or "nothing recorded"

    def stats(self) -> dict:
        c = stats_lib.to_dict(self._counters)
        m = self._m
        slots = m["batches"] * self.batch_size * self.seq_len
        return {
            "batches": m["batches"],
            "tokens": m["tokens"],  # non-padding input tokens delivered
            "fill_rate": m["tokens"] / slots if slots else 0.0,
            "documents_per_row": m["segments"] / m["rows"] if m["rows"] else 0.0,
            "fim_fraction": c["fim_files"] / c["files"] if c["files"] else 0.0,
            "spm_fraction": c["spm_files"] / c["fim_files"] if c["fim_files"] else 0.0,
            "tokens_per_second": m["tokens"] / self._wait if self._wait > 0 else 0.0,
            "seconds_waiting": self._wait,
            "documents_built": c["documents"], "repos_built": c["repos"], "files_built": c["files"],
            "skipped": self._skipped(),
            "padding_batches": m["padding_batches"],
        }

    def close(self) -> None:
        super().close()

    def __str__(self) -> str:
        return f"DataIterator(batch_size={self.batch_size}, seq_len={self.seq_len})"


def make_train_iterator(cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> DataIterator:
    """Infinite training batches ([batch_size, seq_len] for this process), epochs reshuffled by seed."""
    ds, info = build_dataset(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed, train=True,
                             process_index=process_index, process_count=process_count)
    return DataIterator(ds.__iter__(), info, batch_size=batch_size, seq_len=seq_len)


def make_eval_iterator(cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1, max_batches: int | None = None) -> DataIterator:
    """One finite pass over the held-out data (see DataConfig.eval_sources / holdout_fraction).

    The last batch is padded with empty rows (loss_mask 0). With several hosts pass `max_batches`:
    every host then yields exactly that many batches (padding with empty ones), so collectives match."""
    ds, info = build_dataset(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed, train=False,
                             process_index=process_index, process_count=process_count)
    return DataIterator(ds.__iter__(), info, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
