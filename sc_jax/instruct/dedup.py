"""Remove exact duplicates from SFT / DPO JSONL files, across files and inputs.

    python -m sc_jax.instruct.dedup openhermes.jsonl code_feedback/ codealpaca.jsonl --out sft.jsonl

Each IN (a file, a glob or a directory of *.jsonl / *.ndjson) is one input; the first occurrence
of a record in the order given (inputs, then their files sorted, then lines) is kept, every later
copy removed. Records are compared after normalising whitespace (every run one space, none at the
ends) and role spellings (ShareGPT's human/gpt = user/assistant): the conversation for SFT, the
prompt, chosen and rejected answers for DPO (--task auto tells them apart per record). Kept lines
are copied byte for byte; lines that are not records of the task are kept as they are (and
counted). Prints, per input, what was read, kept and removed, and a few of the removed lines with
the line they duplicate. Seen hashes go to an on-disk index (--tmp-dir), so memory stays bounded
on corpora larger than memory. OUT is written to a temporary file and moved into place at the end.
Training can deduplicate as it scans, too: data.dedup=true.
"""

from __future__ import annotations

import os
import sys
import time

from sc_jax.cli import Parser, exit_code_of, whole_number
from sc_jax.config import ConfigError


def _parser() -> Parser:
    doc = __doc__.split("\n\n", 1)
    parser = Parser(prog="python -m sc_jax.instruct.dedup", description=doc[0], epilog=doc[1])
    parser.add_argument("inputs", nargs="+", metavar="IN", help="JSONL file, glob or directory (one input each)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the deduplicated JSONL file to write")
    parser.add_argument("--task", choices=("auto", "sft", "dpo"), default="auto",
                        help="what the records are: auto = per record (prompt+chosen+rejected: dpo, else sft)")
    parser.add_argument("--show", type=whole_number(0), default=10, metavar="N",
                        help="removed lines to list per input")
    parser.add_argument("--tmp-dir", default="", metavar="DIR",
                        help="where the on-disk hash index goes (default: the system's temporary directory)")
    parser.add_argument("--cache-mb", type=whole_number(1), default=64, metavar="MB",
                        help="memory for the index's page cache")
    parser.add_argument("--batch", type=whole_number(1), default=16384, metavar="N",
                        help="records looked up in the index together (in sorted order)")
    parser.add_argument("--force", action="store_true", help="replace OUT when it exists")
    return parser


def _sources(inputs: list[str], out: str) -> list[tuple[str, list[str]]]:
    from sc_jax.instruct.duplicates import expand_paths

    sources = []
    for given in inputs:
        files = expand_paths(given)
        if os.path.abspath(out) in map(os.path.abspath, files):
            raise ConfigError(f"--out {out} is also an input ({given}): write the result to a new file")
        sources.append((given, files))
    return sources


def _print_report(reports, seconds: float, out: str, index_bytes: int) -> None:
    total = sum(r.records for r in reports)
    removed = sum(r.duplicates for r in reports)
    for r in reports:
        print(f"{r.label}: {r.records:,} records in {len(r.files)} file(s), kept {r.kept:,}, removed {r.duplicates:,} "
              f"duplicate(s) ({r.across:,} of an earlier input)"
              + (f", {r.unparsed:,} line(s) not records, kept as they are" if r.unparsed else ""))
        for example in r.examples:
            print(f"  removed {example}")
    print(f"removed {removed:,} of {total:,} records ({removed / total if total else 0:.2%}); wrote "
          f"{total - removed:,} to {out} ({seconds:.1f}s, hash index {index_bytes / 2**20:.1f} MiB on disk)")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of(lambda: run(args))


def run(args) -> int:
    """Deduplicates the inputs into --out; returns the exit code."""
    from sc_jax.fileio import atomic_file, check_new_file, nearest_existing
    from sc_jax.instruct.duplicates import HashIndex, dedup_files

    out = check_new_file(args.out, args.force)
    if not os.access(nearest_existing(os.path.dirname(out)), os.W_OK):
        raise ConfigError(f"cannot write --out {args.out}: its directory is not writable")
    if args.tmp_dir and not os.path.isdir(args.tmp_dir):
        raise ConfigError(f"--tmp-dir {args.tmp_dir} is not a directory: give an existing one")
    sources = _sources(args.inputs, out)
    t0 = time.time()

    def progress(rep):
        print(f"  {rep.label}: {rep.records:,} records read, {rep.duplicates:,} duplicates so far", flush=True)

    with HashIndex(args.tmp_dir, args.cache_mb, args.batch) as index, atomic_file(out, args.force) as tmp:
        with open(tmp, "wb") as f:
            reports = dedup_files(sources, f, task=args.task, index=index, show=args.show, progress=progress)
        index_bytes = index.disk_bytes()
    _print_report(reports, time.time() - t0, out, index_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
