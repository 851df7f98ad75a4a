"""What every `python -m sc_jax.X` command line shares: a usage mistake is one `error:` line and
exit code 2, every option's help shows its default, and numbers are checked when they are parsed.

    parser = Parser(prog="python -m sc_jax.NAME", description=__doc__)
    parser.add_argument("--batch-size", type=whole_number(1), default=4, help="rows per batch")
    ...
    except OSError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)

Entry points (`__main__.py` and command-only modules) import this; library modules do not
(tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sc_jax.config import first_line  # noqa: F401  (re-exported for the commands)


class HelpFormatter(argparse.HelpFormatter):
    """Ends each option's help with its default (unless the help already gives it in words: a
    default computed at run time), and keeps the line breaks of a description laid out by hand."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:  # examples and lists: their lines stay as written
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text.lower():
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one `error:` line naming the fix and exit code 2
    (argparse's own is the usage, then `prog: error:`). Subcommands' parsers are Parsers too."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- number types
# Two wordings, each pinned by the bad-input tests of the commands that use it: the value first
# ("0 must be at least 1": the data commands and the tokenizer) and the bound first ("must be >= 1,
# got 0": eval). New commands: either, but one per command.


def _parse(text: str, cast: Callable, not_a_number: str):
    """`cast(text)`, or an ArgumentTypeError saying `not_a_number`."""
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(not_a_number) from None


def whole_number(low: int, why_low: str = "") -> Callable[[str], int]:
    """An argparse type: an int >= low (`why_low`, when given, explains the bound)."""

    def parse(text: str) -> int:
        value = _parse(text, int, f"'{text}' is not a whole number")
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: {why_low}" if why_low
                                             else f"{value} must be at least {low}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a float in [0, 1) (a share of the data held out: all of it leaves nothing)."""
    value = _parse(text, float, f"'{text}' is not a number")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be within [0, 1)")
    return value


def bounded(cast: type, low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: `cast` (int or float) of the text, >= low (> low with `low_open`) and
    <= high when given."""
    bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    what = f"an integer {bounds}" if cast is int else "a number"

    def parse(text: str):
        value = _parse(text, cast, f"must be {what}, got {text!r}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


# ----------------------------------------------------------------------------- error lines and paths


# first_line (the one line of an exception an `error:` line shows) is defined with ConfigError,
# where library modules can reach it too; the commands import it from here.




def exit_code_of(run: Callable[[], int]) -> int:
    """A command's body run for its exit code: a ConfigError or OSError (the user's input, a file
    that cannot be read or written) is one `error:` line and 2, Ctrl-C is 130."""
    from sc_jax.config import ConfigError  # here: `--help` of every command stays light

    try:
        return run()
    except (ConfigError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
