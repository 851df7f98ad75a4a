"""The batch layout, defined once for every task (no grain, no JAX: cheap to import).

    pretrain, sft   BATCH_KEYS, each [batch, seq_len]
    dpo             PAIR_KEYS: `chosen_` and `rejected_` + each of BATCH_KEYS, each [batch, seq_len]

input_ids, targets (the next token of each input), segment_ids (1, 2, ... per packed document or
conversation, 0 = padding) and positions (restarting per segment) are int32; loss_mask is
float32 (1 where the target is learned).
"""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
PAIR_SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{side}_{k}" for side in PAIR_SIDES for k in BATCH_KEYS)


def batch_keys(task: str) -> tuple[str, ...]:
    """The keys of one batch of `train.task` (pretrain | sft | dpo)."""
    return PAIR_KEYS if task == "dpo" else BATCH_KEYS


def key_dtype(key: str) -> type:
    return np.float32 if key.endswith("loss_mask") else np.int32


def empty_batch(batch_size: int, seq_len: int, keys: tuple[str, ...] = BATCH_KEYS) -> dict:
    """A batch of padding rows only ({key: zeros [batch_size, seq_len]}): nothing to learn."""
    return {k: np.zeros((batch_size, seq_len), key_dtype(k)) for k in keys}


def batch_metrics(batch: dict) -> dict[str, int]:
    """What one batch delivers: rows (non-empty rows; DPO: valid pairs), segments (documents or
    conversations; DPO: pairs), tokens (non-padding inputs) and loss_tokens (learned targets)."""
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        return {"rows": int((seg > 0).any(axis=1).sum()), "segments": int(seg.max(axis=1).sum()),
                "tokens": int((seg > 0).sum()), "loss_tokens": int(batch["loss_mask"].sum())}
    sides = [{k: batch[f"{side}_{k}"] for k in BATCH_KEYS} for side in PAIR_SIDES]
    valid = int(np.logical_and.reduce([s["loss_mask"].sum(axis=1) > 0 for s in sides]).sum())
    return {"rows": valid, "segments": valid, "tokens": sum(int((s["segment_ids"] > 0).sum()) for s in sides),
            "loss_tokens": sum(int(s["loss_mask"].sum()) for s in sides)}
