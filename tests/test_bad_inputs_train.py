"""Bad input to `python -m sc_jax.train` and `python -m sc_jax.sweep`: one `error:` line, exit 2,
no traceback, and nothing left behind: a failed start creates no run directory (and leaves an
existing one as it was)."""

from __future__ import annotations

import functools
import os
import shutil
import sysconfig
import tempfile

import pytest
import yaml

from cli_harness import BadInput, run_bad_input

TINY = ["model.preset=tiny", "train.data=synthetic", "train.seq_len=32", "train.steps=2", "train.run_dir=run",
        "logging.tensorboard=false"]
PIPELINE = ["model.preset=tiny", "model.vocab_size=512", "train.seq_len=32", "train.steps=2", "train.run_dir=run",
            "data.tokenizer=tok.json"]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """A small real tokenizer (trained once per session on one stdlib package)."""
    from sc_jax.tokenizer import iter_corpus_texts, train_tokenizer

    texts = list(iter_corpus_texts(os.path.join(sysconfig.get_paths()["stdlib"], "json")))
    path = os.path.join(tempfile.mkdtemp(prefix="sc_jax_bad_inputs_"), "tok.json")
    train_tokenizer(texts, 300).backend.save(path)
    return path


def with_tokenizer(d):
    shutil.copy(_tokenizer_json(), os.path.join(d, "tok.json"))


def write(name, text):
    def setup(d):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return setup


def old_run(d):
    """A run directory trained at hidden_size 64 (its config.yaml: all a refusal needs to read)."""
    from sc_jax.config import to_dict
    from sc_jax.train import load_config

    os.makedirs(os.path.join(d, "run"))
    with open(os.path.join(d, "run", "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(load_config(None, TINY)), f, sort_keys=False)


def train(name, argv, needles, **kw):
    return BadInput(name, "sc_jax.train", argv, needles, leaves=kw.pop("leaves", ("run",)), **kw)


def sweep(name, argv, needles, **kw):
    return BadInput(name, "sc_jax.sweep", ["--steps", "2", "--out", "out", *argv], needles, leaves=("out",), **kw)


ROWS = [
    train("steps negative", [*TINY, "train.steps=-5"], ("train.steps", "at least 1", "-5")),
    train("steps zero", [*TINY, "train.steps=0"], ("train.steps", "at least 1")),
    train("batch zero", [*TINY, "train.global_batch_size=0"], ("train.global_batch_size", "at least 1")),
    train("config is a directory", ["--config", ".", *TINY], ("is a directory",)),
    train("config missing", ["--config", "nope.yaml", *TINY], ("nope.yaml", "does not exist")),
    train("yaml syntax error", ["--config", "bad.yaml", *TINY], ("bad.yaml:3:8:", "not valid yaml", "mapping values"),
          setup=write("bad.yaml", "train:\n  steps: 3\n   seed: 1\n")),
    train("override value is not yaml", [*TINY, "train.seed=[1"], ("train.seed=[1", "not valid yaml")),
    train("unknown key", [*TINY, "train.stepz=3"], ("train.stepz", "did you mean 'steps'")),
    train("negative learning rate", [*TINY, "optimizer.peak_lr=-1"], ("optimizer.peak_lr", "at least 0")),
    train("floor above peak", [*TINY, "optimizer.min_lr=0.1"], ("optimizer.min_lr", "peak_lr")),
    train("warmup longer than the run", [*TINY, "optimizer.warmup_steps=10"],
          ("optimizer.warmup_steps", "train.steps")),
    train("dpo without a reference", [*TINY, "train.task=dpo"], ("train.init_from",)),
    train("bad option value", [*TINY, "--num-processes", "two"], ("--num-processes", "invalid int")),
    train("run_dir is a file", [*TINY[:-2], "train.run_dir=taken"], ("train.run_dir", "is a file"),
          setup=write("taken", "x"), leaves=()),
    # Failed starts: each used to leave a run directory with config.yaml, checkpoints/ and tb/.
    train("mesh does not divide the devices", [*TINY, "mesh.tensor=3"], ("do not divide",)),
    train("batch not divisible over devices", [*TINY, "train.global_batch_size=3"], ("cannot be split", "2 devices"),
          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
    train("tokenizer missing", [*PIPELINE, "data.tokenizer=missing.json"], ("missing.json", "does not exist")),
    train("data missing", [*PIPELINE, "data.sources=[{kind: dir, path: nowhere}]"], ("nowhere", "does not exist"),
          setup=with_tokenizer),
    train("resume with another model", [*TINY, "model.hidden_size=128"],
          ("model.hidden_size 64 -> 128", "--restart", "train.run_dir"), setup=old_run, leaves=()),
    sweep("grid without values", ["--grid", "optimizer.peak_lr", *TINY[:2]], ("not of the form",)),
    sweep("grid with an empty value", ["--grid", "optimizer.peak_lr=", *TINY[:2]], ("not of the form",)),
    sweep("grid unknown key", ["--grid", "optimizer.peak_rl=1,2", *TINY[:2]], ("did you mean 'peak_lr'",)),
    sweep("grid bad value", ["--grid", "optimizer.peak_lr=1e-3,-1", *TINY[:3]],
          ("optimizer.peak_lr", "at least 0", "(point peak_lr--1)")),
    sweep("sweep steps zero", ["--steps", "0", *TINY[:2]], ("--steps", "at least 1")),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input_is_one_error_line_and_leaves_nothing(row, tmp_path):
    run_bad_input(row, str(tmp_path))
