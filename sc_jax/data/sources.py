"""Random-access data sources (grain `RandomAccessDataSource`-style: `__len__` / `__getitem__`).

Every source presents the same two views, so documents can be built per repository or per file:

- repositories: `num_repos()`, `repo_name(i)` (cheap, None when only reading tells), `read_repo(i)`;
- files: `num_files()`, `file_repo_name(j)`, `read_file(j)`.

Reads return a `RepoData` (name, clean (path, text) pairs, skip counts). Nothing raises on bad
input: unreadable, undecodable, binary, empty, oversized, minified and malformed inputs, and names
that are not UTF-8 (`bad_filename`, `bad_filename_dir`, `bad_repo_name`), are skipped and counted,
at scan time (`scan_skipped`, counted once, in the main process) or at read time (in
`RepoData.skipped`, counted by the pipeline's statistics).

Kinds: `dir` (a directory of repositories), `jsonl` and `parquet` (The Stack's layout: one row per
file with content, repository name, path, language), `tfds` (ArrayRecord files written by
`sc_jax.data.tfds_builder`, one record per repository, read with `tfds.data_source`).
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import threading

import numpy as np

from sc_jax.config import ConfigError
from sc_jax.data.config import LANGUAGE_EXTENSIONS, DataConfig, SourceConfig, normalize_language
from sc_jax.data.jsonl import JsonlIndex

_BINARY_SNIFF_BYTES = 8192
_MINIFIED_SUFFIXES = (".min.js", ".min.css", ".min.mjs", "-min.js", ".bundle.js")

CONTENT_KEYS = ("content", "text", "code")
REPO_KEYS = ("repo_name", "max_stars_repo_name", "repository_name", "repo")
PATH_KEYS = ("path", "max_stars_repo_path", "file_path", "filename")
LANGUAGE_KEYS = ("language", "lang")
# content_key: messages reads SFT records ({"messages": [{"role", "content"}, ...]}, e.g. what
# `python -m sc_jax.instruct.evolve` writes) as text documents: the turns' contents, a blank line
# between them. Only when configured: auto-detection never picks it.
CHAT_KEY = "messages"


def chat_text(messages) -> str:
    """An SFT record's turns as one text (ValueError when they are not a list of turns with text)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    parts = [m.get("content") if isinstance(m, dict) else None for m in messages]
    if not all(isinstance(p, str) for p in parts):
        raise ValueError("a message without text content")
    return "\n\n".join(p.strip() for p in parts)


class DataError(ConfigError):
    """A data source that cannot be used at all (missing path, nothing usable)."""


@dataclasses.dataclass
class RepoData:
    name: str
    files: list[tuple[str, str]]  # (path, text)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


def _count(d: dict, key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


def is_utf8(name: str) -> bool:
    """Whether a name can be written as text. File names that are not UTF-8 reach Python as lone
    surrogates (os.fsdecode's surrogateescape; in JSON, from bad \\u escapes): no tokenizer and no
    TFDS Text feature takes them, so such a name would fail its whole document."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ----------------------------------------------------------------------------- filtering


@dataclasses.dataclass
class FileFilter:
    """Which files to keep and how to turn their bytes into text."""

    extensions: frozenset[str] | None  # None = any extension
    languages: frozenset[str] | None  # None = any language
    max_file_bytes: int = 1_000_000
    max_line_length: int = 1000
    vendored_dirs: frozenset[str] = frozenset()
    skip_hidden: bool = True

    @classmethod
    def from_config(cls, cfg: DataConfig, src: SourceConfig | None) -> "FileFilter":
        langs = cfg.all_languages(None if src is None else src.languages)
        if langs is None:
            exts = None
        else:
            exts = {e.lower() for lang in langs for e in LANGUAGE_EXTENSIONS.get(lang, ())}
            exts |= {e.lower() for e in cfg.extensions}
        return cls(extensions=None if exts is None else frozenset(exts),
                   languages=None if langs is None else frozenset(langs),
                   max_file_bytes=cfg.max_file_bytes, max_line_length=cfg.max_line_length,
                   vendored_dirs=frozenset(cfg.vendored_dirs), skip_hidden=cfg.skip_hidden)

    def dir_skip_reason(self, name: str) -> str | None:
        """Reason to prune a directory (counted as `{reason}_dir`; None = descend)."""
        if not is_utf8(name):
            return "bad_filename"
        if name in self.vendored_dirs:
            return "vendored"
        if self.skip_hidden and name.startswith("."):
            return "hidden"
        return None

    def name_skip_reason(self, path: str) -> str | None:
        """Reason to skip a file by its path alone (None = keep)."""
        if not is_utf8(path):
            return "bad_filename"
        base = os.path.basename(path)
        if self.skip_hidden and base.startswith("."):
            return "hidden"
        low = base.lower()
        if low.endswith(_MINIFIED_SUFFIXES):
            return "vendored"
        if any(part in self.vendored_dirs for part in path.replace("\\", "/").split("/")[:-1]):
            return "vendored"
        if self.extensions is not None and os.path.splitext(low)[1] not in self.extensions:
            return "not_selected"
        return None

    def row_selected(self, language: str | None, path: str | None) -> bool:
        """Language filter for table rows: by the language column, else by the path's extension."""
        if self.languages is None:
            return True
        if language:
            return normalize_language(language) in self.languages
        if path:
            return os.path.splitext(path.lower())[1] in (self.extensions or ())
        return True  # no way to tell: keep

    def clean(self, data: bytes | str | None) -> tuple[str | None, str | None]:
        """(text, None) for a usable file, else (None, reason)."""
        if data is None:
            return None, "malformed"
        if isinstance(data, str):
            if (self.max_file_bytes and len(data) > self.max_file_bytes // 4
                    and len(data.encode("utf-8", "surrogatepass")) > self.max_file_bytes):
                return None, "oversized"
            if "\x00" in data[:_BINARY_SNIFF_BYTES]:
                return None, "binary"
            try:
                data.encode("utf-8")  # lone surrogates from bad JSON escapes
            except UnicodeEncodeError:
                return None, "undecodable"
            text = data
        else:
            if self.max_file_bytes and len(data) > self.max_file_bytes:
                return None, "oversized"
            if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
                return None, "binary"
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                return None, "undecodable"
        if not text.strip():
            return None, "empty"
        if self.max_line_length and len(text) > self.max_line_length:
            if max(map(len, text.splitlines())) > self.max_line_length:
                return None, "long_lines"
        return text, None

    def read_and_clean(self, path: str) -> tuple[str | None, str | None]:
        try:
            with open(path, "rb") as f:
                data = f.read(self.max_file_bytes + 1 if self.max_file_bytes else -1)
        except OSError:
            return None, "unreadable"
        return self.clean(data)


def size_skip_reason(path: str, filt: FileFilter) -> str | None:
    """Reason to skip a file by its size alone (None = keep)."""
    try:
        size = os.stat(path).st_size
    except OSError:  # a dangling link, or removed since the listing
        return "unreadable"
    if size == 0:
        return "empty"
    if filt.max_file_bytes and size > filt.max_file_bytes:
        return "oversized"
    return None


def scan_tree(root: str, filt: FileFilter, skipped: dict[str, int]) -> list[str]:
    """Absolute paths of the files under `root` that pass the name/size filters, sorted."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: _count(skipped, "unreadable")):
        keep = []
        for d in sorted(dirnames):
            reason = filt.dir_skip_reason(d)
            if reason:
                _count(skipped, f"{reason}_dir")
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            reason = filt.name_skip_reason(name) or size_skip_reason(full, filt)
            if reason:
                _count(skipped, reason)
                continue
            out.append(full)
    return out


def _detect_key(record: dict, configured: str, candidates: tuple[str, ...]) -> str | None:
    if configured:
        return configured
    for k in candidates:
        if k in record:
            return k
    return None


def expand_paths(path: str, patterns: tuple[str, ...], what: str) -> list[str]:
    """A file, a glob, or a directory (its files matching `patterns`, recursively), sorted."""
    if os.path.isdir(path):
        files = sorted({f for p in patterns for f in glob.glob(os.path.join(path, "**", p), recursive=True)})
    elif any(c in path for c in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"{what} path '{path}' does not exist: check the source's path")
    if not files:
        raise DataError(f"{what} path '{path}' holds no files matching {', '.join(patterns)}")
    return files


# ----------------------------------------------------------------------------- unit identity


def names_digest(*parts) -> str:
    """A short hash of sequences of names, in order: the identity of a source's units (the
    iterator state's fingerprint). The same names give the same digest on any machine."""
    h = hashlib.blake2b(digest_size=8)
    for names in parts:
        h.update(b"\x01")
        chunk: list[str] = []
        for name in names:
            chunk.append(str(name))
            if len(chunk) >= 1 << 16:
                h.update(("\0".join(chunk) + "\0").encode("utf-8", "surrogatepass"))
                chunk = []
        if chunk:
            h.update(("\0".join(chunk) + "\0").encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def relative_names(files: list[str]) -> list[str]:
    """Paths relative to their common directory: the same for a corpus copied elsewhere."""
    if not files:
        return []
    base = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    return [os.path.relpath(f, base) for f in files]


def rows_per_file(files: list[str], fid: np.ndarray) -> list[str]:
    """"name:rows" for each file (fid: the file id of every unit row)."""
    counts = np.bincount(np.asarray(fid, np.int64), minlength=len(files)) if len(files) else []
    return [f"{name}:{int(n)}" for name, n in zip(relative_names(files), counts)]


# ----------------------------------------------------------------------------- base


class Source:
    """Base class: subclasses fill `scan_skipped` and implement the two views."""

    kind = "base"

    def __init__(self, src: SourceConfig, filt: FileFilter, max_repo_bytes: int = 0):
        self.config = src
        self.label = src.label()
        self.filter = filt
        self.max_repo_bytes = max_repo_bytes
        self.scan_skipped: dict[str, int] = {}

    # repositories
    def num_repos(self) -> int:
        raise NotImplementedError

    def repo_name(self, i: int) -> str | None:
        return None

    def read_repo(self, i: int) -> RepoData:
        raise NotImplementedError

    # files
    def num_files(self) -> int:
        raise NotImplementedError

    def file_repo_name(self, j: int) -> str | None:
        return None

    def read_file(self, j: int) -> RepoData:
        raise NotImplementedError

    def _cap_repo(self, data: RepoData) -> RepoData:
        if self.max_repo_bytes:
            total, kept = 0, []
            for path, text in data.files:
                total += len(text)
                if total > self.max_repo_bytes and kept:
                    _count(data.skipped, "repo_oversized")
                    continue
                kept.append((path, text))
            data.files = kept
        return data

    def unit_digest(self, files: bool) -> str | None:
        """`names_digest` of the units (files: the file view, else the repository view), or None
        where naming them would mean reading every record (then only their count is checked)."""
        return None

    def describe(self) -> str:
        return f"{self.kind}:{self.label} ({self.num_repos()} repositories)"


# ----------------------------------------------------------------------------- dir


class DirSource(Source):
    """A directory of repositories: each subdirectory one, or the directory itself one."""

    kind = "dir"

    def __init__(self, src: SourceConfig, filt: FileFilter, max_repo_bytes: int = 0):
        super().__init__(src, filt, max_repo_bytes)
        root = os.path.abspath(src.path)
        if not os.path.isdir(root):
            raise DataError(f"dir source '{src.path}' is not a directory: give a directory of repositories, or use "
                            "kind jsonl/parquet for a file" if os.path.exists(root)
                            else f"dir source '{src.path}' does not exist: check the source's path")
        self.root = root
        names = sorted(os.listdir(root))
        top_files = [n for n in names if os.path.isfile(os.path.join(root, n))]
        layout = src.layout
        if layout == "auto":
            layout = "repo" if any(filt.name_skip_reason(n) is None for n in top_files) else "repos"
        repos: list[tuple[str, str, list[str]]] = []  # (name, dir, relative paths)
        if layout == "repo":
            files = scan_tree(root, filt, self.scan_skipped)
            if files:
                self._add_repo(repos, os.path.basename(root), root, files)
            else:
                _count(self.scan_skipped, "empty_repo")
        else:
            for d in names:
                full = os.path.join(root, d)
                if not os.path.isdir(full):
                    continue
                reason = filt.dir_skip_reason(d)
                if reason:
                    _count(self.scan_skipped, f"{reason}_dir")
                    continue
                if src.include and not any(fnmatch.fnmatch(d, pat) for pat in src.include):
                    continue
                files = scan_tree(full, filt, self.scan_skipped)
                if not files:
                    _count(self.scan_skipped, "empty_repo")
                    continue
                repos.append((d, full, [os.path.relpath(f, full) for f in files]))
            if top_files and (not src.include or any(fnmatch.fnmatch(os.path.basename(root), p) for p in src.include)):
                loose = self._loose_files(root, top_files)
                if loose:
                    self._add_repo(repos, os.path.basename(root), root, loose)
        self.repos = repos
        counts = np.array([len(r[2]) for r in repos], dtype=np.int64)
        self._file_repo = np.repeat(np.arange(len(repos), dtype=np.int64), counts)
        self._file_offset = np.concatenate([[0], np.cumsum(counts)])[:-1] if len(repos) else np.zeros(0, np.int64)

    def _add_repo(self, repos: list, name: str, base: str, files: list[str]) -> None:
        """Appends the repository `name` at `base` (files: absolute paths) unless its name is unusable."""
        if not is_utf8(name):  # the name is written into every document of the repository
            _count(self.scan_skipped, "bad_filename_dir")
            return
        repos.append((name, base, [os.path.relpath(f, base) for f in files]))

    def _loose_files(self, root: str, names: list[str]) -> list[str]:
        """The files at the top of a `repos` directory (one more repository), filtered and counted."""
        kept = []
        for n in names:
            full = os.path.join(root, n)
            reason = self.filter.name_skip_reason(n) or size_skip_reason(full, self.filter)
            if reason:
                _count(self.scan_skipped, reason)
            else:
                kept.append(full)
        return kept

    def num_repos(self) -> int:
        return len(self.repos)

    def repo_name(self, i: int) -> str:
        return self.repos[i][0]

    def read_repo(self, i: int) -> RepoData:
        name, base, rels = self.repos[i]
        data = RepoData(name, [])
        for rel in rels:
            text, reason = self.filter.read_and_clean(os.path.join(base, rel))
            if text is None:
                _count(data.skipped, reason)
            else:
                data.files.append((rel.replace(os.sep, "/"), text))
        return self._cap_repo(data)

    def num_files(self) -> int:
        return len(self._file_repo)

    def unit_digest(self, files: bool) -> str | None:
        if files:
            return names_digest(f"{name}/{rel}" for name, _, rels in self.repos for rel in rels)
        return names_digest(name for name, _, _ in self.repos)

    def file_repo_name(self, j: int) -> str:
        return self.repos[int(self._file_repo[j])][0]

    def read_file(self, j: int) -> RepoData:
        r = int(self._file_repo[j])
        name, base, rels = self.repos[r]
        rel = rels[j - int(self._file_offset[r])]
        text, reason = self.filter.read_and_clean(os.path.join(base, rel))
        if text is None:
            return RepoData(name, [], {reason: 1})
        return RepoData(name, [(rel.replace(os.sep, "/"), text)])


# ----------------------------------------------------------------------------- tables (jsonl, parquet)


class _TableSource(Source):
    """Rows = files (The Stack layout). Repository grouping needs the repo column at scan time."""

    def __init__(self, src: SourceConfig, filt: FileFilter, max_repo_bytes: int, group_repos: bool):
        super().__init__(src, filt, max_repo_bytes)
        self.group_repos = group_repos
        self._repos: list[tuple[str, np.ndarray]] = []  # (name, row ids)
        self._rows = np.zeros(0, np.int64)  # row ids usable in the file view

    def _group(self, names: list[str | None], keep: np.ndarray) -> None:
        groups: dict[str, list[int]] = collections.OrderedDict()
        singles: list[tuple[str, list[int]]] = []
        for row in np.flatnonzero(keep):
            name = names[row]
            if name is None:
                singles.append(("", [int(row)]))
            else:
                groups.setdefault(name, []).append(int(row))
        self._repos = [(n, np.asarray(r, np.int64)) for n, r in list(groups.items()) + singles]

    def num_repos(self) -> int:
        return len(self._repos) if self.group_repos else len(self._rows)

    def repo_name(self, i: int) -> str | None:
        return (self._repos[i][0] or None) if self.group_repos else None

    def num_files(self) -> int:
        return len(self._rows)

    def _row_files(self) -> np.ndarray:
        """The file id of every usable row (`_rows`)."""
        raise NotImplementedError

    def unit_digest(self, files: bool) -> str | None:
        per_file = rows_per_file(self.files, self._row_files())
        if files or not self.group_repos:
            return names_digest(per_file)
        return names_digest(per_file, (name or f"#{int(rows[0])}" for name, rows in self._repos))

    # Subclasses: _read_row(row) -> (repo, path, language, content) or raises ValueError (malformed).
    def _read_row(self, row: int):
        raise NotImplementedError

    def _row_to_file(self, row: int, data: RepoData) -> None:
        try:
            fields = self._read_row(row)
            if fields is None:  # a blank line
                return
            repo, path, lang, content = fields
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            _count(data.skipped, "malformed")
            return
        except OSError:
            _count(data.skipped, "unreadable")
            return
        if not data.name and repo:
            data.name = repo
        if path and not is_utf8(path):
            _count(data.skipped, "bad_filename")
            return
        if not self.group_repos and not self.filter.row_selected(lang, path):
            _count(data.skipped, "not_selected")
            return
        if content is not None and not isinstance(content, (str, bytes)):
            _count(data.skipped, "malformed")
            return
        text, reason = self.filter.clean(content)
        if text is None:
            _count(data.skipped, reason)
            return
        data.files.append((path or "", text))

    def read_repo(self, i: int) -> RepoData:
        if not self.group_repos:
            return self.read_file(i)
        name, rows = self._repos[i]
        data = RepoData(name, [])
        for row in rows:
            self._row_to_file(int(row), data)
        return self._cap_repo(data)

    def read_file(self, j: int) -> RepoData:
        data = RepoData("", [])
        self._row_to_file(int(self._rows[j]), data)
        return data


class JsonlSource(_TableSource):
    """JSON lines, one file per line: {"content", "repo_name", "path", "language"} (keys configurable)."""

    kind = "jsonl"

    def __init__(self, src: SourceConfig, filt: FileFilter, max_repo_bytes: int = 0, group_repos: bool = True):
        super().__init__(src, filt, max_repo_bytes, group_repos)
        self.files = expand_paths(src.path, ("*.jsonl", "*.jsonl.gz", "*.ndjson"), "jsonl")
        self.index = JsonlIndex.build(self.files, unreadable=self.scan_skipped)
        if group_repos:
            names, keep = self._scan_rows()
            self._group(names, keep)
            self._rows = np.flatnonzero(keep)
        else:
            self._rows = np.arange(len(self.index), dtype=np.int64)

    def _row_files(self) -> np.ndarray:
        return self.index.fid[self._rows]

    def _scan_rows(self) -> tuple[list[str | None], np.ndarray]:
        """(repository name per row, which rows are usable files): one pass over the rows."""
        names: list[str | None] = [None] * len(self.index)
        keep = np.zeros(len(self.index), bool)
        for row in range(len(self.index)):
            try:
                rec = self._parse(row)
                if rec is None:  # a blank line: not a record
                    continue
                repo, path, lang, _ = self._fields(rec)
            except (ValueError, TypeError, UnicodeDecodeError):
                _count(self.scan_skipped, "malformed")
                continue
            if not self.filter.row_selected(lang if isinstance(lang, str) else None,
                                            path if isinstance(path, str) else None):
                _count(self.scan_skipped, "not_selected")
                continue
            if repo is not None and not is_utf8(str(repo)):  # from a bad \u escape: cannot be written
                _count(self.scan_skipped, "bad_repo_name")
                continue
            names[row] = str(repo) if repo is not None else None
            keep[row] = True
        return names, keep

    def _parse(self, row: int) -> dict | None:
        raw = self.index.read(row)
        if not raw.strip():
            return None
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            raise ValueError("not an object")
        return rec

    def _fields(self, rec: dict) -> tuple:
        """(repo, path, language, content) of a record as stored (any JSON type); ValueError
        when it has no content."""
        src = self.config
        content_key = _detect_key(rec, src.content_key, CONTENT_KEYS)
        if content_key is None or content_key not in rec:
            raise ValueError("no content")

        def field(configured: str, candidates: tuple[str, ...]):
            key = _detect_key(rec, configured, candidates)
            return rec.get(key) if key else None

        content = chat_text(rec[content_key]) if content_key == CHAT_KEY else rec[content_key]
        return (field(src.repo_key, REPO_KEYS), field(src.path_key, PATH_KEYS),
                field(src.language_key, LANGUAGE_KEYS), content)

    def _read_row(self, row: int):
        rec = self._parse(row)
        if rec is None:
            return None
        repo, path, lang, content = self._fields(rec)
        return (None if repo is None else str(repo), None if path is None else str(path),
                lang if isinstance(lang, str) else None, content)


class ParquetSource(_TableSource):
    """Parquet in The Stack's layout; random access through a small row-group cache.

    Fine for local corpora; for large shuffled runs convert to ArrayRecord with
    `python -m sc_jax.data.tfds_builder` (row groups are read whole)."""

    kind = "parquet"
    _CACHE = 4

    def __init__(self, src: SourceConfig, filt: FileFilter, max_repo_bytes: int = 0, group_repos: bool = True):
        super().__init__(src, filt, max_repo_bytes, group_repos)
        import pyarrow.parquet as pq

        self.files = expand_paths(src.path, ("*.parquet",), "parquet")
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._rg: list[tuple[int, int, int]] = []  # (file, row group, first global row)
        self._cols: list[dict[str, str | None]] = []
        total = 0
        names: list[str | None] = []
        keep_parts: list[np.ndarray] = []
        for fid, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except Exception:  # pyarrow raises ArrowInvalid / OSError on bad files
                _count(self.scan_skipped, "unreadable")
                self._cols.append({})
                continue
            schema = set(pf.schema_arrow.names)

            def pick(configured, candidates):
                if configured:
                    return configured if configured in schema else None
                return next((c for c in candidates if c in schema), None)

            cols = {"content": pick(src.content_key, CONTENT_KEYS), "repo": pick(src.repo_key, REPO_KEYS),
                    "path": pick(src.path_key, PATH_KEYS), "language": pick(src.language_key, LANGUAGE_KEYS)}
            self._cols.append(cols)
            n = pf.metadata.num_rows
            if cols["content"] is None:
                _count(self.scan_skipped, "malformed", n)
                continue
            for rg in range(pf.metadata.num_row_groups):
                self._rg.append((fid, rg, total))
                total += pf.metadata.row_group(rg).num_rows
            meta_cols = [c for c in (cols["repo"], cols["path"], cols["language"]) if c]
            keep = np.ones(n, bool)
            if group_repos:
                table = pf.read(columns=meta_cols) if meta_cols else None
                repo = table.column(cols["repo"]).to_pylist() if cols["repo"] else [None] * n
                path_ = table.column(cols["path"]).to_pylist() if cols["path"] else [None] * n
                lang = table.column(cols["language"]).to_pylist() if cols["language"] else [None] * n
                for k in range(n):
                    if not filt.row_selected(lang[k], path_[k]):
                        keep[k] = False
                        _count(self.scan_skipped, "not_selected")
                names.extend(None if r is None else str(r) for r in repo)
            keep_parts.append(keep)
        self._rg_start = np.array([r[2] for r in self._rg], dtype=np.int64)
        keep = np.concatenate(keep_parts) if keep_parts else np.zeros(0, bool)
        if group_repos:
            self._group(names, keep)
        self._rows = np.flatnonzero(keep)

    def _row_files(self) -> np.ndarray:
        if not len(self._rows):
            return np.zeros(0, np.int64)
        rg = np.searchsorted(self._rg_start, self._rows, side="right") - 1
        return np.asarray([f for f, _, _ in self._rg], np.int64)[rg]

    def _row_group(self, idx: int):
        with self._lock:
            if idx in self._cache:
                self._cache.move_to_end(idx)
                return self._cache[idx]
        import pyarrow.parquet as pq

        fid, rg, _ = self._rg[idx]
        cols = self._cols[fid]
        table = pq.ParquetFile(self.files[fid]).read_row_group(rg, columns=[c for c in cols.values() if c])
        data = {k: (table.column(c) if c else None) for k, c in cols.items()}
        with self._lock:
            self._cache[idx] = data
            while len(self._cache) > self._CACHE:
                self._cache.popitem(last=False)
        return data

    def _read_row(self, row: int):
        idx = int(np.searchsorted(self._rg_start, row, side="right") - 1)
        data = self._row_group(idx)
        k = row - int(self._rg_start[idx])

        def get(key):
            col = data[key]
            return None if col is None else col[k].as_py()

        repo, path, lang = get("repo"), get("path"), get("language")
        return (None if repo is None else str(repo), None if path is None else str(path),
                lang if isinstance(lang, str) else None, get("content"))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        state["_cache"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._cache = collections.OrderedDict()


# ----------------------------------------------------------------------------- tfds / ArrayRecord


def open_tfds_data_source(path: str, split: str, name: str = "code_repositories"):
    """`tfds.data_source` over ArrayRecord files (no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    try:
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
            return tfds.builder_from_directory(path).as_data_source(split=split)
        return tfds.data_source(name, data_dir=path, split=split)
    except Exception as e:  # tfds raises many kinds (DatasetNotFoundError, ValueError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tfds source '{path}' (split '{split}'): {first}") from None


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class TfdsSource(Source):
    """ArrayRecord files written by `sc_jax.data.tfds_builder`: one record per repository."""

    kind = "tfds"

    def __init__(self, src: SourceConfig, filt: FileFilter, max_repo_bytes: int = 0, group_repos: bool = True):
        super().__init__(src, filt, max_repo_bytes)
        if not os.path.exists(src.path):
            raise DataError(f"tfds source '{src.path}' does not exist: check the source's path (a dataset directory "
                            "written by `python -m sc_jax.data.tfds_builder`, or its data_dir)")
        self._ds = open_tfds_data_source(src.path, src.split, src.tfds_name)
        self._n = len(self._ds)
        self.group_repos = group_repos
        self._file_rec = np.zeros(0, np.int64)
        self._file_k = np.zeros(0, np.int64)
        if not group_repos:  # the file view needs the per-record file counts: one pass over the records
            counts = np.array([len(self._ds[i]["files"]["path"]) for i in range(self._n)], dtype=np.int64)
            self._file_rec = np.repeat(np.arange(self._n, dtype=np.int64), counts)
            self._file_k = np.concatenate([np.arange(c) for c in counts]) if self._n else np.zeros(0, np.int64)

    def _record(self, i: int) -> dict:
        if self._ds is None:
            self._ds = open_tfds_data_source(self.config.path, self.config.split, self.config.tfds_name)
        return self._ds[i]

    def num_repos(self) -> int:
        return self._n

    def _files(self, rec: dict, data: RepoData, only: int | None = None) -> None:
        files = rec["files"]
        paths, contents = files["path"], files["content"]
        langs = files.get("language", [None] * len(paths))
        for k in range(len(paths)) if only is None else [only]:
            path = _text(paths[k])
            lang = _text(langs[k]) if langs[k] is not None else None
            if not self.filter.row_selected(lang, path):
                _count(data.skipped, "not_selected")
                continue
            text, reason = self.filter.clean(contents[k])
            if text is None:
                _count(data.skipped, reason)
            else:
                data.files.append((path, text))

    def read_repo(self, i: int) -> RepoData:
        try:
            rec = self._record(i)
            data = RepoData(_text(rec["repo_name"]), [])
            self._files(rec, data)
        except (KeyError, TypeError, ValueError):
            return RepoData("", [], {"malformed": 1})
        return self._cap_repo(data)

    def num_files(self) -> int:
        return len(self._file_rec)

    def read_file(self, j: int) -> RepoData:
        try:
            rec = self._record(int(self._file_rec[j]))
            data = RepoData(_text(rec["repo_name"]), [])
            self._files(rec, data, only=int(self._file_k[j]))
        except (KeyError, TypeError, ValueError, IndexError):
            return RepoData("", [], {"malformed": 1})
        return data

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None  # reopened lazily in each worker process
        return state


# ----------------------------------------------------------------------------- factory

_KINDS = {"dir": DirSource, "jsonl": JsonlSource, "parquet": ParquetSource, "tfds": TfdsSource}


def open_source(src: SourceConfig, cfg: DataConfig, *, group_repos: bool = True) -> Source:
    """Opens (scans) one source. `group_repos=False` when documents are per file."""
    filt = FileFilter.from_config(cfg, src)
    cls = _KINDS[src.kind]
    if cls is DirSource:
        return cls(src, filt, cfg.max_repo_bytes)
    return cls(src, filt, cfg.max_repo_bytes, group_repos=group_repos)
