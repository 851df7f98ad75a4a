"""Remat policies and the tiled cross-entropy change what is kept and when logits exist, never the
numbers: every policy and tile size gives the loss and gradients of no remat, untiled."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from sc_jax import model as M
from sc_jax.config import REMAT_POLICIES, model_preset
from sc_jax.train.step import loss_sums

B, T = 2, 48
CFG = dataclasses.replace(model_preset("tiny"), vocab_size=96, num_key_value_heads=2, dtype="float32",
                          loss_tile=0)


def _batch(seed=0):
    """Two packed rows: documents of 20 + 16 tokens then padding, and one of 40 + padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    seg[0, :20], seg[0, 20:36], seg[1, :40] = 1, 2, 1
    positions = np.concatenate([np.arange(20), np.arange(28)])[None].repeat(B, 0)
    positions[1] = np.arange(T)
    return {"input_ids": jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            "positions": jnp.asarray(positions, jnp.int32), "segment_ids": jnp.asarray(seg),
            "loss_mask": jnp.asarray(seg > 0, jnp.float32)}


def _params(cfg):
    return nnx.split(M.create_model(cfg, seed=1))[1]


def _loss_and_grads(cfg, params, batch, z_loss=0.0):
    graphdef = nnx.graphdef(M.abstract_model(cfg))

    def loss(p):
        total, count = loss_sums(graphdef, p, batch, z_loss)
        return total / count

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_same(got, want):
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6, err_msg=str(path))


@pytest.mark.parametrize("attention", ["reference", "chunked"])
def test_every_remat_policy_gives_the_loss_and_gradients_of_no_remat(attention):
    base = dataclasses.replace(CFG, attention=attention)
    params, batch = _params(base), _batch()
    want = _loss_and_grads(base, params, batch)
    for policy in REMAT_POLICIES[1:]:
        if policy not in ("dots", "dots_no_batch"):  # JAX's own policies: tests/test_model.py
            _assert_same(_loss_and_grads(dataclasses.replace(base, remat=policy), params, batch), want)
    if attention == "chunked":
        _assert_same(_loss_and_grads(dataclasses.replace(base, remat="minimal", scan_layers=False), params, batch),
                     want)


def test_the_split_layer_keeps_the_parallel_residual_and_qk_norm_exact():
    base = dataclasses.replace(CFG, attention="chunked", use_parallel_residual=True, qk_layernorm=True,
                               use_qkv_bias=True)
    params, batch = _params(base), _batch()
    want = _loss_and_grads(base, params, batch)
    for policy in ("save_qkv_proj", "full"):
        _assert_same(_loss_and_grads(dataclasses.replace(base, remat=policy), params, batch), want)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiled_cross_entropy_gives_the_loss_and_gradients_of_the_whole_logits(tied):
    base = dataclasses.replace(CFG, tie_word_embeddings=tied)
    params, batch = _params(base), _batch(1)
    want = _loss_and_grads(base, params, batch, 1e-3)
    for tile in (16, 20):  # dividing T, and not (the last tile padded)
        _assert_same(_loss_and_grads(dataclasses.replace(base, loss_tile=tile, remat="full"), params, batch, 1e-3),
                     want)


def _residual_bytes(cfg) -> int:
    """What the backward pass keeps from the forward one (bytes, nothing allocated)."""
    graphdef, params = nnx.split(M.abstract_model(cfg))
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _batch())
    kept = saved_residuals(lambda p, b: loss_sums(graphdef, p, b)[0], params, batch)
    return sum(int(np.prod(aval.shape)) * aval.dtype.itemsize for aval, _ in kept)


def test_each_policy_keeps_less_than_the_one_before_it():
    """none > minimal > save_dot_except_mlp > save_qkv_proj > full, for the reference core (inside
    the recomputed region) and the chunked one (outside it, where q, k, v and the context are kept
    whatever the policy, so save_qkv_proj keeps what full keeps)."""
    order = ("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full")
    ref = [_residual_bytes(dataclasses.replace(CFG, attention="reference", remat=p)) for p in order]
    assert ref == sorted(ref, reverse=True) and len(set(ref)) == len(ref), ref
    chunked = [_residual_bytes(dataclasses.replace(CFG, attention="chunked", remat=p)) for p in order]
    assert chunked[0] > chunked[1] > chunked[2] > chunked[3] == chunked[4], chunked


@pytest.mark.parametrize("policy", ["full", "save_qkv_proj", "none"])
def test_the_fused_attention_runs_forward_once_per_layer_under_remat(policy):
    """The train step's value_and_grad lowered for "cuda" on the CPU, rows of one segment: one
    forward cuDNN call per layer (not one more for the recompute) and one backward, each with
    [B, heads, T] softmax statistics."""
    from test_attention import cuda_hlo, fmha_calls

    cfg = dataclasses.replace(CFG, attention="cudnn", dtype="bfloat16", remat=policy, scan_layers=False)
    graphdef, params = nnx.split(M.abstract_model(cfg))
    batch = {k: jax.ShapeDtypeStruct((B, 128), jnp.int32) for k in ("input_ids", "targets")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((B, 128), jnp.float32)
    hlo = cuda_hlo(jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b)[0]), params, batch)
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    assert fmha_calls(hlo) == dict(forward=layers, backward=layers, stats_shapes=[[B, heads, 128]] * layers)
