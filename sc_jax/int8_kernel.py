"""The weight-only int8 matmul on XLA's CPU backend: a small C++ kernel (int8_matmul.cc)
called through jax.ffi, which reads the int8 weights once, front to back, and widens them
in registers (AVX-512).

XLA's CPU dot takes float operands only, so `q.astype(f32) @ ...` writes an fp32 copy of
every kernel before its dot, on every decode step, and int8 decodes no faster than fp32
(README, "Weight-only int8"). The kernel is compiled on first use with the machine's C++
compiler (g++ or $CXX, -O3 -march=native) against the XLA FFI headers jaxlib ships, into
~/.cache/sc_jax/kernels (or $SC_JAX_CACHE/kernels), keyed by the source, jax's version and
the compiler command, and registered with jax.ffi once per process. Where no compiler is
found, the build fails or the CPU has no AVX-512, `available()` is False, one warning says
why, and `model.project` keeps XLA's convert + dot: same results to fp32 rounding, slower.

`model.project` and `DecodeModel.logits` call `matmul` for int8 kernels with fp32
activations on the CPU; `enabled` turns that off (bench/generate.py's "int8-xla" row).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp

from sc_jax.fileio import atomic_file

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_matmul.cc")
TARGET = "sc_jax_int8_matmul"

enabled = True  # False: int8 products go through XLA's convert + dot (an A/B switch for benches)
_state: dict = {}  # "ok": bool once tried; "why": the reason it is not available


def _compiler() -> list[str] | None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return shlex.split(cxx) if cxx else None


def _cache_dir() -> str:
    root = os.environ.get("SC_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sc_jax")
    return os.path.join(root, "kernels")


def _build() -> str:
    """The shared library's path, compiled now unless the cache holds this exact build."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-I", jax.ffi.include_dir()]
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + repr((cxx, flags, jax.__version__)).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"int8_matmul-{key}.so")
    if not os.path.exists(path):
        with atomic_file(path, force=True) as tmp:
            done = subprocess.run([*cxx, *flags, SOURCE, "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cxx)} failed: {done.stderr.strip()[-500:]}")
    return path


def available() -> bool:
    """Whether the kernel is built and registered (built on the first call in a process)."""
    if "ok" not in _state:
        try:
            library = ctypes.cdll.LoadLibrary(_build())
            if not library.ScInt8MatmulVectorized():
                raise RuntimeError("this CPU has no AVX-512, and the kernel's plain loops are slower than XLA's product")
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.ScInt8Matmul), platform="cpu")
            _state["ok"] = True
        except (RuntimeError, OSError) as e:
            _state.update(ok=False, why=str(e))
            warnings.warn(f"sc_jax's int8 CPU kernel is not available ({e}); int8 products use XLA's "
                          "convert + dot (correct, but no faster than fp32)", stacklevel=2)
    return _state["ok"]


def applies(x, q) -> bool:
    """Whether `matmul` takes this product: on, fp32 activations, int8 weights, on the CPU."""
    return (enabled and x.dtype == jnp.float32 and q.dtype == jnp.int8
            and jax.default_backend() == "cpu" and available())


def matmul(x, q, scale):
    """x [M,K] fp32, q [N,K] int8 (one row per output), scale [N] fp32 -> [M,N] fp32:
    (x @ q.T) * scale, with q widened to fp32 inside the product."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32))
    return call(x, q, scale.astype(jnp.float32))
