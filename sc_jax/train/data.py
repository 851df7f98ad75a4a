"""What a run feeds its step: this process's batches (synthetic rows, or the task's pipeline
through sc_jax.tasks), placed on the mesh as global arrays."""

from __future__ import annotations

from typing import Callable

import numpy as np

from sc_jax.config import ConfigError
from sc_jax.data.batches import BATCH_KEYS, key_dtype

EVAL_OFFSET = 10**6  # synthetic held-out batches: the rows of steps no run reaches


def synthetic_batches(cfg, vocab: int, batch_size: int, process_index: int, start_step: int):
    """Learnable token rows (arithmetic progressions mod vocab), a pure function of
    (seed, step, global row), so any process count yields the same global batches."""
    T = cfg.train.seq_len
    step = start_step
    while True:
        rows = []
        for r in range(process_index * batch_size, (process_index + 1) * batch_size):
            rng = np.random.default_rng([cfg.train.seed, step, r])
            start, stride = rng.integers(0, vocab), rng.integers(1, 4)
            rows.append((start + stride * np.arange(T + 1)) % vocab)
        toks = np.asarray(rows, np.int32)
        batch = {k: np.ones((batch_size, T), key_dtype(k)) for k in BATCH_KEYS}  # one document, all learned
        batch.update(input_ids=toks[:, :-1], targets=toks[:, 1:],
                     positions=np.broadcast_to(np.arange(T, dtype=np.int32), (batch_size, T)).copy())
        yield batch
        step += 1


class SyntheticIterator:
    """synthetic_batches with the data iterators' get_state/set_state (the step it is at)."""

    def __init__(self, cfg, vocab, batch_size, process_index, start_step=0):
        self.args = (cfg, vocab, batch_size, process_index)
        self.step = start_step
        self._gen = synthetic_batches(*self.args, start_step)

    def __next__(self):
        self.step += 1
        return next(self._gen)

    def __iter__(self):
        return self

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]
        self._gen = synthetic_batches(*self.args, self.step)


def make_data(cfg, vocab: int, process_index: int, process_count: int, tokenizer=None, eval_: bool = False):
    """This process's training (or held-out, `eval_`) batches for `cfg.train.data`."""
    t = cfg.train
    if t.global_batch_size % process_count:
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by the "
                          f"{process_count} processes")
    per_process = t.global_batch_size // process_count
    if t.data == "synthetic":
        return SyntheticIterator(cfg, vocab, per_process, process_index, start_step=EVAL_OFFSET if eval_ else 0)
    from sc_jax import tasks

    return tasks.make_iterator(cfg, seq_len=t.seq_len, batch_size=per_process, process_index=process_index,
                               process_count=process_count, tokenizer=tokenizer, eval_=eval_)


def global_placer(cfg, batch_sharding) -> Callable[[dict], dict]:
    """`to_global(batch)`: this process's rows -> global arrays on `batch_sharding`. With the fused
    attention a row packing more than model.max_segments documents is refused (it would be wrong)."""
    import jax

    from sc_jax.attention import use_cudnn

    fused_attention = use_cudnn(cfg.model)

    def to_global(batch: dict) -> dict:
        packed = int(np.max(batch["segment_ids"])) if fused_attention and "segment_ids" in batch else 0
        if packed > cfg.model.max_segments:
            raise ConfigError(f"a batch row packs {packed} documents, more than the fused "
                              f"attention's model.max_segments={cfg.model.max_segments}: raise it")
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v),
                                                          (cfg.train.global_batch_size, *np.shape(v)[1:]))
                for k, v in batch.items()}

    return to_global
