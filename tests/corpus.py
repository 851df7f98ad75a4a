"""Small real corpora and tokenizers for tests: repositories copied from this
interpreter's standard library, a byte-level BPE trained on them."""

import os
import shutil
import subprocess
import sys
import sysconfig

STDLIB = sysconfig.get_paths()["stdlib"]
REPOS = ("json", "email", "http", "urllib", "wsgiref")


def make_corpus(root, repos=REPOS) -> str:
    """root/<repo>/... : one repository per stdlib package (Python files only)."""
    root = str(root)
    for name in repos:
        shutil.copytree(os.path.join(STDLIB, name), os.path.join(root, name),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "test*"))
    return root


def make_tokenizer(corpus: str, out: str, vocab_size: int = 512) -> str:
    subprocess.run([sys.executable, "-m", "sc_jax.tokenizer", "train", "--corpus", corpus, "--vocab-size",
                    str(vocab_size), "--out", out], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=os.getcwd()))
    return out


def data_overrides(corpus: str, tokenizer: str) -> list[str]:
    """train.py overrides for the real grain pipeline over `corpus`."""
    return ["model.preset=tiny", "train.data=pipeline", f"data.tokenizer={tokenizer}",
            f"data.sources=[{{kind: dir, path: '{corpus}'}}]", "model.vocab_size=512"]
