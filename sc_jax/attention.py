"""The attention core: q, k, v -> output, by one of several paths of the same math.

`attend` picks the path from `model.attention`: `reference` (the dense math, softmax in
fp32), `chunked` (the reference one query block at a time, any backend), `cudnn` (fused
flash attention on NVIDIA GPUs). `cached_attention` is one new token against the decode
cache. Shapes: B batch, T query length, S key length, H heads, K kv heads, D head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sc_jax.config import ModelConfig

NEG_INF = -1e30  # finite, so a fully masked (padding) row stays finite instead of NaN
ATTENTION_CHUNK = 1024  # queries per block in chunked_attention


def attend(cfg: ModelConfig, q, k, v, mask: "AttentionMask", segment_ids=None):
    """q [B,T,H,D], k/v [B,S,K,D] -> [B,T,H,D] by the configured path."""
    if use_cudnn(cfg):
        return cudnn_attention(q, k, v, segment_ids, cfg.max_segments)
    if use_chunked(cfg):
        return chunked_attention(q, k, v, mask)
    return reference_attention(q, k, v, mask)


class AttentionMask(NamedTuple):
    """Who attends to whom, without materialising [T,S]: causal by buffer slot, same
    segment, never a padding (segment 0) key."""

    q_seg: jax.Array  # [B,T]
    kv_seg: jax.Array  # [B,S]
    q_slot: jax.Array  # [T]
    kv_slot: jax.Array  # [S]

    @classmethod
    def causal(cls, segment_ids) -> "AttentionMask":
        """Whole sequences attending to themselves: segment_ids [B,T] int32 (0 = padding)."""
        slot = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
        return cls(segment_ids, segment_ids, slot, slot)

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


def cached_attention(q, k_cache, v_cache, valid):
    """One new token per row over the valid slots of the heads-major cache (its own
    included). q [B,H,D]; k/v_cache [B*K,S,D]; valid [B*K,S] bool -> [B,H,D] fp32.
    Softmax in fp32, GQA by grouping: each cache row serves H/K query heads."""
    B, H, D = q.shape
    K = k_cache.shape[0] // B
    q = q.reshape(B * K, H // K, D)
    scores = jnp.einsum("ngd,nsd->ngs", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(valid[:, None, :], scores * (1.0 / np.sqrt(D)), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("ngs,nsd->ngd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(B, H, D)


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
