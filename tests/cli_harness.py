"""Shared checks for the table-driven bad-input tests (tests/test_bad_inputs_*.py).

A bad input must give: exit code 2, exactly one `error:` line on stderr that contains the
expected words (the problem and the fix), no traceback anywhere, and nothing new left in
the working directory except what the row's setup made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class BadInput:
    """One row: `python -m MODULE *argv` run in a fresh directory after `setup(dir)`."""

    name: str
    module: str
    argv: list[str]
    needles: tuple[str, ...]  # words the error line must contain (lower-cased match)
    setup: Callable[[str], None] | None = None
    leaves: tuple[str, ...] = ()  # paths (relative) that must not exist afterwards
    env: dict = field(default_factory=dict)
    timeout: int = 300

    def __str__(self):
        return self.name


def snapshot(root: str) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def run_bad_input(row: BadInput, workdir: str) -> subprocess.CompletedProcess:
    """Runs one row and asserts the clean-failure contract."""
    if row.setup:
        row.setup(workdir)
    before = snapshot(workdir)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    env.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **row.env)
    res = subprocess.run([sys.executable, "-m", row.module, *row.argv], cwd=workdir, env=env, capture_output=True,
                         text=True, timeout=row.timeout)
    assert_clean_failure(res, row.needles)
    after = snapshot(workdir)
    assert after - before == set(), f"{row.name}: left behind {sorted(after - before)}"
    for path in row.leaves:
        assert not os.path.exists(os.path.join(workdir, path)), f"{row.name}: {path} exists"
    return res


def assert_clean_failure(res: subprocess.CompletedProcess, needles=()) -> str:
    both = res.stdout + res.stderr
    assert res.returncode == 2, f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    assert "Traceback" not in both, both[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"want one error: line, got {errors}\nstderr:\n{res.stderr[-3000:]}"
    line = errors[0].lower()
    for needle in needles:
        assert needle.lower() in line, f"'{needle}' not in: {errors[0]}"
    return errors[0]
