"""TFDS builder: any of our sources -> ArrayRecord files, one record per repository.

    python -m sc_jax.data.tfds_builder --source dir:/data/repos --source jsonl:/data/stack.jsonl \\
        --data-dir /data/tfds [--holdout-fraction 0.01] [--languages python,java]

writes /data/tfds/code_repositories/1.0.0/ (splits `train`, and `validation` with a holdout), read
back without TensorFlow by `tfds.data_source` / a source `{kind: tfds, path: <that dir>}`.

Each record: {"repo_name": str, "files": [{"path": str, "content": str, "language": str}]}, files
already filtered and decoded (the same filters as the pipeline, so bad input is skipped and counted
here once); records keep the source order (we shuffle in grain).
"""

from __future__ import annotations

import argparse
import os
import sys

import tensorflow_datasets as tfds
from etils import epath

from sc_jax.config import ConfigError
from sc_jax.data.config import LANGUAGE_EXTENSIONS, DataConfig, SourceConfig
from sc_jax.data.documents import holdout_value
from sc_jax.data.sources import open_source

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


def build(sources: list[SourceConfig], data_dir: str, *, data_config: DataConfig | None = None,
          holdout_fraction: float = 0.0, quiet: bool = False) -> tuple[str, dict]:
    """Builds the ArrayRecord dataset; returns (dataset directory, build statistics)."""
    if quiet:
        tfds.disable_progress_bar()
    builder = CodeRepositories(sources=sources, data_config=data_config, holdout_fraction=holdout_fraction,
                               data_dir=data_dir, file_format="array_record")
    builder.open_sources()
    builder.download_and_prepare()
    return str(builder.data_dir), builder.build_stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sc_jax.data.tfds_builder", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True, metavar="KIND:PATH",
                        help="dir:PATH, jsonl:PATH or parquet:PATH (repeatable)")
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--holdout-fraction", type=float, default=0.0,
                        help="repositories (by name hash) written to a `validation` split")
    parser.add_argument("--languages", default="", help="comma-separated languages (default: the 18 default ones)")
    parser.add_argument("--max-file-bytes", type=int, default=DataConfig.max_file_bytes)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        sources = []
        for spec in args.source:
            kind, sep, path = spec.partition(":")
            if not sep or kind not in ("dir", "jsonl", "parquet"):
                raise ConfigError(f"--source '{spec}' must be dir:PATH, jsonl:PATH or parquet:PATH")
            sources.append(SourceConfig(kind=kind, path=path))
        cfg = DataConfig(sources=sources, languages=[x for x in args.languages.split(",") if x],
                         max_file_bytes=args.max_file_bytes).validate()
        path, stats = build(sources, args.data_dir, data_config=cfg, holdout_fraction=args.holdout_fraction,
                            quiet=args.quiet)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    print("statistics: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    print(f"use it with: sources: [{{kind: tfds, path: {path}}}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
