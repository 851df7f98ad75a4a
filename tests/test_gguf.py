"""GGUF export checked against llama.cpp itself (llama-cpp-python, built from source by
requirements-test.txt): the file a `python -m sc_jax.convert orbax-to-gguf` writes loads in
llama.cpp, its logits over a token sequence equal ours within f16 rounding, greedy decoding
gives our tokens, q8_0 keeps >= 95% of them, and llama.cpp's tokenizer turns FIM, ChatML and
plain code into our ids."""

import json
import os

import jax
import jax.numpy as jnp
import llama_cpp
import numpy as np
import pytest
import tokenizers
import data_fixtures
from data_fixtures import STDLIB
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

import gguf
from sc_jax import checkpoint
from sc_jax import model as M
from sc_jax.config import ModelConfig
from sc_jax.convert import save_hf
from sc_jax.convert.__main__ import main as convert_main
from sc_jax.convert.to_gguf import STABLELM2_REGEX
from sc_jax.generate.generator import TokenGenerator
from sc_jax.tokenizer import ALL_SPECIAL_TOKENS, Tokenizer, iter_corpus_texts

SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, partial_rotary_factor=0.25, max_position_embeddings=256, rope_theta=10_000.0)
VARIANTS = {  # Stable Code 3B's layout; StableLM 2 12B's (parallel residual, qk norms, qkv bias), tied
    "stable_code": dict(),
    "parallel_qk_norm_bias_tied": dict(use_parallel_residual=True, qk_layernorm=True, use_qkv_bias=True,
                                       tie_word_embeddings=True),
}
# A random model whose greedy picks are not near-ties (a top-2 logit gap of at least ~2.5 here,
# against ~0.001 for the training init, where any rounding flips a pick and the rest of the row
# with it): inputs embedded at std 1, layers at std 0.1 (not chaotic: rounding errors do not
# grow layer over layer), and an lm_head that maps each input direction to the embedding of
# another token (a random permutation), so the continuation walks the vocabulary, steered by
# the layers, instead of repeating a token.
INNER_STD, EMBED_STD, HEAD_SCALE, TIED_EMBED_STD = 0.1, 1.0, 0.3, 0.3
F16_LOGIT_TOL = 0.02  # max |ours - llama.cpp| over all logits (logits std ~2.5): f16 weights and activations
F32_LOGIT_TOL = 5e-3  # f32 weights: summation order and ggml's exp/SiLU approximations (~1e-4 of the range)
N_NEW = 24
tokenizer_path = data_fixtures.tokenizer_path  # a 1024-token BPE of ours (every special token), session-wide


def params_for(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random weights (numpy f32, see INNER_STD) with norms and biases away from their trivial init."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        if "norm" in name or "bias" in name:
            return (np.asarray(a) + rng.normal(0, 0.1, a.shape)).astype(np.float32)
        return rng.normal(0, INNER_STD, a.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(fill, nnx.split(M.create_model(cfg, seed))[1].to_pure_dict())
    embed = rng.normal(0, TIED_EMBED_STD if cfg.tie_word_embeddings else EMBED_STD,
                       (cfg.vocab_size, cfg.hidden_size)).astype(np.float32)
    params["model"]["embed_tokens"]["embedding"] = embed
    if not cfg.tie_word_embeddings:  # [E, V]
        params["lm_head"] = (embed[rng.permutation(cfg.vocab_size)].T * HEAD_SCALE).astype(np.float32)
    return params


def our_model(cfg, params):
    graphdef, state = nnx.split(M.create_model(cfg))
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def f16_rounded(params):
    """The weights an f16 GGUF holds: matrices rounded to f16, norms and biases f32."""
    def one(path, a):
        name = jax.tree_util.keystr(path)
        return a if ("norm" in name or "bias" in name) else a.astype(np.float16).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, params)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_path):
    """{variant: (cfg, params, orbax checkpoint dir with its tokenizer/)}"""
    out = {}
    for name, kw in VARIANTS.items():
        cfg = ModelConfig(**SHAPE, **kw).validate()
        params = params_for(cfg)
        ck = tmp_path_factory.mktemp(name) / "ck"
        checkpoint.save_params(str(ck), params, cfg)
        (ck / "tokenizer").mkdir()
        (ck / "tokenizer" / "tokenizer.json").write_text(open(tokenizer_path).read())
        out[name] = (cfg, params, str(ck))
    return out


_EXPORTS: dict = {}


def export(checkpoints, name, type_name):
    if (name, type_name) not in _EXPORTS:
        ck = checkpoints[name][2]
        out = os.path.join(os.path.dirname(ck), f"model-{type_name}.gguf")
        assert convert_main(["orbax-to-gguf", "--ckpt", ck, "--out", out, "--type", type_name]) == 0
        _EXPORTS[name, type_name] = out
    return _EXPORTS[name, type_name]


def load_llama(path, **kw):
    return llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=256, logits_all=True, n_threads=2, seed=0,
                           verbose=False, **kw)


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], np.float32)


def llama_greedy(llm, prompt, n) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@pytest.fixture(scope="module")
def prompts(tok):
    """Token prompts cut from real code (this machine's standard library)."""
    texts = [t for t in iter_corpus_texts(os.path.join(STDLIB, "wsgiref"))]
    ids = tok.encode("\n".join(texts), allow_special=False)
    return [ids[s:s + n] for s, n in zip(range(0, 4000, 500), (5, 9, 17, 24, 31, 12, 40, 7))]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of positions where two greedy continuations hold the same token."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / sum(map(len, a))


def our_greedy(cfg, params, prompts) -> list[list[int]]:
    return TokenGenerator(cfg, params, dtype="float32").generate_ids(prompts, max_new_tokens=N_NEW, stop_tokens=())


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_f16_logits_and_greedy_tokens_equal_ours(checkpoints, prompts, name):
    cfg, params, _ = checkpoints[name]
    llm = load_llama(export(checkpoints, name, "f16"))
    rounded = f16_rounded(params)
    ids = sum(prompts, [])[:200]
    ours = np.asarray(our_model(cfg, rounded)(jnp.asarray([ids]))[0], np.float32)
    theirs = llama_logits(llm, ids)
    diff = np.abs(ours - theirs).max()
    top2 = np.sort(ours, -1)[:, -2:]
    print(f"{name}: f16 logits max |diff| {diff:.4f} (logits std {ours.std():.2f}, range "
          f"[{ours.min():.1f}, {ours.max():.1f}], smallest top-2 gap {np.min(top2[:, 1] - top2[:, 0]):.2f})")
    assert diff < F16_LOGIT_TOL
    ours_greedy = our_greedy(cfg, rounded, prompts)
    theirs_greedy = [llama_greedy(llm, p, N_NEW) for p in prompts]
    assert theirs_greedy == ours_greedy


@pytest.mark.parametrize("name", list(VARIANTS))
def test_f32_logits_equal_ours(checkpoints, prompts, name):
    cfg, params, _ = checkpoints[name]
    llm = load_llama(export(checkpoints, name, "f32"))
    ids = sum(prompts, [])[:200]
    ours = np.asarray(our_model(cfg, params)(jnp.asarray([ids]))[0], np.float32)
    diff = np.abs(ours - llama_logits(llm, ids)).max()
    print(f"{name}: f32 logits max |diff| {diff:.2e} (logits range [{ours.min():.1f}, {ours.max():.1f}])")
    assert diff < F32_LOGIT_TOL


@pytest.mark.parametrize("type_name,floor", [("q8_0", 0.95), ("q4_0", 0.9), ("q4_1", 0.9)])
def test_quantized_greedy_agreement(checkpoints, prompts, type_name, floor):
    cfg, params, _ = checkpoints["stable_code"]
    path = export(checkpoints, "stable_code", type_name)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == type_name.upper() and types["blk.0.attn_norm.weight"] == "F32"
    llm = load_llama(path)
    share = agreement([llama_greedy(llm, p, N_NEW) for p in prompts], our_greedy(cfg, params, prompts))
    print(f"{type_name}: greedy agreement with our f32 {share:.1%} over {len(prompts)} prompts x {N_NEW} tokens")
    assert share >= floor


def test_metadata_is_stablelms(checkpoints):
    cfg, _, _ = checkpoints["parallel_qk_norm_bias_tied"]
    reader = gguf.GGUFReader(export(checkpoints, "parallel_qk_norm_bias_tied", "f16"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "stablelm"
    assert field("stablelm.rope.dimension_count") == 4  # 0.25 of head_dim 16
    assert field("stablelm.context_length") == 256 and field("stablelm.use_parallel_residual") is True
    assert field("stablelm.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field("stablelm.attention.head_count_kv") == 2
    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert tensors["blk.1.attn_q_norm.weight"] == (16, 4) and tensors["blk.1.attn_k_norm.weight"] == (16, 2)
    assert "blk.0.ffn_norm.weight" not in tensors and "output.weight" in tensors  # parallel residual; tied
    assert tensors["blk.0.attn_q.bias"] == (64,)


def test_hf_to_gguf_writes_the_same_file_as_orbax_to_gguf(checkpoints, tmp_path, tokenizer_path):
    cfg, params, _ = checkpoints["parallel_qk_norm_bias_tied"]
    hf = str(tmp_path / "hf")
    save_hf(hf, cfg, params, dtype="float32", tokenizer_from=tokenizer_path)
    out = str(tmp_path / "from-hf.gguf")
    assert convert_main(["hf-to-gguf", "--hf", hf, "--out", out, "--type", "q8_0"]) == 0
    a = gguf.GGUFReader(out)
    b = gguf.GGUFReader(export(checkpoints, "parallel_qk_norm_bias_tied", "q8_0"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        np.testing.assert_array_equal(x.data, y.data)
    assert convert_main(["hf-to-gguf", "--hf", hf, "--out", out, "--type", "f16", "--force"]) == 0
    assert gguf.GGUFReader(out).tensors[1].tensor_type.name == "F16"


# ----------------------------------------------------------------------------- the tokenizer


def prompts_with_special_tokens():
    code = "def area(r):\n    return 3.14159 * r ** 2  # don't round\n\n\tx = [1, 22, 333, 4444]\n"
    return [
        f"<fim_prefix>{code}<fim_suffix>\n    print('done')\n<fim_middle>",
        "<fim_prefix>import os\n<fim_suffix>\n<fim_middle>    return os.path.join(a, b)<|endoftext|>",
        "<repo_name>user/repo<file_sep>a.py\n" + code + "<file_sep>b.py\nfrom a import area\n",
        "<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\nSum a list.<|im_end|>\n"
        "<|im_start|>assistant\n",
        code + "<|endoftext|>" + "café ünïcödé — 你好 \u00a0  spaces   and\n\n\nnewlines\r\n",
    ]


def check_tokenizer_agrees(llm, tok):
    for text in prompts_with_special_tokens():
        ids = tok.encode(text, allow_special=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        # Without special parsing, special-token strings are plain text to both.
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, allow_special=False)
        assert llm.detokenize(ids, special=True) == text.encode()
    for name in ALL_SPECIAL_TOKENS:  # one id each, typed CONTROL
        assert llm.tokenize(name.encode(), add_bos=False, special=True) == [tok.token_id(name)]


def test_fim_and_chat_prompts_tokenize_to_our_ids(checkpoints, tok):
    llm = llama_cpp.Llama(model_path=export(checkpoints, "stable_code", "f16"), vocab_only=True, verbose=False)
    check_tokenizer_agrees(llm, tok)
    reader = gguf.GGUFReader(export(checkpoints, "stable_code", "f16"))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.ggml.fim_pre_token_id"].contents() == tok.token_id("<fim_prefix>")
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.token_id("<|endoftext|>")
    assert llm.token_eos() == tok.token_id("<|endoftext|>")


def arcade_like_tokenizer(texts, vocab_size=700) -> tokenizers.Tokenizer:
    """A byte-level BPE split as Stable Code's arcade100k splits (one digit at a time)."""
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(STABLELM2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(ALL_SPECIAL_TOKENS),
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    return t


def test_stable_codes_pre_tokenizer_is_llamas_stablelm2(checkpoints, tmp_path):
    """A tokenizer with arcade100k's split, fewer tokens than the model's rows (padded)."""
    texts = [t for t in iter_corpus_texts(os.path.join(STDLIB, "json"))]
    path = str(tmp_path / "tokenizer.json")
    arcade_like_tokenizer(texts).save(path)
    assert json.load(open(path))["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == STABLELM2_REGEX
    out = str(tmp_path / "m.gguf")
    ck = checkpoints["stable_code"][2]
    assert convert_main(["orbax-to-gguf", "--ckpt", ck, "--out", out, "--tokenizer", path, "--type", "q8_0"]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "stablelm2"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 1024 and tokens[-1] == "[PAD1023]"
    llm = llama_cpp.Llama(model_path=out, vocab_only=True, verbose=False)
    tok = Tokenizer.from_file(path)
    check_tokenizer_agrees(llm, tok)
    assert tok.encode("x = 4444") == llm.tokenize(b"x = 4444", add_bos=False)  # digits one by one
    assert len(tok.encode("4444")) == 4


def test_relative_checkpoint_paths_convert(checkpoints, tmp_path, monkeypatch):
    """orbax reads absolute paths only: a relative --ckpt is made absolute (both exports)."""
    ck = checkpoints["stable_code"][2]
    monkeypatch.chdir(os.path.dirname(ck))
    assert convert_main(["orbax-to-gguf", "--ckpt", "ck", "--out", str(tmp_path / "m.gguf"), "--type", "q4_0"]) == 0
    assert convert_main(["orbax-to-hf", "--ckpt", "ck", "--out", str(tmp_path / "hf")]) == 0
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
