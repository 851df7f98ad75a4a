"""Fill-in-the-middle, character level (SantaCoder / StarCoder recipe): the one definition of the
FIM layout, for training documents and for generation prompts alike.

A file is cut at two uniform points in [0, len(text)] (code points, sorted, empty pieces allowed)
into prefix, middle and suffix; each piece is tokenized on its own (special-token strings inside
the text stay text), then laid out as

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle      (SPM "variant 2")

and the caller appends what follows the file (`<file_sep>` or `<|endoftext|>`). An infilling
prompt is the PSM layout with the middle left for the model (`infill_prompt`). Every choice comes
from the `np.random.Generator` it is handed, which the pipeline seeds from (seed, element index).
`unpermute_ids` inverts the layout exactly: the original bytes come back.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sc_jax.tokenizer import EOS, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, REPO_NAME


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids the pipeline writes, looked up by string (never hard-coded); -1 = not in the tokenizer."""

    eos: int = -1
    fim_prefix: int = -1
    fim_middle: int = -1
    fim_suffix: int = -1
    repo_name: int = -1
    file_sep: int = -1

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        g = tok.special.get
        return cls(eos=g(EOS, -1), fim_prefix=g(FIM_PREFIX, -1), fim_middle=g(FIM_MIDDLE, -1),
                   fim_suffix=g(FIM_SUFFIX, -1), repo_name=g(REPO_NAME, -1), file_sep=g(FILE_SEP, -1))


def cut_points(n: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two sorted uniform cut points in [0, n]."""
    a, b = (int(x) for x in rng.integers(0, n + 1, size=2))
    return (a, b) if a <= b else (b, a)


def split_text(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    i, j = cut_points(len(text), rng)
    return text[:i], text[i:j], text[j:]


def layout(prefix, middle, suffix, spm: bool, sp: SpecialIds) -> list:
    """The PSM / SPM order of one file's three parts, whatever they are (texts or token lists):
    a list of pieces, the special ids among them as ints."""
    if spm:
        return [sp.fim_prefix, sp.fim_suffix, suffix, sp.fim_middle, prefix, middle]
    return [sp.fim_prefix, prefix, sp.fim_suffix, suffix, sp.fim_middle, middle]


def layout_ids(prefix: list[int], middle: list[int], suffix: list[int], spm: bool, sp: SpecialIds) -> list[int]:
    """The layout of three token lists, as one token list."""
    ids: list[int] = []
    for piece in layout(prefix, middle, suffix, spm, sp):
        if isinstance(piece, int):
            ids.append(piece)
        else:
            ids.extend(piece)
    return ids


def infill_prompt(prefix: list[int], suffix: list[int], sp: SpecialIds) -> list[int]:
    """What a model trained on these documents completes with the middle:
    `<fim_prefix> prefix <fim_suffix> suffix <fim_middle>` (PSM, the middle left out)."""
    return layout_ids(prefix, [], suffix, False, sp)


def permute_text(text: str, rng: np.random.Generator, spm_rate: float = 0.5) -> tuple[str, str, str, bool]:
    """(prefix, middle, suffix, spm): the string-level decisions `fim_ids` makes."""
    prefix, middle, suffix = split_text(text, rng)
    spm = bool(rng.random() < spm_rate)
    return prefix, middle, suffix, spm


def fim_ids(text: str, encode, rng: np.random.Generator, spm_rate: float, sp: SpecialIds) -> tuple[list[int], bool]:
    """Tokens of one FIM-permuted file and whether SPM was chosen. `encode` maps list[str] -> list[list[int]]."""
    prefix, middle, suffix, spm = permute_text(text, rng, spm_rate)
    p, m, s = encode([prefix, middle, suffix])
    return layout_ids(p, m, s, spm, sp), spm


def unpermute_ids(ids, sp: SpecialIds) -> list[int]:
    """Original-order tokens (prefix + middle + suffix) of one FIM'd file; `ids` starts at <fim_prefix>
    and ends where the middle ends. Non-FIM input is returned unchanged."""
    ids = [int(i) for i in ids]
    if not ids or ids[0] != sp.fim_prefix:
        return ids
    s = ids.index(sp.fim_suffix)
    m = ids.index(sp.fim_middle, s + 1)
    if s == 1:  # SPM: <P><S> suffix <M> prefix middle
        return ids[m + 1:] + ids[s + 1:m]
    return ids[1:s] + ids[m + 1:] + ids[s + 1:m]  # PSM: <P> prefix <S> suffix <M> middle


def fim_layout(ids, sp: SpecialIds) -> str | None:
    """"psm", "spm" or None (not FIM). A PSM file with an empty prefix reads as "spm"; both
    layouts then invert to the same text."""
    ids = list(ids)
    if not ids or ids[0] != sp.fim_prefix:
        return None
    return "spm" if len(ids) > 1 and ids[1] == sp.fim_suffix else "psm"


def parse_document(ids, tok, sp: SpecialIds | None = None) -> dict:
    """Inverts a document: {"repo_name": str | None, "files": [(path | None, content, layout | None)]}.

    Repository documents: `<repo_name>name<file_sep>path\\ncontent<file_sep>...<|endoftext|>`;
    file documents: `content<|endoftext|>`; FIM'd files are put back in order."""
    sp = sp or SpecialIds.from_tokenizer(tok)
    ids = [int(i) for i in ids]
    if ids and ids[-1] == sp.eos:
        ids = ids[:-1]
    if not ids or ids[0] != sp.repo_name:
        layout = fim_layout(ids, sp)
        return {"repo_name": None, "files": [(None, tok.decode(unpermute_ids(ids, sp)), layout)]}
    parts: list[list[int]] = [[]]
    for i in ids[1:]:
        if i == sp.file_sep:
            parts.append([])
        else:
            parts[-1].append(i)
    name = tok.decode(parts[0])
    files = []
    for part in parts[1:]:
        cut = part.index(sp.fim_prefix) if sp.fim_prefix in part else len(part)
        header, body = part[:cut], part[cut:]
        text = tok.decode(header) + tok.decode(unpermute_ids(body, sp))
        path, _, content = text.partition("\n")
        files.append((path, content, fim_layout(body, sp)))
    return {"repo_name": name, "files": files}
