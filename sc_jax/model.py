"""The StableLM / Stable Code decoder in Flax NNX.

Attribute names mirror Hugging Face's `StableLmForCausalLM` (model.embed_tokens,
model.layers.*.self_attn.q_proj, ...) so that conversion is a name map plus
reshapes. Every parameter carries `logical_axes` metadata that `sharding.py` maps
onto mesh axes. The layers' parameters are stored stacked with a leading `layers`
axis and run with `jax.lax.scan` (one compiled layer for all of them); with
`scan_layers=False` the same stacked parameters are run in a Python loop.
`DecodeModel` holds the same layers laid out for generation, with `prefill` and
`decode_step` over a heads-major KV cache.

Shapes: B batch, T query length, S key length, E hidden, H heads, K kv heads,
D head_dim, M intermediate, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from sc_jax import int8_kernel
from sc_jax.attention import AttentionMask, attend, attention_path, cached_attention
from sc_jax.config import DTYPES, ModelConfig
from sc_jax.sharding import constrain

# What each remat policy keeps for the backward pass (the rest is recomputed), by the
# `checkpoint_name` tags in the layer: query_proj/key_proj/value_proj (after bias, qk norm
# and rotary), context (the attention core's output), out_proj, mlpwi (gate and up), mlpwo.
# When the attention core runs outside the recomputed region (every path but `reference`,
# see `_run_layers`), q, k, v and the context are kept by that alone, whatever the policy.
_SAVE = jax.checkpoint_policies.save_only_these_names
REMAT = {
    "minimal": _SAVE("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlpwi", "mlpwo"),
    "save_dot_except_mlp": _SAVE("query_proj", "key_proj", "value_proj", "context", "out_proj"),
    "save_qkv_proj": _SAVE("query_proj", "key_proj", "value_proj"),
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, init, shape, axes, dtype, stack: int | None) -> nnx.Param:
    """A parameter with logical axis names; `stack` prepends the scanned layer axis."""
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def _normal(std):
    return jax.nn.initializers.normal(std)


# ----------------------------------------------------------------------------- modules


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (with bias, as StableLM; bias optional for qk norms)."""

    def __init__(self, shape, axes, eps, dtype, rngs, stack=None, use_bias=True):
        self.eps = eps
        self.weight = _param(rngs, jax.nn.initializers.ones, shape, axes, dtype, stack)
        self.bias = _param(rngs, jax.nn.initializers.zeros, shape, axes, dtype, stack) if use_bias else None

    def __call__(self, x):
        # Statistics in fp32: bf16 variance over 2560 channels loses digits.
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, stack=None):
        E, H, K, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd, init = DTYPES[cfg.param_dtype], _normal(cfg.initializer_range)
        self.cfg = cfg
        self.q_proj = _param(rngs, init, (E, H, D), ("embed", "heads", "head_dim"), pd, stack)
        self.k_proj = _param(rngs, init, (E, K, D), ("embed", "kv_heads", "head_dim"), pd, stack)
        self.v_proj = _param(rngs, init, (E, K, D), ("embed", "kv_heads", "head_dim"), pd, stack)
        self.o_proj = _param(rngs, init, (H, D, E), ("heads", "head_dim", "embed"), pd, stack)
        if cfg.use_qkv_bias:
            zeros = jax.nn.initializers.zeros
            self.q_bias = _param(rngs, zeros, (H, D), ("heads", "head_dim"), pd, stack)
            self.k_bias = _param(rngs, zeros, (K, D), ("kv_heads", "head_dim"), pd, stack)
            self.v_bias = _param(rngs, zeros, (K, D), ("kv_heads", "head_dim"), pd, stack)
        if cfg.qk_layernorm:  # one bias-free LayerNorm per head, over head_dim
            self.q_layernorm = LayerNorm((H, D), ("heads", "head_dim"), cfg.layer_norm_eps, pd, rngs, stack, False)
            self.k_layernorm = LayerNorm((K, D), ("kv_heads", "head_dim"), cfg.layer_norm_eps, pd, rngs, stack, False)

    def __call__(self, x, positions, mask, segment_ids=None):
        """x [B,T,E] -> ([B,T,E], this chunk's (k, v) [B,T,K,D], which the prefill caches)."""
        q, k, v = self.qkv(x, positions)
        return self.out(attend(self.cfg, q, k, v, mask, segment_ids)), (k, v)

    def qkv(self, x, positions):
        """x [B,T,E] -> q [B,T,H,D], k, v [B,T,K,D]: projected, biased, normed, rotated."""
        dt = DTYPES[self.cfg.dtype]
        x = x.astype(dt)
        q, k, v = (project(x, w[...], dt) for w in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = self._bias_norm_rotate(q, k, v, positions)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        return checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")

    def out(self, context):
        """The attention core's output [B,T,H,D] -> [B,T,E]."""
        dt = DTYPES[self.cfg.dtype]
        context = checkpoint_name(context.astype(dt), "context")
        return checkpoint_name(project(context, self.o_proj[...], dt, contract=2), "out_proj")

    def step(self, x, positions, k_cache, v_cache, valid, index):
        """One token per row against the heads-major cache: writes its key/value at slot
        `index` (in place) and attends over the valid slots.

        x [B,1,E], positions [B], k/v_cache [B*K,S,D], valid [B*K,S] bool
        -> ([B,1,E], k_cache, v_cache)."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        B, K, D = x.shape[0], cfg.num_key_value_heads, cfg.head_dim
        q, k, v = (project(x, w[...], dt) for w in (self.q_proj, self.k_proj, self.v_proj))  # [B,1,H|K,D]
        q, k, v = self._bias_norm_rotate(q, k, v, positions[:, None])
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype).reshape(B * K, 1, D), (0, index, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype).reshape(B * K, 1, D), (0, index, 0))
        context = cached_attention(q[:, 0], k_cache, v_cache, valid)  # [B,H,D]
        return project(context, self.o_proj[...], dt, contract=2)[:, None], k_cache, v_cache

    def _bias_norm_rotate(self, q, k, v, positions):
        """The projections' biases, the per-head qk LayerNorms and rotary: q [B,T,H,D],
        k/v [B,T,K,D], positions [B,T]."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        if cfg.use_qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if cfg.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q = apply_rotary(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = apply_rotary(k, positions, cfg.rotary_dim, cfg.rope_theta)
        return q, k, v


def project(x, kernel, dt, contract: int = 1):
    """x [..., *in] @ kernel [*in, *out] -> [..., *out] in dt, over the last `contract` dims of x.

    Run as one 2-D matmul [rows, prod(in)] @ [prod(in), prod(out)], as torch's Linear does:
    XLA's CPU backend runs that faster than the einsum with batch and head dims kept
    (bench/train.py). The reshapes are of contiguous arrays; on the 8-device CPU mesh every
    layout still gives the single-device losses (tests/test_train.py). Not measured on GPU/TPU."""
    lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    rows = x.astype(dt).reshape(-1, int(np.prod(inner)))
    if isinstance(kernel, Int8):  # q [prod(out), prod(in)]: the int8 values in the product, the scales on its output
        out = kernel.scale.shape
        return int8_product(rows, kernel.q, kernel.scale.reshape(-1), dt).reshape(*lead, *out)
    out = kernel.shape[contract:]
    return (rows @ kernel.astype(dt).reshape(rows.shape[1], -1)).reshape(*lead, *out)


def int8_product(rows, q, scale, out_dtype):
    """rows [M,K] (in the compute dtype) @ int8 q [N,K] transposed, times scale [N] -> [M,N]
    in out_dtype. On the CPU in fp32 the product is `int8_kernel`'s, which reads q as int8;
    elsewhere XLA's dot, with q converted to the compute dtype and fp32 sums."""
    if int8_kernel.applies(rows, q):
        y = int8_kernel.matmul(rows, q, scale)
    else:
        y = jnp.matmul(rows, q.T.astype(rows.dtype), preferred_element_type=jnp.float32) * scale
    return y.astype(out_dtype)


class Int8(NamedTuple):
    """A weight-only int8 kernel, as `QuantizedKernel[...]` reads it: q [prod(out), prod(in)]
    int8, one row per output channel (as torch's Linear.weight), and fp32 scales [*out], one
    per output channel, symmetric: the weight is q * scale. Rows, so that a product reads q
    front to back (`int8_kernel`); a [V,E] table (embedding, transposed head) is that already."""

    q: jax.Array
    scale: jax.Array


class QuantizedKernel(nnx.Module):
    """Stands in for a kernel Param in a weight-only int8 `DecodeModel`; `kernel[...]`
    gives the `Int8` pair that `project`, `Embed` and `DecodeModel.logits` multiply by."""

    def __init__(self, shape, scale_shape):
        self.q = nnx.Param(jnp.zeros(shape, jnp.int8))
        self.scale = nnx.Param(jnp.ones(scale_shape, jnp.float32))

    def __getitem__(self, index):
        return Int8(self.q[index], self.scale[index])


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: ModelConfig, rngs, stack=None):
        E, M = cfg.hidden_size, cfg.intermediate_size
        pd, init = DTYPES[cfg.param_dtype], _normal(cfg.initializer_range)
        self.dtype = DTYPES[cfg.dtype]
        self.gate_proj = _param(rngs, init, (E, M), ("embed", "mlp"), pd, stack)
        self.up_proj = _param(rngs, init, (E, M), ("embed", "mlp"), pd, stack)
        self.down_proj = _param(rngs, init, (M, E), ("mlp", "embed"), pd, stack)

    def __call__(self, x):
        dt = self.dtype
        x = x.astype(dt)
        gate = checkpoint_name(project(x, self.gate_proj[...], dt), "mlpwi")
        up = checkpoint_name(project(x, self.up_proj[...], dt), "mlpwi")
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        return checkpoint_name(project(h, self.down_proj[...], dt), "mlpwo")


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, stack=None):
        E, pd = cfg.hidden_size, DTYPES[cfg.param_dtype]
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = LayerNorm((E,), ("norm",), cfg.layer_norm_eps, pd, rngs, stack)
        self.self_attn = Attention(cfg, rngs, stack)
        self.mlp = MLP(cfg, rngs, stack)
        if not self.parallel:
            self.post_attention_layernorm = LayerNorm((E,), ("norm",), cfg.layer_norm_eps, pd, rngs, stack)

    def __call__(self, x, positions, mask, segment_ids=None):
        """x [B,T,E] -> ([B,T,E], (k, v) [B,T,K,D])."""
        q, k, v = self.attention_inputs(x, positions)
        return self.finish(x, attend(self.self_attn.cfg, q, k, v, mask, segment_ids)), (k, v)

    # The layer in two halves around the attention core, so that training can recompute
    # each half under remat while the core (a fused kernel) runs once: see `_run_layers`.
    def attention_inputs(self, x, positions):
        """x [B,T,E] -> q [B,T,H,D], k, v [B,T,K,D]."""
        return self.self_attn.qkv(self.input_layernorm(x), positions)

    def finish(self, x, context):
        """The layer's input x [B,T,E] and attention context [B,T,H,D] -> its output [B,T,E].
        The parallel residual's normed input is recomputed here (a LayerNorm) rather than
        carried from `attention_inputs`, so the recomputed halves share nothing but x."""
        h = self.input_layernorm(x) if self.parallel else None
        out = self._residual(x, h, self.self_attn.out(context))
        return constrain(out, ("act_batch", "act_seq", "act_embed"))

    def step(self, x, positions, k_cache, v_cache, valid, index):
        """One token per row against the heads-major cache (see `Attention.step`):
        x [B,1,E] -> ([B,1,E], k_cache, v_cache)."""
        h = self.input_layernorm(x)
        attn, k_cache, v_cache = self.self_attn.step(h, positions, k_cache, v_cache, valid, index)
        return self._residual(x, h, attn), k_cache, v_cache

    def _residual(self, x, h, attn):
        """The layer's output from its input x, normed input h and attention output."""
        if self.parallel:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln1(x))
            return x + attn + self.mlp(h)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        self.embedding = _param(rngs, _normal(cfg.initializer_range), (cfg.vocab_size, cfg.hidden_size),
                                ("vocab", "embed"), DTYPES[cfg.param_dtype], None)

    def __call__(self, ids):
        table = self.embedding[...]
        if isinstance(table, Int8):  # a row: its int8 values times its scale
            return jnp.take(table.q, ids, axis=0).astype(jnp.float32) * jnp.take(table.scale, ids)[..., None]
        return jnp.take(table, ids, axis=0)


class StableLmModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        self.embed_tokens = Embed(cfg, rngs)
        self.layers = DecoderLayer(cfg, rngs, stack=cfg.num_hidden_layers)
        self.norm = LayerNorm((cfg.hidden_size,), ("norm",), cfg.layer_norm_eps, DTYPES[cfg.param_dtype], rngs)


class StableLmForCausalLM(nnx.Module):
    """input_ids [B,T] -> logits [B,T,V] in fp32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.config = cfg
        self.model = StableLmModel(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, _normal(cfg.initializer_range), (cfg.hidden_size, cfg.vocab_size),
                                  ("embed", "vocab"), DTYPES[cfg.param_dtype], None)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """Runs the decoder over whole sequences (scoring); `DecodeModel` generates, and
        training takes `hidden_states` to tile the loss over tokens.

        input_ids [B,T] int; positions [B,T] (default arange); segment_ids [B,T] (packed
        documents: attend within a segment only; 0 = padding) -> logits [B,T,V] fp32.
        """
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    def hidden_states(self, input_ids, positions=None, segment_ids=None):
        """The same inputs -> the final normed hidden states [B,T,E], before the LM head."""
        cfg = self.config
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        segs = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        x = self.model.embed_tokens(input_ids).astype(DTYPES[cfg.dtype])
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        x = self._run_layers(x, positions, AttentionMask.causal(segs), segment_ids)
        return self.model.norm(x)

    def logits(self, x):
        """[B,T,E] hidden -> [B,T,V] fp32 logits."""
        return head_logits(x, self.head(), self.config.dtype)

    def head(self):
        """The LM head [E,V] (the embedding's transpose when tied)."""
        return self.model.embed_tokens.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def _run_layers(self, x, positions, mask, segment_ids):
        """x [B,T,E] through every layer: one compiled layer under `scan`, or a Python loop.

        Under remat, the attention core of every path but `reference` stays outside the
        recomputed region: each half of the layer is recomputed, the core runs once and
        keeps its own residuals (q, k, v, its output and, for the fused kernels, the
        [B,H,T] softmax statistics; `chunked` recomputes its score blocks by itself). The
        reference core's residual is the [B,H,T,S] probabilities, so it is recomputed."""
        cfg = self.config
        graphdef, params = nnx.split(self.model.layers)

        def layer(x, layer_params):
            return nnx.merge(graphdef, layer_params)(x, positions, mask, segment_ids)[0], None

        core = attention_path(cfg, x.shape[1], packed=segment_ids is not None)
        if cfg.remat != "none" and core == "reference":
            layer = jax.checkpoint(layer, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        elif cfg.remat != "none":
            remat = lambda f: jax.checkpoint(f, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)  # noqa: E731
            first = remat(lambda x, p: nnx.merge(graphdef, p).attention_inputs(x, positions))
            second = remat(lambda x, context, p: nnx.merge(graphdef, p).finish(x, context))

            def layer(x, layer_params):
                q, k, v = first(x, layer_params)
                return second(x, attend(cfg, q, k, v, mask, segment_ids), layer_params), None

        if cfg.scan_layers:
            return jax.lax.scan(layer, x, params)[0]
        for i in range(cfg.num_hidden_layers):
            x, _ = layer(x, jax.tree.map(lambda a: a[i], params))
        return x


def head_logits(x, head, dtype: str):
    """x [B,T,E] hidden, head [E,V] -> [B,T,V] fp32 logits (fp32 accumulation of the matmul)."""
    dt = DTYPES[dtype]
    B, T, E = x.shape
    logits = jnp.matmul(x.astype(dt).reshape(B * T, E), head.astype(dt), preferred_element_type=jnp.float32)
    return constrain(logits.reshape(B, T, -1), ("act_batch", "act_seq", "act_vocab"))  # 2-D: see `project`


# ----------------------------------------------------------------------------- attention


def apply_rotary(x, positions, rotary_dim: int, theta: float):
    """Rotates the first `rotary_dim` dims of each head (rotate-half), passes the rest.

    x [B,T,H,D], positions [B,T]. Angles in fp32 (bf16 positions lose digits past 256).
    """
    if rotary_dim == 0:
        return x
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,r/2]
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]  # [B,T,1,r]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x_rot, x_pass = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], -1)
    x_rot = (x_rot * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([x_rot, x_pass], -1)


# ----------------------------------------------------------------------------- decoding


class DecodeModel(nnx.Module):
    """StableLmForCausalLM laid out for generation with a KV cache: `prefill` runs
    left-padded prompts and fills the cache, `decode_step` runs one token per row against
    it. The math is the layers' own (`DecoderLayer.__call__` for prompts,
    `DecoderLayer.step` for one token); the layout differs because decoding is
    memory-bound and XLA copies what it slices:
      * each layer is its own module with its own arrays, run unrolled (a stacked [L,...]
        array under `scan` gets each layer's slice copied on every step: that alone halved
        the decode speed on CPU);
      * the cache is one heads-major array per layer, k/v [B*K,S,D], so the score and value
        matmuls read contiguous [S,D] blocks (a [L,B,S,K,D] cache makes XLA transpose every
        layer's cache on every step: ~10x slower attention on CPU), and a step writes only
        its new slot, in place. Batch and kv-heads share one axis because with a batch axis
        of 1, XLA fused each layer's cache update twice (once per shape it is read in) and
        copied every cache on every step: a third of the step of the quick start's model
        at batch 1 on CPU;
      * the LM head is stored [V,E] (2x faster than [E,V] for a few rows on CPU) and the
        prefill computes logits for the last position only (not [B,P,V]).
    Build one with `decode_state` (from StableLmForCausalLM's parameters) and
    `abstract_decode_model`; tests/test_model.py checks it against the full forward pass.

    The cache: {"k", "v": per layer [B*K,S,D]; "valid": [B,S] bool, the slots a token may
    attend to; "index": int32, the next slot to write}.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # Prompts are left-padded, which cuDNN's kernel does not handle (it assumes right
        # padding); the chunked path is the reference math 1024 queries at a time, so a
        # long prompt never holds a [B,H,P,P] score array.
        cfg = dataclasses.replace(cfg, attention="chunked").validate()
        pd = DTYPES[cfg.param_dtype]
        self.config = cfg
        self.embed_tokens = Embed(cfg, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = LayerNorm((cfg.hidden_size,), ("norm",), cfg.layer_norm_eps, pd, rngs)
        if not cfg.tie_word_embeddings:  # [V,E]: lm_head transposed
            self.lm_head_t = _param(rngs, _normal(cfg.initializer_range), (cfg.vocab_size, cfg.hidden_size),
                                    ("vocab", "embed"), pd, None)

    def prefill(self, input_ids, positions, segment_ids, cache_len: int):
        """Left-padded prompts (every row's last token in the last column): input_ids,
        positions, segment_ids [B,P] int32 (segment 0: padding, never attended to)
        -> (last-position logits [B,V] fp32, cache with cache_len slots, the first P filled)."""
        B, P = input_ids.shape
        x = self.embed_tokens(input_ids).astype(DTYPES[self.config.dtype])
        mask = AttentionMask.causal(segment_ids)
        pad = ((0, 0), (0, cache_len - P), (0, 0))
        ks, vs = [], []
        for layer in self.layers:
            x, (k, v) = layer(x, positions, mask, segment_ids)
            ks.append(jnp.pad(heads_major(k), pad))  # [B,P,K,D] -> [B*K,cache_len,D]
            vs.append(jnp.pad(heads_major(v), pad))
        cache = {"k": ks, "v": vs, "valid": jnp.pad(segment_ids != 0, ((0, 0), (0, cache_len - P))),
                 "index": jnp.asarray(P, jnp.int32)}
        return self.logits(self.norm(x[:, -1:]))[:, 0], cache

    def decode_step(self, tokens, positions, cache: dict):
        """tokens, positions [B] int32 -> (logits [B,V] fp32, the cache with the tokens
        written at cache["index"])."""
        x = self.embed_tokens(tokens[:, None]).astype(DTYPES[self.config.dtype])
        index = cache["index"]
        valid = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((tokens.shape[0], 1), bool), (0, index))
        valid_heads = jnp.repeat(valid, self.config.num_key_value_heads, axis=0)  # [B*K,S], the cache's rows
        ks, vs = [], []
        for layer, k_cache, v_cache in zip(self.layers, cache["k"], cache["v"]):
            x, k_cache, v_cache = layer.step(x, positions, k_cache, v_cache, valid_heads, index)
            ks.append(k_cache)
            vs.append(v_cache)
        cache = {"k": ks, "v": vs, "valid": valid, "index": index + 1}
        return self.logits(self.norm(x))[:, 0], cache

    def score(self, input_ids, positions, segment_ids):
        """Whole sequences through the prefill's layers (the held-out loss of a quantized
        model): input_ids, positions, segment_ids [B,T] -> logits [B,T,V] fp32."""
        x = self.embed_tokens(input_ids).astype(DTYPES[self.config.dtype])
        mask = AttentionMask.causal(segment_ids)
        for layer in self.layers:
            x, _ = layer(x, positions, mask, segment_ids)
        return self.logits(self.norm(x))

    def logits(self, x):
        """[B,T,E] final hidden -> [B,T,V] fp32 logits."""
        dt = DTYPES[self.config.dtype]
        head = self.embed_tokens.embedding[...] if self.config.tie_word_embeddings else self.lm_head_t[...]
        if isinstance(head, Int8):  # [V,E] int8 rows, a scale per vocabulary row
            B, T, E = x.shape
            return int8_product(x.astype(dt).reshape(B * T, E), head.q, head.scale, jnp.float32).reshape(B, T, -1)
        return jnp.einsum("bte,ve->btv", x.astype(dt), head.astype(dt), preferred_element_type=jnp.float32)


def heads_major(x):
    """[B,T,K,D] keys or values -> [B*K,T,D], the decode cache's layout."""
    B, T, K, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * K, T, D)


def abstract_decode_model(cfg: ModelConfig, weights: str | None = None) -> DecodeModel:
    """The DecodeModel with ShapeDtypeStructs instead of arrays (its graph definition);
    weights="int8": its kernels are `QuantizedKernel`s (see `quantize_decode_model`)."""
    def build():
        model = DecodeModel(cfg, rngs=nnx.Rngs(0))
        if weights == "int8":
            quantize_decode_model(model)
        return model

    return nnx.eval_shape(build)


# Each quantized kernel of a DecodeModel: (its path in the model, its contracted (input) axes).
# LayerNorms and biases stay in the compute dtype: they are a rounding error of the bytes.
QUANTIZED_KERNELS = {("embed_tokens", "embedding"): (1,), ("lm_head_t",): (1,)}
LAYER_KERNELS = {("self_attn", "q_proj"): (0,), ("self_attn", "k_proj"): (0,), ("self_attn", "v_proj"): (0,),
                 ("self_attn", "o_proj"): (0, 1), ("mlp", "gate_proj"): (0,), ("mlp", "up_proj"): (0,),
                 ("mlp", "down_proj"): (0,)}


def _quantized_kernels(cfg: ModelConfig) -> dict:
    """{path in a DecodeModel's pure state: contracted axes} of every kernel int8 holds."""
    paths = {p: a for p, a in QUANTIZED_KERNELS.items() if p != ("lm_head_t",) or not cfg.tie_word_embeddings}
    for i in range(cfg.num_hidden_layers):
        paths.update({("layers", i, *p): a for p, a in LAYER_KERNELS.items()})
    return paths


def quantize_decode_model(model: DecodeModel) -> None:
    """Swaps every kernel of `model` for a `QuantizedKernel` of its shape (in place)."""
    for path, contracted in _quantized_kernels(model.config).items():
        parent = model
        for name in path[:-1]:
            parent = parent[name] if isinstance(name, int) else getattr(parent, name)
        shape = getattr(parent, path[-1]).shape
        out = tuple(n for a, n in enumerate(shape) if a not in contracted)
        setattr(parent, path[-1], QuantizedKernel((int(np.prod(out)), int(np.prod(shape)) // int(np.prod(out))), out))


def quantize_int8(w, contracted) -> tuple[np.ndarray, np.ndarray]:
    """A float kernel -> (int8 values, fp32 scales over the axes not in `contracted`):
    symmetric, per output channel, scale = max|w| / 127 (1 for an all-zero channel), so
    |w - q * scale| <= scale / 2 in every channel."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=tuple(contracted), keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis=tuple(contracted))


def int8_rows(q, contracted) -> np.ndarray:
    """int8 values of a kernel, in its own layout -> [prod(out), prod(in)], `Int8`'s: the
    output axes first, each output channel's inputs one contiguous row."""
    out = [a for a in range(q.ndim) if a not in contracted]
    rows = np.transpose(q, out + list(contracted))
    return np.ascontiguousarray(rows.reshape(int(np.prod([q.shape[a] for a in out])), -1))


def decode_state(cfg: ModelConfig, params: dict, weights: str | None = None) -> nnx.State:
    """StableLmForCausalLM's pure parameter dict (stacked layers; numpy or jax arrays) ->
    the DecodeModel's state on the default device, in cfg.param_dtype; weights="int8":
    its kernels quantized (`quantize_int8`), one tensor at a time, so that no float copy
    of them is put on the device."""
    dtype = jnp.dtype(DTYPES[cfg.param_dtype])
    put = lambda a: jnp.asarray(a if isinstance(a, jax.Array) else np.asarray(a), dtype=dtype)  # noqa: E731
    layers = params["model"]["layers"]
    pure = {"embed_tokens": params["model"]["embed_tokens"], "norm": params["model"]["norm"],
            "layers": {i: jax.tree.map(lambda a, i=i: _Slice(a, i), layers) for i in range(cfg.num_hidden_layers)}}
    if not cfg.tie_word_embeddings:
        pure["lm_head_t"] = _Slice(params["lm_head"], None)
    kernels = _quantized_kernels(cfg) if weights == "int8" else {}

    def place(path, a):
        names = tuple(k.key if hasattr(k, "key") else k.idx for k in path)
        a = a.get() if isinstance(a, _Slice) else a
        if names not in kernels:
            return put(a)
        q, scale = quantize_int8(a, kernels[names])
        return {"q": jnp.asarray(int8_rows(q, kernels[names])), "scale": jnp.asarray(scale)}

    state = nnx.state(abstract_decode_model(cfg, weights))
    state.replace_by_pure_dict(jax.tree_util.tree_map_with_path(place, pure, is_leaf=lambda a: isinstance(a, _Slice)))
    return state


class _Slice:
    """One layer's slice of a stacked array (index None: the [E,V] head as [V,E]), taken
    when its turn comes: `decode_state` holds one converted tensor at a time."""

    def __init__(self, array, index):
        self.array, self.index = array, index

    def get(self):
        if self.index is None:
            return np.asarray(self.array).T
        return self.array[self.index]


# ----------------------------------------------------------------------------- helpers


def create_model(cfg: ModelConfig, seed: int = 0) -> StableLmForCausalLM:
    return StableLmForCausalLM(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> StableLmForCausalLM:
    """The model with ShapeDtypeStructs instead of arrays: nothing allocated."""
    return nnx.eval_shape(lambda: StableLmForCausalLM(cfg, rngs=nnx.Rngs(0)))


def logical_axes(params: Any):
    """The `logical_axes` metadata of every parameter in an nnx.State, as a matching tree."""
    return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))

