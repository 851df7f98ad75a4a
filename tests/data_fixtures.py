"""Shared fixtures and helpers for the tokenizer and data-pipeline tests (a real corpus: a few
packages of this machine's Python standard library)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from sc_jax.data import BATCH_KEYS, DataConfig, SourceConfig
from sc_jax.tokenizer import Tokenizer, iter_corpus_texts, train_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]
# Small packages: about 300 kB of Python in total.
PACKAGES = ["json", "html", "wsgiref", "dbm", "tomllib", "zoneinfo", "sqlite3"]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A 1024-token byte-level BPE trained on two stdlib packages (about a second)."""
    texts = [t for pkg in ("json", "html") for t in iter_corpus_texts(os.path.join(STDLIB, pkg))]
    tok = train_tokenizer(texts, 1024)
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.backend.save(path)
    return path


@pytest.fixture(scope="session")
def tok(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path)


def stdlib_cfg(tokenizer_path: str, packages=PACKAGES, **kw) -> DataConfig:
    src = SourceConfig(kind="dir", path=STDLIB, layout="repos", include=list(packages))
    return DataConfig(sources=[src], tokenizer=tokenizer_path, **kw)


def run_cli(*args, check_rc: int | None = 0, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def document_tokens(ds) -> list[tuple[int, ...]]:
    """Full token sequences of the documents of a (finite) document MapDataset, in order."""
    out = []
    for i in range(len(ds)):
        d = ds[i]
        if d is not None:
            out.append(tuple(d["input_ids"].tolist()) + (int(d["targets"][-1]),))
    return out


def segments(batch):
    """Yields (row, start, stop) for every segment of every row."""
    seg = batch["segment_ids"]
    for r in range(seg.shape[0]):
        row = seg[r]
        t = 0
        while t < len(row):
            if row[t] == 0:
                t += 1
                continue
            s = t
            while t < len(row) and row[t] == row[s]:
                t += 1
            yield r, s, t


def rows_to_documents(batches, eos: int) -> list[tuple[int, ...]]:
    """Re-assembles documents from concat-then-split rows (pieces of a document are consecutive;
    a document ends at the piece whose last target is <|endoftext|>)."""
    docs, cur = [], []
    for b in batches:
        for r, s, t in segments(b):
            cur.extend(b["input_ids"][r, s:t].tolist())
            if b["targets"][r, t - 1] == eos:
                docs.append(tuple(cur) + (eos,))
                cur = []
    assert not cur, "a document piece was left over"
    return docs


def check_batch_invariants(b, batch_size: int, seq_len: int) -> None:
    for key in BATCH_KEYS:
        assert b[key].shape == (batch_size, seq_len), key
    assert b["loss_mask"].dtype == np.float32
    for key in ("input_ids", "targets", "segment_ids", "positions"):
        assert b[key].dtype == np.int32, key
    np.testing.assert_array_equal(b["loss_mask"], (b["segment_ids"] > 0).astype(np.float32))
    pad = b["segment_ids"] == 0
    assert not b["input_ids"][pad].any() and not b["positions"][pad].any()
    for r in range(batch_size):
        ids = b["segment_ids"][r][b["segment_ids"][r] > 0]
        if len(ids):  # 1-based, consecutive, non-decreasing
            assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    for r, s, t in segments(b):
        np.testing.assert_array_equal(b["positions"][r, s:t], np.arange(t - s))
        # within a segment the targets are the next inputs
        np.testing.assert_array_equal(b["input_ids"][r, s + 1:t], b["targets"][r, s:t - 1])
