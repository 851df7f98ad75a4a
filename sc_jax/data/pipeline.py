"""The one grain pipeline of every task: source -> shuffle/repeat -> examples -> mix -> shard ->
pack -> batch -> counts -> workers. A task only brings its example function per source and its
packer (pretraining: `sc_jax.data.pretrain`; SFT and DPO: `sc_jax.instruct.data`).

    MapDataset.range(units)                            per source: unit ids (repositories, files, records)
      .repeat().map_with_index(EpochShuffle)            train: infinite, a new permutation every epoch
      .map_with_index(example function)                 (stream index, unit) -> example, or None (dropped)
    MapDataset.mix(sources, weights)[host::hosts]       train: weighted mixture, per document or (TokenMix)
                                                        per token (eval: one after the other), then this
                                                        host's share
      .to_iter_dataset()                                example building in `read_threads` threads
    pack                                                the task's: concat-then-split or first-fit (grain's
                                                        packers) -> rows of BATCH_KEYS; DPO: none
      .batch(batch_size, batch_and_pad)                 the last batch of a finite pass padded with empty rows
      .map(AttachStats)                                 the counts made since the last batch ride along
      .mp_prefetch(num_workers)                         worker processes, each running all of the above

Every random choice is drawn from (seed, element index), so any element can be computed without
the ones before it: what a resumed or re-sliced pipeline needs.

An iterator state holds grain indices into this stream; `fingerprint` describes what they index
(the layout, per source its unit count and unit names, the weights, the host slice, the worker
count, the seed), so that a state restored onto other data is noticed (`changes`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import threading
import time
import uuid
from typing import Callable

import grain
import numpy as np

from sc_jax.config import ConfigError
from sc_jax.data import stats
from sc_jax.data.config import LEGACY_WEIGHT_UNIT, DataConfig, SourceConfig
from sc_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def configured_tokenizer(cfg: DataConfig, given: Tokenizer | None) -> Tokenizer:
    """`given` when it is data.tokenizer as the config reads it (same special-token
    spellings), else data.tokenizer loaded here: a run loads its tokenizer once and passes it."""
    if given is not None and given.aliases == dict(cfg.special_tokens or {}):
        return given
    return Tokenizer.from_file(cfg.tokenizer, aliases=cfg.special_tokens)


def new_pipeline_id() -> str:
    """Names one pipeline's counters in the registry of every process that builds its examples."""
    return uuid.uuid4().hex


def check_shape(seq_len: int, batch_size: int) -> None:
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"seq_len ({seq_len}) must be >= 2 and batch_size ({batch_size}) >= 1")


def check_host(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not within [0, process_count={process_count})")


# ----------------------------------------------------------------------------- splits

_warned: set = set()
_warned_lock = threading.Lock()


def warn_once(logger: logging.Logger, key, message: str) -> None:
    """Logs a warning the first time `key` comes up in this process. The trainer rebuilds its eval
    iterator at every evaluation, and a warning about the config is news only the first time."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(message)


def split_plan(cfg: DataConfig, train: bool, *, task: str, what: str, hint: str) -> tuple[list[SourceConfig], str]:
    """(sources, keep) of one split; keep: "all", "train" (outside the held-out split) or "eval"
    (only the held-out split). Eval reads `eval_sources`, else the holdout of the training sources,
    else (with a warning naming `what` is read) one pass over the training sources. `hint` ends
    the error for a config without sources."""
    if train:
        srcs, keep = cfg.sources, ("train" if cfg.holdout_fraction > 0 else "all")
    elif cfg.eval_sources:
        srcs, keep = cfg.eval_sources, "all"
    elif cfg.holdout_fraction > 0:
        srcs, keep = cfg.sources, "eval"
    else:
        warn_once(log, (task, "eval_on_train", tuple((s.kind, s.path) for s in cfg.sources)),
                  "data: no eval_sources and holdout_fraction = 0: the eval iterator makes one pass over the "
                  f"training {what} (set data.holdout_fraction for a held-out split)")
        srcs, keep = cfg.sources, "all"
    if not srcs:
        raise ConfigError(f"data.sources is empty: {hint}")
    return srcs, keep


# ----------------------------------------------------------------------------- source stage


def sub_seed(*xs: int) -> int:
    """A uint32 seed mixed from integers (grain shuffles take seeds < 2**32)."""
    return int(np.random.SeedSequence([abs(int(x)) for x in xs]).generate_state(1)[0])


class EpochShuffle:
    """grain map_with_index: stream index -> unit id, a new permutation of range(n) every epoch.

    Drawn from (seed, epoch) alone, so any index can be computed without the ones before it. Up to
    `_DENSE_MAX` units the permutation is numpy's, cached for the last two epochs (grain's
    `index_shuffle` costs milliseconds per call when n is small); past that, grain's
    `index_shuffle`, one index at a time (no array of n entries, seed mixed with the epoch)."""

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


@dataclasses.dataclass(frozen=True)
class Component:
    """One source of examples: `make(stream index, unit)` -> an example dict, or None (dropped and
    counted by `make`), for units 0 .. size-1; `weight`: its share of the training mixture;
    `names`: a digest of which unit each id is (sources.names_digest; None: not known cheaply);
    `unit`: what a unit is, in words (for messages)."""

    make: Callable
    size: int
    weight: float
    names: str | None = None
    unit: str = "units"


def example_stream(components: list[Component], *, seed: int, salt: int, shuffle: bool, train: bool,
                   process_index: int = 0, process_count: int = 1, unit_tokens: list[float] | None = None,
                   pipeline_id: str = "") -> grain.MapDataset:
    """The examples this host reads (None where one was dropped), a MapDataset.

    Train: every source infinite, reshuffled per epoch from (seed, source index, `salt`), mixed by
    weight: per document drawn (grain's mix), or with `unit_tokens` (each source's mean tokens per
    unit) per token (`TokenMix`). Eval: one pass, in order, the sources one after the other. Host i
    of n reads elements i, i + n, ... of that stream. With `pipeline_id`, the tokens each source
    makes are counted (stats.source_tokens)."""
    parts = []
    for i, c in enumerate(components):
        units = grain.MapDataset.range(c.size)
        if train:
            units = units.repeat().map_with_index(EpochShuffle(c.size, sub_seed(seed, i, salt), shuffle))
        make = SourceTokens(c.make, i, len(components), pipeline_id) if pipeline_id else c.make
        parts.append(units.map_with_index(make))
    if len(parts) == 1:
        ds = parts[0]
    elif train and unit_tokens is not None:
        ds = TokenMix(parts, [c.weight / t for c, t in zip(components, unit_tokens)])
    elif train:
        ds = grain.MapDataset.mix(parts, [c.weight for c in components])
    else:
        ds = grain.MapDataset.concatenate(parts)
    return ds[process_index::process_count] if process_count > 1 else ds


def example_tokens(example: dict) -> int:
    """The input tokens an example puts into rows (DPO: both sides)."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return sum(len(v) for k, v in example.items() if k.endswith("input_ids"))


class SourceTokens:
    """grain map_with_index around one source's example function: counts the tokens it makes
    under that source (stats.source_tokens), in whichever process builds them."""

    def __init__(self, make: Callable, source: int, num_sources: int, pipeline_id: str):
        self.make, self.source, self.num_sources, self.pipeline_id = make, source, num_sources, pipeline_id

    def __call__(self, index: int, unit):
        example = self.make(index, unit)
        if example is not None:
            stats.source_tokens(self.num_sources).add(stats.source_key(self.pipeline_id),
                                                      {str(self.source): example_tokens(example)})
        return example


# Integer draw rates: the smallest is this, the others in proportion (grain's mix uses 100, which
# leaves rate ratios up to 1% off: too coarse for token shares).
_RATE_SCALE = 1_000_000


class TokenMix(grain.MapDataset):
    """An infinite mixture drawing source i at rate `rates[i]` (any positive numbers): element k
    comes from the source whose cumulative share steps up at k, a deterministic interleave (the
    same construction as grain's mix, with finer integer rates), so any element is found without
    the ones before it."""

    def __init__(self, parents: list[grain.MapDataset], rates: list[float]):
        super().__init__(parents)
        low = min(rates)
        self.rates = tuple(max(1, round(r / low * _RATE_SCALE)) for r in rates)

    def __len__(self) -> int:
        return sys.maxsize

    def source_of(self, k: int) -> tuple[int, int]:
        """(source, index within it) of element k."""
        remaining = sum(self.rates)
        at, at_next = k, k + 1
        for i, rate in enumerate(self.rates):
            # How many of the first `at` elements the sources after i take, by proportion.
            rest, rest_next = at * (remaining - rate) // remaining, at_next * (remaining - rate) // remaining
            if at - rest != at_next - rest_next:
                return i, at_next - rest_next - 1
            remaining -= rate
            at, at_next = rest, rest_next
        raise AssertionError("unreachable: the last source takes every remaining element")

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        source, k = self.source_of(int(index))
        return self._parents[source][k]

    def __str__(self) -> str:
        return f"TokenMix(rates={self.rates})"


# The token mixture's estimate of each source's mean tokens per unit is sampled until its relative
# standard error is below this (or data.weight_sample_max units are read): a 0.5% error moves an
# 80:20 mix by under 0.1 point. Heavy-tailed sizes (repositories) need far more than a fixed sample.
WEIGHT_RSE = 0.005


@dataclasses.dataclass
class TokenEstimate:
    """One source's mean input tokens per unit over `n` sampled units, and its relative standard error."""

    mean: float
    rse: float
    n: int


def _rse(tokens: list[int], size: int) -> float:
    """The relative standard error of the mean of `tokens`, units sampled without replacement
    from `size` (finite-population corrected: every unit read gives 0)."""
    n, mean = len(tokens), float(np.mean(tokens)) if tokens else 0.0
    if n >= size:
        return 0.0
    if n < 2 or mean <= 0:
        return float("inf")
    return float(np.std(tokens, ddof=1)) / math.sqrt(n) * math.sqrt((size - n) / (size - 1)) / mean


def _sample_order(size: int, first: int, seed: int, i: int):
    """Unit ids to sample from source i, without repeats: the `first` drawn as one choice (what
    a fixed sample of that size drew), then the others in an order drawn from (seed, i)."""
    rng = np.random.default_rng([int(seed), i, 0x70C5])
    if size <= first:
        yield from range(size)
        return
    chosen = [int(u) for u in rng.choice(size, size=first, replace=False)]
    yield from chosen
    used = set(chosen)
    more = np.random.default_rng([int(seed), i, 0x70C5, 1])
    if size <= 1 << 22:
        yield from (int(u) for u in more.permutation(size) if int(u) not in used)
        return
    while True:  # sparse: the caller stops before every unit is used
        for u in more.integers(size, size=4096):
            if int(u) not in used:
                used.add(int(u))
                yield int(u)


def source_estimate(c: Component, i: int, *, seed: int, sample: int, sample_max: int,
                    progress: Callable[[int, TokenEstimate], None] | None = None) -> TokenEstimate:
    """Source i's mean input tokens per unit (a dropped unit counts 0: it takes a draw and gives
    nothing): at least `sample` units, then more, `sample` at a time, until the relative standard
    error is under WEIGHT_RSE or `sample_max` units are read. Drawn from (seed, i) alone: the same
    on every host, worker and resume."""
    tokens, limit = [], min(c.size, max(sample, sample_max))
    for u in _sample_order(c.size, min(sample, c.size), seed, i):
        example = c.make(u, u)
        tokens.append(example_tokens(example) if example is not None else 0)
        n = len(tokens)
        if n >= limit or (n >= sample and n % sample == 0):
            est = TokenEstimate(float(np.mean(tokens)), _rse(tokens, c.size), n)
            if n >= limit or est.rse < WEIGHT_RSE:
                return est
            if progress is not None:
                progress(i, est)
    return TokenEstimate(float(np.mean(tokens)) if tokens else 0.0, _rse(tokens, c.size), len(tokens))


def unit_tokens(components: list[Component], *, seed: int, sample: int, sample_max: int, counters: stats.CounterSet,
                pipeline_id: str, progress=None) -> tuple[list[float], list[TokenEstimate]]:
    """(per source, the mean tokens per unit the token mixture's rates use; the estimates). The
    counts the sampled examples made are discarded."""
    found = [source_estimate(c, i, seed=seed, sample=sample, sample_max=sample_max, progress=progress)
             for i, c in enumerate(components)]
    counters.take(pipeline_id)
    known = [e.mean for e in found if e.mean > 0]
    if not known:
        return [1.0] * len(found), found
    # A source whose sample gave nothing: drawn as if average (its weight then counts documents).
    return [e.mean if e.mean > 0 else sum(known) / len(known) for e in found], found


def _estimating_progress(labels: list[str]):
    """Logs sampling that takes long, every 10 s."""
    t0, last = time.time(), [time.time()]

    def report(i: int, est: TokenEstimate) -> None:
        if time.time() - last[0] >= 10:
            last[0] = time.time()
            log.info("data: estimating tokens per unit of %s: %d units read, mean %.1f +- %.2f%% (%.0fs)",
                     labels[i], est.n, est.mean, 100 * est.rse, time.time() - t0)

    return report


def mixture(components: list[Component], srcs: list[SourceConfig], *, cfg: DataConfig, seed: int, salt: int,
            train: bool, process_index: int, process_count: int, pipeline_id: str, counters: stats.CounterSet,
            weight_unit: str | None = None, rates: list[float] | None = None) -> tuple[grain.MapDataset, dict]:
    """(example_stream, its fingerprint) with the mixture by `weight_unit` (default data.weight_unit).
    Only a training stream of several sources mixes: the others ignore it. `rates`: by tokens, the
    tokens per unit to use instead of estimating them (a saved state's)."""
    unit = cfg.weight_unit if weight_unit is None else weight_unit
    if not (train and len(components) > 1 and unit == "tokens"):
        rates = None
    elif rates is None:
        t0 = time.time()
        labels = [s.label() for s in srcs]
        rates, found = unit_tokens(components, seed=seed, sample=cfg.weight_sample, sample_max=cfg.weight_sample_max,
                                   counters=counters, pipeline_id=pipeline_id, progress=_estimating_progress(labels))
        log.info("data: tokens per unit %s (%.1fs; target relative error %.1f%%, at most %d units per source)",
                 ", ".join(f"{name} {e.mean:.1f} +- {100 * e.rse:.2f}% ({e.n} units)"
                           for name, e in zip(labels, found)), time.time() - t0, 100 * WEIGHT_RSE,
                 cfg.weight_sample_max)
    ds = example_stream(components, seed=seed, salt=salt, shuffle=cfg.shuffle, train=train,
                        process_index=process_index, process_count=process_count, unit_tokens=rates,
                        pipeline_id=pipeline_id)
    fp = fingerprint(components, srcs, cfg=cfg, seed=seed, train=train, process_index=process_index,
                     process_count=process_count, weight_unit=unit, unit_tokens=rates)
    return ds, fp


def restreamer(remix: Callable, batches: Callable) -> Callable:
    """(weight_unit, rates=None) -> (a fresh iterator of batches, its fingerprint): `remix` (a partial
    of `mixture`) mixed by that unit (by tokens: with those tokens per unit, when given), then
    `batches` (a partial of `format_and_batch`)."""
    def restream(weight_unit: str, rates: list[float] | None = None):
        examples, fp = remix(weight_unit=weight_unit, rates=rates)
        return batches(examples).__iter__(), fp

    return restream


# ----------------------------------------------------------------------------- fingerprint

# Bump when the same (seed, sources) would map a grain index onto another unit: a change to
# example_stream, EpochShuffle or the salts. States saved with another layout are then refused.
STREAM_LAYOUT = 1


def fingerprint(components: list[Component], srcs: list[SourceConfig], *, cfg: DataConfig, seed: int, train: bool,
                process_index: int, process_count: int, weight_unit: str = LEGACY_WEIGHT_UNIT,
                unit_tokens: list[float] | None = None) -> dict:
    """What the grain indices of an iterator state point at (JSON): stored in every state and
    compared on restore. How each unit is turned into an example (FIM, filters, tokenizer) is
    not here: that is the config (the trainer refuses a resume with another one)."""
    fp = {"layout": STREAM_LAYOUT, "split": "train" if train else "eval", "seed": int(seed),
          "shuffle": bool(cfg.shuffle), "hosts": [int(process_index), int(process_count)],
          "workers": int(cfg.num_workers), "weight_unit": weight_unit,
          "sources": [{"kind": s.kind, "path": s.path, "units": int(c.size), "unit": c.unit,
                       "weight": float(c.weight), "names": c.names} for c, s in zip(components, srcs)]}
    for s, t in zip(fp["sources"], unit_tokens or ()):
        s["tokens_per_unit"] = float(t)
    return fp


def mixes(fp: dict) -> bool:
    """Whether the stream a fingerprint describes mixes sources (training, several of them)."""
    return fp.get("split") == "train" and len(fp.get("sources", [])) > 1


def _shares(sources: list[dict]) -> list[float]:
    total = sum(float(s.get("weight", 1.0)) for s in sources) or 1.0
    return [float(s.get("weight", 1.0)) / total for s in sources]


def changes(saved: dict, now: dict) -> list[str]:
    """"what old -> new" for everything that makes the saved fingerprint index other data than
    `now` ([] = the same stream). The process index is not compared (see `other_host`); a source
    at another path with the same unit count and names is the same data, moved."""
    out = []
    for key, what in (("layout", "stream layout"), ("split", "split"), ("seed", "seed"), ("workers", "num_workers")):
        if key in saved and saved[key] != now[key]:
            extra = " (saved by another version of sc_jax)" if key == "layout" else ""
            out.append(f"{what} {saved[key]!r} -> {now[key]!r}{extra}")
    train = now["split"] == "train"
    if train and "shuffle" in saved and saved["shuffle"] != now["shuffle"]:
        out.append(f"shuffle {saved['shuffle']} -> {now['shuffle']}")
    if "hosts" in saved and saved["hosts"][1] != now["hosts"][1]:
        out.append(f"process_count {saved['hosts'][1]} -> {now['hosts'][1]}")
    old, new = saved.get("sources", []), now["sources"]
    if len(old) != len(new):
        label = lambda ss: "[" + ", ".join(f"{s['kind']}:{s['path']}" for s in ss) + "]"  # noqa: E731
        out.append(f"sources {label(old)} -> {label(new)}")
    for i, (a, b) in enumerate(zip(old, new)):
        where = f"source {i} ({b['kind']}:{b['path']})"
        moved = f" (path {a['path']} -> {b['path']})" if a["path"] != b["path"] else ""
        if a["kind"] != b["kind"]:
            out.append(f"source {i} kind {a['kind']} -> {b['kind']}")
        elif a["units"] != b["units"]:
            out.append(f"{where} units {a['units']} -> {b['units']} ({b.get('unit', 'units')}){moved}")
        elif a.get("names") and b.get("names"):
            if a["names"] != b["names"]:
                out.append(f"{where} other units ({b['units']} either way, names differ){moved}")
        elif moved:  # units not named: another path may be other data
            out.append(f"source {i} path {a['path']} -> {b['path']}")
    if train and len(old) == len(new) > 1 and not all(
            abs(x - y) <= 1e-9 for x, y in zip(_shares(old), _shares(new))):
        out.append(f"weights {[s['weight'] for s in old]} -> {[s['weight'] for s in new]}")
    unit_old, unit_new = saved.get("weight_unit", LEGACY_WEIGHT_UNIT), now.get("weight_unit", LEGACY_WEIGHT_UNIT)
    if mixes(now) and len(old) == len(new):
        if unit_old != unit_new:
            out.append(f"weight_unit {unit_old} -> {unit_new}")
        elif unit_new == "tokens":
            rate = lambda ss: [round(s.get("tokens_per_unit", 0.0), 3) for s in ss]  # noqa: E731
            if any(abs(a.get("tokens_per_unit", 0.0) - b.get("tokens_per_unit", 0.0)) > 1e-9 * b.get(
                    "tokens_per_unit", 1.0) for a, b in zip(old, new)):
                out.append(f"tokens per unit {rate(old)} -> {rate(new)} (the token mixture's estimate)")
    return out


def saved_rates(saved: dict, now: dict) -> list[float] | None:
    """The tokens per unit of a state's token mixture when they are all that differs from `now`
    (they were estimated by another rule, e.g. the fixed sample of older code): the stream the state
    indexes is rebuilt with them. None otherwise."""
    diff = changes(saved, now)
    if len(diff) != 1 or not diff[0].startswith("tokens per unit "):
        return None
    rates = [s.get("tokens_per_unit") for s in saved["sources"]]
    return [float(t) for t in rates] if all(isinstance(t, (int, float)) and t > 0 for t in rates) else None


def other_host(saved: dict, now: dict) -> str | None:
    """The note for a state saved by another process of the same host count (what a checkpoint
    written by older code, which kept process 0's state only, gives every host): this process
    resumes near, not exactly at, its position. None when the state is this process's own."""
    if "hosts" not in saved or saved["hosts"] == now["hosts"] or saved["hosts"][1] != now["hosts"][1]:
        return None
    return (f"data: this data state was saved by process {saved['hosts'][0]} of {saved['hosts'][1]} and is restored "
            f"on process {now['hosts'][0]}: its stream resumes at that process's position (near, not exactly at, "
            "where this one stopped)")


# ----------------------------------------------------------------------------- packing

# Examples carry `input_ids = tokens[:-1]` and `targets = tokens[1:]`, and the packers split both at
# the same places, so an example cut across rows keeps its true next-token targets.
_SHIFTED = ("input_ids", "targets")


def packed_row(row: dict) -> dict:
    """A grain packer's row -> BATCH_KEYS, each [seq_len]. Only padding is masked, and where the
    examples carry their own loss_mask (SFT: the assistant tokens), what that masks too."""
    seg = np.asarray(row["input_ids_segment_ids"], np.int32)
    mask = (seg > 0).astype(np.float32)
    if "loss_mask" in row:
        mask = np.asarray(row["loss_mask"], np.float32) * mask
    return {"input_ids": np.asarray(row["input_ids"], np.int32), "targets": np.asarray(row["targets"], np.int32),
            "segment_ids": seg, "positions": np.asarray(row["input_ids_positions"], np.int32), "loss_mask": mask}


def pack_concat(ds: grain.IterDataset, *, seq_len: int) -> grain.IterDataset:
    """Concatenate-then-split: rows full to the last token, examples cut at row ends."""
    length = {k: seq_len for k in _SHIFTED}
    return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=length).map(packed_row)


def pack_first_fit(ds: grain.IterDataset, *, seq_len: int, bins: int, seed: int, shuffle_bins: bool,
                   meta_features: tuple[str, ...] = (), max_sequences: int | None = None) -> grain.IterDataset:
    """First-fit packing of whole examples (each <= seq_len) into `bins` open rows; meta_features
    are packed alongside without segment ids of their own."""
    length = {k: seq_len for k in _SHIFTED + meta_features}
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=length, num_packing_bins=bins, seed=sub_seed(seed, 0xB1D5), shuffle_bins=shuffle_bins,
        meta_features=meta_features, max_sequences_per_bin=max_sequences)
    return ds.map(packed_row)


# ----------------------------------------------------------------------------- batches


def format_and_batch(examples: grain.MapDataset, pack: Callable[[grain.IterDataset], grain.IterDataset] | None, *,
                     cfg: DataConfig, batch_size: int, train: bool, pipeline_id: str,
                     counters: stats.CounterSet, num_sources: int = 0) -> grain.IterDataset:
    """examples -> pack -> batch -> counts -> workers, the stages every task shares. `pack` turns
    examples into rows of the batch keys (None: the examples are rows already)."""
    ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
    if pack is not None:
        ds = pack(ds)
    # grain's batch_and_pad: the last batch of a finite pass is padded with zero rows (loss_mask 0).
    ds = ds.batch(batch_size, drop_remainder=train,
                  batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size))
    ds = ds.map(stats.AttachStats(pipeline_id, counters, num_sources))
    # Dropped examples (bad input, held out, too long) are expected: no warnings. A training stream
    # where *every* example is dropped would spin forever: an error (the iterator explains it).
    ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(
        filter_warn_threshold_ratio=None, filter_raise_threshold_ratio=1.0 if train else None))
    if cfg.num_workers > 0:
        _absl_flags_with_defaults()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size),
                            worker_init_fn=_init_worker)
    return ds


def _init_worker(worker_index: int, worker_count: int) -> None:
    """In each worker process: one tokenizer thread per worker (no oversubscription), unless set."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _absl_flags_with_defaults() -> None:
    """Grain's worker processes read absl flags; outside an absl app they were never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

