"""Choosing the next token from a step's logits: greedy, temperature, top-k and top-p, with the
sampling parameters traced (one compile serves every value)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits, top_k, top_p):
    """Top-k then top-p (nucleus) filtering as `transformers`' warpers do it, with k and p
    traced (no recompiles). logits [B,V] fp32 (already divided by the temperature).

    Returns (sorted_logits [B,V] with removed entries -inf, sorted_ids [B,V]): the
    candidates in descending order, which is all sampling needs (no scatter back).
    top_k 0 disables top-k; top_p 1 disables top-p. Top-k keeps ties with the k-th
    value; top-p keeps the smallest prefix whose mass reaches p, always at least one.
    """
    B, V = logits.shape
    ids = jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), (B, V))
    neg, sorted_ids = jax.lax.sort((-logits, ids), dimension=-1, num_keys=1)  # stable: ties by lowest id
    sorted_logits = -neg
    k = jnp.clip(jnp.where(top_k > 0, top_k, V), 1, V)
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(k - 1, (B, 1)), axis=-1)
    sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better-ranked tokens
    keep = (mass_before < top_p) | (jnp.arange(V) == 0)
    return jnp.where(keep, sorted_logits, -jnp.inf), sorted_ids


def greedy_pick(logits):
    """argmax over the last axis, ties to the lowest id (as torch.argmax). A max and a
    min-reduce: faster on CPU than jnp.argmax's paired-value reduction."""
    V = logits.shape[-1]
    best = logits.max(axis=-1, keepdims=True)
    ids = jnp.min(jnp.where(logits == best, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(ids, V - 1)  # (all-NaN rows match nothing)


def sample(logits, keys, step, temperature, top_k, top_p, *, greedy: bool, filtered: bool):
    """logits [B,V] fp32 -> next tokens [B] int32. keys [B,2] per-row PRNG keys."""
    if greedy:
        return greedy_pick(logits)
    scaled = logits / temperature
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    if not filtered:
        return jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)
    cand_logits, cand_ids = filter_logits(scaled, top_k, top_p)
    choice = jax.vmap(jax.random.categorical)(step_keys, cand_logits)
    return jnp.take_along_axis(cand_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
