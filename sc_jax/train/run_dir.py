"""The run directory: checked before anything is written, then created (or updated) with the
resolved config.yaml and the run's tokenizer.json; --restart moves an old one aside."""

from __future__ import annotations

import os
import time

from sc_jax.config import ConfigError, dump_yaml
from sc_jax.fileio import nearest_existing, unused_path
from sc_jax.multihost import sync


def checked_run_dir(path: str) -> str:
    """The absolute run directory, refused when it is a file or cannot be created."""
    run_dir = os.path.abspath(path)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"train.run_dir '{path}' is a file: point it at a directory")
    parent = nearest_existing(run_dir)
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"train.run_dir '{path}': cannot write in {parent}")
    return run_dir


def saved_run_config(run_dir: str) -> dict | None:
    """config.yaml of a run directory as a raw dict (None: there is none)."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None  # unreadable: the checkpoints' own copies still guard a resume
    return data if isinstance(data, dict) else None


def open_tokenizer(cfg):
    """(Tokenizer, its tokenizer.json bytes for the run directory) for pipeline data, else (None, None).
    The run's one tokenizer: every iterator it builds is handed this one."""
    if cfg.train.data != "pipeline":
        return None, None
    from sc_jax.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer, aliases=cfg.data.special_tokens)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}: raise model.vocab_size")
    with open(tokenizer.path, "rb") as f:  # read now: --restart may move it aside
        return tokenizer, f.read()


def write_run_dir(run_dir: str, cfg, tokenizer_json: bytes | None, restart: bool, process_index: int, log) -> None:
    """Creates or updates the run directory (process 0; the others wait for it)."""
    if process_index == 0:
        if restart and os.path.isdir(run_dir) and os.listdir(run_dir):
            aside = unused_path(f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(run_dir, aside)
            log(f"--restart: moved the previous run to {aside}")
        os.makedirs(run_dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))
        tokenizer_path = os.path.join(run_dir, "tokenizer.json")
        if tokenizer_json is not None and not os.path.exists(tokenizer_path):
            with open(tokenizer_path + ".tmp", "wb") as f:
                f.write(tokenizer_json)
            os.replace(tokenizer_path + ".tmp", tokenizer_path)
    sync("sc_jax:run_dir")
    os.makedirs(run_dir, exist_ok=True)
