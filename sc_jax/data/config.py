"""Typed config of the data pipeline (`data:` section of a training YAML).

Sequence length and batch size are not here: the trainer passes them to
`make_train_iterator` / `make_eval_iterator`.
"""

from __future__ import annotations

import dataclasses
import os

from sc_jax.config import ConfigError, _closest

SOURCE_KINDS = ("dir", "jsonl", "parquet", "tfds")
DOCUMENT_KINDS = ("repository", "file")
PACKING_KINDS = ("concat", "first_fit")
ON_SOURCE_CHANGE = ("error", "warn")
DIR_LAYOUTS = ("auto", "repos", "repo")
WEIGHT_UNITS = ("tokens", "documents")
# What `weight_unit` meant before the key existed: a saved config or iterator state without it was
# mixed by documents, and resumes so (sc_jax.data.pipeline.changes, sc_jax.train.config).
LEGACY_WEIGHT_UNIT = "documents"

# Language name -> file extensions (lower case). Names follow The Stack's `lang` column, lower-cased.
LANGUAGE_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "python": (".py", ".pyi"),
    "java": (".java",),
    "javascript": (".js", ".mjs", ".cjs", ".jsx"),
    "typescript": (".ts", ".tsx", ".mts", ".cts"),
    "c": (".c", ".h"),
    "cpp": (".cc", ".cpp", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp", ".inl"),
    "c-sharp": (".cs",),
    "go": (".go",),
    "rust": (".rs",),
    "php": (".php",),
    "ruby": (".rb",),
    "sql": (".sql",),
    "markdown": (".md", ".markdown", ".rst"),
    "shell": (".sh", ".bash", ".zsh"),
    "scala": (".scala",),
    "kotlin": (".kt", ".kts"),
    "lua": (".lua",),
    "r": (".r",),
    # Not in the default set; select them explicitly.
    "swift": (".swift",),
    "julia": (".jl",),
    "haskell": (".hs",),
    "perl": (".pl", ".pm"),
    "html": (".html", ".htm"),
    "css": (".css", ".scss", ".less"),
    "yaml": (".yaml", ".yml"),
    "json": (".json",),
    "toml": (".toml",),
    "text": (".txt",),
}
# The 18 languages used when `languages` is empty.
DEFAULT_LANGUAGES: tuple[str, ...] = (
    "python", "java", "javascript", "typescript", "c", "cpp", "c-sharp", "go", "rust", "php", "ruby", "sql",
    "markdown", "shell", "scala", "kotlin", "lua", "r")
# Spellings found in The Stack (v1/v2) and elsewhere -> our names.
LANGUAGE_ALIASES: dict[str, str] = {
    "c++": "cpp", "c#": "c-sharp", "csharp": "c-sharp", "js": "javascript", "ts": "typescript", "py": "python",
    "bash": "shell", "sh": "shell", "golang": "go", "md": "markdown", "restructuredtext": "markdown",
    "plaintext": "text", "plain text": "text",
}
DEFAULT_VENDORED_DIRS: tuple[str, ...] = (
    "node_modules", "bower_components", "vendor", "vendors", "third_party", "third-party", "thirdparty",
    "external", "extern", "site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", ".venv", "venv")


def normalize_language(name: str) -> str:
    name = (name or "").strip().lower()
    return LANGUAGE_ALIASES.get(name, name)


def check_languages(names, where: str = "data.languages") -> None:
    """A ConfigError naming the first unknown language ("*" = any language)."""
    for lang in map(normalize_language, names):
        if lang != "*" and lang not in LANGUAGE_EXTENSIONS:
            known = f" (known: {', '.join(LANGUAGE_EXTENSIONS)})"
            raise ConfigError(f"{where}: unknown language '{lang}'{_did_you_mean(lang, LANGUAGE_EXTENSIONS) or known}")


def _did_you_mean(value: str, options) -> str:
    """' (did you mean X?)' for a near miss, else '' (the caller lists the options itself)."""
    hint = _closest(str(value), options)
    return hint if "did you mean" in hint else ""


@dataclasses.dataclass
class SourceConfig:
    """One input of the mixture."""

    kind: str = "dir"  # dir | jsonl | parquet | tfds
    path: str = ""  # a directory, a file, or a glob (jsonl/parquet); tfds: a dataset dir or a data_dir
    weight: float = 1.0  # mixture weight: its share of the tokens (or documents: data.weight_unit)
    name: str = ""  # label in statistics (default: basename of path)
    # dir: "repos" = each subdirectory a repository (top-level files form one more), "repo" = the
    # directory itself is one repository, "auto" = "repos" unless files sit at the top level.
    layout: str = "auto"
    include: list[str] = dataclasses.field(default_factory=list)  # dir: glob patterns on repository names
    # jsonl/parquet column names; "" = auto-detect among The Stack's spellings. jsonl content_key
    # "messages": SFT records read as text (sources.chat_text), e.g. an evolved instruction set.
    content_key: str = ""
    repo_key: str = ""
    path_key: str = ""
    language_key: str = ""
    # tfds
    split: str = "train"
    tfds_name: str = "code_repositories"
    # Per-source overrides of the DataConfig values (None = inherit), e.g. natural language:
    # {kind: jsonl, document: file, fim_rate: 0, languages: []}.
    document: str | None = None
    fim_rate: float | None = None
    languages: list[str] | None = None  # ["*"] = no language filter (natural language)

    def label(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.path)) or self.kind


@dataclasses.dataclass
class DataConfig:
    """The `data:` section. Defaults follow Stable Code / StarCoder."""

    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    # Held-out data for `make_eval_iterator`: explicit sources, else a hash split of repositories
    # (by name) at `holdout_fraction`, else (with a warning) one pass over the training sources.
    eval_sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    holdout_fraction: float = 0.0
    tokenizer: str = ""  # a tokenizer.json (or a directory holding one)
    # Special-token spellings when a foreign tokenizer names them differently, e.g. {"<repo_name>": "<reponame>"}.
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    strict: bool = False  # sft/dpo: a malformed JSONL record stops the run with path:line
    # A resumed iterator state saved over other data (a source's unit count or unit names, the
    # mixture weights, the host count, num_workers, the seed): "error" refuses it (exact resume or
    # nothing), "warn" logs what changed and continues on the new data (the order from there on
    # is not the saved run's: some inputs of the current epoch repeat, others are skipped).
    on_source_change: str = "error"
    # What the source weights share out: "tokens" (the paper's sense: 0.8 code = 80% of the training
    # tokens, whatever the document lengths) or "documents" (80% of the documents drawn). Tokens:
    # each source's tokens per unit are estimated at start-up from at least `weight_sample` of its
    # units, then more until the estimate's relative standard error is under 0.5% or
    # `weight_sample_max` units are read (drawn by the seed, the same on every host and resume),
    # and the draw rates set to weight / that.
    weight_unit: str = "tokens"
    weight_sample: int = 256
    weight_sample_max: int = 16384
    # SFT/DPO: drop exact duplicates (whitespace and role spellings normalised), across files and
    # sources, keeping the first in source order (sc_jax.instruct.duplicates). The seen hashes go
    # to an on-disk index in `dedup_dir` ("" = the system's temporary directory).
    dedup: bool = False
    dedup_dir: str = ""

    # Documents
    document: str = "repository"  # repository | file
    repo_orders: int = 2  # each repository emitted in this many different file orders
    max_repo_bytes: int = 50_000_000  # files past this many bytes of one repository are dropped (0 = no limit)

    # Fill-in-the-middle (character-level, per file)
    fim_rate: float = 0.5  # probability that a file is FIM-permuted
    spm_rate: float = 0.5  # probability that a FIM file uses the SPM layout (else PSM)
    fim_repo_rate: float = 1.0  # per-repository coin before the per-file coins (StarCoder2 style: 0.5)

    # File filters
    languages: list[str] = dataclasses.field(default_factory=list)  # empty = DEFAULT_LANGUAGES; ["*"] = any
    extensions: list[str] = dataclasses.field(default_factory=list)  # extra extensions, e.g. [".proto"]
    max_file_bytes: int = 1_000_000
    max_line_length: int = 1000  # longer lines mark minified/generated files (0 = no limit)
    vendored_dirs: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_VENDORED_DIRS))
    skip_hidden: bool = True  # dot-files and dot-directories

    # Packing and reading
    packing: str = "concat"  # concat (concat-then-split, no padding) | first_fit (no splits beyond seq_len)
    first_fit_bins: int = 64
    shuffle: bool = True
    num_workers: int = 0  # worker processes (grain mp_prefetch); 0 = in this process
    worker_buffer_size: int = 2  # batches each worker keeps ready
    read_threads: int = 1  # threads building documents in each process
    read_buffer: int = 16  # documents built ahead per process

    def all_languages(self, override: list[str] | None = None) -> list[str] | None:
        """Selected languages for a source; None means no filter (a "*" entry)."""
        langs = self.languages if override is None else override
        if "*" in langs:
            return None
        return [normalize_language(x) for x in (langs or DEFAULT_LANGUAGES)]

    def validate(self) -> "DataConfig":
        def check_choice(where, value, options):
            if value not in options:
                raise ConfigError(f"{where} '{value}' must be one of {', '.join(options)}{_did_you_mean(value, options)}")

        def check_rate(where, value):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where} = {value} must be within [0, 1]")

        check_choice("data.document", self.document, DOCUMENT_KINDS)
        check_choice("data.packing", self.packing, PACKING_KINDS)
        check_choice("data.on_source_change", self.on_source_change, ON_SOURCE_CHANGE)
        check_choice("data.weight_unit", self.weight_unit, WEIGHT_UNITS)
        for key in ("fim_rate", "spm_rate", "fim_repo_rate"):
            check_rate(f"data.{key}", getattr(self, key))
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction = {self.holdout_fraction} must be within [0, 1)")
        for key in ("repo_orders", "first_fit_bins", "read_threads", "read_buffer", "worker_buffer_size",
                    "weight_sample"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} = {getattr(self, key)} must be at least 1")
        if self.weight_sample_max < self.weight_sample:
            raise ConfigError(f"data.weight_sample_max = {self.weight_sample_max} must be at least data.weight_sample "
                              f"({self.weight_sample})")
        for key in ("num_workers", "max_file_bytes", "max_line_length", "max_repo_bytes"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} = {getattr(self, key)} must not be negative")
        for group, sources in (("sources", self.sources), ("eval_sources", self.eval_sources)):
            for i, src in enumerate(sources):
                where = f"data.{group}[{i}]"
                check_choice(f"{where}.kind", src.kind, SOURCE_KINDS)
                check_choice(f"{where}.layout", src.layout, DIR_LAYOUTS)
                if not src.path:
                    raise ConfigError(f"{where}.path is empty")
                if not 0 < src.weight < float("inf"):  # NaN fails too
                    raise ConfigError(f"{where}.weight = {src.weight} must be a positive number (its share of the "
                                      "mixture)")
                if src.document is not None:
                    check_choice(f"{where}.document", src.document, DOCUMENT_KINDS)
                if src.fim_rate is not None:
                    check_rate(f"{where}.fim_rate", src.fim_rate)
        check_languages([x for s in [self] + self.sources + self.eval_sources for x in (s.languages or [])])
        if self.dedup and self.dedup_dir:
            self._check_dedup_dir()
        for ext in self.extensions:
            if not ext.startswith("."):
                raise ConfigError(f"data.extensions: '{ext}' must start with a dot")
        return self

    def _check_dedup_dir(self) -> None:
        where = self.dedup_dir
        problem = ("does not exist" if not os.path.exists(where) else "is not a directory" if not os.path.isdir(where)
                   else "is not writable" if not os.access(where, os.W_OK | os.X_OK) else None)
        if problem:
            raise ConfigError(f"data.dedup_dir '{where}' {problem}: give a writable directory for the dedup hash "
                              "index, or '' for the system's temporary directory")
