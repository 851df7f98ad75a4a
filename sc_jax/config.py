"""Typed configs: dataclasses that load from YAML, take `key.sub=value` overrides and
refuse unknown keys (naming the closest valid one).

`ModelConfig` uses the field names of Hugging Face's `StableLmConfig` so that reading
and writing `config.json` is a near-identity map.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any

import ml_dtypes
import numpy as np
import yaml


# The dtype names a config may hold. ml_dtypes' bfloat16 is numpy's and jax's alike, so one
# table serves the model, conversion and generation.
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ConfigError(ValueError):
    """A config problem a user can fix; the message says what to change."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): `error:` lines
    are one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- generic


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Turns YAML/CLI values into the annotated type, recursing into dataclasses."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except (ConfigError, ValueError, TypeError):
                continue
        raise ConfigError(f"{where}: cannot read {value!r} as {typ}")
    if dataclasses.is_dataclass(typ):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {typ.__name__}, got {value!r}")
        return from_dict(typ, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        (item_t, *_rest) = typing.get_args(typ) or (Any,)
        items = [_coerce(v, item_t, f"{where}[]") for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        return str(value)
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Builds dataclass `cls` from a nested dict, refusing unknown keys."""
    types_ = _field_types(cls)
    if hasattr(cls, "expand_dict"):
        data = cls.expand_dict(dict(data or {}))
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in types_:
            raise ConfigError(f"unknown config key '{path}'{_closest(key, types_)}")
        kwargs[key] = _coerce(value, types_[key], path)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def known_only(cls, data: Any) -> Any:
    """`data` (a raw config dict) without the keys dataclass `cls` does not have, recursively: a config
    written by another version of this code reads back with what this version understands."""
    if not isinstance(data, dict):
        return data
    types_ = _field_types(cls)
    out = {}
    for key, value in data.items():
        if key not in types_:
            continue
        typ = types_[key]
        sub = _dataclass_of(typ)
        if typing.get_origin(typ) in (list, tuple):  # a list of sections, e.g. data.sources
            out[key] = [known_only(sub, v) for v in value] if sub and isinstance(value, list) else value
        else:
            out[key] = known_only(sub, value) if sub else value
    return out


def _dataclass_of(typ):
    """The dataclass inside an annotation such as `Foo` or `Foo | None`, else None."""
    if dataclasses.is_dataclass(typ):
        return typ
    for arg in typing.get_args(typ):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _default_value(cls, name: str):
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return None if f.default is dataclasses.MISSING else f.default
    return None


def apply_overrides(data: dict, overrides: list[str], cls) -> dict:
    """Applies `a.b.c=value` strings to a raw config dict, checking every key against
    the dataclass `cls`; values are parsed as YAML scalars."""
    data = dict(data)
    # A preset replaces its whole section, so apply preset overrides before the keys they reset.
    overrides = sorted(overrides, key=lambda o: not o.split("=", 1)[0].endswith(".preset"))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        node, node_cls, keys = data, cls, dotted.split(".")
        for i, key in enumerate(keys):
            fields = _field_types(node_cls) if node_cls else {}
            if node_cls is not None and key not in fields:
                raise ConfigError(f"unknown config key '{'.'.join(keys[: i + 1])}'{_closest(key, fields)}")
            if i == len(keys) - 1:
                if key == "preset":  # the preset's values, not the section's old ones
                    node.clear()
                node[key] = _override_value(item, raw)
                break
            child = node.get(key)
            if child is None and node_cls is not None:  # a section the file leaves out: start from its default
                child = _default_value(node_cls, key)
            child = dict(dataclasses.asdict(child) if dataclasses.is_dataclass(child) else (child or {}))
            node[key] = child
            node, node_cls = child, _dataclass_of(fields[key]) if node_cls else None
    return data


def _override_value(item: str, raw: str):
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)})") from None


def load_yaml(cls, path: str | None, overrides: list[str] = ()):
    data = read_yaml_file(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides), cls))


def read_yaml_file(path: str) -> dict:
    """A config file's top-level mapping; a missing, unreadable or malformed file is a ConfigError
    (YAML mistakes as `file:line:column: what`, the position editors jump to)."""
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"config file '{path}' is a directory: pass a YAML file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}:{_yaml_position(e)} not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level (section: keys), "
                          f"got {type(data).__name__}")
    return data


def _yaml_position(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem, context = getattr(e, "problem", None), getattr(e, "context", None)
    if not problem:
        return str(e).splitlines()[0]
    mark = getattr(e, "context_mark", None)
    if context and mark is not None:
        context += f" from {mark.line + 1}:{mark.column + 1}"
    return f"{problem} ({context})" if context else problem


def dump_yaml(cfg, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass
class ModelConfig:
    """The StableLM / Stable Code architecture, HF `StableLmConfig` field names."""

    vocab_size: int = 50304
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    layer_norm_eps: float = 1e-5
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    # Ours (not in HF): numerics and execution.
    dtype: str = "float32"  # compute dtype: bfloat16 on accelerators
    param_dtype: str = "float32"  # master weights
    attention: str = "auto"  # ATTENTION_PATHS: auto picks the fused kernel of the backend
    remat: str = "none"  # REMAT_POLICIES: what the backward pass keeps instead of recomputing
    scan_layers: bool = True
    max_segments: int = 32  # packed documents per row (the fused attention's static segment count)
    loss_tile: int = 1024  # tokens per cross-entropy tile: the [B,T,V] logits never exist whole (0: untiled)
    preset: str | None = None  # a MODEL_PRESETS name; the other keys override it

    @staticmethod
    def expand_dict(data: dict) -> dict:
        preset = data.get("preset")
        if preset:
            if preset not in MODEL_PRESETS:
                raise ConfigError(f"unknown model preset '{preset}'{_closest(preset, MODEL_PRESETS)}")
            data = {**MODEL_PRESETS[preset], **data}
        return data

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self) -> "ModelConfig":
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "max_segments"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("rope_theta", "layer_norm_eps"):
            if not getattr(self, key) > 0:  # NaN fails too
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"model.partial_rotary_factor must be within (0, 1], got {self.partial_rotary_factor}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dims per head ({self.rotary_dim}) must be even: change partial_rotary_factor")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat '{self.remat}' unknown{_closest(self.remat, REMAT_POLICIES)}")
        if self.attention not in ATTENTION_PATHS:
            raise ConfigError(f"model.attention '{self.attention}' must be one of {', '.join(ATTENTION_PATHS)}")
        if self.loss_tile < 0:
            raise ConfigError(f"model.loss_tile must be 0 (untiled) or a token count, got {self.loss_tile}")
        return self

    def num_params(self, include_embeddings: bool = True) -> int:
        e, m, h, kv, d, L = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                             self.num_key_value_heads, self.head_dim, self.num_hidden_layers)
        attn = e * h * d * 2 + e * kv * d * 2 + (self.use_qkv_bias and (h + 2 * kv) * d or 0)
        attn += self.qk_layernorm and (h + kv) * d or 0
        norms = 2 * e * (1 if self.use_parallel_residual else 2)
        layer = attn + 3 * e * m + norms
        total = L * layer + 2 * e
        if include_embeddings:
            total += self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return total

    # --- Hugging Face config.json ------------------------------------------------------

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["StableLmForCausalLM"],
            "model_type": "stablelm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "use_qkv_bias": self.use_qkv_bias,
            "qk_layernorm": self.qk_layernorm,
            "use_parallel_residual": self.use_parallel_residual,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "bfloat16" if self.param_dtype == "bfloat16" else "float32",
        }

    @classmethod
    def from_hf_dict(cls, hf: dict, **ours) -> "ModelConfig":
        hf = dict(hf)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act '{act}' is not supported (StableLM uses silu)")
        # Older StableLM configs: rope_pct, use_qkv_bias absent, norm_eps.
        if "rope_pct" in hf and "partial_rotary_factor" not in hf:
            hf["partial_rotary_factor"] = hf["rope_pct"]
        if "norm_eps" in hf and "layer_norm_eps" not in hf:
            hf["layer_norm_eps"] = hf["norm_eps"]
        # Newer transformers: a rope_parameters block (rope_type, rope_theta, partial_rotary_factor).
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if isinstance(rope, dict):
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                raise ConfigError(f"rope type '{rope.get('rope_type', rope.get('type'))}' is not supported (only default RoPE)")
            for key in ("rope_theta", "partial_rotary_factor"):
                if key in rope:
                    hf.setdefault(key, rope[key])
        if hf.get("num_key_value_heads") is None:
            hf["num_key_value_heads"] = hf.get("num_attention_heads", cls.num_attention_heads)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        kwargs.update(ours)
        return from_dict(cls, kwargs).validate()


# Fastest and most memory first (MaxText's names); dots and dots_no_batch are JAX's own policies.
REMAT_POLICIES = ("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full", "dots", "dots_no_batch")
ATTENTION_PATHS = ("auto", "reference", "chunked", "cudnn", "splash", "cpu")

MODEL_PRESETS: dict[str, dict] = {
    "stable-code-3b": dict(rope_theta=1_000_000.0, max_position_embeddings=16384),
    "stablelm-3b-4e1t": dict(rope_theta=10_000.0, max_position_embeddings=4096),
    "stablelm-2-1_6b": dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                            num_attention_heads=32, num_key_value_heads=32, rope_theta=10_000.0,
                            max_position_embeddings=4096, use_qkv_bias=True),
    # Small enough for CPU tests; GQA and an odd head_dim exercise the general paths.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rope_theta=10_000.0),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset '{name}'{_closest(name, MODEL_PRESETS)}")
    return from_dict(ModelConfig, {"preset": name, **overrides}).validate()
