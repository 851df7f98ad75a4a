"""The weight-only int8 matmul on XLA's CPU backend: a small C++ kernel (int8_matmul.cc)
called through jax.ffi, which reads the int8 weights once, front to back, and widens them
in registers (AVX-512).

XLA's CPU dot takes float operands only, so `q.astype(f32) @ ...` writes an fp32 copy of
every kernel before its dot, on every decode step, and int8 decodes no faster than fp32
(README, "Weight-only int8"). The kernel is built on first use (`sc_jax.native`: the
machine's C++ compiler, cached in ~/.cache/sc_jax/kernels or $SC_JAX_CACHE/kernels). Where
it cannot be built or the CPU has no AVX-512, `available()` is False, one warning says why,
and `model.project` keeps XLA's convert + dot: same results to fp32 rounding, slower.

`model.int8_product` (the projections and the LM head) calls `matmul` for int8 kernels with
fp32 activations on the CPU (`applies`); `switched(False)` turns that off (bench/generate.py's
"int8-xla" row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sc_jax import native

TARGET = "sc_jax_int8_matmul"
NO_AVX512 = native.NO_AVX512


def _register(library) -> None:
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.ScInt8Matmul), platform="cpu")


LIBRARY = native.Library("int8_matmul.cc", "int8 CPU kernel",
                         "int8 products use XLA's convert + dot (correct, but no faster than fp32)",
                         "ScInt8MatmulVectorized", _register)
_state = LIBRARY.state
available = LIBRARY.available
switched = LIBRARY.switched


def enabled() -> bool:
    """Whether int8 products traced now take the kernel where it applies."""
    return LIBRARY.enabled


def applies(x, q) -> bool:
    """Whether `matmul` takes this product: on, fp32 activations, int8 weights whose rows are
    a multiple of 16 long (the AVX-512 blocks'), on the CPU."""
    return x.dtype == jnp.float32 and q.dtype == jnp.int8 and q.shape[-1] % 16 == 0 and LIBRARY.usable()


def matmul(x, q, scale):
    """x [M,K] fp32, q [N,K] int8 (one row per output), scale [N] fp32 -> [M,N] fp32:
    (x @ q.T) * scale, with q widened to fp32 inside the product."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32))
    return call(x, q, scale.astype(jnp.float32))
