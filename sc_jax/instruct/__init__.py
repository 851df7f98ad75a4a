"""Instruction tuning as in Stable Code Instruct: SFT on ChatML conversations, then DPO.

    python -m sc_jax.train --config experiments/configs/sft.yaml    # train.task: sft
    python -m sc_jax.train --config experiments/configs/dpo.yaml    # train.task: dpo

SFT: JSONL `{"messages": [{"role", "content"}, ...]}` rendered with the ChatML template
(`<|im_start|>role\\n...<|im_end|>\\n`, tokens looked up by string), loss on the assistant tokens
only (content + closing `<|im_end|>`), conversations packed first-fit into rows of seq_len with
per-conversation segment ids and positions (attention never crosses conversations).

DPO: JSONL `{"prompt": text | messages, "chosen": text, "rejected": text}`, one pair per row
(`chosen_*` / `rejected_*` keys: sc_jax.data.batches.PAIR_KEYS), the sigmoid DPO loss against the
frozen `train.init_from` model.

Both run on the pretraining pipeline (sc_jax.data.pipeline) and its iterator; malformed records
are skipped and counted (`iterator.stats()["skipped"]`), or rejected with `path:line: what` when
`data.strict` is true. The iterators resume exactly (get_state/set_state).

API used by `sc_jax.tasks`: `make_iterator`, `dpo_loss_fn(beta)`, `dpo_eval_fn(graphdef, beta)`.
"""

from sc_jax.tokenizer import CHAT_TEMPLATE
from sc_jax.instruct.chat import (SKIP_REASONS, ChatFormat, RecordError, dpo_example, parse_chat,
                                  parse_messages, parse_pair, render_text, sft_example)

_LAZY = {name: "data" for name in ("Records", "build_dataset", "make_instruct_iterator", "make_iterator")}
_LAZY.update({name: "dpo" for name in ("METRICS", "dpo_eval_fn", "dpo_loss_fn", "dpo_terms", "sequence_logps")})


def __getattr__(name):
    # These import grain and JAX (seconds): loaded on first use, so the commands that only read
    # and write records (`python -m sc_jax.instruct.dedup`) start at once.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"sc_jax.instruct.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sc_jax.instruct' has no attribute '{name}'")

__all__ = ["CHAT_TEMPLATE", "SKIP_REASONS", "ChatFormat", "RecordError", "dpo_example", "parse_chat", "parse_messages",
           "parse_pair", "render_text", "sft_example", "Records", "build_dataset", "make_instruct_iterator",
           "make_iterator", "METRICS", "dpo_eval_fn", "dpo_loss_fn", "dpo_terms", "sequence_logps"]
