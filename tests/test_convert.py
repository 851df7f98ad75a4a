"""Streamed conversion: the same tensors as the whole-model path, nothing at --out after a
kill, peak memory bounded by the largest parameter rather than the model, damaged steps."""

import os
import signal
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest

from damage import damage_params
from sc_jax import checkpoint
from sc_jax.convert import hf_params_onto, leaves, load_hf, save_hf
from sc_jax.convert.__main__ import main as convert_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, partial_rotary_factor=0.25, max_position_embeddings=128, hidden_act="silu")
VARIANTS = {"qk_norm_qkv_bias_untied": dict(qk_layernorm=True, use_qkv_bias=True, tie_word_embeddings=False),
            "parallel_tied": dict(use_parallel_residual=True, tie_word_embeddings=True)}


def make_hf(path, dtype="bfloat16", **kw):
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(transformers.StableLmConfig(**{**TINY, **kw}))
    with torch.no_grad():  # norms and biases are trivial at init: randomise them so they are checked
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def reference_params(hf_dir, cfg):
    """Today's whole-model conversion, written independently: every tensor as fp32 numpy,
    heads split out of the [out, in] matrices, layers stacked."""
    from safetensors.torch import load_file

    files = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
    t = {k: v.float().numpy() for f in files for k, v in load_file(os.path.join(hf_dir, f)).items()}
    E, H, K, D, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     cfg.num_hidden_layers)
    layer = lambda name: np.stack([t[f"model.layers.{i}.{name}"] for i in range(L)])  # noqa: E731
    ref = {"model.embed_tokens.embedding": t["model.embed_tokens.weight"],
           "model.norm.weight": t["model.norm.weight"], "model.norm.bias": t["model.norm.bias"],
           "model.layers.input_layernorm.weight": layer("input_layernorm.weight"),
           "model.layers.input_layernorm.bias": layer("input_layernorm.bias"),
           "model.layers.self_attn.q_proj": layer("self_attn.q_proj.weight").transpose(0, 2, 1).reshape(L, E, H, D),
           "model.layers.self_attn.k_proj": layer("self_attn.k_proj.weight").transpose(0, 2, 1).reshape(L, E, K, D),
           "model.layers.self_attn.v_proj": layer("self_attn.v_proj.weight").transpose(0, 2, 1).reshape(L, E, K, D),
           "model.layers.self_attn.o_proj": layer("self_attn.o_proj.weight").transpose(0, 2, 1).reshape(L, H, D, E),
           "model.layers.mlp.gate_proj": layer("mlp.gate_proj.weight").transpose(0, 2, 1),
           "model.layers.mlp.up_proj": layer("mlp.up_proj.weight").transpose(0, 2, 1),
           "model.layers.mlp.down_proj": layer("mlp.down_proj.weight").transpose(0, 2, 1)}
    if not cfg.tie_word_embeddings:
        ref["lm_head"] = t["lm_head.weight"].T
    if not cfg.use_parallel_residual:
        ref["model.layers.post_attention_layernorm.weight"] = layer("post_attention_layernorm.weight")
        ref["model.layers.post_attention_layernorm.bias"] = layer("post_attention_layernorm.bias")
    if cfg.use_qkv_bias:
        for x, n in (("q", H), ("k", K), ("v", K)):
            ref[f"model.layers.self_attn.{x}_bias"] = layer(f"self_attn.{x}_proj.bias").reshape(L, n, D)
    if cfg.qk_layernorm:
        for x, n in (("q", H), ("k", K)):
            ref[f"model.layers.self_attn.{x}_layernorm.weight"] = np.stack(
                [np.stack([t[f"model.layers.{i}.self_attn.{x}_layernorm.norms.{h}.weight"] for h in range(n)])
                 for i in range(L)])
    assert sorted(ref) == sorted(leaf.path for leaf in leaves(cfg))
    return ref


def flat(params):
    return {".".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def hf_tensors(hf_dir):
    """Every tensor's raw bytes, read by the safetensors library."""
    from safetensors.torch import load_file

    return {k: (str(v.dtype), tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
            for f in os.listdir(hf_dir) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(hf_dir, f)).items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("src_dtype", ["bfloat16", "float32"])
def test_streamed_conversions_equal_the_whole_model_path(tmp_path, variant, src_dtype):
    hf_dir = make_hf(tmp_path / "hf", src_dtype, **VARIANTS[variant])
    cfg, whole = load_hf(hf_dir)
    ref = reference_params(hf_dir, cfg)
    assert all(np.array_equal(flat(whole)[k], ref[k]) for k in ref)
    # hf-to-orbax keeps each tensor's dtype by default; --dtype float32 is today's checkpoint bit for bit.
    for dtype, want_dtype in (("source", src_dtype), ("float32", "float32")):
        ck = tmp_path / f"orbax-{dtype}"
        assert convert_main(["hf-to-orbax", "--hf", hf_dir, "--out", str(ck), "--dtype", dtype]) == 0
        _, restored, _ = checkpoint.load_params(str(ck))
        got = flat(restored)
        assert sorted(got) == sorted(ref)
        for k in ref:
            assert got[k].dtype == np.dtype(getattr(ml_dtypes, want_dtype, None) or want_dtype), k
            np.testing.assert_array_equal(got[k].astype(np.float32), ref[k], err_msg=k)
    # orbax-to-hf, streamed, gives back the original tensors bit for bit, and what the
    # whole-dict writer gives.
    back, whole_out = tmp_path / "back", tmp_path / "whole"
    assert convert_main(["orbax-to-hf", "--ckpt", str(tmp_path / "orbax-source"), "--out", str(back),
                         "--dtype", src_dtype]) == 0
    save_hf(str(whole_out), cfg, whole, dtype=src_dtype)
    assert hf_tensors(back) == hf_tensors(hf_dir) == hf_tensors(whole_out)


def test_init_from_hf_places_blocks_on_a_sharded_mesh(tmp_path):
    hf_dir = make_hf(tmp_path / "hf", "bfloat16", **VARIANTS["qk_norm_qkv_bias_untied"])
    cfg, whole = load_hf(hf_dir)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("layers", "other"))
    spec = lambda a: jax.sharding.PartitionSpec(*(("other",) if a.shape[0] % 2 == 0 else (None,)))  # noqa: E731
    sharded = lambda a: jax.sharding.NamedSharding(mesh, spec(a))  # noqa: E731
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32, sharding=sharded(a)), whole)
    _, params = hf_params_onto(hf_dir, target)
    for k, v in flat(params).items():
        np.testing.assert_array_equal(v, flat(whole)[k], err_msg=k)
    got = jax.tree.leaves(params)
    assert all(x.dtype == np.float32 for x in got) and any(len(x.sharding.device_set) == 8 for x in got)


# Runs the convert command with its progress report patched to stop after N parameters
# until killed: a conversion caught halfway, deterministically, with no hook in the library.
PAUSING = """
import sys, time
from sc_jax.convert import streaming
report, after = streaming._Progress.__call__, int(sys.argv[1])
def pausing(self, leaf, dtype):
    report(self, leaf, dtype)
    if self.done == after:
        print("paused", flush=True)
        while True:
            time.sleep(0.05)
streaming._Progress.__call__ = pausing
from sc_jax.convert.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def _start_pausing(args, after: int):
    return subprocess.Popen([sys.executable, "-c", PAUSING, str(after), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})


def _wait_for_line(proc, text, timeout=120):
    t0, seen = time.time(), []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
        assert time.time() - t0 < timeout, "".join(seen)
    raise AssertionError(f"process ended before printing {text!r}:\n{''.join(seen)}")


@pytest.mark.slow
def test_a_conversion_killed_halfway_leaves_nothing_at_out(tmp_path):
    hf_dir = make_hf(tmp_path / "hf")
    good = tmp_path / "good"
    assert convert_main(["hf-to-orbax", "--hf", hf_dir, "--out", str(good)]) == 0
    for args in (["hf-to-orbax", "--hf", hf_dir], ["orbax-to-hf", "--ckpt", str(good)]):
        out = tmp_path / f"out-{args[0]}"
        proc = _start_pausing([*args, "--out", str(out)], after=5)
        _wait_for_line(proc, "paused")
        temporaries = [n for n in os.listdir(tmp_path) if n.startswith(f".tmp-{out.name}-")]
        assert len(temporaries) == 1 and os.listdir(tmp_path / temporaries[0])  # writing was under way
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists()
        # The rerun succeeds and clears the killed run's temporary.
        assert convert_main([*args, "--out", str(out)]) == 0
        assert out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(f".tmp-{out.name}-")]


# ----------------------------------------------------------------------------- memory

# A model of ~324 MB in bf16 whose largest parameter is ~50 MB: the whole-model path holds it
# (in fp32, twice) before writing; the streamed one holds about one parameter.
MEMORY_MODEL = ["vocab_size=32000", "hidden_size=768", "intermediate_size=2048", "num_hidden_layers=16",
                "num_attention_heads=12", "num_key_value_heads=12", "tie_word_embeddings=false"]


def _run_measured(cmd) -> int:
    """Peak RSS in bytes of one command, started from a small process (bench/convert.py)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from convert import measure

    return measure(cmd, echo=False)[1]


@pytest.mark.slow
def test_peak_memory_is_bounded_by_a_parameter_not_the_model(tmp_path):
    hf_dir = str(tmp_path / "hf")
    _run_measured([sys.executable, os.path.join(REPO, "bench", "convert.py"), "_make", hf_dir, "tiny", *MEMORY_MODEL])
    size = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir))
    assert size > 300e6
    baseline = _run_measured([sys.executable, "-c", "import sc_jax.checkpoint, sc_jax.convert"])
    convert = [sys.executable, "-m", "sc_jax.convert"]
    to_orbax = _run_measured(convert + ["hf-to-orbax", "--hf", hf_dir, "--out", str(tmp_path / "ck")])
    to_hf = _run_measured(convert + ["orbax-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "back")])
    # The whole-model path holds the model in fp32, and orbax a copy of it, before writing:
    # > 2x the checkpoint above the baseline. Streamed, it is a few of the largest parameter
    # (the leaf, tensorstore's buffer of it) plus orbax's own ~90 MB of pools: 0.6-0.8x here,
    # by how much of tensorstore's pools a run touches (one CI run: 0.803x).
    bound = baseline + 1.0 * size
    assert to_orbax < bound, (to_orbax / 1e6, baseline / 1e6, size / 1e6)
    assert to_hf < bound, (to_hf / 1e6, baseline / 1e6, size / 1e6)
    assert hf_tensors(str(tmp_path / "back")) == hf_tensors(hf_dir)


# ----------------------------------------------------------------------------- tokenizer, permissions, damage


def test_export_of_a_step_directory_finds_the_runs_tokenizer_and_is_world_readable(tmp_path):
    hf_dir = make_hf(tmp_path / "hf")
    cfg, params = load_hf(hf_dir)
    run = tmp_path / "run"
    checkpoint.save_params(str(run / "checkpoints"), params, cfg, step=7)
    (run / "tokenizer.json").write_text('{"marker": 1}')
    old = os.umask(0o022)
    try:
        assert convert_main(["orbax-to-hf", "--ckpt", str(run / "checkpoints" / "7"), "--out", str(tmp_path / "e")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "e" / "tokenizer.json").read_text() == '{"marker": 1}'
    assert os.stat(tmp_path / "e").st_mode & 0o777 == 0o755


def test_a_damaged_newest_step_falls_back_with_a_warning(tmp_path, capsys):
    hf_dir = make_hf(tmp_path / "hf")
    cfg, params = load_hf(hf_dir)
    ck = tmp_path / "ck"
    checkpoint.save_params(str(ck), params, cfg, step=1)
    doubled = jax.tree.map(lambda a: a * 2, params)
    checkpoint.save_params(str(ck), doubled, cfg, step=2)
    damage_params(ck / "2")
    assert convert_main(["orbax-to-hf", "--ckpt", str(ck), "--out", str(tmp_path / "e"), "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint step 2" in err and "exporting step 1 instead" in err
    _, again = load_hf(str(tmp_path / "e"))
    jax.tree.map(np.testing.assert_array_equal, again, params)
    # Loading for training falls back the same way; naming the damaged step is an error.
    _, restored, step = checkpoint.load_params(str(ck))
    assert step == 1
    assert convert_main(["orbax-to-hf", "--ckpt", str(ck), "--step", "2", "--out", str(tmp_path / "f")]) == 2
    assert "error: checkpoint step 2" in capsys.readouterr().err and not (tmp_path / "f").exists()


def test_help_shows_the_defaults():
    res = subprocess.run([sys.executable, "-m", "sc_jax.convert", "orbax-to-hf", "--help"], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert res.returncode == 0 and "(default: bfloat16)" in res.stdout
    res = subprocess.run([sys.executable, "-m", "sc_jax.convert", "hf-to-orbax", "--help"], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert res.returncode == 0 and "(default: source)" in res.stdout


def test_a_named_step_directory_is_the_step_loaded_and_exported(tmp_path):
    hf_dir = make_hf(tmp_path / "hf")
    cfg, params = load_hf(hf_dir)
    ck = tmp_path / "ck"
    checkpoint.save_params(str(ck), params, cfg, step=1)
    checkpoint.save_params(str(ck), jax.tree.map(lambda a: a * 2, params), cfg, step=2)
    _, got, step = checkpoint.load_params(str(ck / "1"))
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, checkpoint.to_numpy(got), params)
    assert convert_main(["orbax-to-hf", "--ckpt", str(ck / "1"), "--out", str(tmp_path / "e"), "--dtype", "float32"]) == 0
    jax.tree.map(np.testing.assert_array_equal, load_hf(str(tmp_path / "e"))[1], params)


def test_loading_onto_a_model_without_a_stored_parameter_is_refused(tmp_path):
    hf_dir = make_hf(tmp_path / "hf", **VARIANTS["qk_norm_qkv_bias_untied"])
    cfg, params = load_hf(hf_dir)
    checkpoint.save_params(str(tmp_path / "ck"), params, cfg)
    target = {k: v for k, v in params.items() if k != "lm_head"}  # a tied model has no lm_head
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32, sharding=device), target)
    with pytest.raises(checkpoint.ConfigError, match="has parameter lm_head, which the configured model lacks"):
        checkpoint.load_params(str(tmp_path / "ck"), target=target)
    with pytest.raises(checkpoint.ConfigError, match="has parameter lm_head, which the configured model lacks"):
        hf_params_onto(hf_dir, target)


def test_the_tokenizer_is_found_only_where_checkpoints_keep_it(tmp_path):
    from sc_jax.loading import find_tokenizer

    run = tmp_path / "runs" / "a"
    (run / "checkpoints" / "4" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "tokenizer.json").write_text("{}")  # someone else's, one level up
    assert find_tokenizer(str(run)) is None and find_tokenizer(str(run / "checkpoints" / "4")) is None
    (run / "tokenizer.json").write_text("{}")
    for path in (run, run / "checkpoints", run / "checkpoints" / "4"):
        assert find_tokenizer(str(path)) == str(run / "tokenizer.json")
    ck = tmp_path / "ck"
    (ck / "0" / "model").mkdir(parents=True)
    (ck / "tokenizer").mkdir()
    (ck / "tokenizer" / "tokenizer.json").write_text("{}")
    assert find_tokenizer(str(ck)) == find_tokenizer(str(ck / "0")) == str(ck / "tokenizer")


def test_init_from_names_the_architecture_keys_that_differ():
    import dataclasses

    from sc_jax.config import model_preset
    from sc_jax.train.state import model_differences

    base = model_preset("tiny")
    stage2 = dataclasses.replace(base, rope_theta=1e6, max_position_embeddings=512, remat="full", dtype="bfloat16")
    assert model_differences(base, stage2) == ["rope_theta 10000.0 -> 1000000.0", "max_position_embeddings 256 -> 512"]
    assert model_differences(base, dataclasses.replace(base, attention="chunked")) == []
