"""Exact-match deduplication of instruction data (SFT conversations, DPO pairs), across files and
sources: what `data.dedup` does while the records are scanned, and `python -m sc_jax.instruct.dedup`.

    key(SFT record) = [(role, content), ...]          roles normalised (ShareGPT's human/gpt -> user/assistant),
    key(DPO record) = (prompt turns, chosen, rejected)  a text prompt is one user turn
    content: every run of whitespace one space, none at the ends
    hash = blake2b-128 of the task and the key's canonical JSON

The first occurrence in source order (sources, then their files, then lines) is kept; later ones
are duplicates. Seen hashes live in an on-disk index (`HashIndex`: SQLite, the hash its primary
key, a page cache of `cache_mb`), so a corpus larger than memory is deduplicated in bounded
memory: each record costs one indexed insert, and only the index's cache is held in memory.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile

from sc_jax.data import sources as data_sources
from sc_jax.instruct.chat import RecordError, parse_chat, parse_pair

JSONL_PATTERNS = ("*.jsonl", "*.ndjson")


def expand_paths(path: str) -> list[str]:
    """A file, a glob, or a directory (its *.jsonl / *.ndjson files, recursively), sorted."""
    return data_sources.expand_paths(path, JSONL_PATTERNS, "jsonl")


def _text(s: str) -> str:
    return " ".join(s.split())


def _turns(messages: list[dict]) -> list[list[str]]:
    return [[m["role"], _text(m["content"])] for m in messages]


def record_key(task: str, record) -> str:
    """The canonical form of a parsed record (parse_chat's messages, or parse_pair's triple)."""
    if task == "sft":
        key = _turns(record)
    else:
        prompt, chosen, rejected = record
        key = [_turns(prompt), _text(chosen), _text(rejected)]
    return json.dumps([task, key], ensure_ascii=False, separators=(",", ":"))


def record_hash(task: str, record) -> bytes:
    return hashlib.blake2b(record_key(task, record).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def task_of(obj) -> str:
    """'dpo' for a record with prompt/chosen/rejected, else 'sft' (the command's --task auto)."""
    return "dpo" if isinstance(obj, dict) and "chosen" in obj and "prompt" in obj else "sft"


def parse_for_key(task: str, obj):
    """The parsed record `record_key` takes (RecordError when malformed)."""
    return parse_chat(obj) if task == "sft" else parse_pair(obj)


class HashIndex:
    """Seen record hashes, on disk. `first_of(items)`: for each (hash, where, payload) in order,
    (payload, None) when the hash is new (recorded with `where`, a (source, file, line) triple),
    else (payload, the `where` of its first occurrence). A None hash passes as new, unrecorded.

    Items go in batches of `batch`, looked up and inserted in sorted hash order: the B-tree is
    walked in order, not at random, so a small page cache still serves it."""

    def __init__(self, directory: str = "", cache_mb: int = 64, batch: int = 16384):
        self._dir = tempfile.mkdtemp(prefix="sc_jax-dedup-", dir=directory or None)
        self._db = sqlite3.connect(os.path.join(self._dir, "seen.sqlite"), isolation_level=None)
        # A scratch index: nothing to recover after a crash, so no journal and no syncs.
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size=-{cache_mb * 1024}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE seen (h BLOB PRIMARY KEY, src INTEGER, file INTEGER, line INTEGER) "
                         "WITHOUT ROWID")
        self._db.execute("BEGIN")
        self.batch, self.count = batch, 0

    def first_of(self, items):
        pending = []
        for item in items:
            pending.append(item)
            if len(pending) >= self.batch:
                yield from self._resolve(pending)
                pending = []
        yield from self._resolve(pending)

    def _known(self, hashes: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
        known = {}
        for i in range(0, len(hashes), 500):  # SQLite's limit on bound parameters is 999 in old builds
            part = hashes[i:i + 500]
            rows = self._db.execute(f"SELECT h, src, file, line FROM seen WHERE h IN ({','.join('?' * len(part))})",
                                    part)
            known.update((h, (src, f, line)) for h, src, f, line in rows)
        return known

    def _resolve(self, pending: list):
        known = self._known(sorted({h for h, _, _ in pending if h is not None}))
        new = []
        for h, where, payload in pending:
            if h is None:
                yield payload, None
            elif h in known:
                yield payload, known[h]
            else:
                known[h] = tuple(where)
                new.append((h, *where))
                yield payload, None
        new.sort()
        self._db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?)", new)
        self.count += len(new)
        # Committing writes the batch's pages to the file: the cache then holds at most cache_mb.
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def first(self, h: bytes, where: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """One record's `first_of`."""
        return next(self._resolve([(h, where, None)]))[1]

    def disk_bytes(self) -> int:
        return os.path.getsize(os.path.join(self._dir, "seen.sqlite"))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "HashIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- files


@dataclasses.dataclass
class SourceReport:
    """What deduplicating one input did."""

    label: str
    files: list[str]
    records: int = 0  # records read (blank lines are not records)
    kept: int = 0  # written: first occurrences, and lines kept as they are because they do not parse
    duplicates: int = 0  # removed: the same record as an earlier one
    across: int = 0  # of those, first seen in an earlier input
    unparsed: int = 0  # malformed (not a record of the task): kept, not deduplicated
    examples: list[str] = dataclasses.field(default_factory=list)  # "path:line duplicates path:line"


def dedup_files(sources: list[tuple[str, list[str]]], out, *, task: str = "auto", index: HashIndex,
                show: int = 10, progress=None, every: int = 100_000) -> list[SourceReport]:
    """Writes to `out` (a binary file) every line of `sources` ([(label, files)], in order) but the
    duplicates; task "auto" decides per record (task_of). Lines are copied byte for byte.
    `progress(report)` is called every `every` records read (its duplicates: those found so far)."""
    names = [f for _, files in sources for f in files]
    reports = [SourceReport(label, files) for label, files in sources]
    lines = _hashed_lines(sources, task, reports, progress, every)
    for (raw, where), first in index.first_of(lines):
        rep = reports[where[0]]
        if first is None:
            rep.kept += 1
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
            continue
        rep.duplicates += 1
        rep.across += first[0] != where[0]
        if len(rep.examples) < show:
            rep.examples.append(f"{names[where[1]]}:{where[2]} duplicates {names[first[1]]}:{first[2]}")
    return reports


def _hashed_lines(sources, task: str, reports: list[SourceReport], progress, every: int):
    """(hash or None, where, (line, where)) for every record line of the sources, in order; `where`
    names the file by its position among all inputs (a file given twice is two inputs)."""
    fid, read = -1, 0
    for s, (_, files) in enumerate(sources):
        rep = reports[s]
        for path in files:
            fid += 1
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    rep.records += 1
                    read += 1
                    if progress is not None and read % every == 0:
                        progress(rep)
                    where = (s, fid, line_no)
                    yield line_hash(raw, task, rep), where, (raw, where)


def line_hash(raw: bytes, task: str, rep: SourceReport) -> bytes | None:
    """The hash of a JSONL line's record; None (counted as unparsed) when it is not one."""
    try:
        obj = json.loads(raw)
        kind = task_of(obj) if task == "auto" else task
        return record_hash(kind, parse_for_key(kind, obj))
    except (ValueError, RecordError):  # bad JSON (and bad UTF-8) or not a record: not ours to judge
        rep.unparsed += 1
        return None
