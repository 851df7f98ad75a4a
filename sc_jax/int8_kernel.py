"""The weight-only int8 matmul on XLA's CPU backend: a small C++ kernel (int8_matmul.cc)
called through jax.ffi, which reads the int8 weights once, front to back, and widens them
in registers (AVX-512).

XLA's CPU dot takes float operands only, so `q.astype(f32) @ ...` writes an fp32 copy of
every kernel before its dot, on every decode step, and int8 decodes no faster than fp32
(README, "Weight-only int8"). The kernel is compiled on first use with the machine's C++
compiler (g++ or $CXX, -O3 -march=native) against the XLA FFI headers jaxlib ships, into
~/.cache/sc_jax/kernels (or $SC_JAX_CACHE/kernels), keyed by the source, jax's version, the
compiler command and the CPU, and registered with jax.ffi once per process. Where no compiler is
found, the build fails or the CPU has no AVX-512, `available()` is False, one warning says
why, and `model.project` keeps XLA's convert + dot: same results to fp32 rounding, slower.

`model.int8_product` (the projections and the LM head) calls `matmul` for int8 kernels with
fp32 activations on the CPU (`applies`); `enabled` / `switched(False)` turns that off
(bench/generate.py's "int8-xla" row).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
import warnings

import jax
import jax.numpy as jnp

from sc_jax.fileio import atomic_file

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_matmul.cc")
TARGET = "sc_jax_int8_matmul"

enabled = True  # False: int8 products go through XLA's convert + dot (an A/B switch for benches)
_state: dict = {}  # "ok": bool once tried; "why": the reason it is not available
_lock = threading.Lock()
BUILD_TIMEOUT_S = 300


def _compiler() -> list[str] | None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return shlex.split(cxx) if cxx else None


def _cache_dir() -> str:
    root = os.environ.get("SC_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sc_jax")
    return os.path.join(root, "kernels")


def _cpu_fingerprint() -> str:
    """This CPU's model and feature flags: a library built with -march=native for one CPU may
    not run on another (a cache shared over NFS), so they are part of the cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read().splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> str:
    """The shared library's path, compiled now unless the cache holds this exact build."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-I", jax.ffi.include_dir()]
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + repr((cxx, flags, jax.__version__, _cpu_fingerprint())).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"int8_matmul-{key}.so")
    if not os.path.exists(path):
        with atomic_file(path, force=True) as tmp:
            try:
                done = subprocess.run([*cxx, *flags, SOURCE, "-o", tmp], capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{' '.join(cxx)} did not finish in {BUILD_TIMEOUT_S} s") from None
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cxx)} failed: {done.stderr.strip()[-500:]}")
    return path


NO_AVX512 = "this CPU has no AVX-512, and the kernel's plain loops are slower than XLA's product"


def available() -> bool:
    """Whether the kernel is built and registered (built on the first call in a process)."""
    with _lock:
        if "ok" not in _state:
            try:
                _load()
                _state["ok"] = True
            except (RuntimeError, OSError) as e:
                _state.update(ok=False, why=str(e))
                warnings.warn(f"sc_jax's int8 CPU kernel is not available ({e}); int8 products use XLA's "
                              "convert + dot (correct, but no faster than fp32)", stacklevel=2)
    return _state["ok"]


def _load() -> None:
    library = ctypes.cdll.LoadLibrary(_build())
    if not library.ScInt8MatmulVectorized():  # compiled in, and this CPU runs it
        raise RuntimeError(NO_AVX512)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.ScInt8Matmul), platform="cpu")


def applies(x, q) -> bool:
    """Whether `matmul` takes this product: on, fp32 activations, int8 weights whose rows are
    a multiple of 16 long (the AVX-512 blocks'), on the CPU."""
    return (enabled and x.dtype == jnp.float32 and q.dtype == jnp.int8 and q.shape[-1] % 16 == 0
            and jax.default_backend() == "cpu" and available())


@contextlib.contextmanager
def switched(on: bool):
    """`enabled` = on inside the block (what traces there, and the generator it builds, keep
    it), the previous value after."""
    global enabled
    before, enabled = enabled, on
    try:
        yield
    finally:
        enabled = before


def matmul(x, q, scale):
    """x [M,K] fp32, q [N,K] int8 (one row per output), scale [N] fp32 -> [M,N] fp32:
    (x @ q.T) * scale, with q widened to fp32 inside the product."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32))
    return call(x, q, scale.astype(jnp.float32))
