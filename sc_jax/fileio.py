"""Outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile

from sc_jax.config import ConfigError


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner_is_gone(owner: str) -> bool:
    """For the `HOST-PID-random` part of a temporary's name: whether it was left by a
    process of this host that no longer runs (killed mid-write)."""
    parts = owner.split("-")
    if len(parts) != 3 or not parts[1].isdigit() or parts[0] != _host():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_stale_temporaries(parent: str, base: str) -> None:
    prefix = f".tmp-{base}-"
    for name in os.listdir(parent):
        if name.startswith(prefix) and _owner_is_gone(name[len(prefix):]):
            path = os.path.join(parent, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


@contextlib.contextmanager
def atomic_directory(out_dir: str):
    """Yields a temporary sibling of `out_dir`, renamed to `out_dir` only when the block
    completes: a crash or bad input leaves nothing half-written behind. A temporary left
    by a process that was killed is removed on the next attempt. The result gets the
    permissions of any new directory (the temporary is created private)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"output directory '{out_dir}' exists and is not empty: choose a new --out")
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, base)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{base}-{_host()}-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_new_file(out_path: str, force: bool = False) -> str:
    """`out_path` made absolute, refused when it names a directory, or a file that exists
    without `force`: checked before any work, and again by `atomic_file`."""
    out_path = os.path.abspath(out_path)
    if os.path.isdir(out_path):
        raise ConfigError(f"output '{out_path}' is a directory: --out names the new file")
    if os.path.exists(out_path) and not force:
        raise ConfigError(f"output file '{out_path}' exists: choose a new --out, or pass --force to replace it")
    return out_path


@contextlib.contextmanager
def atomic_file(out_path: str, force: bool = False):
    """Yields the path of a temporary sibling of `out_path`, renamed to `out_path` only when the
    block completes (replacing an existing file only with `force`): a crash or bad input
    leaves nothing half-written behind, and a replaced file stays whole until then."""
    out_path = check_new_file(out_path, force)
    parent, base = os.path.split(out_path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, base)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{base}-{_host()}-{os.getpid()}-", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        check_new_file(out_path, force)  # nothing took the name meanwhile
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def unused_path(path: str) -> str:
    """`path`, or `path-1`, `path-2`, ... : the first that does not exist (to move something aside)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        candidate, n = f"{path}-{n}", n + 1
    return candidate


def nearest_existing(path: str) -> str:
    """`path` made absolute, or its nearest ancestor that exists (a file or a directory): where a new
    output at `path` would be created, so whether it can be is checked there before any work."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path
