"""The Flax model is numerically `transformers.StableLmForCausalLM` (tiny random configs)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sc_jax import attention as A  # noqa: E402
from sc_jax import model as M  # noqa: E402
from sc_jax.config import ConfigError, ModelConfig, model_preset  # noqa: E402
from sc_jax.convert import load_hf, save_hf  # noqa: E402
from sc_jax.convert.__main__ import main as convert_main  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, partial_rotary_factor=0.25, rope_theta=10000.0, max_position_embeddings=128,
            layer_norm_eps=1e-5, use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False,
            tie_word_embeddings=False)

VARIANTS = {
    "stable-code": {},
    "gqa_qkv_bias": dict(num_key_value_heads=2, use_qkv_bias=True),
    "qk_layernorm_parallel": dict(qk_layernorm=True, use_parallel_residual=True),
    "full_rotary_tied": dict(partial_rotary_factor=1.0, tie_word_embeddings=True, rope_theta=1e6),
}


def hf_model(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.StableLmConfig(**{**TINY, **kw}, hidden_act="silu")
    model = transformers.StableLmForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases and norms trivially: randomise so they matter
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / "hf")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def hf_logits(model, ids, **kw):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


def ours(cfg, params):
    model = M.create_model(cfg)
    graphdef, state = nnx.split(model)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


IDS = np.random.RandomState(0).randint(0, 128, size=(2, 24))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    model, path = hf_model(tmp_path, **VARIANTS[variant])
    cfg, params = load_hf(path)
    got = np.asarray(ours(cfg, params)(jnp.asarray(IDS)))
    np.testing.assert_allclose(got, hf_logits(model, IDS), rtol=1e-4, atol=1e-4)


def test_round_trip_export_loads_in_transformers(tmp_path):
    model, path = hf_model(tmp_path, num_key_value_heads=2, qk_layernorm=True, use_qkv_bias=True)
    cfg, params = load_hf(path)
    out = str(tmp_path / "export")
    save_hf(out, cfg, params, dtype="float32", max_shard_gb=20_000 / 2**30)  # tiny shards: exercises the index
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(back, IDS), hf_logits(model, IDS), rtol=1e-5, atol=1e-5)
    # Bitwise identical tensors after ours -> HF -> ours.
    _, again = load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, params, again)


def test_packed_segments_equal_separate_documents(tmp_path):
    model, path = hf_model(tmp_path, num_key_value_heads=2)
    cfg, params = load_hf(path)
    net = ours(cfg, params)
    a, b = IDS[0, :10], IDS[1, :9]
    packed = np.concatenate([a, b, np.zeros(5, int)])[None]  # two documents then padding
    seg = np.array([[1] * 10 + [2] * 9 + [0] * 5])
    pos = np.array([list(range(10)) + list(range(9)) + [0] * 5])
    got = np.asarray(net(jnp.asarray(packed), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0, :10], hf_logits(model, a[None])[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0, 10:19], hf_logits(model, b[None])[0], rtol=1e-4, atol=1e-4)


def test_kv_cache_decode_equals_full_forward(tmp_path):
    _, path = hf_model(tmp_path, num_key_value_heads=2)
    cfg, params = load_hf(path)
    net = ours(cfg, params)
    full = np.asarray(net(jnp.asarray(IDS)))
    decoder = nnx.merge(nnx.graphdef(M.abstract_decode_model(cfg)), M.decode_state(cfg, params))
    ids = jnp.asarray(IDS, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), ids.shape)
    logits, cache = decoder.prefill(ids[:, :16], positions[:, :16], jnp.ones((2, 16), jnp.int32), cache_len=32)
    steps = [np.asarray(logits)]  # the prefill gives the last prompt position's logits
    for t in range(16, 24):  # one token at a time
        logits, cache = decoder.decode_step(ids[:, t], positions[:, t], cache)
        steps.append(np.asarray(logits))
    # Every prompt position, too: a prefill of the first t tokens gives position t-1's logits.
    prefixes = [np.asarray(decoder.prefill(ids[:, :t], positions[:, :t], jnp.ones((2, t), jnp.int32),
                                           cache_len=32)[0]) for t in range(1, 16)]
    np.testing.assert_allclose(np.stack(prefixes + steps, 1), full, rtol=1e-4, atol=1e-4)


def test_scan_remat_and_unrolled_agree():
    cfg = model_preset("tiny")
    base = M.create_model(cfg)
    want = np.asarray(base(jnp.asarray(IDS)))
    _, state = nnx.split(base)
    for kw in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots_no_batch", scan_layers=False)):
        other = M.create_model(dataclasses.replace(cfg, **kw))
        graphdef, st = nnx.split(other)
        np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, state)(jnp.asarray(IDS))), want, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_remat():
    cfg = dataclasses.replace(model_preset("tiny"), remat="full")
    graphdef, state = nnx.split(M.create_model(cfg))

    def loss(state):
        return nnx.merge(graphdef, state)(jnp.asarray(IDS)).mean()

    grads = jax.grad(loss)(state)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and all(n > 0 for n in norms)


def test_bf16_compute_close_to_fp32():
    cfg = model_preset("tiny")
    want = np.asarray(M.create_model(cfg)(jnp.asarray(IDS)))
    got = M.create_model(dataclasses.replace(cfg, dtype="bfloat16"))(jnp.asarray(IDS))
    assert got.dtype == jnp.float32  # logits always fp32
    np.testing.assert_allclose(np.asarray(got), want, atol=0.05)


def test_every_param_has_logical_axes():
    graphdef, state = nnx.split(M.create_model(model_preset("tiny")))
    axes = M.logical_axes(state)
    for arr, ax in zip(jax.tree.leaves(state), jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))):
        assert len(ax) == arr.ndim


def test_config_json_variants():
    old = {"vocab_size": 50304, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 32,
           "num_attention_heads": 32, "rope_pct": 0.25, "norm_eps": 1e-5, "rope_theta": 10000, "hidden_act": "silu"}
    cfg = ModelConfig.from_hf_dict(old)
    assert cfg.partial_rotary_factor == 0.25 and cfg.num_key_value_heads == 32
    assert cfg.num_params() == 2_795_443_200
    new = dict(old, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5})
    new.pop("rope_pct"), new.pop("rope_theta")
    cfg = ModelConfig.from_hf_dict(new)
    assert (cfg.rope_theta, cfg.partial_rotary_factor) == (1e6, 0.5)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).rope_theta == 1e6
    with pytest.raises(ConfigError, match="rope type"):
        ModelConfig.from_hf_dict(dict(old, rope_scaling={"type": "linear", "factor": 2}))
    for preset in ("stable-code-3b", "stablelm-3b-4e1t", "stablelm-2-1_6b", "tiny"):
        model_preset(preset)


def test_convert_cli_round_trip_and_errors(tmp_path):
    model, path = hf_model(tmp_path)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"marker": 1}, f)
    orbax_dir, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    assert convert_main(["hf-to-orbax", "--hf", path, "--out", orbax_dir]) == 0
    assert convert_main(["orbax-to-hf", "--ckpt", orbax_dir, "--out", back, "--dtype", "float32"]) == 0
    assert os.path.exists(os.path.join(back, "tokenizer.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    np.testing.assert_allclose(hf_logits(reloaded, IDS), hf_logits(model, IDS), rtol=1e-5, atol=1e-5)
    # Bad input: one line, non-zero exit, nothing half-written.
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    bad = subprocess.run([sys.executable, "-m", "sc_jax.convert", "hf-to-orbax", "--hf", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    assert not os.path.exists(tmp_path / "x")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert convert_main(["hf-to-orbax", "--hf", str(trunc), "--out", str(tmp_path / "y")]) == 2
    assert not os.path.exists(tmp_path / "y")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_segment_offsets_in_cudnn_packed_layout():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 2, 3, 4, 5, 6]])
    lengths, starts = A.segment_offsets(seg, max_segments=4)
    np.testing.assert_array_equal(lengths, [[2, 3, -1, -1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(starts, [[0, 2, -1, -1, -1], [0, 1, 2, 3, -1]])


def test_chunked_attention_equals_reference_values_and_grads():
    B, T, H, K, D = 2, 64, 4, 2, 8
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = (jax.random.normal(kk, (B, T, K, D)) for kk in ks[1:])
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], B, 0).repeat(16, 1))
    mask = A.AttentionMask(seg, seg, jnp.arange(T), jnp.arange(T))
    ref = lambda q, k, v: A.reference_attention(q, k, v, mask)  # noqa: E731
    chunked = lambda q, k, v: A.chunked_attention(q, k, v, mask, chunk=16)  # noqa: E731
    np.testing.assert_allclose(chunked(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v) for f in (ref, chunked)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)
