"""Hugging Face directory -> our parameters, checked against the config before any tensor
is read, and read one HF tensor at a time."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from sc_jax.config import ConfigError, ModelConfig
from sc_jax.convert.layout import Leaf, leaves
from sc_jax.hf_io import CONFIG_NAME, HFCheckpoint
from sc_jax.pytree import get_path, set_path

HF_MODEL_TYPES = ("stablelm", "stablelm_epoch")  # stablelm_epoch: StableLM-3B-4E1T's original remote-code config
HF_ARCHITECTURES = ("StableLmForCausalLM", "StableLMEpochForCausalLM")
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some exports carry; recomputed from the config


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
    tree of ShapeDtypeStructs) in the target's dtype. Every parameter is checked against
    the target first; then each is read once per host (only the layers this host's devices
    hold) and handed to the devices block by block, so the whole model never exists on
    the host beside its device copy."""
    import jax

    cfg, hf = open_hf(directory)
    wanted = {leaf.path: _target_leaf(target, leaf, directory) for leaf in leaves(cfg)}
    missing = sorted(set(_dotted_leaves(target)) - set(wanted))
    if missing:
        raise ConfigError(f"train.init_from '{directory}' has no parameter {missing[0]}, which the configured model "
                          "has: set the model section (preset, sizes) to the checkpoint's architecture")
    params: dict = {}
    for leaf in leaves(cfg):
        want = wanted[leaf.path]
        set_path(params, leaf.path, jax.make_array_from_callback(leaf.shape, want.sharding,
                                                                 _HostBlocks(hf, leaf, want)))
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


class _HostBlocks:
    """make_array_from_callback's callback for one leaf: the layers this host's devices
    hold are read once, in the checkpoint's dtype, and each device gets its block of them
    in the target dtype. The host copy lives as long as this object: one leaf's
    make_array_from_callback call."""

    def __init__(self, hf: HFCheckpoint, leaf: Leaf, want):
        self.hf, self.leaf, self.dtype = hf, leaf, want.dtype
        blocks = want.sharding.addressable_devices_indices_map(leaf.shape).values()
        if leaf.per_layer:  # the span of layers any local device holds
            held = [range(leaf.shape[0])[tuple(b)[0] if len(b) else slice(None)] for b in blocks]
            self.layers = slice(min(r.start for r in held if len(r)), max(r.stop for r in held if len(r)))
        else:
            self.layers = slice(None)
        self._host: np.ndarray | None = None

    def __call__(self, index: tuple) -> np.ndarray:
        if self._host is None:
            stored = self.hf.spec(self.leaf.hf_names(0 if self.leaf.per_layer else None)[0]).dtype
            self._host = read_leaf(self.hf, self.leaf, stored, (self.layers,) if self.leaf.per_layer else ())
        index = tuple(index) + (slice(None),) * (len(self.leaf.shape) - len(index))
        if self.leaf.per_layer:  # layer indices relative to the host copy's first layer
            first = self.layers.start
            index = (slice(index[0].start - first if index[0].start is not None else None,
                           index[0].stop - first if index[0].stop is not None else None), *index[1:])
        return np.array(self._host[index], dtype=self.dtype)  # a copy: the device must not alias the host copy
