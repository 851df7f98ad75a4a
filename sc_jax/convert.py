"""Checkpoint conversion between Hugging Face (`StableLmForCausalLM`) and orbax.

    python -m sc_jax.convert hf-to-orbax --hf DIR --out DIR [--dtype source|float32|bfloat16]
    python -m sc_jax.convert orbax-to-hf --ckpt DIR --out DIR [--step N] [--dtype bfloat16|float32|float16]

Both directions stream: one of our parameters (a stack of one tensor over all layers)
is in memory at a time, so a model converts in little more than its largest tensor.

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
from dataclasses import dataclass
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from sc_jax.config import ConfigError, ModelConfig
from sc_jax.fileio import atomic_directory
from sc_jax.hf_io import CONFIG_NAME, HFCheckpoint, TensorSpec, write_sharded
from sc_jax.pytree import get_path, set_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json")
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
HF_MODEL_TYPES = ("stablelm", "stablelm_epoch")  # stablelm_epoch: StableLM-3B-4E1T's original remote-code config
HF_ARCHITECTURES = ("StableLmForCausalLM", "StableLMEpochForCausalLM")
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some exports carry; recomputed from the config


# ----------------------------------------------------------------------------- the name map


@dataclass(frozen=True)
class Leaf:
    """One of our parameters and the HF tensors it is made of.

    A per-layer leaf is stacked over layers on axis 0, from one HF tensor per layer
    (`hf_name` holds `{i}`), or from one per head when `heads` > 0 (`{h}`: qk norms)."""

    path: str  # dotted path in our parameter tree
    shape: tuple[int, ...]  # our shape, [layers, ...] when per layer
    hf_name: str
    hf_shape: tuple[int, ...]  # one HF tensor
    from_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a
    to_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a
    per_layer: bool = False
    heads: int = 0
    keys: str = "hidden_size"  # the config.json keys that set its shape (for error messages)

    def hf_names(self, layer: int | None) -> list[str]:
        if self.heads:
            return [self.hf_name.format(i=layer, h=h) for h in range(self.heads)]
        return [self.hf_name.format(i=layer)]

    def hf_specs(self, num_layers: int, dtype) -> list[TensorSpec]:
        layers = range(num_layers) if self.per_layer else [None]
        return [TensorSpec(name, self.hf_shape, np.dtype(dtype)) for i in layers for name in self.hf_names(i)]


def _layer_leaves(cfg: ModelConfig) -> list[Leaf]:
    E, H, K, D, I, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.num_hidden_layers)
    T = dict(from_hf=lambda a: a.T, to_hf=lambda a: a.T)

    def proj(heads):  # ours [E, heads, D] <-> HF [heads*D, E]
        return dict(from_hf=lambda a: a.T.reshape(E, heads, D), to_hf=lambda a: a.reshape(E, heads * D).T)

    def bias(heads):  # ours [heads, D] <-> HF [heads*D]
        return dict(from_hf=lambda a: a.reshape(heads, D), to_hf=lambda a: a.reshape(heads * D))

    def leaf(ours, theirs, shape, hf_shape, keys, **kw):
        return Leaf(f"model.layers.{ours}", (L, *shape), f"model.layers.{{i}}.{theirs}", hf_shape, per_layer=True,
                    keys=f"{keys}, num_hidden_layers", **kw)

    heads_keys = "hidden_size, num_attention_heads"
    kv_keys = "hidden_size, num_attention_heads, num_key_value_heads"
    leaves = [
        leaf("input_layernorm.weight", "input_layernorm.weight", (E,), (E,), "hidden_size"),
        leaf("input_layernorm.bias", "input_layernorm.bias", (E,), (E,), "hidden_size"),
        leaf("self_attn.q_proj", "self_attn.q_proj.weight", (E, H, D), (H * D, E), heads_keys, **proj(H)),
        leaf("self_attn.k_proj", "self_attn.k_proj.weight", (E, K, D), (K * D, E), kv_keys, **proj(K)),
        leaf("self_attn.v_proj", "self_attn.v_proj.weight", (E, K, D), (K * D, E), kv_keys, **proj(K)),
        leaf("self_attn.o_proj", "self_attn.o_proj.weight", (H, D, E), (E, H * D), heads_keys,
             from_hf=lambda a: a.T.reshape(H, D, E), to_hf=lambda a: a.reshape(H * D, E).T),
        leaf("mlp.gate_proj", "mlp.gate_proj.weight", (E, I), (I, E), "hidden_size, intermediate_size", **T),
        leaf("mlp.up_proj", "mlp.up_proj.weight", (E, I), (I, E), "hidden_size, intermediate_size", **T),
        leaf("mlp.down_proj", "mlp.down_proj.weight", (I, E), (E, I), "hidden_size, intermediate_size", **T),
    ]
    if not cfg.use_parallel_residual:
        leaves += [leaf("post_attention_layernorm.weight", "post_attention_layernorm.weight", (E,), (E,), "hidden_size"),
                   leaf("post_attention_layernorm.bias", "post_attention_layernorm.bias", (E,), (E,), "hidden_size")]
    if cfg.use_qkv_bias:
        leaves += [leaf("self_attn.q_bias", "self_attn.q_proj.bias", (H, D), (H * D,), heads_keys, **bias(H)),
                   leaf("self_attn.k_bias", "self_attn.k_proj.bias", (K, D), (K * D,), kv_keys, **bias(K)),
                   leaf("self_attn.v_bias", "self_attn.v_proj.bias", (K, D), (K * D,), kv_keys, **bias(K))]
    if cfg.qk_layernorm:  # ours [heads, D] per layer <-> HF one [D] weight per head
        leaves += [leaf("self_attn.q_layernorm.weight", "self_attn.q_layernorm.norms.{h}.weight", (H, D), (D,),
                        heads_keys, heads=H),
                   leaf("self_attn.k_layernorm.weight", "self_attn.k_layernorm.norms.{h}.weight", (K, D), (D,),
                        kv_keys, heads=K)]
    return leaves


def leaves(cfg: ModelConfig) -> list[Leaf]:
    """Every parameter of the model `cfg` describes, in a fixed order."""
    V, E = cfg.vocab_size, cfg.hidden_size
    out = [Leaf("model.embed_tokens.embedding", (V, E), "model.embed_tokens.weight", (V, E),
                keys="vocab_size, hidden_size"),
           *_layer_leaves(cfg),
           Leaf("model.norm.weight", (E,), "model.norm.weight", (E,)),
           Leaf("model.norm.bias", (E,), "model.norm.bias", (E,))]
    if not cfg.tie_word_embeddings:
        out.append(Leaf("lm_head", (E, V), "lm_head.weight", (V, E), from_hf=lambda a: a.T, to_hf=lambda a: a.T,
                        keys="vocab_size, hidden_size"))
    return out


# ----------------------------------------------------------------------------- HF -> ours


def check_architecture(hf_config: dict, directory: str) -> None:
    """Only StableLM checkpoints: another model's tensors can have our names and shapes."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if model_type not in HF_MODEL_TYPES or any(a not in HF_ARCHITECTURES for a in archs):
        what = f"model_type '{model_type}'" if model_type else "no model_type"
        raise ConfigError(f"{os.path.join(directory, CONFIG_NAME)} has {what}"
                          + (f" ({', '.join(map(str, archs))})" if archs else "")
                          + ": sc_jax converts StableLM checkpoints only (model_type 'stablelm', StableLmForCausalLM)")


def _layers_in_file(names) -> set[int]:
    return {int(n.split(".")[2]) for n in names if n.startswith("model.layers.") and n.split(".")[2].isdigit()}


def check_tensors(cfg: ModelConfig, hf: HFCheckpoint) -> None:
    """Every tensor is there, with the shape the config implies, and nothing else is."""
    in_file = _layers_in_file(hf.names())
    if in_file and in_file != set(range(cfg.num_hidden_layers)):
        raise ConfigError(f"config.json in {hf.directory} says {cfg.num_hidden_layers} layers but the weights hold "
                          f"{len(in_file)}: the config does not belong to these weights")
    expected = {}
    for leaf in leaves(cfg):
        for spec in leaf.hf_specs(cfg.num_hidden_layers, np.float32):
            expected[spec.name] = (spec.shape, leaf.keys)
    for name, (shape, keys) in expected.items():
        if name not in hf:
            raise ConfigError(f"tensor {name} is missing from {hf.directory}, but config.json implies it "
                              "(check use_qkv_bias, qk_layernorm, use_parallel_residual, tie_word_embeddings)")
        spec = hf.spec(name)
        if spec.shape != shape:
            raise ConfigError(f"tensor {name} in {hf.directory} has shape {list(spec.shape)} but config.json "
                              f"({keys}) implies {list(shape)}: the config does not belong to these weights")
        if spec.dtype.kind != "f" and spec.dtype != ml_dtypes.bfloat16:
            raise ConfigError(f"tensor {name} in {hf.directory} has dtype {spec.dtype}: weights must be floating point")
    extra = sorted(n for n in hf.names() if n not in expected and not n.endswith(IGNORED_HF_TENSORS))
    if extra:
        raise ConfigError(f"tensor {extra[0]} in {hf.directory} is not part of the model config.json describes"
                          + (f" ({len(extra)} such tensors)" if len(extra) > 1 else "")
                          + " (check use_qkv_bias, qk_layernorm, use_parallel_residual, tie_word_embeddings)")


def open_hf(directory: str, **ours) -> tuple[ModelConfig, HFCheckpoint]:
    """(ModelConfig, tensors) of a HF directory, checked before any tensor is read."""
    hf = HFCheckpoint(directory)
    hf_config = hf.config()
    check_architecture(hf_config, directory)
    cfg = ModelConfig.from_hf_dict(hf_config, **ours)
    check_tensors(cfg, hf)
    return cfg, hf


def is_hf_directory(path: str) -> bool:
    """A HF model directory (config.json beside the weights), rather than an orbax checkpoint."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def _read_one(hf: HFCheckpoint, leaf: Leaf, layer: int | None) -> np.ndarray:
    parts = [hf.read(name) for name in leaf.hf_names(layer)]
    return np.stack(parts) if leaf.heads else leaf.from_hf(parts[0])


def read_leaf(hf: HFCheckpoint, leaf: Leaf, dtype, index: tuple = ()) -> np.ndarray:
    """Our leaf (or the block `index` of it) as numpy `dtype`, read one HF tensor at a time:
    a per-layer leaf reads only the layers the block covers."""
    if not leaf.per_layer:
        return np.ascontiguousarray(_read_one(hf, leaf, None)[index], dtype=dtype)
    index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
    out = None
    layers = range(leaf.shape[0])[index[0]]
    for j, layer in enumerate(layers):
        block = _read_one(hf, leaf, layer)[index[1:]]
        if out is None:
            out = np.empty((len(layers), *block.shape), dtype)
        out[j] = block
    return out


def hf_to_params(cfg: ModelConfig, hf: HFCheckpoint, dtype=np.float32) -> dict:
    """HF tensors -> our whole parameter dict (numpy, `dtype`). Holds the whole model:
    conversion and training streams instead (`read_leaf`)."""
    params: dict = {}
    for leaf in leaves(cfg):
        set_path(params, leaf.path, read_leaf(hf, leaf, dtype))
    return params


def load_hf(directory: str, dtype=np.float32, **ours) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params as numpy `dtype`) from a HF model directory."""
    cfg, hf = open_hf(directory, **ours)
    return cfg, hf_to_params(cfg, hf, dtype)


def hf_params_onto(directory: str, target: dict) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a HF directory as jax arrays on `target`'s shardings (a
    tree of ShapeDtypeStructs): each device's block is read from the HF tensors it needs
    and cast to the target dtype, so neither the whole model nor a host copy of a whole
    leaf is built unless a device holds it whole."""
    import jax

    cfg, hf = open_hf(directory)
    params: dict = {}
    for leaf in leaves(cfg):
        want = _target_leaf(target, leaf, directory)
        set_path(params, leaf.path, jax.make_array_from_callback(
            leaf.shape, want.sharding, _BlockReader(hf, leaf, want.dtype)))
    missing = sorted(set(_dotted_leaves(target)) - {leaf.path for leaf in leaves(cfg)})
    if missing:
        raise ConfigError(f"train.init_from '{directory}' has no parameter {missing[0]}, which the configured model "
                          "has: set the model section (preset, sizes) to the checkpoint's architecture")
    return cfg, params


def _target_leaf(target: dict, leaf: Leaf, directory: str):
    try:
        want = get_path(target, leaf.path)
    except (KeyError, TypeError):
        raise ConfigError(f"train.init_from '{directory}' has parameter {leaf.path}, which the configured model "
                          "lacks: set the model section (preset, sizes) to the checkpoint's architecture") from None
    if tuple(want.shape) != leaf.shape:
        raise ConfigError(f"parameter {leaf.path} is {list(leaf.shape)} in train.init_from '{directory}' but "
                          f"{list(want.shape)} in the configured model: set the model section (preset, sizes) to "
                          "the checkpoint's architecture")
    return want


def _dotted_leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out += _dotted_leaves(value, path + ".") if isinstance(value, dict) else [path]
    return out


class _BlockReader:
    """make_array_from_callback's callback: one device's block of a leaf. Devices that
    hold the same block (replication) share one read."""

    def __init__(self, hf: HFCheckpoint, leaf: Leaf, dtype):
        self.hf, self.leaf, self.dtype = hf, leaf, dtype
        self._last: tuple | None = None

    def __call__(self, index: tuple) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if self._last is None or self._last[0] != key:
            self._last = (key, read_leaf(self.hf, self.leaf, self.dtype, index))
        return self._last[1]


# ----------------------------------------------------------------------------- ours -> HF


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
    if dtype not in NP_DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(NP_DTYPES)}, got '{dtype}'")
    np_dtype = NP_DTYPES[dtype]
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


def find_tokenizer(ckpt_path: str) -> str | None:
    """A tokenizer that travels with a checkpoint: CKPT/tokenizer/, a run's tokenizer.json,
    or either of those beside the checkpoint directory a step is in (RUN/checkpoints/N)."""
    path = os.path.abspath(ckpt_path)
    for base in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        for cand in (os.path.join(base, "tokenizer"), os.path.join(base, "tokenizer.json")):
            if os.path.isfile(cand) or (os.path.isdir(cand) and os.path.exists(os.path.join(cand, "tokenizer.json"))):
                return cand
    return None


# ----------------------------------------------------------------------------- CLI


class _Progress:
    """One line per parameter on long conversions: which, its size, elapsed time."""

    def __init__(self, total: int, t0: float):
        self.total, self.done, self.t0 = total, 0, t0

    def __call__(self, leaf: Leaf, dtype) -> None:
        self.done += 1
        print(f"  [{self.done}/{self.total}] {leaf.path} {list(leaf.shape)} {np.dtype(dtype).name} "
              f"({time.time() - self.t0:.1f}s)", flush=True)
        _fault_injection_pause(self.done)


def _fault_injection_pause(done: int) -> None:
    """Tests of interrupted conversions set SC_JAX_CONVERT_PAUSE_AFTER=N: the conversion
    waits after its N-th parameter until it is killed."""
    if os.environ.get("SC_JAX_CONVERT_PAUSE_AFTER") == str(done):
        print("paused", flush=True)
        while True:
            time.sleep(0.05)


def _orbax_dtype(requested: str, leaf_dtype) -> np.dtype:
    return np.dtype(leaf_dtype) if requested == "source" else np.dtype(NP_DTYPES[requested])


def hf_to_orbax(hf_dir: str, out_dir: str, dtype: str = "source") -> None:
    """HF directory -> orbax checkpoint, one of our parameters at a time."""
    from sc_jax import checkpoint

    t0 = time.time()
    if dtype != "source" and dtype not in NP_DTYPES:
        raise ConfigError(f"--dtype must be source or one of {sorted(NP_DTYPES)}, got '{dtype}'")
    cfg, hf = open_hf(hf_dir)
    plan = leaves(cfg)
    print(f"reading {hf_dir}: {cfg.num_params():,} parameters, {cfg.num_hidden_layers} layers; "
          f"writing orbax to {out_dir} ...", flush=True)
    progress = _Progress(len(plan), t0)

    def lazy(leaf: Leaf):
        leaf_dtype = _orbax_dtype(dtype, hf.spec(leaf.hf_names(0 if leaf.per_layer else None)[0]).dtype)

        def produce():
            arr = read_leaf(hf, leaf, leaf_dtype)
            progress(leaf, leaf_dtype)
            return arr

        return checkpoint.LazyArray(leaf.shape, leaf_dtype, produce)

    params: dict = {}
    for leaf in plan:
        set_path(params, leaf.path, lazy(leaf))
    with atomic_directory(out_dir) as tmp:
        checkpoint.save_params(tmp, params, cfg)
        tok_dir = os.path.join(tmp, "tokenizer")
        os.makedirs(tok_dir)
        if not copy_tokenizer(hf_dir, tok_dir):
            os.rmdir(tok_dir)
    print(f"done in {time.time() - t0:.1f}s: {out_dir}")


def orbax_to_hf(ckpt: str, out_dir: str, step: int | None = None, dtype: str = "bfloat16",
                tokenizer: str | None = None) -> None:
    """orbax checkpoint -> HF directory, restoring one of our parameters at a time. When no
    step is named and the newest cannot be read, the one before it is exported."""
    from sc_jax import checkpoint

    if dtype not in NP_DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(NP_DTYPES)}, got '{dtype}'")
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConfigError(f"tokenizer '{tokenizer}' does not exist: pass a tokenizer.json or a directory holding one")
    directory, newest = checkpoint.resolve(ckpt, step)
    candidates = [newest] if step is not None else [s for s in reversed(checkpoint.valid_steps(directory))]
    tokenizer = tokenizer or find_tokenizer(ckpt)
    for n, candidate in enumerate(candidates):
        try:
            _export_step(directory, candidate, out_dir, dtype, tokenizer)
            return
        except checkpoint.DamagedCheckpoint as e:
            if n + 1 == len(candidates):
                raise
            print(f"warning: {e}; exporting step {candidates[n + 1]} instead", file=sys.stderr, flush=True)


def _export_step(directory: str, step: int, out_dir: str, dtype: str, tokenizer: str | None) -> None:
    from sc_jax import checkpoint

    t0 = time.time()
    with checkpoint.ParamReader(directory, step) as reader:
        cfg = reader.model_config
        reader.check_shapes({leaf.path: leaf.shape for leaf in leaves(cfg)}, "its own model config")
        print(f"exporting step {step} of {directory} ({cfg.num_params():,} parameters) as {dtype} safetensors "
              f"to {out_dir} ...", flush=True)
        progress = _Progress(len(leaves(cfg)), t0)

        def read(leaf: Leaf) -> np.ndarray:
            arr = reader.read(leaf.path)
            progress(leaf, arr.dtype)
            return arr

        save_hf(out_dir, cfg, read, dtype=dtype, tokenizer_from=tokenizer)
    print(f"done in {time.time() - t0:.1f}s: {out_dir}" + ("" if tokenizer else " (no tokenizer found to copy)"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m sc_jax.convert", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    a = sub.add_parser("hf-to-orbax", help="HF directory (config.json + safetensors) -> orbax checkpoint",
                       formatter_class=fmt)
    a.add_argument("--hf", required=True, help="Hugging Face model directory (StableLM)")
    a.add_argument("--out", required=True, help="new orbax checkpoint directory (must not exist, or be empty)")
    a.add_argument("--dtype", default="source", choices=["source", *sorted(NP_DTYPES)],
                   help="dtype of the stored parameters: source keeps each tensor's own")
    b = sub.add_parser("orbax-to-hf", help="orbax checkpoint or training run directory -> HF directory",
                       formatter_class=fmt)
    b.add_argument("--ckpt", required=True, help="orbax checkpoint directory, a step in it, or a training run directory")
    b.add_argument("--out", required=True, help="new Hugging Face model directory (must not exist, or be empty)")
    b.add_argument("--step", type=int, default=None, help="step to export (default: the newest readable one)")
    b.add_argument("--dtype", default="bfloat16", choices=sorted(NP_DTYPES), help="dtype of the exported weights")
    b.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or directory to copy (default: found beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "hf-to-orbax":
            hf_to_orbax(args.hf, args.out, args.dtype)
        else:
            orbax_to_hf(args.ckpt, args.out, args.step, args.dtype, args.tokenizer)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
