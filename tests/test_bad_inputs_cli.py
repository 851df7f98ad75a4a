"""Bad input to `python -m sc_jax.plan`, `python -m sc_jax.generate` and `python -m sc_jax`:
one `error:` line naming the problem and the fix, exit code 2, no traceback, nothing left
behind (see tests/cli_harness.py). Plus: `python -m sc_jax` lists every command, and the
--help of plan and generate shows every option's default."""

import argparse
import ast
import os
import subprocess
import sys

import pytest
from cli_harness import REPO, BadInput, run_bad_input

CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
        "class Foo:\n    def __init__(self):\n        self.x = 1\n"] * 20
MODEL: dict[str, str] = {}  # "dir": the tiny HF model directory, built once by the `model_dir` fixture


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with its tokenizer, written as a Hugging Face directory (numpy
    weights of the model's shapes: no initialiser to compile)."""
    import jax
    import numpy as np
    from flax import nnx

    from sc_jax import model as M
    from sc_jax.config import model_preset
    from sc_jax.convert import save_hf
    from sc_jax.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("cli_model")
    tok = str(root / "tokenizer.json")
    train_tokenizer(CODE, vocab_size=300).backend.save(tok)
    cfg = model_preset("tiny", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       max_position_embeddings=128)
    rng = np.random.default_rng(0)
    shapes = nnx.split(M.abstract_model(cfg))[1].to_pure_dict()
    params = jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32), shapes)
    save_hf(str(root / "hf"), cfg, params, dtype="float32", tokenizer_from=tok)
    MODEL["dir"] = str(root / "hf")
    return MODEL["dir"]


def link_model(d):
    """The tiny model as ./model (a link: nothing copied)."""
    os.symlink(MODEL["dir"], os.path.join(d, "model"))


def bare_model(d):
    """./model: the model's weights and config without any tokenizer."""
    os.makedirs(os.path.join(d, "model"))
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(MODEL["dir"], name), os.path.join(d, "model", name))


def garbage_tokenizer(d):
    link_model(d)
    with open(os.path.join(d, "tok.json"), "w") as f:
        f.write("{not json")


def plan(name, argv, needles, **kw):
    return BadInput(f"plan-{name}", "sc_jax.plan", ["--devices", "1", *argv, "model.preset=tiny"], needles,
                    timeout=120, **kw)


def generate(name, argv, needles, setup=link_model):
    return BadInput(f"generate-{name}", "sc_jax.generate", ["--ckpt", "model", *argv], needles, setup=setup,
                    timeout=120)


ROWS = [
    # plan: every option is checked before the re-run with N fake devices and the compile.
    plan("negative-memory", ["--device-memory", "-1"], ("--device-memory", "positive", "--device-memory 80")),
    plan("memory-not-a-number", ["--device-memory", "lots"], ("--device-memory", "invalid float", "--help")),
    plan("mfu-over-1", ["--device-memory", "80", "--mfu", "4"], ("--mfu", "(0, 1]", "--mfu 0.4")),
    plan("unknown-kind", ["--device-memory", "80", "--device-kind", "a1000"],
         ("--device-kind 'a1000'", "did you mean 'a100'", "known:", "h100", "v5p")),
    plan("no-devices", ["--device-memory", "80", "--devices", "0"], ("--devices", "at least 1")),
    plan("missing-config", ["--device-memory", "80", "--config", "nope.yaml"], ("--config 'nope.yaml'", "not a file")),
    plan("bad-override", ["--device-memory", "80", "model.remat=sometimes"], ("model.remat", "sometimes")),
    # generate: options by their flag names, with the fix, before the model loads.
    generate("empty-prompt", ["--prompt", ""], ("--prompt", "empty", "--prompt -")),
    generate("empty-fim", ["--prefix", "", "--suffix", ""], ("--prefix", "--suffix", "empty")),
    generate("zero-new-tokens", ["--prompt", "x", "--max-new-tokens", "0"], ("--max-new-tokens", "at least 1", "128")),
    generate("negative-temperature", ["--prompt", "x", "--temperature", "-1"], ("--temperature", ">= 0", "greedy")),
    generate("top-p-zero", ["--prompt", "x", "--top-p", "0"], ("--top-p", "(0, 1]", "--top-p 0.95")),
    generate("top-p-over-1", ["--prompt", "x", "--top-p", "1.5"], ("--top-p", "1.5")),
    generate("negative-top-k", ["--prompt", "x", "--top-k", "-1"], ("--top-k", "0 or more", "--top-k 50")),
    generate("negative-seed", ["--prompt", "x", "--seed", "-1"], ("--seed", "[0, 2**32)")),
    generate("unknown-dtype", ["--prompt", "x", "--dtype", "int3"], ("--dtype", "'int3'", "int8", "bfloat16")),
    generate("missing-ckpt", ["--prompt", "x"], ("--ckpt 'model'", "does not exist", "hugging face model directory"),
             setup=None),
    generate("ckpt-is-a-file", ["--prompt", "x"], ("is a file", "hugging face model directory"),
             setup=lambda d: open(os.path.join(d, "model"), "w").close()),
    generate("missing-tokenizer", ["--prompt", "x", "--tokenizer", "nope.json"],
             ("--tokenizer 'nope.json'", "does not exist", "tokenizer.json")),
    generate("no-tokenizer-beside-ckpt", ["--prompt", "x"], ("no tokenizer", "--tokenizer"), setup=bare_model),
    generate("garbage-tokenizer", ["--prompt", "x", "--tokenizer", "tok.json"], ("cannot read tokenizer", "tok.json"),
             setup=garbage_tokenizer),
    BadInput("sc_jax-unknown-command", "sc_jax", ["genrate", "--prompt", "x"],
             ("'genrate' is not a command", "did you mean 'generate'", "python -m sc_jax")),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input(row, tmp_path, request):
    if row.module == "sc_jax.generate":
        request.getfixturevalue("model_dir")
    run_bad_input(row, str(tmp_path))


def entry_points() -> set[str]:
    """Every public `python -m sc_jax.X`: modules with an `if __name__ == "__main__"` block,
    and packages with a __main__.py (private `_x` modules are internal)."""
    found = set()
    pkg = os.path.join(REPO, "sc_jax")
    for d, _, names in os.walk(pkg):
        for name in names:
            if not name.endswith(".py") or name.startswith("_") and name != "__main__.py":
                continue
            path = os.path.join(d, name)
            tree = ast.parse(open(path).read())
            if name == "__main__.py" or any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)
                                            for n in tree.body):
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__main__")
                found.add(module)
    return found - {"sc_jax"}


def test_python_m_sc_jax_lists_every_command():
    from sc_jax.__main__ import COMMANDS

    assert {f"sc_jax.{name}" for name in COMMANDS} == entry_points()
    res = subprocess.run([sys.executable, "-m", "sc_jax"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stderr == ""
    for name, what in COMMANDS.items():
        assert any(line.split() and line.split()[0] == name and what in line for line in res.stdout.splitlines()), name
    ran = subprocess.run([sys.executable, "-m", "sc_jax", "plan", "--help"], capture_output=True, text=True, cwd=REPO)
    assert ran.returncode == 0 and "--device-memory" in ran.stdout  # `python -m sc_jax NAME` runs the command


@pytest.mark.parametrize("module", ["sc_jax.plan.__main__", "sc_jax.generate.__main__"])
def test_help_shows_every_option_and_default(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.dest} has no help"
        if action.default is not None:
            shown = "off" if action.default is False else "none" if action.default == [] else action.default
            assert f"(default: {shown}" in text, f"{action.dest}: its default {action.default!r} is not shown"
