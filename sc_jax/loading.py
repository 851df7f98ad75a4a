"""The one way to load what a checkpoint path names: parameters from a Hugging Face
directory, an orbax checkpoint (or one of its steps) or a training run directory, and the
tokenizer that travels with any of them.

    cfg, params = load_params("runs/my-run")                     # numpy-backed, default device
    cfg, params = load_params("hf/stable-code-3b", target=tree)  # straight onto shardings
    tok = load_tokenizer(find_tokenizer("runs/my-run/checkpoints/700"))
"""

from __future__ import annotations

import os
from typing import Any

from sc_jax.config import ConfigError, ModelConfig
from sc_jax.hf_io import CONFIG_NAME

TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS = "checkpoints"  # RUN/checkpoints: a training run's orbax directory
WHAT = "a Hugging Face model directory, an orbax checkpoint (or a step in it) or a training run directory"


def is_hf_directory(path: str) -> bool:
    """A HF model directory (config.json beside the weights), rather than an orbax checkpoint."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def check_checkpoint_path(path: str, flag: str = "checkpoint path") -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{flag} '{path}' does not exist: pass {WHAT}")
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} '{path}' is a file: pass {WHAT}")


def load_params(path: str, *, target: Any = None, dtype=None, step: int | None = None,
                log=print) -> tuple[ModelConfig, Any]:
    """(ModelConfig, parameters) from any checkpoint path.

    target: a tree of ShapeDtypeStructs with shardings: each leaf is placed straight onto
    them (each host reads only its blocks), in the target's dtype. Without it, a HF
    directory gives numpy arrays in `dtype` (default float32) and an orbax checkpoint jax
    arrays on the default device in their stored dtype. step: an orbax step (default: the
    newest that reads back; an unreadable newest one is reported through `log`)."""
    import numpy as np

    from sc_jax import checkpoint
    from sc_jax.convert import hf_params_onto, load_hf

    check_checkpoint_path(path)
    if is_hf_directory(path):
        if step is not None:
            raise ConfigError(f"'{path}' is a Hugging Face directory: it has no steps (drop the step)")
        return hf_params_onto(path, target) if target is not None else load_hf(path, dtype or np.float32)
    cfg, params, _ = checkpoint.load_params(path, step, target=target, log=log)
    return cfg, params


def find_tokenizer(path: str) -> str | None:
    """The tokenizer that travels with a checkpoint, by the layouts we write and read: a HF
    directory's tokenizer.json, a conversion's CKPT/tokenizer/, a run's RUN/tokenizer.json,
    and for RUN/checkpoints or one of its steps (or a step of CKPT) the same beside it.
    Nothing further up: an unrelated tokenizer there would be taken silently."""
    path = os.path.abspath(path)
    bases = [path]
    if os.path.basename(path).isdigit():  # a step directory: CKPT/N or RUN/checkpoints/N
        path = os.path.dirname(path)
        bases.append(path)
    if os.path.basename(path) == CHECKPOINTS:  # RUN/checkpoints
        bases.append(os.path.dirname(path))
    for base in bases:
        for candidate in (os.path.join(base, TOKENIZER_FILE), os.path.join(base, "tokenizer")):
            if os.path.isfile(candidate) or os.path.isfile(os.path.join(candidate, TOKENIZER_FILE)):
                return candidate
    return None


def load_tokenizer(path: str, aliases: dict[str, str] | None = None):
    """A Tokenizer from a tokenizer.json or a directory holding one (`aliases`: other
    spellings of the special tokens, as `data.special_tokens`)."""
    from sc_jax.tokenizer import Tokenizer

    return Tokenizer.from_file(path, aliases=aliases)


def tokenizer_for(path: str, tokenizer: str | None = None, aliases: dict[str, str] | None = None):
    """The tokenizer to use with checkpoint `path`: `tokenizer` when given, else the one
    beside the checkpoint."""
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConfigError(f"tokenizer '{tokenizer}' does not exist: pass a tokenizer.json or a directory holding one")
    found = tokenizer or find_tokenizer(path)
    if found is None:
        raise ConfigError(f"no tokenizer found for '{path}' (no tokenizer.json or tokenizer/ beside it): "
                          "pass --tokenizer PATH (tokenizer= in Python)")
    return load_tokenizer(found, aliases)
