"""The StableLM / Stable Code decoder in Flax NNX.

Attribute names mirror Hugging Face's `StableLmForCausalLM` (model.embed_tokens,
model.layers.*.self_attn.q_proj, ...) so that conversion is a name map plus
reshapes. Every parameter carries `logical_axes` metadata that `sharding.py` maps
onto mesh axes. The layers' parameters are stored stacked with a leading `layers`
axis and run with `jax.lax.scan` (one compiled layer for all of them); with
`scan_layers=False` the same stacked parameters are run in a Python loop.

Shapes: B batch, T query length, S key length, E hidden, H heads, K kv heads,
D head_dim, M intermediate, V vocab, L layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sc_jax.config import ModelConfig
from sc_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NEG_INF = -1e30  # finite, so a fully masked (padding) row stays finite instead of NaN
ATTENTION_CHUNK = 1024  # queries per block in chunked_attention

REMAT = {
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

    def __call__(self, x, positions, mask, kv_cache=None, cache_index=None, segment_ids=None):
        """x [B,T,E] -> ([B,T,E], (k, v) [B,S,K,D] as cached)."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        x = x.astype(dt)
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", x, self.v_proj[...].astype(dt))
        if cfg.use_qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if cfg.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q = apply_rotary(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = apply_rotary(k, positions, cfg.rotary_dim, cfg.rope_theta)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if kv_cache is not None:  # write this chunk's keys at cache_index, attend over the buffer
            k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), (0, cache_index, 0, 0))
            out = reference_attention(q, k.astype(dt), v.astype(dt), mask)
        elif use_cudnn(cfg):
            out = cudnn_attention(q, k, v, segment_ids, cfg.max_segments)
        elif use_chunked(cfg):
            out = chunked_attention(q, k, v, mask)
        else:
            out = reference_attention(q, k, v, mask)
        out = jnp.einsum("bthd,hde->bte", out, self.o_proj[...].astype(dt))
        return out, (k, v)


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
        gate = jnp.einsum("bte,em->btm", x, self.gate_proj[...].astype(dt))
        up = jnp.einsum("bte,em->btm", x, self.up_proj[...].astype(dt))
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        return jnp.einsum("btm,me->bte", h, self.down_proj[...].astype(dt))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, stack=None):
        E, pd = cfg.hidden_size, DTYPES[cfg.param_dtype]
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = LayerNorm((E,), ("norm",), cfg.layer_norm_eps, pd, rngs, stack)
        self.self_attn = Attention(cfg, rngs, stack)
        self.mlp = MLP(cfg, rngs, stack)
        if not self.parallel:
            self.post_attention_layernorm = LayerNorm((E,), ("norm",), cfg.layer_norm_eps, pd, rngs, stack)

    def __call__(self, x, positions, mask, kv_cache=None, cache_index=None, segment_ids=None):
        h = self.input_layernorm(x)
        attn, kv = self.self_attn(h, positions, mask, kv_cache, cache_index, segment_ids)
        if self.parallel:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln1(x))
            out = x + attn + self.mlp(h)
        else:
            x = x + attn
            out = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(out, ("act_batch", "act_seq", "act_embed")), kv


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        self.embedding = _param(rngs, _normal(cfg.initializer_range), (cfg.vocab_size, cfg.hidden_size),
                                ("vocab", "embed"), DTYPES[cfg.param_dtype], None)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


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

    def __call__(self, input_ids, positions=None, segment_ids=None, cache: dict | None = None,
                 return_hidden: bool = False):
        """Runs the decoder.

        input_ids [B,T] int; positions [B,T] (default arange, offset by the cache index);
        segment_ids [B,T] (packed documents: attend within a segment only; 0 = padding).
        With `cache` (see `init_cache`) the new keys/values are written at `cache["index"]`
        and `(logits, new_cache)` is returned.
        """
        cfg = self.config
        B, T = input_ids.shape
        start = cache["index"] if cache is not None else 0
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        q_seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        q_slot = start + jnp.arange(T, dtype=jnp.int32)
        if cache is not None:
            kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], q_seg, (0, start))
            kv_slot = jnp.arange(kv_seg.shape[1], dtype=jnp.int32)
        else:
            kv_seg, kv_slot = q_seg, q_slot
        mask = AttentionMask(q_seg, kv_seg, q_slot, kv_slot)

        x = self.model.embed_tokens(input_ids).astype(DTYPES[cfg.dtype])
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        x, new_kv = self._run_layers(x, positions, mask, cache, start, segment_ids)
        x = self.model.norm(x)
        if return_hidden:
            return x
        logits = self.logits(x)
        if cache is None:
            return logits
        return logits, {"k": new_kv[0], "v": new_kv[1], "segment_ids": kv_seg, "index": start + T}

    def logits(self, x):
        """[B,T,E] hidden -> [B,T,V] fp32 logits (fp32 accumulation of the head matmul)."""
        dt = DTYPES[self.config.dtype]
        head = (self.model.embed_tokens.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...])
        logits = jnp.einsum("bte,ev->btv", x.astype(dt), head.astype(dt), preferred_element_type=jnp.float32)
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"))

    def _run_layers(self, x, positions, mask, cache, start, segment_ids):
        cfg = self.config
        graphdef, params = nnx.split(self.model.layers)

        def layer(x, layer_params, kv_cache):
            out, kv = nnx.merge(graphdef, layer_params)(x, positions, mask, kv_cache, start, segment_ids)
            return out, (kv if kv_cache is not None else None)

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        caches = (cache["k"], cache["v"]) if cache is not None else None

        def body(x, xs):
            layer_params, kv_cache = xs
            return layer(x, layer_params, kv_cache)

        if cfg.scan_layers:
            return jax.lax.scan(body, x, (params, caches))
        outs = []
        for i in range(cfg.num_hidden_layers):
            x, kv = body(x, jax.tree.map(lambda a: a[i], (params, caches)))
            outs.append(kv)
        return x, (jax.tree.map(lambda *a: jnp.stack(a), *outs) if cache is not None else None)


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


class AttentionMask(NamedTuple):
    """Who attends to whom, without materialising [T,S]: causal by buffer slot, same
    segment, never a padding (segment 0) key."""

    q_seg: jax.Array  # [B,T]
    kv_seg: jax.Array  # [B,S]
    q_slot: jax.Array  # [T]
    kv_slot: jax.Array  # [S]

    def dense(self):  # [B,T,S] bool
        return ((self.kv_slot[None, None, :] <= self.q_slot[None, :, None])
                & (self.q_seg[:, :, None] == self.kv_seg[:, None, :]) & (self.kv_seg[:, None, :] != 0))


def reference_attention(q, k, v, mask: AttentionMask):
    """q [B,T,H,D], k/v [B,S,K,D] -> [B,T,H,D]. Softmax in fp32, GQA by grouping."""
    B, T, H, D = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, D)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(D).astype(jnp.float32)
    logits = jnp.where(mask.dense()[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, D)


def chunked_attention(q, k, v, mask: AttentionMask, chunk: int = ATTENTION_CHUNK):
    """The reference math one query block at a time, each block rematerialised in the
    backward pass: peak memory holds one [B,H,chunk,S] score block instead of [B,H,T,S].
    Runs on every backend (TPU, and CPU for memory planning)."""
    B, T, H, D = q.shape
    if T <= chunk or T % chunk:
        return reference_attention(q, k, v, mask)
    n = T // chunk
    q_blocks = q.reshape(B, n, chunk, H, D).swapaxes(0, 1)  # [n,B,c,H,D]
    seg_blocks = mask.q_seg.reshape(B, n, chunk).swapaxes(0, 1)
    slot_blocks = mask.q_slot.reshape(n, chunk)

    @jax.checkpoint
    def block(_, xs):
        qb, segb, slotb = xs
        return None, reference_attention(qb, k, v, AttentionMask(segb, mask.kv_seg, slotb, mask.kv_slot))

    _, out = jax.lax.scan(block, None, (q_blocks, seg_blocks, slot_blocks))
    return out.swapaxes(0, 1).reshape(B, T, H, D)


def use_cudnn(cfg: ModelConfig) -> bool:
    """cuDNN only when asked for. Measured on an H100 (bench/gpu.py, stable-code-3b, seq
    4096): the step with the fused call needs ~3.4 MB/token more memory than with
    `chunked`, with remat (batch 2 ran out of 80 GB where chunked fits batch 4 at 51.6 GB)
    and without (batch 1: 51.6 vs 38.0 GB of temporaries), although the attention kernel
    alone is 2.2x faster. `auto` therefore picks `chunked` on accelerators."""
    return cfg.attention == "cudnn"


def use_chunked(cfg: ModelConfig) -> bool:
    return cfg.attention == "chunked" or (cfg.attention == "auto" and jax.default_backend() in ("gpu", "tpu"))


def cudnn_attention(q, k, v, segment_ids, max_segments: int = 256):
    """Fused cuDNN flash attention (GPU). Packed rows pass their segments as offsets so
    no [T,S] mask is materialised: segment m of row b spans [offsets[b,m], offsets[b,m+1]).
    Rows must hold at most `max_segments` segments (the train loop checks each batch)."""
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_dpa

    seq_lens, offsets = segment_offsets(segment_ids, min(max_segments, segment_ids.shape[1]))
    # Padding is in no segment, so cuDNN leaves its gradients undefined: cut them off here.
    real = segment_ids[..., None, None] > 0
    q, k, v = (jnp.where(real, x, 0) for x in (q, k, v))
    out = cudnn_dpa(q, k, v, None, None, seq_lens, seq_lens, offsets, offsets,
                    scale=1.0 / float(q.shape[-1]) ** 0.5, mask_type=MaskType.PADDING_CAUSAL)
    return jnp.where(real, out, 0)


def segment_offsets(segment_ids, max_segments: int):
    """segment_ids [B,T] (1-based, contiguous, 0 = padding) -> (lengths [B,M], starts [B,M+1])
    as cuDNN's packed-sequence API wants: a row's used segments first, unused entries -1."""
    B, T = segment_ids.shape
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    lengths = (segment_ids[:, None, :] == ids[None, :, None]).sum(-1).astype(jnp.int32)  # [B,M]
    starts = jnp.cumsum(lengths, -1) - lengths  # segments are contiguous and in order
    starts = jnp.where(lengths > 0, starts, -1)
    return jnp.where(lengths > 0, lengths, -1), jnp.pad(starts, ((0, 0), (0, 1)), constant_values=-1)


# ----------------------------------------------------------------------------- helpers


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: k/v [L,B,S,K,D], key segment ids [B,S] (0 = empty slot), write index."""
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.asarray(0, jnp.int32)}


def create_model(cfg: ModelConfig, seed: int = 0) -> StableLmForCausalLM:
    return StableLmForCausalLM(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> StableLmForCausalLM:
    """The model with ShapeDtypeStructs instead of arrays: nothing allocated."""
    return nnx.eval_shape(lambda: StableLmForCausalLM(cfg, rngs=nnx.Rngs(0)))


def logical_axes(params: Any):
    """The `logical_axes` metadata of every parameter in an nnx.State, as a matching tree."""
    return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))

