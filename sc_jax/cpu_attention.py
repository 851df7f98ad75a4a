"""Exact causal attention with segment ids on XLA's CPU backend: a C++ kernel
(cpu_attention.cc) called through jax.ffi, fp32, forward and backward (`attention`, a
custom_vjp whose residuals are q, k, v, the segment ids, the output and each query's
log-sum-exp [B,H,T]).

XLA runs the reference math on the CPU as batched dots over the whole [B,H,T,S] scores
(or 128-query blocks of them, `chunked`), at a fraction of its matmul speed, and computes
the masked upper triangle too. The kernel takes one (batch row, head) per task on XLA's
intra-op threads, 64 queries at a time against only the keys their segment and the causal
mask allow, with those scores in cache (bench/attention.py has the figures). It is built on
first use (`sc_jax.native`); `attention_path` picks it for `auto` on the CPU in fp32 where it
is `available()`, and `model.attention=cpu` asks for it by name.

Segments must be contiguous runs of positions (as the packer writes them); a row where an id
comes back is still exact, at the cost of every earlier key. Padding (segment 0) gets output
0, and no gradient reaches or leaves it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sc_jax import native

FORWARD, BACKWARD = "sc_jax_attention_forward", "sc_jax_attention_backward"


def _register(library) -> None:
    jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(library.ScAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(library.ScAttentionBackward), platform="cpu")


LIBRARY = native.Library("cpu_attention.cc", "CPU attention kernel",
                         "model.attention=auto uses `chunked` on the CPU (correct, slower)",
                         "ScAttentionVectorized", _register)
available = LIBRARY.available
switched = LIBRARY.switched


def unsupported(dtype, seq_len: int, kv_len: int) -> str | None:
    """Why the kernel cannot take this attention here (None: it can)."""
    if jax.default_backend() != "cpu":
        return f"it is the CPU kernel and this backend is {jax.default_backend()}"
    if jnp.dtype(dtype) != jnp.float32:
        return f"it computes in fp32 and the compute dtype is {jnp.dtype(dtype).name}"
    if seq_len != kv_len:
        return f"it is self-attention over whole sequences (queries {seq_len}, keys {kv_len})"
    if not LIBRARY.enabled:
        return "it is switched off (cpu_attention.switched(False))"
    if not available():
        return f"it could not be built: {LIBRARY.state.get('why')}"
    return None


def _forward_call(q, k, v, seg):
    B, T, H, _ = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
    return jax.ffi.ffi_call(FORWARD, shapes)(q, k, v, seg)  # (out [B,T,H,D], lse [B,H,T])


@jax.custom_vjp
def _attention(q, k, v, seg):
    return _forward_call(q, k, v, seg)[0]


def _attention_fwd(q, k, v, seg):
    out, lse = _forward_call(q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(residuals, dout):
    q, k, v, seg, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(BACKWARD, shapes)(q, k, v, seg, out, lse, dout.astype(jnp.float32))
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, segment_ids=None):
    """q [B,T,H,D], k/v [B,T,K,D] fp32 (K divides H), segment_ids [B,T] (0 = padding; None =
    one whole segment per row) -> [B,T,H,D] fp32, causal within each segment, 0 at padding."""
    if not available():  # builds and registers the kernel on first use
        raise RuntimeError(f"sc_jax's CPU attention kernel is not available: {LIBRARY.state.get('why')}")
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return _attention(q, k, v, segment_ids.astype(jnp.int32))
