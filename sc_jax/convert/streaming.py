"""The two conversions the command runs, HF directory <-> orbax checkpoint, each holding
one of our parameters (a stack of one tensor over all layers) at a time."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from sc_jax.config import DTYPES, ConfigError
from sc_jax.convert.from_hf import open_hf, read_leaf
from sc_jax.convert.layout import Leaf, leaves
from sc_jax.convert.to_hf import copy_tokenizer, save_hf
from sc_jax.fileio import atomic_directory
from sc_jax.loading import find_tokenizer
from sc_jax.pytree import set_path


class _Progress:
    """One line per parameter on long conversions: which, its size, elapsed time."""

    def __init__(self, total: int, t0: float):
        self.total, self.done, self.t0 = total, 0, t0

    def __call__(self, leaf: Leaf, dtype) -> None:
        self.done += 1
        print(f"  [{self.done}/{self.total}] {leaf.path} {list(leaf.shape)} {np.dtype(dtype).name} "
              f"({time.time() - self.t0:.1f}s)", flush=True)


def _orbax_dtype(requested: str, leaf_dtype) -> np.dtype:
    return np.dtype(leaf_dtype) if requested == "source" else np.dtype(DTYPES[requested])


def hf_to_orbax(hf_dir: str, out_dir: str, dtype: str = "source") -> None:
    """HF directory -> orbax checkpoint, one of our parameters at a time."""
    from sc_jax import checkpoint

    t0 = time.time()
    if dtype != "source" and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be source or one of {sorted(DTYPES)}, got '{dtype}'")
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

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConfigError(f"tokenizer '{tokenizer}' does not exist: pass a tokenizer.json or a directory holding one")
    tokenizer = tokenizer or find_tokenizer(ckpt)
    checkpoint.first_readable(ckpt, step, lambda d, s: _export_step(d, s, out_dir, dtype, tokenizer),
                              log=lambda msg: print(msg, file=sys.stderr, flush=True), instead="exporting")


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
