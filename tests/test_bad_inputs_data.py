"""Bad input to the data commands (`sc_jax.tokenizer train`, `sc_jax.data.inspect`,
`sc_jax.data.tfds_builder`): one `error:` line naming the problem and the fix, exit code 2, no
traceback, nothing left behind (see tests/cli_harness.py)."""

import os
import re

import pytest
from cli_harness import REPO, BadInput, run_bad_input

from sc_jax.tokenizer import train_tokenizer

CODE = "def add(x, y):\n    return x + y\n\n\nclass Box:\n    def __init__(self, v):\n        self.v = v\n"


def _write(path, data: bytes | str = CODE):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def corpus(d):
    """d/corpus: two small repositories."""
    _write(os.path.join(d, "corpus", "one", "a.py"))
    _write(os.path.join(d, "corpus", "two", "b.py"), CODE.replace("add", "sub"))


def corpus_and_tokenizer(d):
    corpus(d)
    train_tokenizer([CODE] * 4, 300).backend.save(os.path.join(d, "tok.json"))


def inspect_config(d, data: str = "", train: str = "  seq_len: 64\n"):
    """d/cfg.yaml: a training YAML over d/corpus with d/tok.json (plus `data` lines)."""
    with open(os.path.join(d, "cfg.yaml"), "w") as f:
        f.write("data:\n  tokenizer: tok.json\n  sources:\n    - {kind: dir, path: corpus}\n" + data
                + "train:\n" + train)


def with_config(**kw):
    def setup(d):
        corpus_and_tokenizer(d)
        inspect_config(d, **kw)
    return setup


def empty_dir(d):
    os.makedirs(os.path.join(d, "empty"))


def all_bad(d):
    _write(os.path.join(d, "bad", "r", "x.py"), b"\x00\x01\x02")  # binary
    _write(os.path.join(d, "bad", "r", "y.py"), b"x = '\xff\xfe'\n")  # not UTF-8


def built_dataset(d):
    """d/tfds holds a dataset built from d/corpus/one; d/corpus/two is another source."""
    from sc_jax.data import DataConfig, SourceConfig
    from sc_jax.data.tfds_builder import build

    corpus(d)
    src = [SourceConfig(kind="dir", path=os.path.join(d, "corpus", "one"))]
    build(src, os.path.join(d, "tfds"), data_config=DataConfig(sources=src), quiet=True)


TOK = "sc_jax.tokenizer"
INSPECT = "sc_jax.data.inspect"
TFDS = "sc_jax.data.tfds_builder"

ROWS = [
    # sc_jax.tokenizer train
    BadInput("tokenizer: missing corpus", TOK, ["train", "--corpus", "nope", "--vocab-size", "300", "--out", "t.json"],
             ("--corpus 'nope' does not exist", "directory of source code"), leaves=("t.json",)),
    BadInput("tokenizer: vocab size 0", TOK, ["train", "--corpus", "corpus", "--vocab-size", "0", "--out", "t.json"],
             ("--vocab-size", "too small", "at least 265"), setup=corpus, leaves=("t.json",)),
    BadInput("tokenizer: negative vocab size", TOK,
             ["train", "--corpus", "corpus", "--vocab-size", "-5", "--out", "t.json"],
             ("--vocab-size", "-5 is too small", "at least 265"), setup=corpus),
    BadInput("tokenizer: --out is a directory", TOK, ["train", "--corpus", "corpus", "--vocab-size", "300", "--out",
                                                      "corpus", "--quiet"],
             ("--out 'corpus' is a directory", "tokenizer.json"), setup=corpus),
    BadInput("tokenizer: no usable files", TOK, ["train", "--corpus", "empty", "--vocab-size", "300", "--out",
                                                 "out/t.json", "--quiet"],
             ("no usable code files", "--corpus"), setup=empty_dir, leaves=("out",)),
    BadInput("tokenizer: unknown language", TOK, ["train", "--corpus", "corpus", "--vocab-size", "300", "--out",
                                                  "t.json", "--languages", "pythn"],
             ("--languages", "unknown language 'pythn'", "did you mean 'python'"), setup=corpus),
    # sc_jax.data.inspect
    BadInput("inspect: tokenizer file missing", INSPECT, ["--config", "cfg.yaml"],
             ("tokenizer file", "does not exist", "set data.tokenizer", "sc_jax.tokenizer train"),
             setup=lambda d: (corpus(d), inspect_config(d))),
    BadInput("inspect: fim_rate outside [0, 1]", INSPECT, ["--config", "cfg.yaml", "data.fim_rate=1.5"],
             ("data.fim_rate = 1.5", "within [0, 1]"), setup=with_config()),
    BadInput("inspect: source weight 0", INSPECT,
             ["--config", "cfg.yaml", "data.sources=[{kind: dir, path: corpus, weight: 0}]"],
             ("data.sources[0].weight = 0", "positive"), setup=with_config()),
    BadInput("inspect: unknown source kind", INSPECT, ["--config", "cfg.yaml", "data.sources=[{kind: jsnl, path: x}]"],
             ("kind 'jsnl'", "dir, jsonl, parquet, tfds", "did you mean 'jsonl'"), setup=with_config()),
    BadInput("inspect: missing source path", INSPECT,
             ["--config", "cfg.yaml", "data.sources=[{kind: dir, path: gone}]"],
             ("dir source 'gone' does not exist", "check the source's path"), setup=with_config()),
    BadInput("inspect: seq_len not a number", INSPECT, ["--config", "cfg.yaml", "train.seq_len=abc"],
             ("train.seq_len", "'abc'", "whole number"), setup=with_config()),
    BadInput("inspect: config not YAML", INSPECT, ["--config", "cfg.yaml"],
             ("'cfg.yaml' cannot be read as yaml (line 2)", "cannot start any token"),
             setup=lambda d: open(os.path.join(d, "cfg.yaml"), "w").write("data:\n\ttokenizer: tok.json\n")),
    BadInput("inspect: dedup_dir missing", INSPECT, ["--config", "cfg.yaml", "data.dedup=true", "data.dedup_dir=gone"],
             ("data.dedup_dir 'gone' does not exist", "writable directory", "''"), setup=with_config()),
    BadInput("inspect: dedup_dir is a file", INSPECT,
             ["--config", "cfg.yaml", "data.dedup=true", "data.dedup_dir=tok.json"],
             ("data.dedup_dir 'tok.json' is not a directory", "writable directory"), setup=with_config()),
    BadInput("inspect: batch size 0", INSPECT, ["--config", "cfg.yaml", "--batch-size", "0"],
             ("--batch-size", "0 must be at least 1", "--help"), setup=with_config()),
    # sc_jax.data.tfds_builder
    BadInput("tfds_builder: empty source", TFDS, ["--source", "dir:empty", "--data-dir", "tfds", "--quiet"],
             ("no usable repositories", "check the --source paths"), setup=empty_dir, leaves=("tfds",)),
    BadInput("tfds_builder: every file bad", TFDS, ["--source", "dir:bad", "--data-dir", "tfds", "--quiet"],
             ("no usable repositories", "binary=1", "undecodable=1", "--source"), setup=all_bad, leaves=("tfds",)),
    BadInput("tfds_builder: holdout fraction 1.5", TFDS,
             ["--source", "dir:corpus", "--data-dir", "tfds", "--holdout-fraction", "1.5"],
             ("--holdout-fraction", "1.5 must be within [0, 1)"), setup=corpus, leaves=("tfds",)),
    BadInput("tfds_builder: holdout leaves validation empty", TFDS,
             ["--source", "dir:corpus", "--data-dir", "tfds", "--holdout-fraction", "0.001", "--quiet"],
             ("no repository fell in the validation split", "all 2 usable ones went to train", "raise it"),
             setup=corpus, leaves=("tfds",)),
    BadInput("tfds_builder: unknown source kind", TFDS, ["--source", "tfds:corpus", "--data-dir", "tfds"],
             ("--source 'tfds:corpus'", "dir:PATH, jsonl:PATH or parquet:PATH"), setup=corpus, leaves=("tfds",)),
    BadInput("tfds_builder: missing source path", TFDS, ["--source", "jsonl:gone.jsonl", "--data-dir", "tfds"],
             ("gone.jsonl' does not exist",), leaves=("tfds",)),
    BadInput("tfds_builder: rerun with other sources", TFDS,
             ["--source", "dir:corpus/two", "--data-dir", "tfds", "--quiet"],
             ("already holds a dataset", "sources", "corpus/one there", "corpus/two here", "another --data-dir",
              "--overwrite"), setup=built_dataset),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input(row, tmp_path):
    run_bad_input(row, str(tmp_path))


# ----------------------------------------------------------------------------- help texts


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _option_blocks(text: str) -> list[str]:
    """The help of each option ("  --name ..." and its continuation lines), whitespace squeezed."""
    blocks, cur = [], None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            cur = [line]
            blocks.append(cur)
        elif cur is not None and line.startswith("   ") and line.strip():
            cur.append(line)
        else:
            cur = None
    return [" ".join(" ".join(b).split()) for b in blocks]


@pytest.mark.parametrize("module, argv", [("sc_jax.tokenizer.__main__", ["train", "--help"]),
                                          ("sc_jax.tokenizer.__main__", ["info", "--help"]),
                                          ("sc_jax.data.inspect", ["--help"]),
                                          ("sc_jax.data.tfds_builder.__main__", ["--help"])])
def test_help_shows_every_default_once_and_real_files(module, argv, capsys):
    import importlib

    mod = importlib.import_module(module)
    text = _help(mod.main, argv, capsys)
    first = mod.__doc__.strip().splitlines()[0]
    assert text.count(first) <= 1, f"the description is printed {text.count(first)} times"
    for path in re.findall(r"\b((?:experiments|sc_jax|bench)/[\w./-]+\.(?:yaml|py))", text):
        assert os.path.exists(os.path.join(REPO, path)), f"the help cites {path}, which does not exist"
    blocks = [b for b in _option_blocks(text) if not b.startswith("-h,")]
    assert blocks or argv[0] == "info"  # info has only its positional path
    for block in blocks:
        assert re.search(r"\(default|\(required\)", block), f"no default shown: {block}"
