"""TFDS builder: any of our sources -> ArrayRecord files, one record per repository.

    python -m sc_jax.data.tfds_builder --source dir:/data/repos --source jsonl:/data/stack.jsonl \\
        --data-dir /data/tfds [--holdout-fraction 0.01] [--languages python,java]

writes /data/tfds/code_repositories/1.0.0/ (splits `train`, and `validation` with a holdout), read
back without TensorFlow by `tfds.data_source` / a source `{kind: tfds, path: <that dir>}`.

Each record: {"repo_name": str, "files": [{"path": str, "content": str, "language": str}]}, files
already filtered and decoded (the same filters as the pipeline, so bad input is skipped and counted
here once); records keep the source order (we shuffle in grain).

The dataset is written to a temporary directory and moved in when complete: a failed build leaves
nothing. A rerun into the same --data-dir keeps a dataset built from the same sources and settings
(it does not look at whether their files changed: --overwrite rebuilds), and refuses one built from
other sources or settings, naming what differs (use another --data-dir, or --overwrite).
"""

from __future__ import annotations

import os
import sys

from sc_jax.cli import Parser, first_line, fraction, whole_number
from sc_jax.config import ConfigError
from sc_jax.data.config import DataConfig, SourceConfig, check_languages
from sc_jax.data.tfds_builder import build, build_settings, dataset_dir, previous_build


def _parse_sources(specs: list[str]) -> list[SourceConfig]:
    sources = []
    for spec in specs:
        kind, sep, path = spec.partition(":")
        if not sep or kind not in ("dir", "jsonl", "parquet"):
            raise ConfigError(f"--source '{spec}' must be dir:PATH, jsonl:PATH or parquet:PATH")
        if not path:
            raise ConfigError(f"--source '{spec}' has no path: write {kind}:PATH")
        sources.append(SourceConfig(kind=kind, path=os.path.expanduser(path)))
    return sources


def _parser() -> Parser:
    head, rest = __doc__.split("\n\n", 1)
    parser = Parser(prog="python -m sc_jax.data.tfds_builder", description=head, epilog=rest)
    parser.add_argument("--source", action="append", required=True, metavar="KIND:PATH",
                        help="dir:PATH, jsonl:PATH or parquet:PATH (repeatable)")
    parser.add_argument("--data-dir", required=True, metavar="DIR", help="TFDS data_dir to write into")
    parser.add_argument("--holdout-fraction", type=fraction, default=0.0, metavar="F",
                        help="share of the repositories (by name hash) written to a `validation` split")
    parser.add_argument("--languages", default="", metavar="LIST",
                        help="comma-separated languages (default: the 18 default ones)")
    parser.add_argument("--max-file-bytes", type=whole_number(0), default=DataConfig.max_file_bytes, metavar="N",
                        help="larger files are skipped (0 = no limit)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already in --data-dir that was built from other sources or settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
            raise ConfigError(f"--data-dir '{args.data_dir}' is a file: give a directory")
        sources = _parse_sources(args.source)
        languages = [x for x in args.languages.split(",") if x]
        check_languages(languages, "--languages")
        cfg = DataConfig(sources=sources, languages=languages, max_file_bytes=args.max_file_bytes).validate()
        path = dataset_dir(args.data_dir)
        kept = None if args.overwrite else previous_build(path, build_settings(sources, cfg, args.holdout_fraction))
        if kept is None:
            path, stats = build(sources, args.data_dir, data_config=cfg, holdout_fraction=args.holdout_fraction,
                                quiet=args.quiet, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --data-dir, a full disk
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    if kept is None:
        print(f"wrote {path}")
    else:
        stats = kept
        print(f"kept {path}: already built from these sources and settings (--overwrite rebuilds it from the "
              "files as they are now)")
    print("statistics: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    print(f"use it with: sources: [{{kind: tfds, path: {path}}}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
