"""Checkpoint conversion between Hugging Face (`StableLmForCausalLM`) and orbax.

    python -m sc_jax.convert hf-to-orbax --hf DIR --out DIR
    python -m sc_jax.convert orbax-to-hf --ckpt DIR --out DIR [--step N] [--dtype bfloat16|float32]

Because our attribute names mirror HF's, conversion is a name map plus reshapes:
HF `nn.Linear` weights are [out, in]; ours keep heads as their own axis
(q_proj [E,H,D], o_proj [H,D,E]) so that tensor parallelism can shard heads, and the
layers are stacked on a leading axis for `scan`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from sc_jax.config import ConfigError, ModelConfig
from sc_jax.fileio import atomic_directory
from sc_jax.hf_io import HFCheckpoint, write_sharded

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json")
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# Per-layer tensors: (our path under model.layers, HF name under model.layers.{i}, to_hf, from_hf).
# to_hf maps one layer's array [our shape] -> HF array; from_hf the inverse.
def _layer_map(cfg: ModelConfig) -> list[tuple[str, str, Callable, Callable]]:
    E, H, K, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    same = (lambda a: a, lambda a: a)
    T = (lambda a: a.T, lambda a: a.T)

    def proj(heads):  # [E, heads, D] <-> [heads*D, E]
        return (lambda a: a.reshape(E, heads * D).T, lambda a: a.T.reshape(E, heads, D))

    def bias(heads):  # [heads, D] <-> [heads*D]
        return (lambda a: a.reshape(heads * D), lambda a: a.reshape(heads, D))

    entries = [
        ("input_layernorm.weight", "input_layernorm.weight", *same),
        ("input_layernorm.bias", "input_layernorm.bias", *same),
        ("self_attn.q_proj", "self_attn.q_proj.weight", *proj(H)),
        ("self_attn.k_proj", "self_attn.k_proj.weight", *proj(K)),
        ("self_attn.v_proj", "self_attn.v_proj.weight", *proj(K)),
        ("self_attn.o_proj", "self_attn.o_proj.weight", lambda a: a.reshape(H * D, E).T, lambda a: a.T.reshape(H, D, E)),
        ("mlp.gate_proj", "mlp.gate_proj.weight", *T),
        ("mlp.up_proj", "mlp.up_proj.weight", *T),
        ("mlp.down_proj", "mlp.down_proj.weight", *T),
    ]
    if not cfg.use_parallel_residual:
        entries += [("post_attention_layernorm.weight", "post_attention_layernorm.weight", *same),
                    ("post_attention_layernorm.bias", "post_attention_layernorm.bias", *same)]
    if cfg.use_qkv_bias:
        entries += [("self_attn.q_bias", "self_attn.q_proj.bias", *bias(H)),
                    ("self_attn.k_bias", "self_attn.k_proj.bias", *bias(K)),
                    ("self_attn.v_bias", "self_attn.v_proj.bias", *bias(K))]
    return entries


def _qk_norm_entries(cfg: ModelConfig):
    """qk LayerNorm: ours [heads, D] per layer <-> HF one [D] weight per head."""
    if not cfg.qk_layernorm:
        return []
    return [("self_attn.q_layernorm.weight", "self_attn.q_layernorm.norms.{h}.weight", cfg.num_attention_heads),
            ("self_attn.k_layernorm.weight", "self_attn.k_layernorm.norms.{h}.weight", cfg.num_key_value_heads)]


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _set(tree: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for key in head:
        tree = tree.setdefault(key, {})
    tree[last] = value


def hf_to_params(cfg: ModelConfig, hf: HFCheckpoint, dtype=np.float32) -> dict:
    """HF tensors -> our pure parameter dict (numpy, `dtype`)."""
    L = cfg.num_hidden_layers
    cast = lambda a: np.asarray(a, dtype=dtype)  # noqa: E731
    params: dict = {}
    _set(params, "model.embed_tokens.embedding", cast(hf["model.embed_tokens.weight"]))
    _set(params, "model.norm.weight", cast(hf["model.norm.weight"]))
    _set(params, "model.norm.bias", cast(hf["model.norm.bias"]))
    if not cfg.tie_word_embeddings:
        _set(params, "lm_head", cast(hf["lm_head.weight"]).T)
    for ours, theirs, _, from_hf in _layer_map(cfg):
        _set(params, f"model.layers.{ours}",
             np.stack([cast(from_hf(hf[f"model.layers.{i}.{theirs}"])) for i in range(L)]))
    for ours, theirs, heads in _qk_norm_entries(cfg):
        _set(params, f"model.layers.{ours}", np.stack([
            np.stack([cast(hf[f"model.layers.{i}." + theirs.format(h=h)]) for h in range(heads)]) for i in range(L)]))
    n_layers_in_file = len({n.split(".")[2] for n in hf.names() if n.startswith("model.layers.")})
    if n_layers_in_file != L:
        raise ConfigError(f"config says {L} layers but the weights hold {n_layers_in_file}")
    return params


def params_to_hf(cfg: ModelConfig, params: dict, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameters -> (HF name, array) pairs, one tensor at a time."""
    cast = lambda a: np.ascontiguousarray(np.asarray(a).astype(dtype))  # noqa: E731
    yield "model.embed_tokens.weight", cast(_get(params, "model.embed_tokens.embedding"))
    for i in range(cfg.num_hidden_layers):
        for ours, theirs, to_hf, _ in _layer_map(cfg):
            yield f"model.layers.{i}.{theirs}", cast(to_hf(np.asarray(_get(params, f"model.layers.{ours}")[i])))
        for ours, theirs, heads in _qk_norm_entries(cfg):
            stacked = np.asarray(_get(params, f"model.layers.{ours}")[i])
            for h in range(heads):
                yield f"model.layers.{i}." + theirs.format(h=h), cast(stacked[h])
    yield "model.norm.weight", cast(_get(params, "model.norm.weight"))
    yield "model.norm.bias", cast(_get(params, "model.norm.bias"))
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", cast(np.asarray(_get(params, "lm_head")).T)


def load_hf(directory: str, **ours) -> tuple[ModelConfig, dict]:
    """(ModelConfig, fp32 params) from a HF model directory."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"'{directory}' has no config.json: pass a Hugging Face model directory")
    cfg = ModelConfig.from_hf_json(config_path, **ours)
    return cfg, hf_to_params(cfg, HFCheckpoint(directory))


def save_hf(out_dir: str, cfg: ModelConfig, params: dict, dtype: str = "bfloat16", tokenizer_from: str | None = None,
            max_shard_gb: float = 5.0) -> None:
    """Writes a HF model directory atomically: everything goes to a temporary sibling
    directory that is renamed to out_dir only when complete."""
    if dtype not in NP_DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(NP_DTYPES)}, got '{dtype}'")
    with atomic_directory(out_dir) as tmp:
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["torch_dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, f, indent=2)
        write_sharded(tmp, params_to_hf(cfg, params, NP_DTYPES[dtype]), int(max_shard_gb * 2**30))
        if tokenizer_from:
            copy_tokenizer(tokenizer_from, tmp)
            _tokenizer_config(tmp)


def copy_tokenizer(src: str, dst_dir: str) -> list[str]:
    """Copies tokenizer files from a directory, or a single tokenizer.json, into dst_dir."""
    if os.path.isfile(src):
        shutil.copy(src, os.path.join(dst_dir, "tokenizer.json"))
        return ["tokenizer.json"]
    copied = [f for f in TOKENIZER_FILES if f != "generation_config.json" and os.path.exists(os.path.join(src, f))]
    for f in copied:
        shutil.copy(os.path.join(src, f), os.path.join(dst_dir, f))
    return copied


def _tokenizer_config(dst_dir: str) -> None:
    """A minimal tokenizer_config.json so AutoTokenizer loads a bare tokenizer.json
    (with our ChatML template when the tokenizer has the chat tokens)."""
    path = os.path.join(dst_dir, "tokenizer_config.json")
    tok_path = os.path.join(dst_dir, "tokenizer.json")
    if os.path.exists(tok_path) and not os.path.exists(path):
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                  "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        with open(tok_path) as f:
            if '"<|im_start|>"' in f.read():
                from sc_jax.instruct.chat import CHAT_TEMPLATE

                config["chat_template"] = CHAT_TEMPLATE
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------- CLI


def hf_to_orbax(hf_dir: str, out_dir: str) -> None:
    from sc_jax import checkpoint

    t0 = time.time()
    print(f"reading {hf_dir} ...", flush=True)
    cfg, params = load_hf(hf_dir)
    n = sum(a.size for a in _leaves(params))
    print(f"  {n:,} parameters, {cfg.num_hidden_layers} layers ({time.time() - t0:.1f}s); writing orbax to {out_dir} ...",
          flush=True)
    with atomic_directory(out_dir) as tmp:
        checkpoint.save_params(tmp, params, cfg)
        tok_dir = os.path.join(tmp, "tokenizer")
        os.makedirs(tok_dir)
        if not copy_tokenizer(hf_dir, tok_dir):
            os.rmdir(tok_dir)
    print(f"done in {time.time() - t0:.1f}s: {out_dir}")


def find_tokenizer(ckpt_path: str) -> str | None:
    """A tokenizer that travels with a checkpoint: CKPT/tokenizer/ or a run's tokenizer.json."""
    for cand in (os.path.join(ckpt_path, "tokenizer"), os.path.join(ckpt_path, "tokenizer.json"),
                 os.path.join(os.path.dirname(os.path.normpath(ckpt_path)), "tokenizer"),
                 os.path.join(os.path.dirname(os.path.normpath(ckpt_path)), "tokenizer.json")):
        if os.path.isfile(cand) or (os.path.isdir(cand) and os.path.exists(os.path.join(cand, "tokenizer.json"))):
            return cand
    return None


def orbax_to_hf(ckpt: str, out_dir: str, step: int | None = None, dtype: str = "bfloat16",
                tokenizer: str | None = None) -> None:
    from sc_jax import checkpoint

    t0 = time.time()
    if dtype not in NP_DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(NP_DTYPES)}, got '{dtype}'")
    cfg, params, step = checkpoint.load_params(ckpt, step)
    print(f"restored step {step} from {ckpt} ({time.time() - t0:.1f}s); writing {dtype} safetensors to {out_dir} ...",
          flush=True)
    tokenizer = tokenizer or find_tokenizer(ckpt)
    save_hf(out_dir, cfg, checkpoint.to_numpy(params), dtype=dtype, tokenizer_from=tokenizer)
    print(f"done in {time.time() - t0:.1f}s: {out_dir}" + ("" if tokenizer else " (no tokenizer found to copy)"))


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sc_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF directory (config.json + safetensors) -> orbax checkpoint")
    a.add_argument("--hf", required=True, help="Hugging Face model directory")
    a.add_argument("--out", required=True, help="new orbax checkpoint directory")
    b = sub.add_parser("orbax-to-hf", help="orbax checkpoint or training run directory -> HF directory")
    b.add_argument("--ckpt", required=True, help="orbax checkpoint directory, a step in it, or a training run directory")
    b.add_argument("--out", required=True, help="new Hugging Face model directory")
    b.add_argument("--step", type=int, default=None, help="step to export (default: newest)")
    b.add_argument("--dtype", default="bfloat16", choices=sorted(NP_DTYPES), help="dtype of the exported weights")
    b.add_argument("--tokenizer", default=None, help="tokenizer.json or directory to copy (default: found beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "hf-to-orbax":
            hf_to_orbax(args.hf, args.out)
        else:
            orbax_to_hf(args.ckpt, args.out, args.step, args.dtype, args.tokenizer)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
