"""Our parameters -> a Hugging Face directory, one leaf at a time, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Iterator

import numpy as np

from sc_jax.config import DTYPES, ConfigError, ModelConfig
from sc_jax.convert.layout import Leaf, leaves
from sc_jax.fileio import atomic_directory
from sc_jax.hf_io import CONFIG_NAME, TensorSpec, write_sharded
from sc_jax.pytree import get_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def hf_specs(cfg: ModelConfig, dtype) -> list[TensorSpec]:
    """The HF tensors of `cfg`, in the order `hf_tensors` yields them (one leaf after another)."""
    return [spec for leaf in leaves(cfg) for spec in leaf.hf_specs(cfg.num_hidden_layers, dtype)]


def hf_tensors(cfg: ModelConfig, read: Callable[[Leaf], np.ndarray], dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) pairs, asking `read` for one of our leaves at a time."""
    for leaf in leaves(cfg):
        yield from _leaf_to_hf(leaf, read(leaf), cfg.num_hidden_layers, dtype)


def _leaf_to_hf(leaf: Leaf, ours: np.ndarray, num_layers: int, dtype) -> Iterator[tuple[str, np.ndarray]]:
    # Its own generator, so that nothing keeps this leaf alive once its tensors are written.
    for i in range(num_layers) if leaf.per_layer else [None]:
        one = ours[i] if leaf.per_layer else ours
        pairs = zip(leaf.hf_names(i), one) if leaf.heads else [(leaf.hf_names(i)[0], leaf.to_hf(one))]
        for name, arr in pairs:
            yield name, np.ascontiguousarray(arr, dtype=dtype)


def params_to_hf(cfg: ModelConfig, params: dict, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameter dict -> (HF name, array) pairs, one tensor at a time."""
    return hf_tensors(cfg, lambda leaf: np.asarray(get_path(params, leaf.path)), dtype)


def save_hf(out_dir: str, cfg: ModelConfig, params: dict | Callable[[Leaf], np.ndarray], dtype: str = "bfloat16",
            tokenizer_from: str | None = None, max_shard_gb: float = 5.0) -> None:
    """Writes a HF model directory atomically (a temporary sibling directory renamed to
    out_dir when complete). `params` is our parameter dict, or a function that returns
    one leaf at a time (streaming from a checkpoint)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
    np_dtype = DTYPES[dtype]
    read = params if callable(params) else (lambda leaf: np.asarray(get_path(params, leaf.path)))
    with atomic_directory(out_dir) as tmp:
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["torch_dtype"] = dtype
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, f, indent=2)
        write_sharded(tmp, hf_specs(cfg, np_dtype), hf_tensors(cfg, read, np_dtype), int(max_shard_gb * 2**30))
        if tokenizer_from:
            copy_tokenizer(tokenizer_from, tmp)
            _tokenizer_config(tmp)


def copy_tokenizer(src: str, dst_dir: str) -> list[str]:
    """Copies tokenizer files from a directory, or a single tokenizer.json, into dst_dir."""
    if os.path.isfile(src):
        shutil.copy(src, os.path.join(dst_dir, "tokenizer.json"))
        return ["tokenizer.json"]
    copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
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
                from sc_jax.tokenizer import CHAT_TEMPLATE

                config["chat_template"] = CHAT_TEMPLATE
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
