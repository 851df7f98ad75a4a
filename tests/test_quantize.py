"""Weight-only int8 generation (`dtype="int8"`, `--dtype int8`): the per-channel quantization
error bound, the quantized DecodeModel's KV-cache decode against its own full forward pass,
greedy agreement with bf16 and the held-out loss delta (printed), int8 kernels being what stays
resident, orbax and HF checkpoints alike, and the CLI (tiny models, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sc_jax import generate as G
from sc_jax import model as M
from sc_jax.config import ConfigError, ModelConfig
from sc_jax.convert import hf_to_orbax, save_hf
from sc_jax.generate.__main__ import main as generate_main
from sc_jax.tokenizer import train_tokenizer

CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
        "class Foo:\n    def __init__(self):\n        self.x = 1\n", "import os\nimport sys\n"] * 20
# Trained a little (TRAIN_STEPS of Adam on sequences of a fixed rule, `rule_sequences`), so
# that its next tokens are decided as a trained model's are: a random model's near-uniform
# logits make greedy agreement a count of near-ties.
CFG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, partial_rotary_factor=0.25, max_position_embeddings=128,
                  use_qkv_bias=True, initializer_range=0.1, eos_token_id=0, bos_token_id=0).validate()
N_PROMPTS, NEW = 16, 16  # one batch shape for every test: one compile per precision
TRAIN_STEPS, SEQ = 150, 32


def rule_sequences(rng, n: int, length: int) -> np.ndarray:
    """[n, length] ids: a random start, then next = (5 * prev + 3) % (V - 1) + 1, with one
    token in ten random (so that the model must read its context, not only count)."""
    V = CFG.vocab_size
    ids = np.zeros((n, length), np.int32)
    ids[:, 0] = rng.randint(1, V, n)
    for t in range(1, length):
        ids[:, t] = np.where(rng.rand(n) < 0.1, rng.randint(1, V, n), (5 * ids[:, t - 1] + 3) % (V - 1) + 1)
    return ids


def batch_of(ids: np.ndarray) -> dict:
    n, T = ids.shape
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((n, T - 1), np.float32),
            "segment_ids": np.ones((n, T - 1), np.int32),
            "positions": np.broadcast_to(np.arange(T - 1, dtype=np.int32), (n, T - 1))}


@pytest.fixture(scope="module")
def params():
    import optax

    from sc_jax.train.step import loss_sums

    graphdef, state = nnx.split(M.create_model(CFG, seed=1))
    params, tx, rng = state.to_pure_dict(), optax.adam(3e-3), np.random.RandomState(0)

    @jax.jit
    def step(params, opt, batch):
        loss = lambda p: (lambda t, c: t / c)(*loss_sums(graphdef, p, batch))  # noqa: E731
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    opt = tx.init(params)
    for i in range(TRAIN_STEPS):
        params, opt, loss = step(params, opt, batch_of(rule_sequences(rng, 16, SEQ)))
    print(f"\ntrained {TRAIN_STEPS} steps: loss {float(loss):.3f}")
    return jax.device_get(params)


@pytest.fixture(scope="module")
def gens(params):
    return {name: G.TokenGenerator(CFG, params, dtype=name) for name in ("float32", "bfloat16", "int8")}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, params):
    root = tmp_path_factory.mktemp("q8")
    tok = str(root / "tokenizer.json")
    train_tokenizer(CODE, vocab_size=300).backend.save(tok)
    save_hf(str(root / "hf"), CFG, params, dtype="float32", tokenizer_from=tok)
    return str(root / "hf")


def prompt_ids(n=N_PROMPTS, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, CFG.vocab_size, size=rng.randint(3, 30)).tolist() for _ in range(n)]


@pytest.mark.parametrize("shape,contracted", [((64, 4, 16), (0,)), ((4, 16, 64), (0, 1)), ((320, 64), (1,))])
def test_int8_error_is_at_most_half_a_step_per_channel(shape, contracted):
    w = np.random.RandomState(0).standard_t(3, size=shape).astype(np.float32)  # heavy tails: outliers per channel
    w[(slice(None),) * (len(shape) - 1) + (0,)] = 0  # an all-zero channel
    q, scale = M.quantize_int8(w, contracted)
    assert q.dtype == np.int8 and q.min() >= -127
    out_axes = tuple(a for a in range(len(shape)) if a not in contracted)
    assert scale.shape == tuple(shape[a] for a in out_axes) and scale.dtype == np.float32
    s = np.expand_dims(scale, contracted)
    err = np.abs(w - q * s).max(axis=contracted)
    assert np.all(err <= scale / 2 + 1e-7)  # per output channel, half its own step
    amax = np.abs(w).max(axis=contracted)
    np.testing.assert_allclose(scale[amax > 0], amax[amax > 0] / 127, rtol=1e-6)
    assert np.all(scale[amax == 0] == 1)


def test_int8_weights_are_what_stays_resident(gens):
    leaves = jax.tree_util.tree_leaves_with_path(gens["int8"].weights.to_pure_dict())
    kernels = {jax.tree_util.keystr(p) for p, a in leaves if a.dtype == jnp.int8}
    # 7 kernels per layer, the embedding and the head: every one int8.
    assert len(kernels) == 7 * CFG.num_hidden_layers + 2
    floats = [jax.tree_util.keystr(p) for p, a in leaves if a.dtype != jnp.int8]
    # Beside them only their scales, the biases and the LayerNorms: no float kernel kept.
    assert all(p.endswith("['scale']") or "bias" in p or "norm" in p for p in floats), floats
    ratio = gens["int8"].weight_bytes / gens["float32"].weight_bytes
    print(f"\nresident weights: int8 {gens['int8'].weight_bytes:,} B = {ratio:.3f}x float32's")
    assert ratio < 0.3


def test_int8_decode_equals_its_own_full_forward(gens):
    """KV-cache decode on int8 weights against the quantized DecodeModel's whole-sequence pass."""
    gen = gens["int8"]
    ps = prompt_ids(4, seed=3)
    outs, logits = gen.generate_ids(ps, max_new_tokens=NEW, stop_tokens=(), return_logits=True)
    model = gen.model()
    for p, o, lg in zip(ps, outs, logits):
        seq = jnp.asarray([p + o[:-1]], jnp.int32)
        full = model.score(seq, jnp.arange(seq.shape[1])[None], jnp.ones_like(seq))[0, len(p) - 1:]
        np.testing.assert_allclose(lg, full, atol=2e-3, rtol=1e-4)


def test_int8_greedy_agrees_with_bf16_and_costs_little_loss(gens):
    ps = [r[:n].tolist() for r, n in zip(rule_sequences(np.random.RandomState(1), N_PROMPTS, SEQ),
                                          np.random.RandomState(2).randint(3, SEQ, N_PROMPTS))]
    outs = {name: g.generate_ids(ps, max_new_tokens=NEW, stop_tokens=()) for name, g in gens.items()}
    share = {name: np.mean([a == b for a, b in zip(outs[name], outs["bfloat16"])]) for name in outs}
    heldout = batch_of(rule_sequences(np.random.RandomState(3), 16, SEQ))  # never trained on
    loss = {}
    for name, g in gens.items():
        logits = g.model().score(*(jnp.asarray(heldout[k]) for k in ("input_ids", "positions", "segment_ids")))
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(heldout["targets"][..., None]), -1)
        loss[name] = float(nll.mean())
    print(f"\ngreedy outputs equal to bf16's ({len(ps)} prompts x {NEW} tokens): "
          + ", ".join(f"{n} {100 * s:.0f}%" for n, s in share.items()))
    print("held-out loss: " + ", ".join(f"{n} {v:.4f}" for n, v in loss.items())
          + f"; int8 - fp32 = {loss['int8'] - loss['float32']:+.4f}, bf16 - fp32 = "
          f"{loss['bfloat16'] - loss['float32']:+.4f} nats/token")
    assert share["int8"] >= 0.75
    assert abs(loss["int8"] - loss["float32"]) < 0.05


def test_int8_from_hf_and_orbax_checkpoints(hf_dir, gens, tmp_path):
    """Quantized at load from either format, to the same weights as from the parameters."""
    ps = prompt_ids(seed=5)
    want = gens["int8"].generate_ids(ps, max_new_tokens=NEW)
    ckpt = str(tmp_path / "ckpt")
    hf_to_orbax(hf_dir, ckpt)
    for path in (hf_dir, ckpt):
        gen = G.load_generator(path, dtype="int8")
        assert gen.weight_format == "int8" and gen.cfg.dtype == "float32"
        assert gen.generate_ids(ps, max_new_tokens=NEW) == want


def test_cli_dtype_int8(hf_dir, capsys):
    argv = ["--ckpt", hf_dir, "--prompt", "def add(a, b):\n", "--max-new-tokens", "12", "--dtype", "int8"]
    assert generate_main(argv) == 0
    out = capsys.readouterr().out
    want = G.load_generator(hf_dir, dtype="int8").complete(["def add(a, b):\n"], max_new_tokens=12)[0]
    assert out.rstrip("\n") == want.rstrip("\n")


def test_unknown_precision_is_refused(params):
    # (the CLI's `--dtype int3`: a row of tests/test_bad_inputs_cli.py)
    with pytest.raises(ConfigError, match="int8"):
        G.TokenGenerator(CFG, params, dtype="int3")
