"""Generation: greedy equals `transformers` generate token for token, KV-cache decode
logits equal a full forward pass, sampling filters equal transformers' warpers, stop
tokens/strings, FIM prompts, checkpoint formats and the CLI (tiny random models, CPU)."""

import dataclasses
import io
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sc_jax import generate as G  # noqa: E402
from sc_jax.generate import generator as token_generator  # noqa: E402
from sc_jax.generate.__main__ import main as generate_main  # noqa: E402
from sc_jax import attention as A  # noqa: E402
from sc_jax import model as M  # noqa: E402
from sc_jax.config import ConfigError  # noqa: E402
from sc_jax.convert import hf_to_orbax, load_hf  # noqa: E402
from sc_jax.tokenizer import train_tokenizer  # noqa: E402

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, partial_rotary_factor=0.25, rope_theta=10000.0, max_position_embeddings=256,
            layer_norm_eps=1e-5, use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False,
            tie_word_embeddings=False, hidden_act="silu", bos_token_id=0, eos_token_id=0)
VARIANTS = {"stable-code": {},
            "gqa_bias_qknorm_parallel": dict(num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=True,
                                             use_parallel_residual=True, rope_theta=1e6)}
CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
        "class Foo:\n    def __init__(self):\n        self.x = 1\n", "import os\nimport sys\n"] * 20
LENGTHS = (3, 11, 17, 30)  # one batch of prompts of different lengths


def make_hf(path, **kw):
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(transformers.StableLmConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():  # HF initialises norms and biases trivially: randomise so they matter
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(CODE, vocab_size=300).backend.save(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("hf") / "model"
    model = make_hf(path)
    with open(tokenizer_file) as src, open(path / "tokenizer.json", "w") as dst:
        dst.write(src.read())
    return str(path), model


@pytest.fixture(scope="module")
def gen(hf_dir):
    return G.load_generator(hf_dir[0])


def prompts(seed=0, lengths=LENGTHS):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, TINY["vocab_size"], size=n).tolist() for n in lengths]


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0)
    return out[0, len(prompt):].tolist()


_VARIANT_CACHE: dict = {}


def variant(name, tmp_path_factory):
    """(HF model, our Generator, our full model) for a tiny config variant, built once."""
    if name not in _VARIANT_CACHE:
        path = str(tmp_path_factory.mktemp(name) / "hf")
        hf = make_hf(path, **VARIANTS[name])
        cfg, params = load_hf(path)
        graphdef, state = nnx.split(M.create_model(cfg))
        state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
        _VARIANT_CACHE[name] = (hf, G.Generator(cfg, params), nnx.merge(graphdef, state))  # ids only: no tokenizer
    return _VARIANT_CACHE[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_transformers_generate(tmp_path_factory, name):
    hf, gen, _ = variant(name, tmp_path_factory)
    ps = prompts(1)
    ours = gen.generate_ids(ps, max_new_tokens=16, stop_tokens=[0])
    for p, o in zip(ps, ours):  # HF one prompt at a time: no padding on their side
        assert o == hf_greedy(hf, p, 16)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_decode_logits_equal_full_forward(tmp_path_factory, name):
    _, gen, model = variant(name, tmp_path_factory)
    ps = prompts(2)
    outs, logits = gen.generate_ids(ps, max_new_tokens=12, stop_tokens=(), return_logits=True)
    # The model's own forward, no cache: all rows at once, right-padded (segment 0).
    seqs = [p + o[:-1] for p, o in zip(ps, outs)]
    T = max(map(len, seqs))
    ids = np.zeros((len(seqs), T), np.int32)
    seg = np.zeros((len(seqs), T), np.int32)
    for r, q in enumerate(seqs):
        ids[r, :len(q)], seg[r, :len(q)] = q, 1
    full = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(seg)))
    for r, (p, o, lg) in enumerate(zip(ps, outs, logits)):
        assert len(o) == 12 and lg.shape == (12, TINY["vocab_size"])
        want = full[r, len(p) - 1:len(p) + 11]
        np.testing.assert_allclose(lg, want, rtol=1e-4, atol=1e-4)
        assert o == np.argmax(want, -1).tolist()


def test_long_prompt_prefill_runs_in_query_blocks(tmp_path_factory, monkeypatch):
    """A prompt past 1024 tokens is prefilled 1024 queries at a time (never one
    [B,H,P,P] score array), with the logits of the model's full forward pass."""
    _, short_gen, model = variant("stable-code", tmp_path_factory)
    cfg = dataclasses.replace(short_gen.cfg, max_position_embeddings=4096)
    seen = []
    reference = A.reference_attention
    monkeypatch.setattr(A, "reference_attention", lambda q, *a: seen.append(q.shape[1]) or reference(q, *a))
    gen = G.Generator(cfg, nnx.split(model)[1].to_pure_dict())
    ps = prompts(5, lengths=(1100, 40))  # left-padded to 2048: two query blocks
    outs, logits = gen.generate_ids(ps, max_new_tokens=3, stop_tokens=(), return_logits=True)
    assert max(seen) == 1024
    for p, o, lg in zip(ps, outs, logits):
        seq = p + o[:-1]
        full = np.asarray(model(jnp.asarray([seq], jnp.int32)))[0]
        np.testing.assert_allclose(lg, full[len(p) - 1:], rtol=1e-4, atol=1e-4)


def test_long_prompts_run_in_smaller_batches(gen, monkeypatch):
    ps = prompts(8, lengths=(40, 33, 9, 5, 3))
    want = gen.generate_ids(ps, max_new_tokens=5, stop_tokens=())
    assert gen.stats.batches == 1
    # A budget of one row's scores at 64 positions: the two rows bucketed to 64 go one at
    # a time, the three short ones (bucket 16) together. Same tokens.
    monkeypatch.setattr(token_generator, "PREFILL_SCORES_BYTES", gen.cfg.num_attention_heads * 64 * 64 * 4)
    assert gen.generate_ids(ps, max_new_tokens=5, stop_tokens=()) == want
    assert gen.stats.batches == 3


def test_generation_stops_at_the_context_length(gen):
    n_ctx = gen.cfg.max_position_embeddings
    with pytest.raises(ConfigError, match="context"):
        gen.generate_ids([[1] * n_ctx], max_new_tokens=4)
    out = gen.generate_ids(prompts(6, lengths=(n_ctx - 6, 5)), max_new_tokens=20, stop_tokens=())
    assert [len(o) for o in out] == [6, 20]  # the first row's last token sits at position n_ctx - 1


def test_text_prompts_are_cut_to_the_context(gen, monkeypatch):
    """Text too long for the context keeps the code nearest the gap and room to generate
    (an evaluation must not fail on one long problem)."""
    tok, n_ctx = gen.tokenizer, gen.cfg.max_position_embeddings
    text = "".join(f"x{i} = {i * 7}\n" for i in range(n_ctx))  # no repeats: which end was kept shows
    suffix = "".join(f"y{i} = {i * 3}\n" for i in range(n_ctx))
    ids, sids = tok.encode(text), tok.encode(suffix)
    assert min(len(ids), len(sids)) > n_ctx
    seen = []
    real = gen.generate_ids
    monkeypatch.setattr(gen, "generate_ids", lambda p, **kw: seen.append(p) or real(p, **kw))
    with pytest.warns(UserWarning, match="1 prompt.* too long for the model's context"):
        gen.complete([text, "def f():"], max_new_tokens=16)
    assert seen[-1] == [ids[-(n_ctx - 16):], tok.encode("def f():")]
    with pytest.warns(UserWarning, match="too long"):  # at most half the context is kept for generating
        gen.complete([text], max_new_tokens=10 * n_ctx)
    assert seen[-1] == [ids[-(n_ctx - n_ctx // 2):]]
    with pytest.warns(UserWarning, match="2 prompt.* too long"):  # one warning per call
        gen.infill([text, text], [suffix, "pass\n"], max_new_tokens=16)
    room = n_ctx - 16 - 3
    both, short = seen[-1]
    assert len(both) == len(short) == room + 3 and both[0] == tok.token_id(G.FIM_PREFIX)
    assert both[1:1 + room // 2] == ids[-(room // 2):]  # the end of the prefix
    assert both[-1 - (room - room // 2):-1] == sids[:room - room // 2]  # the start of the suffix
    assert short[-1] == tok.token_id(G.FIM_MIDDLE) and short[-1 - len(tok.encode("pass\n")):-1] == tok.encode("pass\n")
    with pytest.raises(ConfigError, match="no room for a prompt"):
        gen.prompt_room(3, special=n_ctx)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_writes_the_cache_in_place(gen, monkeypatch, batch):
    """The compiled decode loop never copies a layer's cache (it once did at batch 1, every
    step): a structural check of the optimised HLO, not a timing."""
    seen = []
    decode = gen._decode
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)  # noqa: E731
    monkeypatch.setattr(gen, "_decode", lambda *a, **kw: seen.append((spec(a), kw)) or decode(*a, **kw))
    gen.generate_ids(prompts(7, lengths=(5, 9, 2)[:batch]), max_new_tokens=4, stop_tokens=())
    args, kw = seen[0]
    hlo = decode.lower(*args, **kw).compile().as_text()
    cache_size = int(np.prod(args[1]["cache"]["k"][0].shape))
    copied = [s for s in re.findall(r"= [a-z]+\d*\[([\d,]+)\][^ ]* copy\(", hlo)
              if np.prod(list(map(int, s.split(",")))) == cache_size]
    assert not copied, f"the decode loop copies caches of shape {copied}"


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (5, 0.5), (1, 1.0), (0, 1e-6), (50, 0.999)])
def test_filters_match_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.RandomState(0)
    logits = rng.randn(6, 64).astype(np.float32) * 2
    logits[0, :5] = logits[0, 7]  # ties at the k-th value
    want = torch.tensor(logits)
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    cand, ids = G.filter_logits(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p))
    cand, ids = np.asarray(cand), np.asarray(ids)
    for r in range(len(logits)):
        assert set(ids[r][np.isfinite(cand[r])].tolist()) == set(np.nonzero(np.isfinite(want[r].numpy()))[0].tolist())


def test_sampling(gen):
    ps = prompts(3)
    greedy = gen.generate_ids(ps, max_new_tokens=10, stop_tokens=())
    kw = dict(max_new_tokens=10, stop_tokens=(), temperature=0.8)
    assert gen.generate_ids(ps, top_k=1, **kw) == greedy
    assert gen.generate_ids(ps, top_p=1e-6, **kw) == greedy
    a = gen.generate_ids(ps, seed=1, **kw)
    assert a == gen.generate_ids(ps, seed=1, **kw) and a != gen.generate_ids(ps, seed=2, **kw) and a != greedy
    # A prompt's sample depends on (seed, its index), not on the rest of the batch.
    gen.batch_size = 1  # one prompt per batch: the same samples, and greedy the same tokens
    try:
        assert gen.generate_ids(ps, seed=1, **kw) == a
        assert gen.generate_ids(ps, max_new_tokens=10, stop_tokens=()) == greedy
    finally:
        gen.batch_size = 32
    # Every sampled token is among the top-k / nucleus of its own step's logits.
    outs, logits = gen.generate_ids(ps, seed=4, top_k=4, top_p=0.7, return_logits=True, **kw)
    for o, lg in zip(outs, logits):
        cand, ids = G.filter_logits(jnp.asarray(lg / 0.8), jnp.int32(4), jnp.float32(0.7))
        allowed = [set(i[np.isfinite(c)].tolist()) for c, i in zip(np.asarray(cand), np.asarray(ids))]
        assert all(t in s for t, s in zip(o, allowed))
    # The empirical first-token distribution follows softmax(logits / T).
    T, n = 0.05, 256
    gen.batch_size = 4  # reuses the compiled batch-of-4 kernels
    try:
        many = gen.generate_ids([ps[0]] * n, max_new_tokens=1, temperature=T, stop_tokens=(), seed=5)
    finally:
        gen.batch_size = 32
    z = logits[0][0].astype(np.float64) / T
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    assert 0.05 < probs.max() < 0.9  # neither uniform nor one-hot: the test can tell
    l1 = lambda draws: np.abs(np.bincount(draws, minlength=len(probs)) / n - probs).sum()  # noqa: E731
    rng = np.random.RandomState(0)
    noise = np.mean([l1(rng.choice(len(probs), n, p=probs)) for _ in range(20)])  # sampling noise at n draws
    assert l1([m[0] for m in many]) < 1.5 * noise + 0.02


def test_stop_tokens_and_early_exit(gen):
    ps = prompts(4)
    free = gen.generate_ids(ps, max_new_tokens=16, stop_tokens=())
    stops = [f[i] for f, i in zip(free, (6, 3, 9, 2))]
    out = gen.generate_ids(ps, max_new_tokens=16, stop_tokens=stops)
    for f, o in zip(free, out):
        k = min(f.index(s) for s in stops if s in f)
        assert o == f[:k + 1]  # ends with the stop token, as transformers does
    assert gen.stats.decode_steps == max(map(len, out)) < 16  # the loop exited once every row was done
    with pytest.raises(ConfigError, match="empty"):
        gen.generate_ids([[]])
    with pytest.raises(ConfigError, match="top_p"):
        gen.generate_ids(ps, top_p=0.0)


def test_complete_stop_strings_and_infill(gen):
    tok = gen.tokenizer
    full = gen.complete(["def add(a, b):\n", "import"], max_new_tokens=32)
    ids = gen.generate_ids([tok.encode("def add(a, b):\n")], max_new_tokens=32)[0]
    if ids[-1] == tok.eos_id:
        ids = ids[:-1]
    assert full[0] == tok.decode(ids)
    assert len(full[0]) > 12
    stop = full[0][8:10]
    cut = gen.complete(["def add(a, b):\n", "import"], max_new_tokens=32, stop=[stop, "\x00never"])
    assert cut[0] == full[0][:full[0].find(stop)]
    assert cut[1] == G.cut_at_stop(full[1], [stop])
    # FIM: special tokens by string; user text that spells a special token stays text.
    sp = tok.special
    assert gen.fim_ids("a", "b") == [sp["<fim_prefix>"], *tok.encode("a"), sp["<fim_suffix>"], *tok.encode("b"),
                                     sp["<fim_middle>"]]
    assert sp["<file_sep>"] not in gen.fim_ids("x<file_sep>y", "")
    assert gen.infill_stop_ids() == sorted(sp[s] for s in G.INFILL_STOPS)
    middle = gen.infill(["def f(x):\n    "], ["\n    return y\n"], max_new_tokens=20)
    raw = gen.generate_ids([gen.fim_ids("def f(x):\n    ", "\n    return y\n")], max_new_tokens=20,
                           stop_tokens=gen.infill_stop_ids())[0]
    if raw and raw[-1] in gen.infill_stop_ids():
        raw = raw[:-1]
    assert middle == [tok.decode(raw)]


def test_orbax_and_run_dir_checkpoints(tmp_path, gen, hf_dir, tokenizer_file):
    ps = prompts(5)
    want = gen.generate_ids(ps, max_new_tokens=8)
    ckpt = str(tmp_path / "ckpt")
    hf_to_orbax(hf_dir[0], ckpt)  # copies the tokenizer to ckpt/tokenizer/
    for path in (ckpt, os.path.join(ckpt, "0")):
        assert G.load_generator(path).generate_ids(ps, max_new_tokens=8) == want
    # A run directory: RUN/checkpoints/<step> with RUN/tokenizer.json.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.rename(os.path.join(ckpt, "0"), run / "checkpoints" / "0")
    os.rename(os.path.join(ckpt, "tokenizer", "tokenizer.json"), run / "tokenizer.json")
    assert G.load_generator(str(run)).complete(["x = "], max_new_tokens=4) == gen.complete(["x = "], max_new_tokens=4)
    os.remove(run / "tokenizer.json")
    with pytest.raises(ConfigError, match="--tokenizer"):
        G.load_generator(str(run))
    assert G.load_generator(str(run), tokenizer=tokenizer_file).generate_ids(ps, max_new_tokens=8) == want


def test_cli(hf_dir, capsys, tmp_path):
    path = hf_dir[0]
    assert generate_main(["--ckpt", path, "--prompt", "def add(a, b):\n", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n") == G.load_generator(path).complete(["def add(a, b):\n"], max_new_tokens=16)[0].rstrip("\n")
    assert generate_main(["--ckpt", path, "--prefix", "def f(", "--suffix", "):\n", "--max-new-tokens", "8",
                   "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20", "--seed", "3"]) == 0
    capsys.readouterr()
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes(open(os.path.join(path, name), "rb").read())
    for argv, msg in [(["--ckpt", str(tmp_path / "nope"), "--prompt", "x"], "does not exist"),
                      (["--ckpt", str(bare), "--prompt", "x"], "--tokenizer"),
                      (["--ckpt", path, "--prompt", "x", "--prefix", "y"], "not both"),
                      (["--ckpt", path], "--prompt"),
                      (["--ckpt", path, "--prompt", "x", "--top-p", "1.5"], "--top-p"),
                      (["--ckpt", path, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
                      (["--ckpt", path, "--prompt", "x", "--max-new-tokens", "-5"], "--max-new-tokens 128"),
                      (["--ckpt", path, "--prompt", "x", "--temperature", "nan"], "--temperature"),
                      (["--ckpt", path, "--prompt", ""], "--prompt is empty"),
                      (["--ckpt", path, "--prefix", "", "--suffix", ""], "both empty"),
                      (["--ckpt", path, "--prompt", "x", "--seed", str(2**32)], "--seed")]:
        assert generate_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and err.count("\n") == 1, err
    # The real command line: --help, and a bad path fails in one line without a traceback.
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    run = lambda *a: subprocess.run([sys.executable, "-m", "sc_jax.generate", *a], capture_output=True, text=True,  # noqa: E731
                                    env=env)
    helped = run("--help")
    assert helped.returncode == 0 and "--ckpt" in helped.stdout and "--suffix" in helped.stdout
    bad = run("--ckpt", str(tmp_path / "nope"), "--prompt", "x", "--top-k", "many")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_cli_reads_stdin_and_refuses_an_empty_one(hf_dir, capsys, monkeypatch):
    path = hf_dir[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO("def add(a, b):\n"))
    assert generate_main(["--ckpt", path, "--prompt", "-", "--max-new-tokens", "4"]) == 0
    want = G.load_generator(path).complete(["def add(a, b):\n"], max_new_tokens=4)[0]
    assert capsys.readouterr().out.rstrip("\n") == want.rstrip("\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert generate_main(["--ckpt", path, "--prompt", "-"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --prompt - read an empty prompt from stdin") and err.count("\n") == 1


def test_cli_says_in_plain_lines_what_the_context_cuts(hf_dir, capsys):
    """A prompt too long for the context, or more new tokens than it leaves, runs anyway,
    with one plain `warning:` line each on stderr (never a Python warning with a source line)."""
    path = hf_dir[0]
    gen = G.load_generator(path)
    tok, n_ctx = gen.tokenizer, gen.cfg.max_position_embeddings
    warning_lines = lambda err: [line for line in err.splitlines() if line.startswith("warning:")]  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the library's cut warning on the CLI's path fails the test
        assert generate_main(["--ckpt", path, "--prompt", "def add(a, b):\n", "--max-new-tokens", "8"]) == 0
        assert warning_lines(capsys.readouterr().err) == []

        long_prompt = "".join(f"x{i} = {i * 7}\n" for i in range(3000))  # 37 KB
        assert len(long_prompt) > 36_000
        assert generate_main(["--ckpt", path, "--prompt", long_prompt, "--max-new-tokens", "16"]) == 0
        out, err = capsys.readouterr()
        assert warning_lines(err) == [
            f"warning: the prompt has {len(tok.encode(long_prompt))} tokens, too many for the model's context of "
            f"{n_ctx} tokens (max_position_embeddings): kept its last {n_ctx - 16}, to leave room to generate"]
        assert "Warning" not in err

        short = "def add(a, b):\n"
        room = n_ctx - len(tok.encode(short))
        assert generate_main(["--ckpt", path, "--prompt", short, "--max-new-tokens", "5000"]) == 0
        out_5000, err = capsys.readouterr()
        assert warning_lines(err) == [
            f"warning: --max-new-tokens 5000 does not fit: the model's context is {n_ctx} tokens "
            f"(max_position_embeddings) and the prompt takes {n_ctx - room}, so at most {room} new tokens will be "
            "generated"]
        made = int(re.search(r"\[(\d+) tokens", err).group(1))
        assert made <= room
    with pytest.warns(UserWarning, match="too long"):  # the library still warns its callers
        assert out.rstrip("\n") == gen.complete([long_prompt], max_new_tokens=16)[0].rstrip("\n")
    assert out_5000.rstrip("\n") == gen.complete([short], max_new_tokens=room)[0].rstrip("\n")


def test_asking_past_the_context_does_not_grow_the_buffers(gen, monkeypatch):
    """max_new_tokens far past the context: as many tokens as fit, with the output buffer
    (and so the cache) sized for those, not for the request."""
    seen = []
    decode = gen._decode
    monkeypatch.setattr(gen, "_decode", lambda w, carry, *a, **kw: seen.append(carry["out"].shape) or
                        decode(w, carry, *a, **kw))
    n_ctx = gen.cfg.max_position_embeddings
    out = gen.generate_ids([[1, 2, 3]], max_new_tokens=50 * n_ctx, stop_tokens=())
    assert len(out[0]) == n_ctx - 3
    assert seen[0][1] == token_generator._bucket(n_ctx - 3, G.MIN_NEW_BUCKET)
