"""Text in and out: completion and fill-in-the-middle prompts, cut to leave room in the model's
context, and completions decoded and cut at stop strings. `Generator` is a `TokenGenerator`
with a tokenizer; the FIM layout is the one the training data uses (`sc_jax.data.fim`).
"""

from __future__ import annotations

import warnings
from typing import Sequence

from sc_jax.config import ConfigError, ModelConfig
from sc_jax.data import fim
from sc_jax.generate.generator import TokenGenerator
from sc_jax.generate.stops import cut_at_stop
from sc_jax.tokenizer import EOS, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

INFILL_STOPS = (EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEP)
FIM_SPECIAL_TOKENS = 3  # <fim_prefix>, <fim_suffix>, <fim_middle>: what a FIM prompt adds to its texts


def keep_nearest_gap(prefix: list[int], suffix: list[int], room: int) -> tuple[list[int], list[int]]:
    """At most `room` tokens of a FIM pair: the end of the prefix and the start of the
    suffix, at least half of the room from each side when both are long."""
    if len(prefix) + len(suffix) <= room:
        return prefix, suffix
    keep_pre = min(len(prefix), max(room - len(suffix), room // 2))
    return prefix[len(prefix) - keep_pre:], suffix[:room - keep_pre]


def _warn_cut(n: int, room: int) -> None:
    """One warning per call that cut prompts to the context (stacklevel: the caller of
    complete / infill / fim_ids)."""
    if n:
        warnings.warn(f"{n} prompt(s) too long for the model's context (max_position_embeddings) were cut to "
                      f"{room} text tokens, nearest the gap, to leave room to generate", stacklevel=3)


class Generator(TokenGenerator):
    """A model (weights on the device) plus an optional tokenizer.

    `generate_ids` works on token ids; `complete` and `infill` on text (tokenizer needed).
    """

    def __init__(self, cfg: ModelConfig, params: dict, tokenizer=None, dtype=None, batch_size: int = 32):
        super().__init__(cfg, params, dtype=dtype, batch_size=batch_size)
        self.tokenizer = tokenizer

    @property
    def eos_id(self) -> int | None:
        """The tokenizer's `<|endoftext|>`, else the config's eos_token_id."""
        if self.tokenizer is not None and EOS in self.tokenizer.special:
            return self.tokenizer.special[EOS]
        return self.cfg.eos_token_id

    def _tok(self):
        if self.tokenizer is None:
            raise ConfigError("this generator has no tokenizer: load it with a tokenizer to generate text")
        return self.tokenizer

    # --- prompts -----------------------------------------------------------------------

    def prompt_room(self, max_new_tokens: int, special: int = 0) -> int:
        """How many text tokens a prompt may keep: the context less `special` tokens and
        room for max_new_tokens new ones (at most half the context)."""
        n_ctx = self.cfg.max_position_embeddings
        room = n_ctx - min(max(int(max_new_tokens), 1), n_ctx // 2) - special
        if room < 1:
            raise ConfigError(f"the model's context ({n_ctx} tokens, max_position_embeddings) has no room for a prompt")
        return room

    def completion_prompts(self, prompts: Sequence[str], room: int) -> tuple[list[list[int]], list[int]]:
        """(the ids `complete` runs, each prompt's full token count). A prompt keeps its last
        `room` tokens (the code nearest the completion); an empty one is `<|endoftext|>`,
        the start of a document."""
        tok, eos = self._tok(), self.eos_id
        ids = [tok.encode(p) or ([eos] if eos is not None else []) for p in prompts]
        return [i[len(i) - min(len(i), room):] for i in ids], [len(i) for i in ids]

    def fim_prompt(self, prefix: str, suffix: str, room: int) -> tuple[list[int], bool]:
        """(the PSM prompt with at most `room` text tokens, whether the texts were cut). The
        texts are encoded separately with special-token strings kept as text (user code may
        contain '<file_sep>'); the special tokens are looked up by string."""
        tok = self._tok()
        tok.require(FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)
        pre, suf = tok.encode(prefix, allow_special=False), tok.encode(suffix, allow_special=False)
        cut = len(pre) + len(suf) > room
        pre, suf = keep_nearest_gap(pre, suf, room)
        return fim.infill_prompt(pre, suf, fim.SpecialIds.from_tokenizer(tok)), cut

    def fim_ids(self, prefix: str, suffix: str, max_new_tokens: int = 1) -> list[int]:
        """The PSM prompt `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>` as ids. When
        it would leave less than max_new_tokens (or half the context) to generate, the start
        of the prefix and the end of the suffix are dropped, with a warning."""
        room = self.prompt_room(max_new_tokens, special=FIM_SPECIAL_TOKENS)
        ids, cut = self.fim_prompt(prefix, suffix, room)
        _warn_cut(int(cut), room)
        return ids

    def completion_stop_ids(self) -> list[int]:
        """The ids that end a completion: `<|endoftext|>` (none when there is no EOS)."""
        return [] if self.eos_id is None else [self.eos_id]

    def infill_stop_ids(self) -> list[int]:
        """`<|endoftext|>`, the FIM tokens and `<file_sep>`: those the tokenizer has."""
        ids = {self._tok().special.get(s) for s in INFILL_STOPS} | {self.eos_id}
        return sorted(i for i in ids if i is not None)

    # --- text out ----------------------------------------------------------------------

    def generate_text(self, prompt_ids, stop_tokens, stop, max_new_tokens, temperature, top_p, top_k,
                      seed) -> list[str]:
        """The completion text after each token prompt, without its stop token, cut at the
        first of the `stop` strings (which are checked on the host while decoding)."""
        tok = self._tok()
        stop = [s for s in (stop or ()) if s]
        stop_set = set(stop_tokens)

        def text_of(ids):
            if ids and ids[-1] in stop_set:
                ids = ids[:-1]
            return tok.decode(ids, skip_special_tokens=False)

        check = (lambda _i, ids: any(s in text_of(ids) for s in stop)) if stop else None
        outs = self.generate_ids(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, stop_tokens=list(stop_tokens), seed=seed, stop_check=check)
        return [cut_at_stop(text_of(ids), stop) for ids in outs]

    def complete(self, prompts: list[str], *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Sequence[str] = (), seed: int = 0) -> list[str]:
        """The completion text of each prompt (prompt not included), cut at the first stop
        string; a row also ends at `<|endoftext|>`. A prompt too long for the model's context
        keeps its last tokens, leaving room for max_new_tokens (or half the context)."""
        if isinstance(prompts, str):
            raise ConfigError("complete() takes a list of prompts, got a single string")
        room = self.prompt_room(max_new_tokens)
        ids, lengths = self.completion_prompts(prompts, room)
        _warn_cut(sum(n > room for n in lengths), room)
        return self.generate_text(ids, self.completion_stop_ids(), stop, max_new_tokens, temperature, top_p, top_k,
                                  seed)

    def infill(self, prefixes: list[str], suffixes: list[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = ()) -> list[str]:
        """The middle text for each (prefix, suffix), PSM format; ends at `<|endoftext|>`,
        a FIM token or `<file_sep>` (and at a stop string when given). Too long a pair is
        cut as `fim_ids` cuts it."""
        if isinstance(prefixes, str) or isinstance(suffixes, str):
            raise ConfigError("infill() takes lists of prefixes and suffixes, got a single string")
        if len(prefixes) != len(suffixes):
            raise ConfigError(f"infill() got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
        room = self.prompt_room(max_new_tokens, special=FIM_SPECIAL_TOKENS)
        prompts = [self.fim_prompt(p, s, room) for p, s in zip(prefixes, suffixes)]
        _warn_cut(sum(cut for _, cut in prompts), room)
        return self.generate_text([ids for ids, _ in prompts], self.infill_stop_ids(), stop, max_new_tokens,
                                  temperature, top_p, top_k, seed)
