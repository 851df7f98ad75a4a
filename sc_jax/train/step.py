"""The training step: `(state, batch) -> (state, metrics)`, plus analytic FLOPs and device peaks.

The state is a plain pytree {step, params, opt_state} so it can be sharded, donated
and checkpointed as is. Gradient accumulation runs the micro-batches in a `scan`
inside the one jitted step, summing the un-normalised loss and dividing once by
the number of target tokens of the whole batch, so the update is the same for any
micro-batch count.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sc_jax.config import ModelConfig
from sc_jax.model import head_logits
from sc_jax.sharding import constrain

Batch = dict[str, jax.Array]  # sc_jax.data.batches.BATCH_KEYS, each [batch, seq]


def token_losses(logits, targets, z_loss: float = 0.0):
    """logits [B,T,V] fp32, targets [B,T] -> per-token cross-entropy [B,T] (+ z-loss)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = logz - target_logit
    if z_loss:
        loss = loss + z_loss * jnp.square(logz)
    return loss


def batch_token_losses(graphdef, params, batch: Batch, z_loss: float = 0.0):
    """The model's per-token cross-entropy [B,T] over a batch, its logits made
    model.loss_tile positions at a time (`tiled_token_losses`)."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["input_ids"], positions=batch.get("positions"),
                                 segment_ids=batch.get("segment_ids"))
    head, dtype = model.head(), model.config.dtype
    return tiled_token_losses(lambda h: head_logits(h, head, dtype), hidden, batch["targets"],
                              model.config.loss_tile, z_loss)


def tiled_token_losses(logits_fn, hidden, targets, tile: int, z_loss: float = 0.0):
    """hidden [B,T,E], targets [B,T] -> token_losses [B,T], computing `logits_fn`'s [B,tile,V]
    fp32 logits one tile of positions at a time, in the forward pass and again (per tile,
    rematerialised) in the backward one: the whole [B,T,V] logits and their gradient never
    exist at once (824 MB per 4k row at V=50304). tile 0, or T <= tile: one tile."""
    B, T, E = hidden.shape
    if not tile or T <= tile:
        return token_losses(logits_fn(hidden), targets, z_loss)
    n = -(-T // tile)
    pad = n * tile - T  # padded positions' losses are computed, then cut off
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, tile, E).swapaxes(0, 1)  # [n,B,tile,E]
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, tile).swapaxes(0, 1)  # [n,B,tile]

    @jax.checkpoint
    def one_tile(_, tile_inputs):
        h, t = tile_inputs
        return None, token_losses(logits_fn(h), t, z_loss)

    _, losses = jax.lax.scan(one_tile, None, (hidden, targets))  # [n,B,tile]
    return losses.swapaxes(0, 1).reshape(B, n * tile)[:, :T]


def loss_sums(graphdef, params, batch: Batch, z_loss: float = 0.0):
    """(sum of masked token losses, number of loss tokens) for one micro-batch."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return (batch_token_losses(graphdef, params, batch, z_loss) * mask).sum(), mask.sum()


def split_micro(batch: Batch, micro: int) -> Batch:
    """[B,T] -> [micro, B/micro, T], micro-batch m = rows m, m+micro, ... so each device's
    contiguous share of the batch splits evenly over the micro-batches."""
    def split(x):
        b = x.shape[0] // micro
        x = x.reshape(b, micro, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "act_batch", "act_seq"))

    return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, micro_batches: int = 1,
                    z_loss: float = 0.0, loss_fn: Callable | None = None) -> Callable:
    """Builds `step(state, batch) -> (state, metrics)`.

    `loss_fn(graphdef, params, micro_batch, ref_params) -> (loss_sum, count, aux dict of sums)`
    defaults to next-token cross-entropy; SFT uses the same, DPO passes its own and
    keeps a frozen reference model in `state["ref_params"]` (passed through untouched).
    A non-finite loss or gradient leaves params and optimizer state untouched (the
    host then stops or skips, as configured) so a NaN never reaches the weights.
    """
    if loss_fn is None:
        def loss_fn(graphdef, params, mb, ref_params):
            total, count = loss_sums(graphdef, params, mb, z_loss)
            return total, count, {}

    def micro_grads(params, mb, ref_params):
        def f(p):
            total, count, aux = loss_fn(graphdef, p, mb, ref_params)
            return total, (count, aux)

        (total, (count, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return total, count, aux, grads

    def step(state: dict[str, Any], batch: Batch):
        params, ref = state["params"], state.get("ref_params")
        if micro_batches == 1:
            total, count, aux, grads = micro_grads(params, batch, ref)
        else:
            def body(carry, mb):
                total, count, aux, grads = micro_grads(params, mb, ref)
                return jax.tree.map(jnp.add, carry, (total, count, aux, grads)), None

            shapes = jax.eval_shape(micro_grads, params, jax.tree.map(lambda x: x[0], split_micro(batch, micro_batches)),
                                    ref)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
            (total, count, aux, grads), _ = jax.lax.scan(body, zeros, split_micro(batch, micro_batches))
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A `lax.cond` around the update measured faster alone on CPU (XLA copies the moments
        # for this select) but fuses the AdamW update differently: the last digit of the loss
        # moves, and saved run directories must resume to their exact losses.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt_state}
        if ref is not None:
            new_state["ref_params"] = ref
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": count,
                   "finite": finite, **{k: v / denom for k, v in aux.items()}}
        return new_state, metrics

    return step


# ----------------------------------------------------------------------------- FLOPs / MFU

# Dense bf16 peak FLOP/s per device (not the sparsity numbers).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "v4": 275e12, "v5e": 197e12, "v5 lite": 197e12,
    "v5p": 459e12, "v6e": 918e12, "v6 lite": 918e12, "cpu": 0.0,
}


def peak_flops(device_kind: str) -> float:
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # longest key first: "v5 lite" before "v5"
        if key in kind:
            return PEAK_FLOPS[key]
    return 0.0


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding params + unembedding) + causal attention
    (12 x layers x hidden x seq, halved for the causal mask)."""
    dense = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len / 2
    return 6 * dense + attention
