"""Tokenizer: any Hugging Face `tokenizer.json`, special tokens looked up by string.

    tok = Tokenizer.from_file("tokenizer.json")   # or a directory holding one
    tok.require(*PRETRAIN_TOKENS)                  # one error naming every missing token
    ids = tok.encode("def f():\\n", allow_special=False)

Train a byte-level BPE (with all the special tokens below) on local code:

    python -m sc_jax.tokenizer train --corpus DIR --vocab-size 4096 --out tokenizer.json

Token ids are never hard-coded: `tok.special["<fim_prefix>"]`, `tok.token_id("<file_sep>")`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sc_jax.config import ConfigError

EOS = "<|endoftext|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
REPO_NAME, FILE_SEP = "<repo_name>", "<file_sep>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

PRETRAIN_TOKENS = (EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP)
CHAT_TOKENS = (IM_START, IM_END)
# What a trained tokenizer holds, in id order (<|endoftext|> = 0, as in StableLM).
ALL_SPECIAL_TOKENS = PRETRAIN_TOKENS + CHAT_TOKENS
MIN_VOCAB_SIZE = 256 + len(ALL_SPECIAL_TOKENS)  # a byte-level BPE: every byte, every special token
_VOCAB_FLOOR = (f"a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                f"(256 bytes + {len(ALL_SPECIAL_TOKENS)} special tokens)")
TRAIN_COMMAND = "python -m sc_jax.tokenizer train --corpus DIR --vocab-size N --out tokenizer.json"
_WHY = {EOS: "end of document", FIM_PREFIX: "fill-in-the-middle", FIM_MIDDLE: "fill-in-the-middle",
        FIM_SUFFIX: "fill-in-the-middle", FIM_PAD: "fill-in-the-middle", REPO_NAME: "repository documents",
        FILE_SEP: "repository documents", IM_START: "chat (SFT)", IM_END: "chat (SFT)"}


class TokenizerError(ConfigError):
    """A tokenizer file that is missing, unreadable or lacks tokens we need."""


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that finds special tokens by string."""

    def __init__(self, tok: tokenizers.Tokenizer, *, path: str = "", aliases: dict[str, str] | None = None):
        self._tok = tok
        self.path = path
        self.aliases = dict(aliases or {})
        # A twin that encodes special-token strings as plain text: data must never smuggle in
        # a `<file_sep>` just because a source file contains that string.
        self._plain = tokenizers.Tokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab = vocab
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self.special: dict[str, int] = {}
        for name in ALL_SPECIAL_TOKENS:
            spelled = self.aliases.get(name, name)
            if spelled in vocab:
                self.special[name] = vocab[spelled]
        unknown = set(self.aliases) - set(ALL_SPECIAL_TOKENS)
        if unknown:
            raise TokenizerError(f"special_tokens aliases for unknown names {sorted(unknown)}; "
                                 f"known names: {', '.join(ALL_SPECIAL_TOKENS)}")

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str, aliases: dict[str, str] | None = None) -> "Tokenizer":
        if not path:
            raise TokenizerError(f"no tokenizer given: set data.tokenizer to a tokenizer.json (train one with "
                                 f"`{TRAIN_COMMAND}`)")
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerError(f"tokenizer file '{file}' does not exist: set data.tokenizer to a tokenizer.json, "
                                 f"or train one with `{TRAIN_COMMAND}`")
        try:
            tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise TokenizerError(f"cannot read tokenizer '{file}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return cls(tok, path=file, aliases=aliases)

    # --- special tokens -------------------------------------------------------------------

    def token_id(self, s: str) -> int:
        """The id of a token spelled `s` (special tokens honour the aliases)."""
        spelled = self.aliases.get(s, s)
        if spelled in self._vocab:
            return self._vocab[spelled]
        raise TokenizerError(f"token '{spelled}' is not in the tokenizer {self.path or ''}".rstrip())

    def require(self, *names: str) -> None:
        """Raises one TokenizerError listing every missing token in `names`."""
        missing = [n for n in names if self.aliases.get(n, n) not in self._vocab]
        if missing:
            listed = ", ".join(f"{n} ({_WHY.get(n, 'required')})" for n in missing)
            raise TokenizerError(
                f"tokenizer '{self.path}' lacks special tokens: {listed}. Train one that has them with "
                f"`{TRAIN_COMMAND}`, or map "
                "differently spelled ones with data.special_tokens, e.g. {\"<repo_name>\": \"<reponame>\"}")

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    # --- encode / decode ------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids, no BOS/EOS added. With allow_special=False, special-token strings in `text`
        are encoded as ordinary text (use this for data); True parses them (chat templates, prompts)."""
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        tok = self._tok if allow_special else self._plain
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, special={self.special})"

    # tokenizers objects pickle themselves; keep pickles small and explicit.
    def __getstate__(self):
        return {"json": self._tok.to_str(), "path": self.path, "aliases": self.aliases}

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), path=state["path"], aliases=state["aliases"])


# ----------------------------------------------------------------------------- training


def build_bpe_trainer(vocab_size: int, *, min_frequency: int = 2, show_progress: bool = True):
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: {_VOCAB_FLOOR}")
    tok = tokenizers.Tokenizer(models.BPE())
    # GPT-2/NeoX style byte-level BPE: every string round-trips exactly, no unknown tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=list(ALL_SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def train_tokenizer(texts, vocab_size: int, *, length: int | None = None, min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """Trains a byte-level BPE holding ALL_SPECIAL_TOKENS on an iterable of strings."""
    tok, trainer = build_bpe_trainer(vocab_size, min_frequency=min_frequency, show_progress=show_progress)
    tok.train_from_iterator(texts, trainer, length=length)
    return Tokenizer(tok)


def iter_corpus_texts(corpus: str, *, languages=None, max_bytes: int = 0, max_file_bytes: int = 1_000_000,
                      progress: bool = False, stats: dict | None = None):
    """Yields the decoded text of every code file under `corpus` (filters as the data pipeline)."""
    from sc_jax.data.config import DataConfig
    from sc_jax.data.sources import FileFilter, scan_tree

    cfg = DataConfig(languages=list(languages or []), max_file_bytes=max_file_bytes)
    filt = FileFilter.from_config(cfg, None)
    skipped: dict[str, int] = {} if stats is None else stats
    files = scan_tree(corpus, filt, skipped)
    total = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(files), unit="file", desc="reading corpus", file=sys.stderr)
    for path in files:
        if bar is not None:
            bar.update(1)
        text, reason = filt.read_and_clean(path)
        if text is None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        skipped["files"] = skipped.get("files", 0) + 1
        total += len(text)
        yield text
        if max_bytes and total >= max_bytes:
            break
    if bar is not None:
        bar.close()


def _check_train_args(args) -> list[str]:
    """Everything that can be checked before reading the corpus; returns the languages."""
    from sc_jax.data.config import check_languages

    if not os.path.isdir(args.corpus):
        what = "is not a directory" if os.path.exists(args.corpus) else "does not exist"
        raise TokenizerError(f"--corpus '{args.corpus}' {what}: give the directory of source code to train on")
    if os.path.isdir(args.out):
        raise TokenizerError(f"--out '{args.out}' is a directory: give a file path, e.g. "
                             f"{os.path.join(args.out, 'tokenizer.json')}")
    probe = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(probe):  # the directory made for --out grows from here
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise TokenizerError(f"--out '{args.out}' cannot be written ('{probe}' is "
                             f"{'a file' if not os.path.isdir(probe) else 'not writable'}): give another path")
    languages = [x for x in (args.languages or "").split(",") if x]
    check_languages(languages, "--languages")
    return languages


def _train_cli(args) -> int:
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
    with _cli().scratch_dir(out_dir, ".tokenizer-") as tmp:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        os.replace(os.path.join(tmp, "tokenizer.json"), out)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "none"


def _cli():
    from sc_jax.data import cli  # imported late: sc_jax.data imports this module

    return cli


def _parser():
    """The command line (a function, so tests can read every option's help)."""
    cli = _cli()
    parser = cli.Parser(prog="python -m sc_jax.tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,info}")
    tr = sub.add_parser("train", help="train a byte-level BPE with the Stable Code special tokens on local code",
                        description="Trains a byte-level BPE (GPT-2/NeoX style) on the code files under --corpus,\n"
                                    f"with the special tokens (ids 0..{len(ALL_SPECIAL_TOKENS) - 1}):\n"
                                    f"    {' '.join(ALL_SPECIAL_TOKENS)}\nExample:\n    {TRAIN_COMMAND}")
    tr.add_argument("--corpus", required=True, metavar="DIR", help="directory of source code (walked recursively)")
    tr.add_argument("--vocab-size", type=cli.whole_number(MIN_VOCAB_SIZE, _VOCAB_FLOOR), required=True, metavar="N",
                    help=f"target vocabulary size, special tokens included (at least {MIN_VOCAB_SIZE})")
    tr.add_argument("--out", required=True, metavar="FILE", help="output tokenizer.json path")
    tr.add_argument("--languages", default="", metavar="LIST",
                    help="comma-separated languages (default: the 18 default ones)")
    tr.add_argument("--max-bytes", type=cli.whole_number(0), default=0, metavar="N",
                    help="stop reading after this many characters (default: 0 = all)")
    tr.add_argument("--min-frequency", type=cli.whole_number(0), default=2, metavar="N",
                    help="minimum pair frequency for a merge")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    info = sub.add_parser("info", help="print vocab size and special-token ids of a tokenizer.json",
                          description="Prints the vocabulary size and the special-token ids of a tokenizer.")
    info.add_argument("path", help="a tokenizer.json, or a directory holding one")
    return parser


def main(argv=None) -> int:
    cli = _cli()
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train_cli(args)
        tok = Tokenizer.from_file(args.path)
        print(json.dumps({"path": tok.path, "vocab_size": tok.vocab_size, "special": tok.special}, indent=2))
        missing = [t for t in PRETRAIN_TOKENS if t not in tok.special]
        if missing:
            print(f"missing for pretraining: {', '.join(missing)}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out, a full disk
        print(f"error: {cli.first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
