"""The C++ kernels sc_jax calls through jax.ffi on XLA's CPU backend (int8_matmul.cc,
cpu_attention.cc): each compiled on first use with the machine's C++ compiler (g++ or $CXX,
-O3 -march=native) against the XLA FFI headers jaxlib ships, into ~/.cache/sc_jax/kernels (or
$SC_JAX_CACHE/kernels), keyed by the source, jax's version, the compiler command and the CPU,
and registered with jax.ffi once per process. Where no compiler is found, the build fails or
the CPU lacks what the kernel needs, `Library.available()` is False and one warning says why;
the callers then keep XLA's own code (same results to fp32 rounding, slower)."""

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
from typing import Callable

import jax

from sc_jax.fileio import atomic_file

BUILD_TIMEOUT_S = 300
HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = (os.path.join(HERE, "parallel_for.h"),)


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


def build(source: str) -> str:
    """The shared library of `source` (a path), compiled now unless the cache holds this exact build."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-I", jax.ffi.include_dir()]
    text = b""
    for path in (source, *HEADERS):  # the kernels' shared header is part of every build
        with open(path, "rb") as f:
            text += f.read()
    key = hashlib.sha256(text + repr((cxx, flags, jax.__version__, _cpu_fingerprint())).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(_cache_dir(), f"{stem}-{key}.so")
    if not os.path.exists(path):
        with atomic_file(path, force=True) as tmp:
            try:
                done = subprocess.run([*cxx, *flags, "-I", HERE, source, "-o", tmp], capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{' '.join(cxx)} did not finish in {BUILD_TIMEOUT_S} s") from None
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cxx)} failed: {done.stderr.strip()[-500:]}")
    return path


NO_AVX512 = "this CPU has no AVX-512, and the kernel's plain loops would be slower than XLA's code"


class Library:
    """One kernel library: built, checked and registered on the first `available()` in a
    process. `register(library)` registers its FFI targets; `vectorized` names the exported
    C function that says whether the AVX-512 code was compiled in and this CPU runs it.
    `enabled` (or `switched(False)`) turns its use off for what traces after: an A/B switch."""

    def __init__(self, source: str, what: str, fallback: str, vectorized: str,
                 register: Callable[[ctypes.CDLL], None]):
        self.source, self.what, self.fallback = os.path.join(HERE, source), what, fallback
        self.vectorized, self.register = vectorized, register
        self.enabled = True
        self.state: dict = {}  # "ok": bool once tried; "why": the reason it is not available
        self._lock = threading.Lock()

    def available(self) -> bool:
        with self._lock:
            if "ok" not in self.state:
                try:
                    self._load()
                    self.state["ok"] = True
                except (RuntimeError, OSError) as e:
                    self.state.update(ok=False, why=str(e))
                    warnings.warn(f"sc_jax's {self.what} is not available ({e}); {self.fallback}", stacklevel=3)
        return self.state["ok"]

    def _load(self) -> None:
        library = ctypes.cdll.LoadLibrary(build(self.source))
        if not getattr(library, self.vectorized)():
            raise RuntimeError(NO_AVX512)
        self.register(library)

    def usable(self) -> bool:
        """On, on the CPU backend, and built."""
        return self.enabled and jax.default_backend() == "cpu" and self.available()

    @contextlib.contextmanager
    def switched(self, on: bool):
        """`enabled` = on inside the block (what traces there keeps it), the previous value after."""
        before, self.enabled = self.enabled, on
        try:
            yield
        finally:
            self.enabled = before
