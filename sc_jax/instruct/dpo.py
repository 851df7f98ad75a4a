"""Direct Preference Optimization (sigmoid loss) against a frozen reference model.

    logp(side)  = sum of log p(token) over the answer tokens (loss_mask = 1) of that side
    reward      = beta * (logp_policy - logp_reference)
    loss(pair)  = -log sigmoid(reward_chosen - reward_rejected)

The reference runs under `jax.lax.stop_gradient` (parameters and outputs): no gradient and
no update ever reaches it. Chosen and rejected rows of a pair are interleaved into one batch
of 2B rows ([B,2,T] -> [2B,T], which keeps each device's rows on that device) so each model
runs one forward pass per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sc_jax.data.batches import BATCH_KEYS, PAIR_SIDES
from sc_jax.train.step import batch_token_losses

# The aux metrics, summed over valid pairs (the step divides by the number of pairs).
METRICS = ("chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")


def _interleave(batch: dict) -> dict:
    """{chosen_k, rejected_k} [B,T] -> {k} [2B,T], rows (c0, r0, c1, r1, ...)."""
    out = {}
    for k in BATCH_KEYS:
        if f"{PAIR_SIDES[0]}_{k}" in batch:
            c, r = (batch[f"{side}_{k}"] for side in PAIR_SIDES)
            out[k] = jnp.stack([c, r], axis=1).reshape(c.shape[0] * 2, *c.shape[1:])
    return out


def sequence_logps(graphdef, params, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logp_chosen [B], logp_rejected [B], valid [B]): summed answer log-probs (fp32) per pair;
    valid = both sides have answer tokens (padding rows do not)."""
    both = _interleave(batch)
    mask = both["loss_mask"].astype(jnp.float32)  # [2B,T]
    logp = -(batch_token_losses(graphdef, params, both) * mask).sum(-1).reshape(-1, 2)
    has = (mask.sum(-1) > 0).reshape(-1, 2)
    return logp[:, 0], logp[:, 1], (has[:, 0] & has[:, 1]).astype(jnp.float32)


def dpo_terms(graphdef, params, ref_params, batch: dict, beta: float) -> dict:
    """Per-pair [B] arrays: loss, valid and the METRICS."""
    if ref_params is None:
        raise ValueError("DPO needs the frozen reference model (state['ref_params']; set train.init_from)")
    pc, pr, valid = sequence_logps(graphdef, params, batch)
    rc, rr, _ = sequence_logps(graphdef, jax.lax.stop_gradient(ref_params), batch)
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    return {"loss": -jax.nn.log_sigmoid(margin), "valid": valid,
            "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
            "reward_accuracy": (chosen_reward > rejected_reward).astype(jnp.float32), "reward_margin": margin,
            "chosen_logp": pc, "rejected_logp": pr}


def dpo_loss_fn(beta: float):
    """The train step's `loss_fn(graphdef, params, micro_batch, ref_params) -> (loss_sum, pairs, aux sums)`."""
    beta = float(beta)

    def loss_fn(graphdef, params, mb, ref_params):
        t = dpo_terms(graphdef, params, ref_params, mb, beta)
        v = t["valid"]
        aux = {k: jax.lax.stop_gradient((t[k] * v).sum()) for k in METRICS}
        return (t["loss"] * v).sum(), v.sum(), aux

    return loss_fn


def dpo_eval_fn(graphdef, beta: float):
    """`(params, batch, ref_params) -> (loss_sum, pairs)` for held-out DPO loss."""
    beta = float(beta)

    def f(params, batch, ref_params=None):
        t = dpo_terms(graphdef, params, ref_params, batch, beta)
        return (t["loss"] * t["valid"]).sum(), t["valid"].sum()

    return f
