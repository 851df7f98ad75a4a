"""Documents: repositories (StarCoder2 format, N file orders) or single files, with per-file FIM.

Repository document:  `<repo_name>name<file_sep>path\\ncontent<file_sep>path\\ncontent...<|endoftext|>`
File document:        `content<|endoftext|>`
A FIM'd file replaces `content` by its PSM/SPM layout (see `fim.py`); in a repository document the
`path\\n` header stays in front of it.

`DocumentMaker` is a grain `map_with_index` function over unit ids: repository mode has
`num_repos * repo_orders` units (unit u = order u % N of repository u // N), file mode one unit per
file. Every random choice is drawn from (seed, salt, element index) and, for the file orders, from
(seed, salt, epoch, repository), so a resumed or re-sliced pipeline makes exactly the same choices.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np

from sc_jax.data import fim, stats
from sc_jax.data.sources import RepoData, Source

log = logging.getLogger(__name__)


def holdout_value(name: str) -> float:
    """A stable number in [0, 1) per repository name (the train / held-out split)."""
    h = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


class DocumentMaker:
    """grain MapWithIndex: (index, unit id) -> {"input_ids", "targets"} int32 arrays, or None."""

    def __init__(self, source: Source, tokenizer, *, mode: str, repo_orders: int, fim_rate: float,
                 spm_rate: float, fim_repo_rate: float, seed: int, salt: int, holdout_fraction: float = 0.0,
                 keep: str = "all", pipeline_id: str = ""):
        self.source = source
        self.tok = tokenizer
        self.sp = fim.SpecialIds.from_tokenizer(tokenizer)
        self.mode = mode
        self.orders = repo_orders if mode == "repository" else 1
        self.fim_rate = fim_rate
        self.spm_rate = spm_rate
        self.fim_repo_rate = fim_repo_rate
        self.seed = int(seed)
        self.salt = int(salt)
        self.holdout_fraction = holdout_fraction
        self.keep = keep  # all | train (drop held-out repositories) | eval (only held-out ones)
        self.pipeline_id = pipeline_id
        self.num_units = source.num_repos() * self.orders if mode == "repository" else source.num_files()

    # ---------------------------------------------------------------------------- helpers

    def _kept(self, name: str | None) -> bool | None:
        """Whether this split keeps the repository; None while its name is unknown."""
        if self.keep == "all" or not self.holdout_fraction:
            return True
        if name is None:
            return None
        held_out = holdout_value(name) < self.holdout_fraction
        return held_out if self.keep == "eval" else not held_out

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok.encode_batch(texts, allow_special=False)

    def _order(self, epoch: int, repo: int, n: int, k: int) -> list[int] | None:
        """The k-th of the repository's distinct random file orders this epoch (None if n! <= k)."""
        if n <= 6 and math.factorial(n) <= k:
            return None
        rng = np.random.default_rng([self.seed, self.salt, 1, epoch, repo])
        seen: list[tuple[int, ...]] = []
        for _ in range(64 * (k + 1)):
            p = tuple(int(x) for x in rng.permutation(n))
            if p not in seen:
                seen.append(p)
                if len(seen) > k:
                    return list(seen[k])
        return None

    def _file_pieces(self, text: str, fim_ok: bool, rng, counts: dict, header: str = ""):
        """The plan for one file: a list of special ids (int) and texts (str)."""
        if fim_ok and self.fim_rate > 0 and rng.random() < self.fim_rate:
            prefix, middle, suffix, spm = fim.permute_text(text, rng, self.spm_rate)
            counts["fim_files"] = counts.get("fim_files", 0) + 1
            if spm:
                counts["spm_files"] = counts.get("spm_files", 0) + 1
            return ([header] if header else []) + fim.layout(prefix, middle, suffix, spm, self.sp)
        return [header + text]

    def _render(self, plan: list) -> list[int]:
        texts = [p for p in plan if isinstance(p, str) and p]
        encoded = iter(self._encode(texts)) if texts else iter(())
        ids: list[int] = []
        for p in plan:
            if isinstance(p, str):
                if p:
                    ids.extend(next(encoded))
            else:
                ids.append(int(p))
        return ids

    # ---------------------------------------------------------------------------- map

    def __call__(self, index: int, unit) -> dict | None:
        counts: dict[str, int] = {}
        try:
            ids = self._make(int(index), int(unit), counts)
        except Exception:  # bad input must never stop a run: count, log once per process, go on
            if not getattr(DocumentMaker, "_logged", False):
                DocumentMaker._logged = True
                log.exception("document %d of %s failed; counted as 'error' (further failures are only counted)",
                              unit, self.source.label)
            # What was counted as produced before the failure was not produced; the skips stand.
            counts = {k: n for k, n in counts.items() if k not in stats.PRODUCED}
            counts["error"] = counts.get("error", 0) + 1
            ids = None
        if ids is not None and len(ids) < 2:
            ids = None
        if ids is not None:
            counts["documents"] = counts.get("documents", 0) + 1
            counts["tokens"] = counts.get("tokens", 0) + len(ids)
        if self.pipeline_id:
            stats.PRETRAIN_COUNTERS.add(self.pipeline_id, counts)
        if ids is None:
            return None
        arr = np.asarray(ids, dtype=np.int32)
        return {"input_ids": arr[:-1], "targets": arr[1:]}

    def _make(self, index: int, unit: int, counts: dict) -> list[int] | None:
        if self.mode == "file":
            return self._file_document(index, unit, counts)
        return self._repo_document(index, unit, counts)

    def _file_document(self, index: int, unit: int, counts: dict) -> list[int] | None:
        """`content<|endoftext|>` of file `unit` (FIM'd or not), or None."""
        kept = self._kept(self.source.file_repo_name(unit))
        if kept is False:
            counts["held_out"] = 1
            return None
        data = self.source.read_file(unit)
        if kept is None and not self._kept(data.name or f"{self.source.label}#{unit}"):
            counts["held_out"] = 1
            return None
        _merge(counts, data.skipped)
        if not data.files:
            return None
        rng = np.random.default_rng([self.seed, self.salt, 0, index])
        counts["files"] = 1
        plan = self._file_pieces(data.files[0][1], self.sp.fim_prefix >= 0, rng, counts)
        return self._render(plan + [self.sp.eos])

    def _repo_document(self, index: int, unit: int, counts: dict) -> list[int] | None:
        """`<repo_name>name<file_sep>path\\ncontent...<|endoftext|>` of unit = (repository, order k),
        or None. Skips are counted once per repository (at k = 0), not once per order."""
        epoch = index // max(self.num_units, 1)
        sp = self.sp
        repo, k = divmod(unit, self.orders)
        kept = self._kept(self.source.repo_name(repo))
        if kept is False:
            if k == 0:
                counts["held_out"] = 1
            return None
        data: RepoData = self.source.read_repo(repo)
        if kept is None and not self._kept(data.name or f"{self.source.label}#{repo}"):
            if k == 0:
                counts["held_out"] = 1
            return None
        if k == 0:
            _merge(counts, data.skipped)
        if not data.files:
            if k == 0:
                counts["empty_repo"] = 1
            return None
        order = self._order(epoch, repo, len(data.files), k)
        if order is None:
            counts["duplicate_order"] = 1
            return None
        rng = np.random.default_rng([self.seed, self.salt, 0, index])
        if not data.name and len(data.files) == 1 and not data.files[0][0]:
            # A table row with neither repository nor path (natural language): a plain document.
            counts["files"] = 1
            return self._render(self._file_pieces(data.files[0][1], sp.fim_prefix >= 0, rng, counts) + [sp.eos])
        fim_ok = sp.fim_prefix >= 0 and self.fim_rate > 0 and rng.random() < self.fim_repo_rate
        plan: list = [sp.repo_name, data.name]
        for f in order:
            path, text = data.files[f]
            plan.append(sp.file_sep)
            plan.extend(self._file_pieces(text, fim_ok, rng, counts, header=f"{path}\n"))
        plan.append(sp.eos)
        if k == 0:
            counts["repos"] = 1
        counts["files"] = counts.get("files", 0) + len(order)
        return self._render(plan)


def _merge(into: dict, add: dict) -> None:
    for key, n in add.items():
        into[key] = into.get(key, 0) + n
