"""The conversions the command runs, HF directory <-> orbax checkpoint and either -> GGUF,
each holding one of our parameters (a stack of one tensor over all layers) at a time."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

from sc_jax.config import DTYPES, ConfigError
from sc_jax.convert.from_hf import open_hf, read_leaf
from sc_jax.convert.layout import Leaf, leaves
from sc_jax.convert.to_gguf import GGUF_TYPES, save_gguf
from sc_jax.convert.to_hf import copy_tokenizer, save_hf
from sc_jax.fileio import atomic_directory, check_new_file
from sc_jax.loading import check_checkpoint_path, find_tokenizer, tokenizer_for
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
    ckpt = _absolute(ckpt)
    checkpoint.first_readable(ckpt, step, lambda d, s: _export_step(d, s, out_dir, dtype, tokenizer),
                              log=lambda msg: print(msg, file=sys.stderr, flush=True), instead="exporting")


def _absolute(ckpt: str) -> str:
    """An existing checkpoint path made absolute (orbax refuses relative ones); a missing one
    as given, so that the error names it as the user spelled it."""
    return os.path.abspath(ckpt) if os.path.exists(ckpt) else ckpt


@contextlib.contextmanager
def _step_reader(directory: str, step: int, what: str, out: str):
    """A ParamReader of one step, its leaves checked against its own config; says what it exports."""
    from sc_jax import checkpoint

    with checkpoint.ParamReader(directory, step) as reader:
        cfg = reader.model_config
        reader.check_shapes({leaf.path: leaf.shape for leaf in leaves(cfg)}, "its own model config")
        print(f"exporting step {step} of {directory} ({cfg.num_params():,} parameters) as {what} to {out} ...",
              flush=True)
        yield reader, cfg


def _export_step(directory: str, step: int, out_dir: str, dtype: str, tokenizer: str | None) -> None:
    t0 = time.time()
    with _step_reader(directory, step, f"{dtype} safetensors", out_dir) as (reader, cfg):
        progress = _Progress(len(leaves(cfg)), t0)

        def read(leaf: Leaf) -> np.ndarray:
            arr = reader.read(leaf.path)
            progress(leaf, arr.dtype)
            return arr

        save_hf(out_dir, cfg, read, dtype=dtype, tokenizer_from=tokenizer)
    print(f"done in {time.time() - t0:.1f}s: {out_dir}" + ("" if tokenizer else " (no tokenizer found to copy)"))


def _check_gguf_args(out_path: str, type_name: str, force: bool) -> None:
    if type_name not in GGUF_TYPES:
        raise ConfigError(f"--type must be one of {', '.join(GGUF_TYPES)}, got '{type_name}'")
    check_new_file(out_path, force)


def _gguf_name(path: str) -> str:
    """general.name: the checkpoint's directory name (a step directory: the one above it)."""
    path = os.path.abspath(path)
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base.isdigit() else base


def hf_to_gguf(hf_dir: str, out_path: str, type_name: str = "f16", tokenizer: str | None = None,
               force: bool = False) -> None:
    """HF directory -> GGUF file, one of our parameters at a time."""
    t0 = time.time()
    _check_gguf_args(out_path, type_name, force)
    cfg, hf = open_hf(hf_dir)
    tok = tokenizer_for(hf_dir, tokenizer)
    print(f"reading {hf_dir}: {cfg.num_params():,} parameters, {cfg.num_hidden_layers} layers; writing {type_name} "
          f"GGUF to {out_path} ...", flush=True)
    save_gguf(out_path, cfg, lambda leaf: read_leaf(hf, leaf, np.float32), tok, type_name, name=_gguf_name(hf_dir),
              force=force, progress=_Progress(len(leaves(cfg)), t0))
    print(f"done in {time.time() - t0:.1f}s: {out_path}")


def orbax_to_gguf(ckpt: str, out_path: str, step: int | None = None, type_name: str = "f16",
                  tokenizer: str | None = None, force: bool = False) -> None:
    """orbax checkpoint -> GGUF file, restoring one of our parameters at a time. When no step
    is named and the newest cannot be read, the one before it is exported."""
    from sc_jax import checkpoint

    _check_gguf_args(out_path, type_name, force)
    check_checkpoint_path(ckpt, "--ckpt")
    ckpt = _absolute(ckpt)
    tok = tokenizer_for(ckpt, tokenizer)
    checkpoint.first_readable(ckpt, step, lambda d, s: _gguf_step(d, s, out_path, type_name, tok, force, ckpt),
                              log=lambda msg: print(msg, file=sys.stderr, flush=True), instead="exporting")


def _gguf_step(directory: str, step: int, out_path: str, type_name: str, tok, force: bool, ckpt: str) -> None:
    t0 = time.time()
    with _step_reader(directory, step, f"{type_name} GGUF", out_path) as (reader, cfg):
        save_gguf(out_path, cfg, lambda leaf: reader.read(leaf.path), tok, type_name, name=_gguf_name(ckpt),
                  force=force, progress=_Progress(len(leaves(cfg)), t0))
    print(f"done in {time.time() - t0:.1f}s: {out_path}")
