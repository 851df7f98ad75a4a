"""What a run trains on and how its loss is computed, per `train.task`:

    pretrain  next-token loss over packed code (grain pipeline with FIM/repository packing)
    sft       next-token loss on assistant tokens only (packed ChatML conversations)
    dpo       the sigmoid DPO loss against a frozen reference model

The train loop only sees `make_iterator`, `loss_fn` and `eval_fn`.
"""

from __future__ import annotations

from sc_jax.train.step import loss_sums


def make_iterator(cfg, *, seq_len: int, batch_size: int, process_index: int, process_count: int, tokenizer,
                  eval_: bool = False):
    task = cfg.train.task
    if task == "pretrain":
        from sc_jax.data import make_eval_iterator, make_train_iterator

        common = dict(seq_len=seq_len, batch_size=batch_size, seed=cfg.train.seed, process_index=process_index,
                      process_count=process_count, tokenizer=tokenizer)
        if eval_:  # every host yields exactly eval_batches batches, so the collectives line up
            return make_eval_iterator(cfg.data, max_batches=cfg.train.eval_batches, **common)
        return make_train_iterator(cfg.data, **common)
    from sc_jax import instruct

    return instruct.make_iterator(cfg, seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                                  process_count=process_count, tokenizer=tokenizer, eval_=eval_)


def loss_fn(cfg):
    """None (the default cross-entropy) or the task's
    `(graphdef, params, micro_batch, ref_params) -> (loss_sum, count, aux dict of sums)`."""
    if cfg.train.task == "dpo":
        from sc_jax import instruct

        return instruct.dpo_loss_fn(cfg.train.dpo_beta)
    return None


def eval_fn(cfg, graphdef):
    """`(params, batch, ref_params) -> (loss_sum, count)` for held-out loss."""
    if cfg.train.task == "dpo":
        from sc_jax import instruct

        return instruct.dpo_eval_fn(graphdef, cfg.train.dpo_beta)

    def f(params, batch, ref_params=None):
        total, count = loss_sums(graphdef, params, batch)
        return total, count

    return f

