"""Stop strings: where a completion ends. No JAX here, so the evaluation harness can cut
completions made elsewhere without loading a model stack."""

from __future__ import annotations

from typing import Sequence


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to the earliest occurrence of any stop string (empty ones ignored)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]
