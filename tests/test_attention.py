"""Every attention path is the reference math: values and gradients on the CPU (reference,
chunked, splash in interpret mode, auto's CPU choice), and the cuDNN path's HLO lowered for
"cuda" on the CPU (`cuda_hlo`, `fmha_calls`: reusable by other tests)."""

import contextlib
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import native_kernels
from sc_jax import attention as A
from sc_jax import cpu_attention
from sc_jax import sharding
from sc_jax.config import ConfigError, ModelConfig

# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def fake_cuda(cudnn_version: int = 91000, hopper: bool = True):
    """Makes jax's cuDNN attention checks (fused_attention_stablehlo) believe in an NVIDIA GPU
    with cuDNN `cudnn_version` of compute capability 9.0 (`hopper`) or 8.0, so that code lowers
    for "cuda" on a CPU. Restores them on exit."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    cc = (9, 0) if hopper else (8, 0)
    saved = fa.check_cudnn_version, fa.check_compute_capability, fa.is_cuda_compute_capability_equal
    fa.check_cudnn_version = lambda: cudnn_version
    fa.check_compute_capability = lambda capability: cc >= tuple(int(x) for x in capability.split("."))
    fa.is_cuda_compute_capability_equal = lambda capability: cc == tuple(int(x) for x in capability.split("."))
    try:
        yield
    finally:
        fa.check_cudnn_version, fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved


def cuda_hlo(f, *args) -> str:
    """The StableHLO text of jit(f)(*args) traced and lowered for "cuda" on this CPU, jax's
    cuDNN version and compute-capability checks patched (`fake_cuda`) while tracing."""
    with fake_cuda():
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


_FMHA = re.compile(r"custom_call @(__cudnn\$fmha\w*)")


def fmha_calls(hlo: str) -> dict:
    """cuDNN fused-attention custom calls in `hlo`: forward / backward counts (the targets
    differ: __cudnn$fmha...Backward for the backward pass), and each training forward
    call's softmax-statistics shape (its fp32 result), e.g. [B, heads, T]."""
    forward, backward, stats = 0, 0, []
    for line in hlo.splitlines():
        m = _FMHA.search(line)
        if not m:
            continue
        if m.group(1).endswith("Backward"):
            backward += 1
            continue
        forward += 1
        results = line.rsplit("->", 1)[-1]
        stats += [[int(d) for d in s.split("x")] for s in re.findall(r"tensor<([0-9x]+)xf32>", results)]
    return dict(forward=forward, backward=backward, stats_shapes=stats)


B, H, K, D = 2, 4, 2, 8
T = 384  # splash's blocks are multiples of 128: 3 x 3 blocks of 128


def segments(T=T):
    """[2,T]: row 0 three documents then T/8 padding, row 1 one document filling the row."""
    a, b, c = T // 4, T * 3 // 5, T - T // 8
    seg = np.zeros((2, T), np.int32)
    seg[0, :a], seg[0, a:b], seg[0, b:c] = 1, 2, 3
    seg[1] = 1
    return jnp.asarray(seg)


def qkvw(B=B, T=T, H=H, K=K, D=D, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k, v = (jax.random.normal(kk, (B, T, K, D), dtype) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)
    return q, k, v, w


# LLVM at -O0: splash's interpret-mode kernels are big programs that run once; this cuts their
# compile time by ~30% (the numerics are XLA's either way: no fast-math on the CPU).
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def run_once(f, *args):
    return jax.jit(f).lower(*args).compile(compiler_options=QUICK_COMPILE)(*args)


def value_and_grads(f, q, k, v, w):
    """f(q,k,v) and the gradients of sum(f * w), in one compiled program (one trace of f)."""
    def both(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v).astype(jnp.float32), q, k, v)
        return out, vjp(w)

    return run_once(both, q, k, v)


def model_cfg(attention, H=H, K=K, D=D, dtype="float32"):
    return ModelConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=K, attention=attention,
                       dtype=dtype).validate()


def cpu_paths(mask, seg, H, K):
    """name -> (f(q,k,v), whether it promises zero output and gradients at padding)."""
    paths = {
        "chunked": (lambda q, k, v: A.chunked_attention(q, k, v, mask, chunk=128), False),
        "xla": (lambda q, k, v: A.xla_attention(q, k, v, mask), False),
        "auto": (lambda q, k, v: A.attend(model_cfg("auto", H, K), q, k, v, mask, seg), False),
    }
    if native_kernels.built(cpu_attention.LIBRARY):  # a CPU without AVX-512 has no kernel
        paths["cpu"] = (lambda q, k, v: A.attend(model_cfg("cpu", H, K), q, k, v, mask, seg), True)
    if H == K:
        paths["splash"] = (lambda q, k, v: A.splash_attention(q, k, v, seg, interpret=True), True)
    else:  # the same kernel through the dispatcher (interpret mode: this is not a TPU)
        paths["splash (attend)"] = (lambda q, k, v: A.attend(model_cfg("splash", H, K), q, k, v, mask, seg), True)
    return paths


# ----------------------------------------------------------------------------- CPU paths


@pytest.mark.parametrize("kv_heads", [K, H], ids=["gqa", "mha"])
def test_cpu_paths_equal_reference_values_and_grads(kv_heads):
    """The CPU kernel (`cpu`) among them. Packed rows with padding, fp32. The loss weighs real tokens only, as the model's does;
    a path that promises zero output and gradients at padding (splash, like cudnn) gets a
    loss over every position instead, and must still match and be exactly zero there."""
    q, k, v, w = qkvw(K=kv_heads)
    seg = segments()
    real = np.asarray(seg > 0)[..., None, None]  # [B,T,1,1]
    mask = A.AttentionMask.causal(seg)
    ref_out, ref_grads = value_and_grads(lambda q, k, v: A.reference_attention(q, k, v, mask), q, k, v, w * real)
    for name, (f, zero_pad) in cpu_paths(mask, seg, H, kv_heads).items():
        out, grads = value_and_grads(f, q, k, v, w if zero_pad else w * real)
        np.testing.assert_allclose(np.asarray(out) * real, np.asarray(ref_out) * real, rtol=2e-5, atol=2e-5,
                                   err_msg=name)
        if zero_pad:
            assert not np.any(np.asarray(out) * (1 - real)), f"{name}: output at padding"
        for g, r, what in zip(grads, ref_grads, "qkv"):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5, err_msg=f"{name} d{what}")
            assert not np.any(np.asarray(g) * (1 - real)), f"{name}: d{what} at padding"


def test_cpu_kernel_rows_of_one_segment_a_returning_id_and_a_padding_block():
    """The CPU kernel without segment ids is the causal reference; a row whose id comes back
    after another (not one run: the kernel then looks at every earlier key) and a block of 64
    queries that is all padding still get the reference's values and gradients."""
    native_kernels.require(cpu_attention.LIBRARY)
    q, k, v, w = qkvw()
    seg = np.ones((B, T), np.int32)
    seg[0, 100:200], seg[0, 300:] = 2, 1  # id 1, then 2, then 1 again
    seg[1, 256:] = 0  # queries 256..383: two whole blocks of padding
    cases = {"no segment ids": (None, np.ones((B, T), np.int32)), "returning id, padding blocks": (seg, seg)}
    for name, (given, dense) in cases.items():
        real = (dense > 0)[..., None, None]
        mask = A.AttentionMask.causal(jnp.asarray(dense))
        ref_out, ref_grads = value_and_grads(lambda q, k, v: A.reference_attention(q, k, v, mask), q, k, v, w * real)
        given = None if given is None else jnp.asarray(given)
        out, grads = value_and_grads(lambda q, k, v: cpu_attention.attention(q, k, v, given), q, k, v, w)
        np.testing.assert_allclose(np.asarray(out) * real, np.asarray(ref_out) * real, rtol=2e-5, atol=2e-5,
                                   err_msg=name)
        assert not np.any(np.asarray(out) * (1 - real)), name
        for g, r, what in zip(grads, ref_grads, "qkv"):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5, err_msg=f"{name} d{what}")


def test_cpu_kernel_in_shard_map_over_the_activation_mesh():
    """Under a multi-device mesh `attend` runs the kernel per device (shard_map: batch over
    data, heads over tensor, GQA's 2 kv heads alike) rather than XLA gathering q, k, v onto
    every device for a custom call it cannot partition; the reference's values and gradients."""
    native_kernels.require(cpu_attention.LIBRARY)
    q, k, v, w = qkvw()
    seg = segments()
    real = np.asarray(seg > 0)[..., None, None]
    mask = A.AttentionMask.causal(seg)
    f = lambda q, k, v: A.attend(model_cfg("cpu"), q, k, v, mask, seg)  # noqa: E731
    ref_out, ref_grads = value_and_grads(lambda q, k, v: A.reference_attention(q, k, v, mask), q, k, v, w * real)
    mesh = sharding.build_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2, num_devices=4))
    with sharding.activation_rules(mesh, sharding.rules_for(None)):
        out, grads = value_and_grads(f, q, k, v, w)
        hlo = jax.jit(f).lower(q, k, v).as_text()
    assert cpu_attention.FORWARD in hlo and "sdy.manual_computation" in hlo, "the kernel did not run per device"
    np.testing.assert_allclose(out, np.asarray(ref_out) * real, rtol=2e-5, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), grads, ref_grads)


def test_splash_forward_without_segment_ids_and_with_a_fully_masked_row():
    """Without segment ids splash is the causal reference. A query row masked everywhere (its
    id in no key; splash_attention never makes one, as padding queries see padding keys)
    comes out of the kernel finite, not NaN."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    q, k, v, _ = qkvw(T=128)
    ids = jnp.asarray(np.r_[np.ones(100), np.zeros(28)].astype(np.int32))

    def both(q, k, v):
        masked_row = A._splash_kernel(H, 128, 128, True)(q[0].swapaxes(0, 1), k[0].swapaxes(0, 1), v[0].swapaxes(0, 1),
                                                         segment_ids=SegmentIds(ids, jnp.where(ids == 0, -1, ids)))
        return A.splash_attention(q, k, v, None, interpret=True), masked_row

    no_segments, masked_row = run_once(both, q, k, v)
    mask = A.AttentionMask.causal(jnp.ones((B, 128), jnp.int32))
    np.testing.assert_allclose(no_segments, A.reference_attention(q, k, v, mask), rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(masked_row))


def test_splash_in_shard_map_over_the_activation_mesh():
    """Under a multi-device mesh the Mosaic kernel runs per device (shard_map): batch over
    data, heads over tensor; GQA's 2 kv heads shard alike."""
    q, k, v, w = qkvw(T=128)
    seg = segments(128)
    real = np.asarray(seg > 0)[..., None, None]
    mask = A.AttentionMask.causal(seg)
    mesh = sharding.build_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2, num_devices=4))
    ref_out, ref_grads = value_and_grads(lambda q, k, v: A.reference_attention(q, k, v, mask), q, k, v, w * real)
    with sharding.activation_rules(mesh, sharding.rules_for(None)):
        out, grads = value_and_grads(lambda q, k, v: A.splash_attention(q, k, v, seg, interpret=True), q, k, v, w)
    np.testing.assert_allclose(out, np.asarray(ref_out) * real, rtol=2e-5, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), grads, ref_grads)


def test_splash_refuses_a_sharded_sequence():
    q, k, v, _ = qkvw(T=128)
    mesh = sharding.build_mesh(sharding.MeshConfig(fsdp=1, sequence=2, num_devices=2))
    with sharding.activation_rules(mesh, sharding.rules_for(None)):
        assert A._sequence_sharded(128)
        with pytest.raises(ConfigError, match="mesh.sequence=1 or model.attention=chunked"):
            A.splash_attention(q, k, v, segments(128), interpret=True)
    assert not A._sequence_sharded(128)


def test_auto_and_explicit_path_choice():
    kernel = native_kernels.built(cpu_attention.LIBRARY)
    assert A.attention_path(model_cfg("auto"), T) == ("cpu" if kernel else "chunked")  # the kernel where built
    assert A.attention_path(model_cfg("auto", dtype="bfloat16"), T) == "chunked"  # the kernel is fp32
    assert A.attention_path(model_cfg("auto"), T, T + 1) == "chunked"  # not self-attention
    with cpu_attention.switched(False):
        assert A.attention_path(model_cfg("auto"), T) == "chunked"
        with pytest.raises(ConfigError, match="cpu cannot run here: it is switched off.*model.attention=chunked"):
            A.attention_path(model_cfg("cpu"), T)
    with pytest.raises(ConfigError, match="cpu cannot run here: it computes in fp32"):
        A.attention_path(model_cfg("cpu", dtype="bfloat16"), T)
    assert A.attention_path(model_cfg("chunked"), T) == "chunked"
    assert A.attention_path(model_cfg("splash"), T) == "splash"
    assert not A.use_cudnn(model_cfg("auto", dtype="bfloat16"))  # no GPU here
    with pytest.raises(ConfigError, match="multiple of 128.*model.attention=chunked"):
        A.attention_path(model_cfg("splash"), 100)
    with pytest.raises(ConfigError, match="cudnn cannot run here.*model.attention=chunked"):
        A.attention_path(model_cfg("cudnn", dtype="bfloat16"), T)
    with fake_cuda():
        assert A.use_cudnn(model_cfg("auto", dtype="bfloat16"))
        assert A.attention_path(model_cfg("auto", dtype="bfloat16"), T) == "cudnn"
        assert not A.use_cudnn(model_cfg("auto", dtype="float32"))  # cuDNN computes in bf16/fp16 only
        with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
            A.attention_path(model_cfg("cudnn", dtype="float32"), T)
        with pytest.raises(ConfigError, match="head_dim 10 is not a multiple of 8"):
            A.attention_path(model_cfg("cudnn", D=10, dtype="bfloat16"), T)
    with fake_cuda(hopper=False):  # an A100: the packed layout needs Hopper, so auto stays off it
        assert not A.use_cudnn(model_cfg("auto", dtype="bfloat16"))
        assert A.use_cudnn(model_cfg("auto", dtype="bfloat16"), packed=False)
        with pytest.raises(ConfigError, match="Hopper"):
            A.attention_path(model_cfg("cudnn", dtype="bfloat16"), T)


# ----------------------------------------------------------------------------- cuDNN, lowered for cuda

DC = 80  # stable-code-3b's head_dim
TC = 256


def cudnn_grad_hlo(seg, H=H, K=K, max_segments=32):
    q, k, v, w = qkvw(T=TC, H=H, K=K, D=DC, dtype=jnp.bfloat16)
    cfg = dataclasses.replace(model_cfg("cudnn", H, K, DC, dtype="bfloat16"), max_segments=max_segments)
    mask = A.AttentionMask.causal(jnp.ones((B, TC), jnp.int32) if seg is None else seg)

    def loss(q, k, v):
        return (A.attend(cfg, q, k, v, mask, seg).astype(jnp.float32) * w).sum()

    return cuda_hlo(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v)


def test_cudnn_one_segment_rows_lower_to_one_unpacked_call():
    """No segment ids (one whole segment per row, known when tracing): one forward and one
    backward cuDNN call, softmax statistics [B, heads, T], no packed call, no cond."""
    hlo = cudnn_grad_hlo(None)
    assert fmha_calls(hlo) == dict(forward=1, backward=1, stats_shapes=[[B, H, TC]])
    assert "stablehlo.case" not in hlo


def test_cudnn_max_segments_1_lowers_padded_rows_to_one_unpacked_call():
    """model.max_segments=1 promises one document per row: padded one-segment rows lower to
    the unpacked call alone (lengths for the padding), statistics [B, heads, T]."""
    one = jnp.asarray([[1] * 200 + [0] * 56, [1] * 256])
    hlo = cudnn_grad_hlo(one, max_segments=1)
    assert fmha_calls(hlo) == dict(forward=1, backward=1, stats_shapes=[[B, H, TC]])
    assert "stablehlo.case" not in hlo


def test_cudnn_segment_ids_lower_to_a_cond_of_unpacked_and_packed_calls():
    """Segment ids: the batch decides at run time. One branch is the unpacked call (stats
    [B, heads, T], for batches of one-segment rows), the other the packed call with
    max_segments=32 (stats [B*32, heads, T]); one backward call per branch."""
    seg = segments(TC)
    hlo = cudnn_grad_hlo(seg)
    calls = fmha_calls(hlo)
    assert calls["forward"] == 2 and calls["backward"] == 2
    assert sorted(calls["stats_shapes"]) == [[B, H, TC], [B * 32, H, TC]]
    assert "stablehlo.case" in hlo
    # MHA too (K = H), and the packed call's offsets are [B, 32+1]
    assert sorted(fmha_calls(cudnn_grad_hlo(seg, K=H))["stats_shapes"]) == [[B, H, TC], [B * 32, H, TC]]
    assert re.search(r"tensor<2x33xi32>", hlo)


def test_cudnn_one_segment_rows_take_the_unpacked_branch():
    """The cond's predicate: a batch of one-segment rows (right padding allowed) is "unpacked",
    one packed row makes the batch packed; the packed layout's offsets for it."""
    one = jnp.asarray([[1] * 200 + [0] * 56, [1] * 256])
    assert bool(jnp.max(one) <= 1) and not bool(jnp.max(segments(TC)) <= 1)
    lengths, starts = A.segment_offsets(segments(TC), 32)  # row 0: 64, 89, 71 tokens, 32 padding
    assert lengths.shape == (B, 32) and starts.shape == (B, 33)
    assert lengths[0, :4].tolist() == [64, 89, 71, -1] and starts[0, :4].tolist() == [0, 64, 153, -1]
    assert lengths[1, :2].tolist() == [TC, -1] and starts[1, :2].tolist() == [0, -1]


def test_names_other_modules_import_stay():
    for name in ("reference_attention", "chunked_attention", "cached_attention", "AttentionMask",
                 "segment_offsets", "NEG_INF", "ATTENTION_CHUNK", "use_cudnn", "cudnn_attention", "attend"):
        assert hasattr(A, name), name
