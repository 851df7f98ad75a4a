"""What the data commands (`sc_jax.tokenizer`, `sc_jax.data.inspect`, `sc_jax.data.tfds_builder`)
share: a usage mistake is one `error:` line and exit 2, every option's help shows its default,
numbers are checked when they are parsed, and outputs appear whole or not at all."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends each option's help with its default (unless
    the help already names it: defaults computed at run time are described in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes as one `error:` line (argparse's own is `prog: error:`
    after the usage) and exit code 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def whole_number(low: int, why_low: str = ""):
    """An argparse type: an int >= low (`why_low`, when given, explains the bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: {why_low}" if why_low
                                             else f"{value} must be at least {low}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a float in [0, 1) (a share of the data held out: all of it leaves nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be within [0, 1)")
    return value


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def nearest_existing_dir(path: str) -> str:
    """`path` or its nearest ancestor that exists (where a temporary sibling can be made)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


@contextlib.contextmanager
def scratch_dir(near: str, prefix: str):
    """A temporary directory on the same file system as `near` (so os.replace can move results
    into place), removed on the way out whatever happens."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=nearest_existing_dir(near))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
