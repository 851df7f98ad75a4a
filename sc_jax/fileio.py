"""Outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from sc_jax.config import ConfigError


@contextlib.contextmanager
def atomic_directory(out_dir: str):
    """Yields a temporary sibling of `out_dir`, renamed to `out_dir` only when the block
    completes: a crash or bad input leaves nothing half-written behind."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"output directory '{out_dir}' exists and is not empty: choose a new --out")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
