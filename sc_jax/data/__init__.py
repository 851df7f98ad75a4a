"""The grain data pipeline: sources, tokenizer, FIM, repository documents, packing.

    from sc_jax.data import DataConfig, SourceConfig, make_train_iterator
    cfg = DataConfig(sources=[SourceConfig(kind="dir", path="/code")], tokenizer="tokenizer.json")
    it = make_train_iterator(cfg, seq_len=4096, batch_size=8, seed=0)
    batch = next(it)              # BATCH_KEYS: input_ids, targets, segment_ids, positions, loss_mask: [8, 4096]
    state = it.get_state()        # JSON-serialisable; it.set_state(state) on a fresh iterator resumes

Modules: `pipeline` (the stages every task shares), `iterator` (the one iterator and its state),
`pretrain` (documents -> packed rows), `batches` (the batch keys), `stats` (counters), `sources`
and `jsonl` (reading), `documents` and `fim` (what a document is). SFT and DPO: `sc_jax.instruct`.
"""

from sc_jax.data.batches import BATCH_KEYS, PAIR_KEYS, batch_keys
from sc_jax.data.config import DataConfig, SourceConfig
from sc_jax.data.sources import DataError

__all__ = ["BATCH_KEYS", "PAIR_KEYS", "batch_keys", "DataConfig", "SourceConfig", "DataIterator", "DataError",
           "make_train_iterator", "make_eval_iterator"]
_LAZY = {"DataIterator": "iterator", "make_train_iterator": "pretrain", "make_eval_iterator": "pretrain"}


def __getattr__(name):
    # These import grain (seconds): loaded on first use, so commands that only need the config or
    # the sources (`python -m sc_jax.tokenizer`) start at once.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"sc_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sc_jax.data' has no attribute '{name}'")
