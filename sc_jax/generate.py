"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling,
stop tokens and stop strings, batches of prompts of different lengths, and
fill-in-the-middle.

    python -m sc_jax.generate --ckpt PATH --prompt "def fib(n):"
    python -m sc_jax.generate --ckpt PATH --prefix $'def add(a, b):\\n    ' --suffix $'\\n\\nprint(add(1, 2))'
    [--max-new-tokens N --temperature T --top-p P --top-k K --seed S --stop STR --tokenizer PATH --dtype D]

PATH is a Hugging Face model directory, an orbax checkpoint (a directory or one step
in it) or a training run directory. The tokenizer is found beside the checkpoint
(`tokenizer.json` or `tokenizer/`); otherwise pass --tokenizer.

How it runs: the prompts are left-padded (segment id 0: never attended to) to a
power-of-two length and batch, and one jitted prefill fills the KV cache and returns
the logits of each prompt's last token; then one jitted `lax.while_loop` samples and
decodes on the device (the cache donated, no host round trip per token) and exits
early once every row has produced a stop token. Positions count from 0 at each
prompt's first real token, so rotary angles are those of the unpadded prompt. Stop
strings need text, so they are checked on the host between chunks of decode steps and
the completion is cut at the first one. Sampling keys derive from (seed, the prompt's
index in the call), so a prompt's sample does not depend on how the call is batched.
Compiled code is cached per (config, batch bucket, prompt bucket, new-token bucket,
sampling mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sc_jax import model as M
from sc_jax.config import ConfigError, ModelConfig

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEP, EOS = "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>"
INFILL_STOPS = (EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEP)
MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
STOP_CHECK_EVERY = 32  # decode steps between host-side stop-string checks
PREFILL_SCORES_BYTES = 2 << 30  # most bytes of attention scores one prefill block may hold

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def _bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------- sampling


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


# ----------------------------------------------------------------------------- the forward passes
#
# The model's own modules (model.py) are merged from their parameters: the prefill runs
# each layer's `DecoderLayer.__call__` as is; the one-token step uses the layer's
# LayerNorms, MLP, rotary and parameters and does the attention itself (`_layer_one`).
# What differs from `StableLmForCausalLM.__call__` is how parameters and the cache are
# laid out, because decoding is memory-bound and XLA copies what it slices:
#   * each layer's parameters are separate arrays and the layers run unrolled (a
#     stacked [L,...] array under `scan` gets each layer's slice copied on every step:
#     that alone halved the decode speed on CPU);
#   * the cache is one heads-major array per layer, k/v [B*K,S,D], so the score and value
#     matmuls read contiguous [S,D] blocks (the model's [L,B,S,K,D] cache makes XLA
#     transpose every layer's cache on every step: ~10x slower attention on CPU), and a
#     step writes only its new slot, in place. Batch and kv-heads share one axis because
#     with a batch axis of 1, XLA fused each layer's cache update twice (once per shape it
#     is read in) and copied every cache on every step: a third of the step of the quick
#     start's model at batch 1 on CPU;
#   * the LM head is stored [V,E] (2x faster than [E,V] for a few rows on CPU) and the
#     prefill computes logits for the last position only (not [B,P,V]).
# tests/test_generate.py checks the step's logits against the model's full forward pass
# and the tokens against `transformers`.


class _Defs(NamedTuple):
    """The static half of the weights: NNX graph definitions of the modules we merge."""

    embed: Any
    norm: Any
    layer: Any


def _logits(cfg: ModelConfig, embed, head, x):
    """[B,T,E] final hidden -> [B,T,V] fp32 logits; head is [V,E] (None when tied)."""
    dt = M.DTYPES[cfg.dtype]
    w = embed.embedding[...] if head is None else head
    return jnp.einsum("bte,ve->btv", x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)


def _prompt_mask(segs):
    """The model's attention mask for prompts alone: causal, within the row's segment,
    never a padding (segment 0) key."""
    slot = jnp.arange(segs.shape[1], dtype=jnp.int32)
    if hasattr(M, "AttentionMask"):
        return M.AttentionMask(segs, segs, slot, slot)
    return (slot[None, None, :] <= slot[None, :, None]) & (segs[:, :, None] == segs[:, None, :]) & (segs[:, None, :] != 0)


def _forward_prompt(cfg, defs, weights, ids, positions, segs, cache_len: int):
    """Left-padded prompts [B,P] -> (last-position logits [B,V], per-layer caches with
    cache_len slots, the first P filled)."""
    dt = M.DTYPES[cfg.dtype]
    B, P = ids.shape
    embed = nnx.merge(defs.embed, weights["embed"])
    x = embed(ids).astype(dt)
    mask = _prompt_mask(segs)
    ks, vs = [], []
    for layer_weights in weights["layers"]:
        x, (k, v) = nnx.merge(defs.layer, layer_weights)(x, positions, mask, segment_ids=segs)
        pad = ((0, 0), (0, cache_len - P), (0, 0))
        ks.append(jnp.pad(_heads_major(k), pad))  # [B,P,K,D] -> [B*K,cache_len,D]
        vs.append(jnp.pad(_heads_major(v), pad))
    x = nnx.merge(defs.norm, weights["norm"])(x[:, -1:])
    cache = {"k": ks, "v": vs, "valid": jnp.pad(segs != 0, ((0, 0), (0, cache_len - P))),
             "index": jnp.asarray(P, jnp.int32)}
    return _logits(cfg, embed, weights["head"], x)[:, 0], cache


def _heads_major(x):
    """[B,T,K,D] keys or values -> [B*K,T,D], the cache's layout."""
    B, T, K, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * K, T, D)


def _attend_one(q, k_cache, v_cache, valid):
    """Attention of one new token per row over the valid cache slots (its own included).

    q [B,H,D]; k/v_cache [B*K,S,D]; valid [B*K,S] bool -> [B,H,D] fp32. Softmax in fp32."""
    B, H, D = q.shape
    K = k_cache.shape[0] // B
    q = q.reshape(B * K, H // K, D)
    scores = jnp.einsum("ngd,nsd->ngs", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(valid[:, None, :], scores * (1.0 / np.sqrt(D)), M.NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("ngs,nsd->ngd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(B, H, D)


def _layer_one(layer, cfg: ModelConfig, x, pos, k_cache, v_cache, valid, idx):
    """`DecoderLayer.__call__` for one token per row against the heads-major cache: writes
    the token's key/value at slot idx (in place) and attends over the valid slots.
    x [B,1,E] -> (x, k_cache, v_cache)."""
    dt = M.DTYPES[cfg.dtype]
    attn = layer.self_attn
    B, E = x.shape[0], x.shape[-1]
    H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = layer.input_layernorm(x)
    hd = h[:, 0].astype(dt)
    # [E,H,D] weights as [E,H*D] matrices: reshapes of contiguous arrays, no copies.
    q = (hd @ attn.q_proj[...].astype(dt).reshape(E, H * D)).reshape(B, 1, H, D)
    k = (hd @ attn.k_proj[...].astype(dt).reshape(E, K * D)).reshape(B, 1, K, D)
    v = (hd @ attn.v_proj[...].astype(dt).reshape(E, K * D)).reshape(B, 1, K, D)
    if cfg.use_qkv_bias:
        q, k, v = q + attn.q_bias[...].astype(dt), k + attn.k_bias[...].astype(dt), v + attn.v_bias[...].astype(dt)
    if cfg.qk_layernorm:
        q, k = attn.q_layernorm(q), attn.k_layernorm(k)
    q = M.apply_rotary(q, pos[:, None], cfg.rotary_dim, cfg.rope_theta)
    k = M.apply_rotary(k, pos[:, None], cfg.rotary_dim, cfg.rope_theta)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype).reshape(B * K, 1, D), (0, idx, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype).reshape(B * K, 1, D), (0, idx, 0))
    out = _attend_one(q[:, 0], k_cache, v_cache, valid).astype(dt).reshape(B, H * D)
    out = (out @ attn.o_proj[...].astype(dt).reshape(H * D, E))[:, None]
    if cfg.use_parallel_residual:
        return x + out + layer.mlp(h), k_cache, v_cache
    x = x + out
    return x + layer.mlp(layer.post_attention_layernorm(x)), k_cache, v_cache


def _forward_one(cfg, defs, weights, tok, pos, cache):
    """tok/pos [B] -> (logits [B,V] fp32, cache with the token written at cache['index'])."""
    embed = nnx.merge(defs.embed, weights["embed"])
    x = embed(tok[:, None]).astype(M.DTYPES[cfg.dtype])
    idx = cache["index"]
    valid = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((tok.shape[0], 1), bool), (0, idx))
    valid_heads = jnp.repeat(valid, cfg.num_key_value_heads, axis=0)  # [B*K,S], the cache's rows
    ks, vs = [], []
    for layer_weights, k_cache, v_cache in zip(weights["layers"], cache["k"], cache["v"]):
        x, k_cache, v_cache = _layer_one(nnx.merge(defs.layer, layer_weights), cfg, x, pos, k_cache, v_cache,
                                         valid_heads, idx)
        ks.append(k_cache)
        vs.append(v_cache)
    x = nnx.merge(defs.norm, weights["norm"])(x)
    return _logits(cfg, embed, weights["head"], x)[:, 0], {"k": ks, "v": vs, "valid": valid, "index": idx + 1}


# ----------------------------------------------------------------------------- jitted kernels


def _prefill(cfg, defs, weights, ids, positions, segs, real, *, cache_len: int, new_len: int, pad_id: int):
    """Runs the left-padded prompts and builds the decode carry: the cache (cache_len
    slots) and the logits for each row's first new token. No sampling here, so one
    compile serves every sampling mode.

    ids/positions/segs [B,P]; real [B] bool (False for batch-padding rows)."""
    B = ids.shape[0]
    logits, cache = _forward_prompt(cfg, defs, weights, ids, positions, segs, cache_len)
    return {
        "cache": cache,
        "logits": logits,  # [B,V]: the next token's
        "pos": positions[:, -1] + 1,  # where the next token goes
        "done": ~real,
        "out": jnp.full((B, new_len), pad_id, jnp.int32),
        "length": jnp.zeros((B,), jnp.int32),
        "step": jnp.asarray(0, jnp.int32),
    }


def _decode(cfg, defs, weights, carry, limit, keys, stop_ids, temperature, top_k, top_p, *,
            greedy: bool, filtered: bool, pad_id: int):
    """Samples a token, records it and runs it through the model, until `limit` tokens
    exist or every row is done (one forward past the last token: its logits are unused)."""

    def cond(c):
        return (c["step"] < limit) & ~jnp.all(c["done"])

    def body(c):
        step, done = c["step"], c["done"]
        tok = sample(c["logits"], keys, step, temperature, top_k, top_p, greedy=greedy, filtered=filtered)
        tok = jnp.where(done, pad_id, tok)
        new = dict(c, step=step + 1, pos=c["pos"] + 1,
                   out=jax.lax.dynamic_update_slice(c["out"], tok[:, None], (0, step)),
                   length=c["length"] + (~done).astype(jnp.int32),
                   # A row also ends with the token at the last position the model knows.
                   done=done | jnp.isin(tok, stop_ids) | (c["pos"] >= cfg.max_position_embeddings - 1))
        if "all_logits" in c:
            new["all_logits"] = jax.lax.dynamic_update_slice(c["all_logits"], c["logits"][:, None], (0, step, 0))
        new["logits"], new["cache"] = _forward_one(cfg, defs, weights, tok, c["pos"], c["cache"])
        return new

    return jax.lax.while_loop(cond, body, carry)


_KERNELS: dict[str, tuple] = {}


def _kernels(cfg: ModelConfig):
    """(graph definitions, jitted prefill, jitted decode) for a config, shared by every
    Generator of that config so that reloading a model reuses the compiled code."""
    key = repr(dataclasses.astuple(cfg))
    if key not in _KERNELS:
        model = M.abstract_model(cfg)
        defs = _Defs(nnx.split(model.model.embed_tokens)[0], nnx.split(model.model.norm)[0],
                     nnx.split(model.model.layers)[0])
        prefill = jax.jit(functools.partial(_prefill, cfg, defs), static_argnames=("cache_len", "new_len", "pad_id"))
        decode = jax.jit(functools.partial(_decode, cfg, defs), static_argnames=("greedy", "filtered", "pad_id"),
                         donate_argnames=("carry",))
        _KERNELS[key] = (defs, prefill, decode)
    return _KERNELS[key]


def _device_weights(cfg: ModelConfig, params: dict) -> dict:
    """Our pure parameter dict (stacked layers, numpy or jax) -> the generator's weights
    on the device in the compute dtype: embed/norm states, head [V,E] or None, and one
    state per layer."""
    dtype = jnp.dtype(M.DTYPES[cfg.dtype])
    put = lambda a: jnp.asarray(np.asarray(a) if not isinstance(a, jax.Array) else a, dtype=dtype)  # noqa: E731

    def state_of(module, pure):
        st = nnx.split(module)[1]
        st.replace_by_pure_dict(jax.tree.map(put, pure))
        return st

    model = M.abstract_model(cfg)
    layers = params["model"]["layers"]
    head = None if cfg.tie_word_embeddings else put(np.asarray(params["lm_head"]).T)
    return {
        "embed": state_of(model.model.embed_tokens, params["model"]["embed_tokens"]),
        "norm": state_of(model.model.norm, params["model"]["norm"]),
        "head": head,
        "layers": [state_of(model.model.layers, jax.tree.map(lambda a: a[i], layers))
                   for i in range(cfg.num_hidden_layers)],
    }


def _resolve_dtype(dtype) -> str:
    if dtype is None:
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in M.DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(M.DTYPES)}, got '{dtype}'")
    return name


@dataclasses.dataclass
class GenerationStats:
    """What the last call did (for benchmarks and tests)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    batches: int = 0
    seconds: float = 0.0


class Generator:
    """A model (weights on the device) plus an optional tokenizer.

    `generate_ids` works on token ids; `complete` and `infill` on text (tokenizer needed).
    `batch_size` caps how many prompts run together (more are split into batches,
    grouped by length; long prompts run in smaller batches, see `_rows_per_batch`).
    """

    def __init__(self, cfg: ModelConfig, params: dict, tokenizer=None, dtype=None, batch_size: int = 32):
        dtype = _resolve_dtype(dtype)
        # Inference: weights stored in the compute dtype. The prefill runs the model's
        # chunked attention (the reference math one 1024-query block at a time, so a 16k
        # prompt never holds a [B,H,16k,16k] score array; prompts up to 1024 tokens are one
        # block); not cuDNN, whose kernel assumes right padding where prompts are left-padded.
        self.cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype, attention="chunked").validate()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.defs, self._prefill, self._decode = _kernels(self.cfg)
        self.weights = _device_weights(self.cfg, params)
        self.stats = GenerationStats()

    # --- token level -------------------------------------------------------------------

    @property
    def eos_id(self) -> int | None:
        if self.tokenizer is not None:
            eos = _maybe_id(self.tokenizer, EOS)
            if eos is not None:
                return eos
        return self.cfg.eos_token_id

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 256, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, stop_tokens: Sequence[int] | None = None, seed: int = 0,
                     stop_check: Callable[[int, list[int]], bool] | None = None, return_logits: bool = False):
        """Generates after each prompt; returns the new ids per prompt, ending with the stop
        token when one was produced (as `transformers` does), at most max_new_tokens, and
        never past the model's context (max_position_embeddings tokens, prompt included).

        stop_tokens: ids that end a row (default: the EOS id; () for none).
        stop_check(i, new_ids) -> bool: a host-side test run every few steps (stop strings).
        return_logits: also return each row's per-step logits [n_new, V] (tests).
        """
        _check_sampling(max_new_tokens, temperature, top_p, top_k)
        prompts = [list(map(int, p)) for p in prompt_ids]
        V = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ConfigError(f"prompt {i} is empty: give at least one token")
            if min(p) < 0 or max(p) >= V:
                raise ConfigError(f"prompt {i} has token ids outside [0, {V})")
            if len(p) >= self.cfg.max_position_embeddings:
                raise ConfigError(f"prompt {i} has {len(p)} tokens but the model's context is "
                                  f"{self.cfg.max_position_embeddings} (max_position_embeddings): shorten it")
        if stop_tokens is None:
            stop_tokens = () if self.eos_id is None else (self.eos_id,)
        t0 = time.perf_counter()
        self.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
        results: list = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
        b = 0
        while b < len(order):
            idx = order[b:b + self._rows_per_batch(len(prompts[order[b]]))]  # order[b]: the longest left
            b += len(idx)
            outs = self._generate_batch([prompts[i] for i in idx], idx, max_new_tokens, float(temperature),
                                        float(top_p), int(top_k), list(stop_tokens), int(seed), stop_check,
                                        return_logits)
            for i, o in zip(idx, outs):
                results[i] = o
        self.stats.seconds = time.perf_counter() - t0
        if return_logits:
            return [r[0] for r in results], [r[1] for r in results]
        return results

    def _rows_per_batch(self, longest: int) -> int:
        """batch_size, or fewer rows for long prompts: a power of two that keeps one
        prefill query block's fp32 scores [rows, H, min(P, 1024), P] under
        PREFILL_SCORES_BYTES (at 16k tokens on stable-code-3b one row's block is 2 GiB)."""
        P = _bucket(longest, MIN_PROMPT_BUCKET)
        per_row = self.cfg.num_attention_heads * min(P, M.ATTENTION_CHUNK) * P * 4
        rows = max(1, PREFILL_SCORES_BYTES // per_row)
        return max(1, min(self.batch_size, 1 << (rows.bit_length() - 1)))

    def _generate_batch(self, prompts, rows, max_new, temperature, top_p, top_k, stop_tokens, seed, stop_check,
                        return_logits):
        n = len(prompts)
        # No row goes past the context, so the shortest prompt bounds the steps: asking for
        # more must not grow the output buffer and the cache past it.
        max_new = min(max_new, self.cfg.max_position_embeddings - min(map(len, prompts)))
        B, P, N = _bucket(n), _bucket(max(map(len, prompts)), MIN_PROMPT_BUCKET), _bucket(max_new, MIN_NEW_BUCKET)
        pad_id = int(stop_tokens[0]) if stop_tokens else 0
        ids = np.full((B, P), pad_id, np.int32)
        pos = np.zeros((B, P), np.int32)
        seg = np.zeros((B, P), np.int32)
        for r, p in enumerate(prompts):  # left-pad: the last column holds every prompt's last token
            ids[r, P - len(p):] = p
            pos[r, P - len(p):] = np.arange(len(p))
            seg[r, P - len(p):] = 1
        for r in range(n, B):  # batch padding rows: one dummy token, done from the start
            ids[r, -1], seg[r, -1] = pad_id, 1
        real = np.arange(B) < n
        base = jax.random.PRNGKey(seed)
        row_ids = np.asarray(list(rows) + [0] * (B - n), np.uint32)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(row_ids))
        stop_ids = jnp.asarray(np.asarray(stop_tokens if stop_tokens else [-1], np.int32))
        greedy = temperature == 0.0
        filtered = not greedy and (top_k > 0 or top_p < 1.0)
        sp = (jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p))
        carry = self._prefill(self.weights, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(real),
                              cache_len=P + N, new_len=N, pad_id=pad_id)
        if return_logits:  # every step's logits too (tests; [B,N,V] fp32)
            carry["all_logits"] = jnp.zeros((B, N, self.cfg.vocab_size), jnp.float32)
        step = 0
        while step < max_new:
            limit = max_new if stop_check is None else min(step + STOP_CHECK_EVERY, max_new)
            carry = self._decode(self.weights, carry, jnp.int32(limit), keys, stop_ids, *sp, greedy=greedy,
                                 filtered=filtered, pad_id=pad_id)
            step = int(carry["step"])
            done = np.array(carry["done"])
            if stop_check is not None and not done.all():
                out, length = np.asarray(carry["out"]), np.asarray(carry["length"])
                hit = [r for r in range(n) if not done[r] and stop_check(rows[r], out[r, :length[r]].tolist())]
                if hit:
                    done[hit] = True
                    carry["done"] = jnp.asarray(done)
            if done.all():
                break
        out, length = np.asarray(carry["out"]), np.asarray(carry["length"])
        self.stats.decode_steps += step
        self.stats.batches += 1
        self.stats.new_tokens += int(length[:n].sum())
        logits = np.asarray(carry["all_logits"]) if return_logits else None
        res = []
        for r in range(n):
            toks = out[r, :length[r]].tolist()
            res.append((toks, logits[r, :length[r]]) if return_logits else toks)
        return res

    # --- text level --------------------------------------------------------------------

    def _tok(self):
        if self.tokenizer is None:
            raise ConfigError("this generator has no tokenizer: load it with a tokenizer to generate text")
        return self.tokenizer

    def _text_generate(self, prompt_ids, stop_tokens, stop, max_new_tokens, temperature, top_p, top_k, seed):
        tok = self._tok()
        stop = [s for s in (stop or ()) if s]
        stop_set = set(stop_tokens)

        def text_of(ids):
            if ids and ids[-1] in stop_set:
                ids = ids[:-1]
            return tok.decode(ids, skip_special_tokens=False)

        check = (lambda _i, ids: any(s in text_of(ids) for s in stop)) if stop else None
        outs = self.generate_ids(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, stop_tokens=list(stop_tokens), seed=seed, stop_check=check)
        return [cut_at_stop(text_of(ids), stop) for ids in outs]

    def complete(self, prompts: list[str], *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Sequence[str] = (), seed: int = 0) -> list[str]:
        """The completion text of each prompt (prompt not included), cut at the first stop
        string; a row also ends at `<|endoftext|>`. A prompt too long for the model's context
        keeps its last tokens, leaving room for max_new_tokens (or half the context)."""
        if isinstance(prompts, str):
            raise ConfigError("complete() takes a list of prompts, got a single string")
        room = self._prompt_room(max_new_tokens)
        ids, lengths = self._completion_ids(prompts, room)
        _warn_cut(sum(n > room for n in lengths), room)
        return self._text_generate(ids, self.completion_stop_ids(), stop, max_new_tokens, temperature, top_p, top_k,
                                   seed)

    def _completion_ids(self, prompts: Sequence[str], room: int) -> tuple[list[list[int]], list[int]]:
        """(the ids `complete` runs, each prompt's full token count). A prompt keeps its last
        `room` tokens (the code nearest the completion); an empty one is `<|endoftext|>`,
        the start of a document."""
        tok, eos = self._tok(), self.eos_id
        ids = [tok.encode(p) or ([eos] if eos is not None else []) for p in prompts]
        return [i[len(i) - min(len(i), room):] for i in ids], [len(i) for i in ids]

    def completion_stop_ids(self) -> list[int]:
        """The ids that end a completion: `<|endoftext|>` (none when there is no EOS)."""
        return [] if self.eos_id is None else [self.eos_id]

    def fim_ids(self, prefix: str, suffix: str, max_new_tokens: int = 1) -> list[int]:
        """The PSM prompt `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>` as ids (the
        special tokens looked up by string, the texts encoded separately so that text that
        merely looks like a special token stays text). When it would leave less than
        max_new_tokens (or half the context) to generate, the start of the prefix and the
        end of the suffix are dropped."""
        room = self._prompt_room(max_new_tokens, special=3)
        ids, cut = self._fim_ids(prefix, suffix, room)
        _warn_cut(int(cut), room)
        return ids

    def _fim_ids(self, prefix: str, suffix: str, room: int) -> tuple[list[int], bool]:
        """(PSM ids with at most `room` text tokens, whether the texts were cut)."""
        tok = self._tok()
        tok.require(FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)
        pre, suf = _encode_plain(tok, prefix), _encode_plain(tok, suffix)
        cut = len(pre) + len(suf) > room
        if cut:  # keep the code nearest the gap, at least half of it from each side when both are long
            keep_pre = min(len(pre), max(room - len(suf), room // 2))
            pre, suf = pre[len(pre) - keep_pre:], suf[:room - keep_pre]
        return [tok.token_id(FIM_PREFIX)] + pre + [tok.token_id(FIM_SUFFIX)] + suf + [tok.token_id(FIM_MIDDLE)], cut

    def _prompt_room(self, max_new_tokens: int, special: int = 0) -> int:
        """How many text tokens a prompt may keep: the context less `special` tokens and
        room for max_new_tokens new ones (at most half the context)."""
        n_ctx = self.cfg.max_position_embeddings
        room = n_ctx - min(max(int(max_new_tokens), 1), n_ctx // 2) - special
        if room < 1:
            raise ConfigError(f"the model's context ({n_ctx} tokens, max_position_embeddings) has no room for a prompt")
        return room

    def infill_stop_ids(self) -> list[int]:
        """`<|endoftext|>`, the FIM tokens and `<file_sep>`: those the tokenizer has."""
        tok = self._tok()
        ids = [_maybe_id(tok, s) for s in INFILL_STOPS]
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return sorted({i for i in ids if i is not None})

    def infill(self, prefixes: list[str], suffixes: list[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = ()) -> list[str]:
        """The middle text for each (prefix, suffix), PSM format; ends at `<|endoftext|>`,
        a FIM token or `<file_sep>` (and at a stop string when given). Too long a pair is
        cut as `fim_ids` cuts it."""
        if isinstance(prefixes, str) or isinstance(suffixes, str):
            raise ConfigError("infill() takes lists of prefixes and suffixes, got a single string")
        if len(prefixes) != len(suffixes):
            raise ConfigError(f"infill() got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
        room = self._prompt_room(max_new_tokens, special=3)
        prompts = [self._fim_ids(p, s, room) for p, s in zip(prefixes, suffixes)]
        _warn_cut(sum(cut for _, cut in prompts), room)
        return self._text_generate([ids for ids, _ in prompts], self.infill_stop_ids(), stop, max_new_tokens,
                                   temperature, top_p, top_k, seed)


def _warn_cut(n: int, room: int) -> None:
    """One warning per call that cut prompts to the context (stacklevel: the caller of
    complete / infill / fim_ids)."""
    if n:
        warnings.warn(f"{n} prompt(s) too long for the model's context (max_position_embeddings) were cut to "
                      f"{room} text tokens, nearest the gap, to leave room to generate", stacklevel=3)


def _maybe_id(tok, s: str) -> int | None:
    """The id of special token `s`, or None when the tokenizer lacks it."""
    try:
        return int(tok.token_id(s))
    except (KeyError, ValueError, ConfigError):
        return None


def _encode_plain(tok, text: str) -> list[int]:
    """Text with special-token strings kept as text (user code may contain '<file_sep>')."""
    try:
        return list(tok.encode(text, allow_special=False))
    except TypeError:  # a tokenizer without the keyword
        return list(tok.encode(text))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _check_sampling(max_new_tokens, temperature, top_p, top_k) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = off), got {top_k}")


# ----------------------------------------------------------------------------- loading


def _find_tokenizer(path: str) -> str | None:
    from sc_jax.convert import find_tokenizer

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):  # a HF directory
        return path
    # The checkpoint itself, a step's manager directory, or a run directory above checkpoints/.
    return find_tokenizer(path) or find_tokenizer(os.path.dirname(path))


def _load_tokenizer(path: str):
    try:
        from sc_jax.tokenizer import Tokenizer
    except ImportError as e:  # pragma: no cover - the tokenizer module is part of the package
        raise ConfigError(f"cannot import sc_jax.tokenizer: {e}") from None
    return Tokenizer.from_file(path)


def load_generator(path: str, tokenizer: str | None = None, dtype=None, *, batch_size: int = 32) -> Generator:
    """A Generator from a HF model directory, an orbax checkpoint (directory or step) or a
    training run directory. The tokenizer is `tokenizer` when given, else the one beside
    the checkpoint (the HF directory itself, CKPT/tokenizer/, RUN/tokenizer.json, ...)."""
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint path '{path}' does not exist: pass a Hugging Face model directory, an orbax "
                          "checkpoint or a training run directory")
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint path '{path}' is a file: pass a Hugging Face model directory, an orbax "
                          "checkpoint directory or a training run directory")
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConfigError(f"tokenizer '{tokenizer}' does not exist: pass a tokenizer.json or a directory holding one")
    tok_path = tokenizer or _find_tokenizer(path)
    if tok_path is None:
        raise ConfigError(f"no tokenizer found for '{path}' (no tokenizer.json or tokenizer/ beside it): "
                          "pass --tokenizer PATH (tokenizer= in Python)")
    tok = _load_tokenizer(tok_path)
    if os.path.exists(os.path.join(path, "config.json")):
        from sc_jax.convert import load_hf

        cfg, params = load_hf(path)
    else:
        from sc_jax import checkpoint

        cfg, params, _ = checkpoint.load_params(path)
    return Generator(cfg, params, tokenizer=tok, dtype=dtype, batch_size=batch_size)


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sc_jax.generate", description=__doc__.split("\n\n")[0],
                epilog="Give --prompt for a completion, or --prefix/--suffix for fill-in-the-middle. "
                       "Texts are taken literally (use the shell's $'...' for newlines); --prompt - reads stdin. "
                       "Generation stops at the model's context (max_position_embeddings tokens, prompt "
                       "included): asking for more prints a warning line with how many will come; a prompt "
                       "too long for the context keeps its end (for FIM: the code nearest the gap), with a "
                       "warning line.")
    p.add_argument("--ckpt", required=True,
                   help="HF model directory, orbax checkpoint (or a step in it), or training run directory (required)")
    p.add_argument("--prompt", help="text to continue ('-' reads it from stdin)")
    p.add_argument("--prefix", help="fill-in-the-middle: the code before the gap")
    p.add_argument("--suffix", help="fill-in-the-middle: the code after the gap")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="most tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy; > 0 samples from softmax(logits / T) (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: sample among the most likely tokens holding mass P, in (0, 1] "
                        "(default: %(default)s = off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens (default: %(default)s = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, 0 to 2**32-1 (default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable); the output is cut before it (default: none)")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (default: found beside --ckpt)")
    p.add_argument("--dtype", choices=sorted(M.DTYPES),
                   help="compute dtype (default: float32 on CPU, bfloat16 otherwise)")
    return p


def _check_cli_args(args) -> None:
    """Refuses bad options by their flag names, with the fix, before any model is loaded."""
    _check_prompt_args(args)
    _check_sampling_args(args)
    _check_path_args(args)


def _check_prompt_args(args) -> None:
    if args.prompt is not None and (args.prefix is not None or args.suffix is not None):
        raise ConfigError("give either --prompt or --prefix/--suffix, not both")
    if args.prompt is None and args.prefix is None and args.suffix is None:
        raise ConfigError("give --prompt TEXT, or --prefix TEXT --suffix TEXT for fill-in-the-middle")
    if args.prompt == "":  # would continue a bare <|endoftext|>: noise
        raise ConfigError("--prompt is empty: give the text to continue, e.g. --prompt 'def fib(n):' "
                          "(or --prompt - to read it from stdin)")
    if args.prompt is None and not (args.prefix or args.suffix):
        raise ConfigError("--prefix and --suffix are both empty: give the code before and/or after the gap")


def _check_sampling_args(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}: pass how many tokens "
                          "to generate, e.g. --max-new-tokens 128")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a number >= 0, got {args.temperature}: pass 0 for greedy "
                          "decoding, or e.g. --temperature 0.7 to sample")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be within (0, 1], got {args.top_p}: pass 1 to turn nucleus sampling off, "
                          "or e.g. --top-p 0.95")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be 0 or more, got {args.top_k}: pass 0 to turn it off, or e.g. --top-k 50")
    if not 0 <= args.seed < 2**32:  # jax folds larger seeds onto smaller ones
        raise ConfigError(f"--seed must be within [0, 2**32), got {args.seed}: pass e.g. --seed 0")


def _check_path_args(args) -> None:
    if not os.path.exists(args.ckpt):
        raise ConfigError(f"--ckpt '{args.ckpt}' does not exist: pass a Hugging Face model directory, an orbax "
                          "checkpoint or a training run directory")
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        raise ConfigError(f"--tokenizer '{args.tokenizer}' does not exist: pass a tokenizer.json or a directory "
                          "holding one (or leave it out to use the one beside --ckpt)")


def _read_prompt(args) -> str | None:
    """The --prompt text (stdin for '-'), None for fill-in-the-middle."""
    if args.prompt != "-":
        return args.prompt
    text = sys.stdin.read()
    if not text:
        raise ConfigError("--prompt - read an empty prompt from stdin: pipe the text to continue into the command")
    return text


def _cli_prompt(gen: Generator, args, prompt: str | None) -> tuple[list[int], list[int], list[str]]:
    """(the ids the CLI runs, the ids that end them, warning lines for the user). The same
    cuts as `complete` / `infill`, said in plain words instead of a Python warning."""
    ids, stops, notes = _cli_fim(gen, args) if prompt is None else _cli_completion(gen, args, prompt)
    n_ctx, want = gen.cfg.max_position_embeddings, args.max_new_tokens
    can = n_ctx - len(ids)
    if want > can:
        notes.append(f"--max-new-tokens {want} does not fit: the model's context is {n_ctx} tokens "
                     f"(max_position_embeddings) and the prompt takes {len(ids)}, so at most {can} new tokens "
                     "will be generated")
    return ids, stops, notes


def _cli_fim(gen: Generator, args) -> tuple[list[int], list[int], list[str]]:
    room = gen._prompt_room(args.max_new_tokens, special=3)
    ids, cut = gen._fim_ids(args.prefix or "", args.suffix or "", room)
    notes = [f"--prefix and --suffix are too long for the model's context of {gen.cfg.max_position_embeddings} "
             f"tokens (max_position_embeddings): kept the {room} tokens nearest the gap, to leave room to generate"]
    return ids, gen.infill_stop_ids(), notes if cut else []


def _cli_completion(gen: Generator, args, prompt: str) -> tuple[list[int], list[int], list[str]]:
    room = gen._prompt_room(args.max_new_tokens)
    (ids,), (full,) = gen._completion_ids([prompt], room)
    notes = [f"the prompt has {full} tokens, too many for the model's context of {gen.cfg.max_position_embeddings} "
             f"tokens (max_position_embeddings): kept its last {room}, to leave room to generate"]
    return ids, gen.completion_stop_ids(), notes if full > room else []


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_cli_args(args)
        prompt = _read_prompt(args)
        t0 = time.perf_counter()
        gen = load_generator(args.ckpt, tokenizer=args.tokenizer, dtype=args.dtype)
        t1 = time.perf_counter()
        ids, stop_ids, notes = _cli_prompt(gen, args, prompt)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        text = gen._text_generate([ids], stop_ids, list(args.stop), args.max_new_tokens, args.temperature,
                                  args.top_p, args.top_k, args.seed)[0]
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    s = gen.stats
    print(f"[{s.new_tokens} tokens in {s.seconds:.2f}s incl. compile; model loaded in {t1 - t0:.1f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
