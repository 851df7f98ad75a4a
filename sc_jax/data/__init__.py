"""The grain data pipeline: sources, tokenizer, FIM, repository documents, packing.

    from sc_jax.data import DataConfig, SourceConfig, make_train_iterator
    cfg = DataConfig(sources=[SourceConfig(kind="dir", path="/code")], tokenizer="tokenizer.json")
    it = make_train_iterator(cfg, seq_len=4096, batch_size=8, seed=0)
    batch = next(it)              # input_ids, targets, segment_ids, positions, loss_mask: [8, 4096]
    state = it.get_state()        # JSON-serialisable; it.set_state(state) on a fresh iterator resumes
"""

from sc_jax.data.config import DataConfig, SourceConfig
from sc_jax.data.pipeline import DataIterator, make_eval_iterator, make_train_iterator
from sc_jax.data.sources import DataError

__all__ = ["DataConfig", "SourceConfig", "DataIterator", "DataError", "make_train_iterator", "make_eval_iterator"]
