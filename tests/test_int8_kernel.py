"""sc_jax.int8_kernel: the C++ weight-only int8 matmul for XLA's CPU backend, against a
float64 reference, inside the model's projections, and the fallback when it cannot build."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import native_kernels
from sc_jax import int8_kernel
from sc_jax import model as M

# Shapes that hit every tail: M past a 4-row block, N past a 4-row block of q, K not a
# multiple of 16 (the plain loops); the last is the 77M model's LM head at batch 1.
SHAPES = [(1, 7, 5), (3, 33, 70), (5, 64, 128), (9, 96, 131), (1, 512, 50304)]


@pytest.fixture(scope="module")
def kernel():
    native_kernels.require(int8_kernel.LIBRARY)
    return int8_kernel


def problem(m, k, n, seed=0):
    """x [m,k], q [n,k] int8, scale [n], and (x @ q.T) * scale in float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scale = rng.random(n).astype(np.float32) + 0.01
    return x, q, scale, (x.astype(np.float64) @ q.astype(np.float64).T) * scale


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_equals_the_float64_product(kernel, m, k, n):
    x, q, scale, want = problem(m, k, n)
    got = jax.jit(kernel.matmul)(x, q, scale)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_same_bits_every_call(kernel):
    """Each panel is summed by one thread in k order: threads do not change the result."""
    x, q, scale, _ = problem(8, 512, 1536, seed=1)
    f = jax.jit(kernel.matmul)
    first = np.asarray(f(x, q, scale))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(f(x, q, scale)), first)


def int8_projection(x, q, scale):
    return M.project(x, M.Int8(q, scale), jnp.float32)


def test_project_calls_the_kernel_and_agrees_with_xla(kernel):
    """model.project's int8 branch takes the kernel on the CPU in fp32; with it off, XLA's
    convert + dot gives the same values to fp32 rounding."""
    x, q, scale, want = problem(6, 96, 80, seed=2)
    x, scale = x.reshape(2, 3, 96), scale.reshape(8, 10)  # scales [*out]: the output is [2, 3, 8, 10]
    hlo = jax.jit(int8_projection).lower(x, q, scale).as_text()
    assert kernel.TARGET in hlo
    got = jax.jit(int8_projection)(x, q, scale)
    with kernel.switched(False):
        fresh = jax.jit(lambda *a: int8_projection(*a))  # a new function: jit's trace cache would keep the kernel
        assert kernel.TARGET not in fresh.lower(x, q, scale).as_text()
        xla = fresh(x, q, scale)
    assert kernel.enabled()
    assert got.shape == (2, 3, 8, 10)
    np.testing.assert_allclose(np.asarray(got).reshape(6, 80), want, rtol=0, atol=2e-6 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=0, atol=2e-6 * np.abs(want).max())


def test_bf16_activations_keep_the_xla_product(kernel):
    x, q, scale, _ = problem(4, 32, 48)
    x = jnp.asarray(x, jnp.bfloat16)
    assert kernel.TARGET not in jax.jit(lambda x: M.project(x, M.Int8(q, scale), jnp.bfloat16)).lower(x).as_text()


def test_no_compiler_warns_once_and_falls_back(tmp_path):
    """With no compiler and an empty cache: one warning naming why, and the int8 projection
    still runs (XLA's product), with the reference's values."""
    script = textwrap.dedent("""
        import warnings
        import jax.numpy as jnp, numpy as np
        from sc_jax import int8_kernel, model as M
        x = np.ones((2, 16), np.float32); q = np.full((3, 16), 2, np.int8); s = np.full(3, 0.5, np.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = M.project(x, M.Int8(jnp.asarray(q), jnp.asarray(s)), jnp.float32)
            M.project(x, M.Int8(jnp.asarray(q), jnp.asarray(s)), jnp.float32)
        print(int8_kernel.available())
        print(np.asarray(y).tolist())
        print([str(w.message) for w in caught])
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "SC_JAX_CACHE": str(tmp_path / "cache"),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    available, values, warned = done.stdout.strip().splitlines()
    assert available == "False" and values == str([[16.0, 16.0, 16.0]] * 2)
    assert warned.count("int8 CPU kernel is not available") == 1 and "no-such-compiler" in warned
    assert not list((tmp_path / "cache").rglob("*.so*"))  # nothing half-built left in the cache


def test_a_generator_keeps_the_switch_it_was_built_with(kernel, monkeypatch):
    """An int8 generator built with the kernel off traces without it even when it first runs
    with the kernel on (its compiled code is its own: generator._kernels' key), and the other
    way round."""
    from flax import nnx

    from sc_jax import generate as G
    from sc_jax.config import ModelConfig

    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0, bos_token_id=0).validate()
    params = jax.device_get(nnx.split(M.create_model(cfg, seed=0))[1].to_pure_dict())
    calls, real = [], kernel.matmul
    monkeypatch.setattr(kernel, "matmul", lambda *a: calls.append(a) or real(*a))
    with kernel.switched(False):
        off = G.TokenGenerator(cfg, params, dtype="int8")
    on = G.TokenGenerator(cfg, params, dtype="int8")
    prompts = [[1, 2, 3, 4, 5]]
    off.generate_ids(prompts, max_new_tokens=3, stop_tokens=())  # first traced here, with the switch on
    assert not calls
    with kernel.switched(False):
        on.generate_ids(prompts, max_new_tokens=3, stop_tokens=())
    assert calls  # traced with the kernel, as built
