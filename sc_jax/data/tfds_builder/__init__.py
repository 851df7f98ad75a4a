"""TFDS builder: any of our sources -> ArrayRecord files, one record per repository.

    target, stats = build([SourceConfig(kind="dir", path="/data/repos")], "/data/tfds", holdout_fraction=0.01)

writes /data/tfds/code_repositories/1.0.0/ (splits `train`, and `validation` with a holdout), read
back without TensorFlow by `tfds.data_source` / a source `{kind: tfds, path: <that dir>}`. The
command line is `python -m sc_jax.data.tfds_builder` (`__main__.py`).

Each record: {"repo_name": str, "files": [{"path": str, "content": str, "language": str}]}, files
already filtered and decoded (the same filters as the pipeline, so bad input is skipped and counted
here once); records keep the source order (we shuffle in grain).

The dataset is written to a temporary directory and moved in when complete: a failed build leaves
nothing. A build into a data_dir that already holds a dataset built from the same sources and
settings keeps it (it does not look at whether their files changed: overwrite=True rebuilds), and
refuses one built from other sources or settings, naming what differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile

import tensorflow_datasets as tfds
from etils import epath

from sc_jax.config import ConfigError
from sc_jax.data.config import LANGUAGE_EXTENSIONS, DataConfig, SourceConfig
from sc_jax.data.documents import holdout_value
from sc_jax.data.sources import DataError, open_source
from sc_jax.fileio import nearest_existing

_EXT_TO_LANG = {ext: lang for lang, exts in LANGUAGE_EXTENSIONS.items() for ext in exts}


def language_of(path: str) -> str:
    return _EXT_TO_LANG.get(os.path.splitext(path.lower())[1], "")


class CodeRepositories(tfds.core.GeneratorBasedBuilder):
    """Source code, one example per repository."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS would locate this file through `importlib_resources` (not installed); tell it directly.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Repositories with their files (path, content, language)."}

    def __init__(self, *, sources: list[SourceConfig] = (), data_config: DataConfig | None = None,
                 holdout_fraction: float = 0.0, **kwargs):
        self._sources = list(sources)
        self._data_config = data_config or DataConfig()
        self._holdout = holdout_fraction
        self._opened = None
        self.build_stats: dict[str, int] = {}
        self.usable_elsewhere: dict[str, int] = {}  # per split: usable repositories that belong to the other
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "repo_name": tfds.features.Text(),
                "files": tfds.features.Sequence({
                    "path": tfds.features.Text(),
                    "content": tfds.features.Text(),
                    "language": tfds.features.Text(),
                }),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        if not self._sources:
            raise ConfigError("CodeRepositories needs sources=[SourceConfig(...)] to build")
        splits = {"train": self._generate_examples("train")}
        if self._holdout > 0:
            splits["validation"] = self._generate_examples("validation")
        return splits

    # TFDS prints where it writes: a temporary directory (see `build`); the command says where it ends up.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _count(self, key: str, n: int = 1) -> None:
        self.build_stats[key] = self.build_stats.get(key, 0) + n

    def open_sources(self):
        """Scans the sources (raising a ConfigError for a bad one) before anything is written."""
        if self._opened is None:
            self._opened = [open_source(s, self._data_config, group_repos=True) for s in self._sources]
        return self._opened

    def _generate_examples(self, split: str):
        for s_idx, src in enumerate(self.open_sources()):
            if split == "train":
                for k, v in src.scan_skipped.items():
                    self._count(k, v)
            for i in range(src.num_repos()):
                name = src.repo_name(i)
                data = src.read_repo(i)
                name = data.name or name or f"{src.label}#{i}"
                held_out = self._holdout > 0 and holdout_value(name) < self._holdout
                if held_out != (split == "validation"):
                    if data.files:  # usable, in the other split: tells an empty split's cause
                        self.usable_elsewhere[split] = self.usable_elsewhere.get(split, 0) + 1
                    continue
                for k, v in data.skipped.items():
                    self._count(k, v)
                if not data.files:
                    self._count("empty_repo")
                    continue
                self._count(f"{split}_repos")
                self._count(f"{split}_files", len(data.files))
                yield f"{s_idx:04d}-{i:09d}", {
                    "repo_name": name,
                    "files": [{"path": p, "content": t, "language": language_of(p)} for p, t in data.files],
                }

    def empty_split_error(self, split: str) -> DataError:
        """Why `split` got no record, and what to change."""
        if self.usable_elsewhere.get(split):
            other = "train" if split == "validation" else "validation"
            fix = "raise it, or leave it at 0 for no validation split" if split == "validation" else "lower it"
            return DataError(f"no repository fell in the {split} split: all {self.usable_elsewhere[split]} usable "
                             f"ones went to {other} at --holdout-fraction {self._holdout}; {fix}")
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self._skipped().items()))
        return DataError(f"no usable repositories in the sources (skipped: {skipped or 'nothing found'}): check the "
                         "--source paths and --languages")

    def _skipped(self) -> dict[str, int]:
        if self.build_stats:  # the train pass has run: it counted the scans' skips too
            return {k: v for k, v in self.build_stats.items() if not k.startswith(("train_", "validation_"))}
        out: dict[str, int] = {}
        for src in self.open_sources():
            for k, v in src.scan_skipped.items():
                out[k] = out.get(k, 0) + v
        return out


# ----------------------------------------------------------------------------- building

BUILD_RECORD = "sc_jax_build.json"  # beside dataset_info.json: what the dataset was built from
# The DataConfig settings that decide which files a record holds.
_FILTER_KEYS = ("languages", "extensions", "max_file_bytes", "max_line_length", "max_repo_bytes", "vendored_dirs",
                "skip_hidden")


def dataset_dir(data_dir: str) -> str:
    """Where `build` puts the dataset under a TFDS data_dir."""
    return os.path.join(data_dir, CodeRepositories.name, str(CodeRepositories.VERSION))


def build_settings(sources: list[SourceConfig], data_config: DataConfig, holdout_fraction: float) -> dict:
    """What decides the records: the sources (paths made absolute) and the file filters."""
    srcs = []
    for s in sources:
        d = dataclasses.asdict(s)
        d["path"] = os.path.abspath(os.path.expanduser(s.path))
        srcs.append({k: v for k, v in d.items() if k not in ("weight", "name", "document", "fim_rate")})
    filters = {k: getattr(data_config, k) for k in _FILTER_KEYS}
    filters["languages"] = data_config.all_languages() or ["*"]
    return {"sources": srcs, "holdout_fraction": holdout_fraction, **filters}


def _describe(key: str, value) -> str:
    if key == "sources":
        return " ".join(f"{s['kind']}:{s['path']}" for s in value) or "none"
    return json.dumps(value)


def previous_build(target: str, settings: dict) -> dict | None:
    """The statistics of the dataset at `target` when it was built with `settings`; None when there
    is none; a DataError when it was built from something else (reusing it would be stale data)."""
    if not os.path.exists(target):
        return None
    how = "use another --data-dir, or pass --overwrite to rebuild it"
    try:
        with open(os.path.join(target, BUILD_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        raise DataError(f"{target} already holds a dataset with no record of what it was built from: {how}") from None
    old = record.get("settings", {})
    differ = [k for k in settings if old.get(k) != settings[k]]
    if differ:
        what = "; ".join(f"{k} {_describe(k, old.get(k))} there, {_describe(k, settings[k])} here" for k in differ)
        raise DataError(f"{target} already holds a dataset built from other settings ({what}): {how}")
    return record.get("statistics", {})


def build(sources: list[SourceConfig], data_dir: str, *, data_config: DataConfig | None = None,
          holdout_fraction: float = 0.0, quiet: bool = False, overwrite: bool = False) -> tuple[str, dict]:
    """Builds the ArrayRecord dataset; returns (dataset directory, build statistics).

    Nothing appears under `data_dir` unless the build succeeds (it is written to a temporary
    directory and moved in). A dataset already there from the same settings is kept (its
    statistics returned); one from other settings is a DataError unless `overwrite`."""
    cfg = data_config or DataConfig()
    target = dataset_dir(data_dir)
    settings = build_settings(sources, cfg, holdout_fraction)
    if not overwrite:
        kept = previous_build(target, settings)
        if kept is not None:
            return target, kept
    if quiet:
        tfds.disable_progress_bar()
    if not os.path.isdir(nearest_existing(data_dir)):
        raise DataError(f"data_dir {data_dir} is under a file, {nearest_existing(data_dir)}: "
                        "point it at a directory")
    # beside the dataset's place (os.replace moves it in), in what of data_dir exists already (a failed build
    # leaves no empty data_dir behind)
    with tempfile.TemporaryDirectory(prefix=".tfds_builder-", dir=nearest_existing(data_dir),
                                     ignore_cleanup_errors=True) as tmp:
        builder = CodeRepositories(sources=sources, data_config=cfg, holdout_fraction=holdout_fraction,
                                   data_dir=tmp, file_format="array_record")
        if not sum(src.num_repos() for src in builder.open_sources()):
            raise builder.empty_split_error("train")
        _prepare(builder)
        built = str(builder.data_dir)
        with open(os.path.join(built, BUILD_RECORD), "w") as f:
            json.dump({"settings": settings, "statistics": builder.build_stats}, f, indent=1)
        _move_into_place(built, target, os.path.join(tmp, "replaced"))
    return target, builder.build_stats


def _prepare(builder: CodeRepositories) -> None:
    """download_and_prepare, with TFDS's assertion on an empty split turned into what to change."""
    try:
        builder.download_and_prepare()
    except AssertionError as e:
        match = re.search(r'split "(\w+)": No examples were yielded', str(e))
        if match is None:
            raise
        raise builder.empty_split_error(match.group(1)) from None


def _move_into_place(built: str, target: str, trash: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.exists(target):  # --overwrite: the old dataset goes with the temporary directory
        os.replace(target, trash)
    os.replace(built, target)
