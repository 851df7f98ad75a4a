"""Tokenizer: any Hugging Face `tokenizer.json`, special tokens looked up by string.

    tok = Tokenizer.from_file("tokenizer.json")   # or a directory holding one
    tok.require(*PRETRAIN_TOKENS)                  # one error naming every missing token
    ids = tok.encode("def f():\\n", allow_special=False)

Train a byte-level BPE (with all the special tokens below) on local code: `train_tokenizer(texts,
vocab_size)`, or from the command line (`__main__.py`):

    python -m sc_jax.tokenizer train --corpus DIR --vocab-size 4096 --out tokenizer.json

Token ids are never hard-coded: `tok.special["<fim_prefix>"]`, `tok.token_id("<file_sep>")`.
"""

from __future__ import annotations

import os
import sys

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sc_jax.config import ConfigError

EOS = "<|endoftext|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
REPO_NAME, FILE_SEP = "<repo_name>", "<file_sep>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML as a Hugging Face chat template (exports carry it, so apply_chat_template matches our SFT rendering).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PRETRAIN_TOKENS = (EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP)
CHAT_TOKENS = (IM_START, IM_END)
# What a trained tokenizer holds, in id order (<|endoftext|> = 0, as in StableLM).
ALL_SPECIAL_TOKENS = PRETRAIN_TOKENS + CHAT_TOKENS
MIN_VOCAB_SIZE = 256 + len(ALL_SPECIAL_TOKENS)  # a byte-level BPE: every byte, every special token
VOCAB_FLOOR = (f"a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
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
        raise TokenizerError(f"vocab_size {vocab_size} is too small: {VOCAB_FLOOR}")
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
