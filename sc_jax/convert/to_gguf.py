"""Our parameters -> one GGUF file for llama.cpp, written with `gguf` (llama.cpp's own writer),
one of our parameters at a time, atomically.

What llama.cpp's `convert_hf_to_gguf.py` (StableLMModel) writes, from our config and tokenizer:

- architecture `stablelm`; context, embedding, feed-forward length, block count, head counts,
  `rope.dimension_count` = partial_rotary_factor * head_dim, rope freq base, LayerNorm epsilon,
  `use_parallel_residual`. llama.cpp has no key for qk layernorm: the `attn_q_norm` /
  `attn_k_norm` tensors ([heads, head_dim], one LayerNorm weight per head, as llama.cpp stacks
  HF's per-head norms) are how it knows. A parallel-residual model has no `ffn_norm`.
- tensor names from gguf's own StableLM map (`gguf.get_tensor_name_map`), applied to the HF
  names of `layout.py`; matrices as HF's [out, in]. Q and K are not permuted: llama.cpp runs
  StableLM with NeoX-style rotary (rotate-half over the first rope dims of each head), as we
  do; only llama-architecture exports permute them.
- A tied model gets `output.weight` = the embedding: llama.cpp's StableLM requires one.
- the tokenizer: byte-level BPE (`gpt2`), every token with its type (the added special tokens
  CONTROL, so that llama.cpp parses them in prompts), merges, the pre-tokenizer by name,
  bos/eos/unk/pad/FIM/eot ids looked up by their strings, and the ChatML template.

Types: 1-D tensors and norms stay f32 (as llama.cpp's converter keeps them); matrices get
--type. A matrix whose rows do not split into quantization blocks (32 values) is written f16,
as llama.cpp's converter does. q4_0/q4_1 keep `output.weight` at q8_0 (llama-quantize keeps
it at a higher precision too; gguf's Python quantizer has no k-quants).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sc_jax.config import ConfigError, ModelConfig
from sc_jax.convert.layout import Leaf, leaves
from sc_jax.fileio import atomic_file
from sc_jax.tokenizer import (CHAT_TEMPLATE, EOS, FILE_SEP, FIM_MIDDLE, FIM_PAD, FIM_PREFIX,
                              FIM_SUFFIX, IM_END, IM_START, REPO_NAME, Tokenizer)

ARCH = "stablelm"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
# llama.cpp's regex for its `stablelm2` pre-tokenizer (arcade100k: cl100k's, one digit at a
# time), spelled as tokenizer.json holds it.
STABLELM2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                   "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _gguf():
    try:
        import gguf
    except ImportError:  # a runtime dependency (pyproject): only a broken install lacks it
        raise ConfigError("the `gguf` package is not installed: pip install gguf==0.19.0") from None
    return gguf


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: made from layer `layer` of our `leaf` (None: not per layer)."""

    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists it reversed)
    qtype: int  # GGMLQuantizationType
    leaf: Leaf
    layer: int | None

    def data(self, ours: np.ndarray) -> np.ndarray:
        """This tensor's bytes from our whole leaf `ours`, quantized."""
        one = ours[self.layer] if self.layer is not None else ours
        # qk norms: [heads, D] as we hold them; the rest in HF's layout ([out, in] matrices).
        arr = np.asarray(one if self.leaf.heads else self.leaf.to_hf(one), dtype=np.float32)
        return _gguf().quants.quantize(np.ascontiguousarray(arr), self.qtype)

    def nbytes(self) -> int:
        block, size = _gguf().GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def _qtype(name: str, shape: tuple[int, ...], type_name: str) -> int:
    T = _gguf().GGMLQuantizationType
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return T.F32
    wanted = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[type_name]
    if name == "output.weight" and type_name.startswith("q4"):
        wanted = T.Q8_0
    block = _gguf().GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else T.F16


def file_type(type_name: str) -> int:
    F = _gguf().LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1}[type_name]


def gguf_tensors(cfg: ModelConfig, type_name: str) -> list[GGUFTensor]:
    """Every tensor of the file, in file order: our leaves' order, each leaf's layers in turn."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.STABLELM, cfg.num_hidden_layers)
    out = []
    for leaf in leaves(cfg):
        for layer in range(cfg.num_hidden_layers) if leaf.per_layer else [None]:
            # qk norms: llama.cpp's name is that of HF's per-head norms stacked ([heads, D]).
            hf_name = leaf.hf_name.replace(".norms.{h}", "").format(i=layer)
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConfigError(f"gguf has no StableLM tensor name for {hf_name}")
            shape = leaf.shape[1:] if leaf.heads else leaf.hf_shape
            out.append(GGUFTensor(name, tuple(shape), _qtype(name, shape, type_name), leaf, layer))
            if cfg.tie_word_embeddings and name == "token_embd.weight":
                out.append(GGUFTensor("output.weight", tuple(shape), _qtype("output.weight", shape, type_name),
                                      leaf, None))
    return out


# ----------------------------------------------------------------------------- tokenizer


def pre_tokenizer_name(tokenizer_json: dict, path: str) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does: `gpt-2` for a
    GPT-2/NeoX byte-level one (ours: `python -m sc_jax.tokenizer train`), `stablelm2` for
    Stable Code's arcade100k. Anything else llama.cpp would split differently: refused."""
    pre, normalizer = tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("normalizer")
    if normalizer:
        raise ConfigError(f"tokenizer '{path}' has a {normalizer.get('type')} normalizer, which GGUF cannot express: "
                          "export with a byte-level BPE without normalizer (python -m sc_jax.tokenizer train)")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        split, byte_level = steps
        if (split.get("type") == "Split" and split.get("pattern", {}).get("Regex") == STABLELM2_REGEX
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space")):
            return "stablelm2"
    raise ConfigError(f"tokenizer '{path}' splits text with a pre-tokenizer llama.cpp has no name for "
                      f"({json.dumps(pre)[:120]}): GGUF supports the GPT-2 byte-level one "
                      "(python -m sc_jax.tokenizer train) and Stable Code's arcade100k")


def _merges(model: dict) -> list[str]:
    # tokenizers >= 0.20 saves merges as [left, right] pairs; older files as "left right"
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def check_tokenizer(tok: Tokenizer, vocab_size: int) -> tuple[dict, str]:
    """(tokenizer.json's model, llama.cpp's pre-tokenizer name): what the export needs of the
    tokenizer, checked before anything is written."""
    data = json.loads(tok.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer '{tok.path}' is a {model.get('type')} model: GGUF export supports "
                          "byte-level BPE tokenizers")
    pre = pre_tokenizer_name(data, tok.path)
    tok.require(EOS)
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer '{tok.path}' has {tok.vocab_size} tokens but the model only {vocab_size} "
                          "embedding rows: pass the tokenizer the model was trained with (--tokenizer)")
    return data, pre


def add_tokenizer(writer, tok: Tokenizer, vocab_size: int) -> None:
    """The tokenizer's keys: vocab padded to the model's rows, types, merges, special ids."""
    gguf = _gguf()
    data, pre = check_tokenizer(tok, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows no token uses, as llama.cpp's converter pads
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in tok.backend.get_vocab(with_added_tokens=True).items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(data["model"]))
    _add_special_ids(writer, tok)


def _add_special_ids(writer, tok: Tokenizer) -> None:
    K = _gguf().Keys.Tokenizer
    eos = tok.token_id(EOS)  # StableLM: <|endoftext|> begins, ends, pads; prompts get no BOS
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    for key, name in ((K.FIM_PRE_ID, FIM_PREFIX), (K.FIM_SUF_ID, FIM_SUFFIX), (K.FIM_MID_ID, FIM_MIDDLE),
                      (K.FIM_PAD_ID, FIM_PAD), (K.FIM_REP_ID, REPO_NAME), (K.FIM_SEP_ID, FILE_SEP)):
        if name in tok.special:
            writer.add_uint32(key, tok.special[name])
    if IM_START in tok.special and IM_END in tok.special:
        writer.add_eot_token_id(tok.special[IM_END])
        writer.add_chat_template(CHAT_TEMPLATE)


# ----------------------------------------------------------------------------- the file


def add_model_keys(writer, cfg: ModelConfig, type_name: str, name: str) -> None:
    gguf = _gguf()
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.rotary_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_parallel_residual(cfg.use_parallel_residual)
    writer.add_layer_norm_eps(cfg.layer_norm_eps)
    writer.add_file_type(file_type(type_name))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def save_gguf(out_path: str, cfg: ModelConfig, read: Callable[[Leaf], np.ndarray], tok: Tokenizer,
              type_name: str = "f16", *, name: str = "stable-code", force: bool = False,
              progress: Callable[[Leaf, object], None] | None = None) -> None:
    """Writes the GGUF file atomically (a temporary sibling renamed to out_path when complete),
    asking `read` for one of our leaves at a time (the file's tensor table is laid out first
    from the config, then each leaf's tensors are quantized and written in turn)."""
    if type_name not in GGUF_TYPES:
        raise ConfigError(f"--type must be one of {', '.join(GGUF_TYPES)}, got '{type_name}'")
    gguf = _gguf()
    check_tokenizer(tok, cfg.vocab_size)
    tensors = gguf_tensors(cfg, type_name)
    with atomic_file(out_path, force) as tmp:
        writer = gguf.GGUFWriter(None, ARCH)
        try:
            add_model_keys(writer, cfg, type_name, name)
            add_tokenizer(writer, tok, cfg.vocab_size)
            for t in tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes(), raw_dtype=t.qtype)
            writer.write_header_to_file(Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for leaf in leaves(cfg):
                ours = read(leaf)
                for t in (t for t in tensors if t.leaf.path == leaf.path):
                    writer.write_tensor_data(t.data(ours))
                if progress:
                    progress(leaf, ours.dtype)
                del ours
        finally:
            writer.close()
