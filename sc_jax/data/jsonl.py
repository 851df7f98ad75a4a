"""The byte-offset index of JSON-lines files: every source that reads JSONL reads it through this.

Building it finds the newlines (numpy, 64 MiB at a time; a .gz file is decompressed into memory
once); reading line `row` back is one `os.pread`, with a descriptor per thread, so a grain
pipeline can read lines in any order from several threads. Empty lines are not in the index
(whitespace-only ones are: the reader decides what a blank record is). Pickles small: worker
processes reopen the files.
"""

from __future__ import annotations

import gzip
import os
import threading

import numpy as np

_CHUNK = 1 << 26


def _newlines_of_buffer(buf: bytes) -> tuple[np.ndarray, int]:
    return np.flatnonzero(np.frombuffer(buf, np.uint8) == 10), len(buf)


def _newlines_of_file(path: str) -> tuple[np.ndarray, int]:
    parts, size = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            parts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
            size += len(chunk)
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), size


class JsonlIndex:
    """Rows = the non-empty lines of `files`: (file id, start, end) each; `line` (1-based line
    numbers) only when built with lines=True."""

    def __init__(self, files: list[str], fid: np.ndarray, start: np.ndarray, end: np.ndarray,
                 line: np.ndarray | None = None):
        self.files, self.fid, self.start, self.end, self.line = list(files), fid, start, end, line
        self._local = threading.local()
        self._gz: dict[int, bytes] = {}

    @classmethod
    def build(cls, files: list[str], *, lines: bool = False, unreadable: dict[str, int] | None = None) -> "JsonlIndex":
        """Indexes every file. A file that cannot be read raises OSError, or with `unreadable` given
        is left out and counted there (key "unreadable")."""
        index = cls(files, *(np.zeros(0, np.int64) for _ in range(3)))
        parts = []
        for fid in range(len(files)):
            try:
                parts.append(index._lines_of(fid))
            except OSError:
                if unreadable is None:
                    raise
                unreadable["unreadable"] = unreadable.get("unreadable", 0) + 1
        if parts:
            index.fid, index.start, index.end, line = (np.concatenate(x) for x in zip(*parts))
            index.line = line if lines else None
        elif lines:
            index.line = np.zeros(0, np.int64)
        return index

    def _lines_of(self, fid: int) -> tuple[np.ndarray, ...]:
        """(file ids, starts, ends, line numbers) of the non-empty lines of one file."""
        path = self.files[fid]
        nl, size = _newlines_of_buffer(self._gz_bytes(fid)) if path.endswith(".gz") else _newlines_of_file(path)
        nl = nl.astype(np.int64)
        start, end = np.concatenate([[0], nl + 1]), np.concatenate([nl, [size]])
        keep = np.flatnonzero(end > start)
        return np.full(len(keep), fid, np.int64), start[keep], end[keep], keep + 1

    def _gz_bytes(self, fid: int) -> bytes:
        if fid not in self._gz:
            with gzip.open(self.files[fid], "rb") as f:
                self._gz[fid] = f.read()
        return self._gz[fid]

    def __len__(self) -> int:
        return len(self.start)

    def read(self, row: int) -> bytes:
        """The bytes of line `row` (without its newline)."""
        fid, start, end = int(self.fid[row]), int(self.start[row]), int(self.end[row])
        if self.files[fid].endswith(".gz"):
            return bytes(self._gz_bytes(fid)[start:end])
        fds = self._local.__dict__.setdefault("fds", {})
        if fid not in fds:
            fds[fid] = os.open(self.files[fid], os.O_RDONLY)
        return os.pread(fds[fid], end - start, start)

    def where(self, row: int) -> str:
        """`path:line` of a row (an index built with lines=True)."""
        return f"{self.files[int(self.fid[row])]}:{int(self.line[row])}"

    def select(self, rows) -> "JsonlIndex":
        """The index of the given rows only (in that order)."""
        rows = np.asarray(rows, np.int64)
        line = None if self.line is None else self.line[rows]
        out = JsonlIndex(self.files, self.fid[rows], self.start[rows], self.end[rows], line)
        out._gz = self._gz  # decompressed once
        return out

    def __getstate__(self):  # worker processes open their own files
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_gz")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()
        self._gz = {}
