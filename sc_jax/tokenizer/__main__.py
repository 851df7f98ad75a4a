"""`python -m sc_jax.tokenizer`: train a byte-level BPE with the Stable Code special tokens on
local code, or show what a tokenizer.json holds.

    python -m sc_jax.tokenizer train --corpus DIR --vocab-size 4096 --out tokenizer.json
    python -m sc_jax.tokenizer info tokenizer.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import tokenizers

from sc_jax.cli import Parser, first_line, whole_number
from sc_jax.fileio import nearest_existing
from sc_jax.config import ConfigError
from sc_jax.data.config import check_languages
from sc_jax.tokenizer import (
    ALL_SPECIAL_TOKENS,
    MIN_VOCAB_SIZE,
    PRETRAIN_TOKENS,
    TRAIN_COMMAND,
    VOCAB_FLOOR,
    Tokenizer,
    TokenizerError,
    build_bpe_trainer,
    iter_corpus_texts,
)


def _check_train_args(args) -> list[str]:
    """Everything that can be checked before reading the corpus; returns the languages."""
    if not os.path.isdir(args.corpus):
        what = "is not a directory" if os.path.exists(args.corpus) else "does not exist"
        raise TokenizerError(f"--corpus '{args.corpus}' {what}: give the directory of source code to train on")
    if os.path.isdir(args.out):
        raise TokenizerError(f"--out '{args.out}' is a directory: give a file path, e.g. "
                             f"{os.path.join(args.out, 'tokenizer.json')}")
    probe = nearest_existing(os.path.dirname(os.path.abspath(args.out)))  # where the directory for --out is made
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise TokenizerError(f"--out '{args.out}' cannot be written ('{probe}' is "
                             f"{'a file' if not os.path.isdir(probe) else 'not writable'}): give another path")
    languages = [x for x in (args.languages or "").split(",") if x]
    check_languages(languages, "--languages")
    return languages


def _train(args) -> int:
    languages = _check_train_args(args)
    t0 = time.time()
    stats: dict[str, int] = {}
    tok, trainer = build_bpe_trainer(args.vocab_size, min_frequency=args.min_frequency, show_progress=not args.quiet)
    texts = iter_corpus_texts(args.corpus, languages=languages, max_bytes=args.max_bytes, progress=not args.quiet,
                              stats=stats)
    tok.train_from_iterator(texts, trainer)
    if not stats.get("files"):
        raise TokenizerError(f"--corpus '{args.corpus}' has no usable code files (skipped: {_fmt(stats)}): point it "
                             "at a directory of source files, or widen --languages")
    _save_whole(tok, args.out)
    wrapped = Tokenizer.from_file(args.out)
    print(f"wrote {args.out}: vocab_size={wrapped.vocab_size} from {stats.get('files', 0)} files "
          f"in {time.time() - t0:.1f}s (skipped: {_fmt({k: v for k, v in stats.items() if k != 'files'})})")
    print("special tokens: " + ", ".join(f"{k}={v}" for k, v in wrapped.special.items()))
    return 0


def _save_whole(tok: tokenizers.Tokenizer, out: str) -> None:
    """Writes next to `out` and moves it in: a failed run never leaves a partial tokenizer.json."""
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    # in out's directory, so os.replace moves the file without copying it across file systems
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out_dir, ignore_cleanup_errors=True) as tmp:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        os.replace(os.path.join(tmp, "tokenizer.json"), out)


def _info(args) -> int:
    tok = Tokenizer.from_file(args.path)
    print(json.dumps({"path": tok.path, "vocab_size": tok.vocab_size, "special": tok.special}, indent=2))
    missing = [t for t in PRETRAIN_TOKENS if t not in tok.special]
    if missing:
        print(f"missing for pretraining: {', '.join(missing)}")
    return 0


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "none"


def _parser() -> Parser:
    """The command line (a function, so tests can read every option's help)."""
    parser = Parser(prog="python -m sc_jax.tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,info}")
    tr = sub.add_parser("train", help="train a byte-level BPE with the Stable Code special tokens on local code",
                        description="Trains a byte-level BPE (GPT-2/NeoX style) on the code files under --corpus,\n"
                                    f"with the special tokens (ids 0..{len(ALL_SPECIAL_TOKENS) - 1}):\n"
                                    f"    {' '.join(ALL_SPECIAL_TOKENS)}\nExample:\n    {TRAIN_COMMAND}")
    tr.add_argument("--corpus", required=True, metavar="DIR", help="directory of source code (walked recursively)")
    tr.add_argument("--vocab-size", type=whole_number(MIN_VOCAB_SIZE, VOCAB_FLOOR), required=True, metavar="N",
                    help=f"target vocabulary size, special tokens included (at least {MIN_VOCAB_SIZE})")
    tr.add_argument("--out", required=True, metavar="FILE", help="output tokenizer.json path")
    tr.add_argument("--languages", default="", metavar="LIST",
                    help="comma-separated languages (default: the 18 default ones)")
    tr.add_argument("--max-bytes", type=whole_number(0), default=0, metavar="N",
                    help="stop reading after this many characters (default: 0 = all)")
    tr.add_argument("--min-frequency", type=whole_number(0), default=2, metavar="N",
                    help="minimum pair frequency for a merge")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    info = sub.add_parser("info", help="print vocab size and special-token ids of a tokenizer.json",
                          description="Prints the vocabulary size and the special-token ids of a tokenizer.")
    info.add_argument("path", help="a tokenizer.json, or a directory holding one")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _info(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out, a full disk
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
