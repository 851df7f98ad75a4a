"""`python -m sc_jax.eval`: help, one-line errors, and the full generate -> execute -> report
path with a fake `sc_jax.generate` (no model)."""

import json
import os
import subprocess
import sys
import types

import pytest

from sc_jax.eval import fim
from sc_jax.eval import humaneval as he
from sc_jax.eval.__main__ import main


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sc_jax.eval", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_help():
    res = _cli("--help")
    assert res.returncode == 0
    for cmd in ("humaneval", "multipl-e", "fim", "check-canonical"):
        assert cmd in res.stdout
    sub = _cli("humaneval", "--help")
    assert sub.returncode == 0 and "--temperature" in sub.stdout and "--workers" in sub.stdout


COMMANDS = ("humaneval", "multipl-e", "fim", "check-canonical", "score", "sql")


def _options(parser):
    """(option, help text as --help renders it) for every option of `parser` but -h."""
    formatter = parser._get_formatter()
    return [(a.option_strings[-1], formatter._get_help_string(a) % vars(a))
            for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_that_shows_its_default(command):
    """`--help` of each subcommand: every option explained, with its default (or 'required')."""
    from sc_jax.eval.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    options = _options(sub)
    assert len(options) >= 8
    missing = [opt for opt, text in options if not text.strip() or ("(default" not in text and "(required)" not in text)]
    assert missing == [], f"{command}: options without help or default: {missing}"
    res = subprocess.run([sys.executable, "-m", "sc_jax.eval", command, "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "400"})  # no line breaks inside words
    assert res.returncode == 0, res.stderr
    shown = " ".join(res.stdout.split())
    for opt, text in options:
        assert opt in shown and " ".join(text.split()) in shown, (opt, text)


class _OracleGenerator:
    """What `load_generator` returns, answering with canonical solutions / masked lines."""

    def __init__(self):
        probs = he.load_humaneval()
        self._complete = he.oracle_complete_fn(probs)
        tasks = [t for m in fim.MODES for t in fim.build_fim_tasks(probs, mode=m)]
        self._infill = fim.oracle_infill_fn(tasks)
        self.calls = []

    def complete(self, prompts, *, max_new_tokens, temperature, top_p, top_k, stop, seed):
        self.calls.append(("complete", len(prompts), max_new_tokens, temperature, top_p, top_k, seed))
        return self._complete(prompts)

    def infill(self, prefixes, suffixes, *, max_new_tokens, temperature, top_p, top_k, seed):
        self.calls.append(("infill", len(prefixes), max_new_tokens, temperature, top_p, top_k, seed))
        return self._infill(prefixes, suffixes)


@pytest.fixture
def fake_generate(monkeypatch):
    gen = _OracleGenerator()
    loaded = []

    def load_generator(path, **kw):
        loaded.append(path)
        return gen

    mod = types.ModuleType("sc_jax.generate")
    mod.load_generator = load_generator
    monkeypatch.setitem(sys.modules, "sc_jax.generate", mod)
    return gen, loaded


def test_humaneval_command_end_to_end(fake_generate, tmp_path, capsys):
    gen, loaded = fake_generate
    out = tmp_path / "out"
    rc = main(["humaneval", "--ckpt", str(tmp_path), "--n", "2", "--temperature", "0.2", "--top-p", "0.95",
               "--max-new-tokens", "64", "--limit", "5", "--out", str(out), "--workers", "2", "--no-progress"])
    assert rc == 0 and loaded == [str(tmp_path)]
    assert gen.calls == [("complete", 10, 64, 0.2, 0.95, 0, 0)]
    printed = capsys.readouterr().out
    assert "| humaneval | python | 5 | 2 | 100.00 |" in printed and "wrote " in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["pass@1"] == 1.0 and summary["meta"]["n"] == 2
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 10 and {r["sample"] for r in recs} == {0, 1} and all(r["passed"] for r in recs)


def test_fim_command_end_to_end(fake_generate, tmp_path, capsys):
    gen, _ = fake_generate
    rc = main(["fim", "--ckpt", str(tmp_path), "--mode", "span", "--limit", "6", "--out", str(tmp_path / "f"),
               "--workers", "2", "--no-progress"])
    assert rc == 0 and gen.calls == [("infill", 6, 128, 0.0, 1.0, 0, 0)]
    assert "| fim-span | python | 6 | 1 | 100.00 | 100.00 |" in capsys.readouterr().out
