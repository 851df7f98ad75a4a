"""Fill-in-the-middle benchmark built offline from HumanEval's canonical solutions.

For each problem one line (``mode="line"``, single-line infilling) or a span of 2 to
`max_span_lines` consecutive lines (``mode="span"``, multi-line infilling) of the
canonical solution is masked, chosen by a seeded RNG keyed on (seed, mode, task id),
so the benchmark is the same on every machine and run. Only spans that start on a
non-blank line are picked.

    prefix = prompt + solution lines before the mask
    suffix = solution lines after the mask
    program = prefix + middle + suffix + tests          (pass: as in `humaneval`)

The model's middle is normalised before it is spliced in: in line mode it is cut after
its first newline (a newline is added when it has none), in span mode a missing final
newline is added. Exact match compares the normalised middle with the masked text,
ignoring trailing whitespace and blank lines at either end.

The evaluation takes an ``infill_fn`` with the signature of ``Generator.infill``::

    infill_fn(prefixes: list[str], suffixes: list[str], *, max_new_tokens: int,
              temperature: float, top_p: float, top_k: int, seed: int) -> list[str]
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from sc_jax.eval.execution import EvalError, SandboxConfig
from sc_jax.eval.humaneval import (
    DEFAULT_KS,
    EvalReport,
    OnBatch,
    Problem,
    check_samples_per_task,
    evaluate_generated,
    generate_in_batches,
    split_batches,
)

InfillFn = Callable[..., list[str]]
MODES = ("line", "span")


@dataclasses.dataclass
class FimTask:
    name: str
    prefix: str
    suffix: str
    middle: str  # the masked reference text
    tests: str
    language: str = "python"
    mode: str = "line"
    start_line: int = 0  # first masked line (0-based, within the canonical solution)
    num_lines: int = 1

    def program(self, middle: str) -> str:
        return self.prefix + middle + self.suffix + self.tests


def build_fim_tasks(
    problems: Sequence[Problem], *, mode: str = "line", seed: int = 0, max_span_lines: int = 5
) -> list[FimTask]:
    if mode not in MODES:
        raise EvalError(f"unknown FIM mode {mode!r} (choose from {', '.join(MODES)})")
    if max_span_lines < 2:
        raise EvalError(f"max_span_lines must be >= 2, got {max_span_lines}")
    tasks = []
    for p in problems:
        if not p.canonical_solution:
            raise EvalError(f"{p.name}: FIM needs a canonical solution")
        lines = p.canonical_solution.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        candidates = [i for i, line in enumerate(lines) if line.strip()]
        if not candidates:
            continue
        rng = random.Random(f"sc_jax-fim:{seed}:{mode}:{p.name}")
        if mode == "line":
            start, length = rng.choice(candidates), 1
        else:
            multi = [i for i in candidates if i + 1 < len(lines)]
            if multi:
                start = rng.choice(multi)
                length = rng.randint(2, min(max_span_lines, len(lines) - start))
            else:
                start, length = candidates[0], 1
        tasks.append(
            FimTask(
                name=p.name,
                prefix=p.prompt + "".join(lines[:start]),
                suffix="".join(lines[start + length :]),
                middle="".join(lines[start : start + length]),
                tests=p.tests,
                language=p.language,
                mode=mode,
                start_line=start,
                num_lines=length,
            )
        )
    return tasks


def normalize_middle(text: str, mode: str) -> str:
    """What gets spliced between prefix and suffix (see module docstring)."""
    text = str(text)
    if mode == "line":
        i = text.find("\n")
        return text[: i + 1] if i >= 0 else text + "\n"
    if text and not text.endswith("\n"):
        text += "\n"
    return text


def _canon(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def exact_match(generated: str, reference: str) -> bool:
    return _canon(generated) == _canon(reference)


def oracle_infill_fn(tasks: Sequence[FimTask]) -> InfillFn:
    """An infill_fn that returns the masked reference text."""
    table = {(t.prefix, t.suffix): t.middle for t in tasks}

    def infill(prefixes, suffixes, **_kw):
        return [table[(p, s)] for p, s in zip(prefixes, suffixes)]

    return infill


def empty_infill_fn(prefixes, suffixes, **_kw) -> list[str]:
    return ["" for _ in prefixes]


def generate_middles(tasks: Sequence[FimTask], infill_fn: InfillFn, *, n: int = 1, max_new_tokens: int = 128,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                     batch_size: int = 32, progress: bool = True, on_batch: OnBatch | None = None) -> list[list[str]]:
    """``n`` normalised middles per task: ``[task][sample]``; batch i uses seed ``seed + i``
    (batches as `humaneval.split_batches` cuts them); `on_batch(jobs, middles)` gets each
    batch as soon as it is generated."""
    check_samples_per_task(n)
    jobs = [(ti, si) for ti in range(len(tasks)) for si in range(n)]

    def ask(batch, batch_seed):
        texts = infill_fn([tasks[ti].prefix for ti, _ in batch], [tasks[ti].suffix for ti, _ in batch],
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=batch_seed)
        if len(texts) != len(batch):
            raise EvalError(f"infill_fn returned {len(texts)} middles for {len(batch)} requests")
        return [normalize_middle(text, tasks[ti].mode) for (ti, _), text in zip(batch, texts)]

    return generate_in_batches(split_batches(jobs, batch_size), ask, num_tasks=len(tasks), n=n, seed=seed,
                               desc="infill", progress=progress, on_batch=on_batch)


def evaluate_fim(tasks: Sequence[FimTask], infill_fn: InfillFn, *, n: int = 1, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 32,
                 workers: int | None = None, config: SandboxConfig | None = None, out_dir: str | None = None,
                 progress: bool = True, ks: Sequence[int] = DEFAULT_KS) -> EvalReport:
    """Infill, execute (while infilling), score pass@k and exact match; writes the report
    when `out_dir` is set."""
    if not tasks:
        raise EvalError("no FIM tasks")
    check_samples_per_task(n)
    mode = tasks[0].mode

    def generate(on_batch):
        return generate_middles(
            tasks, infill_fn, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size, progress=False, on_batch=on_batch,
        )

    def extra(ti: int, si: int, text: str):
        t = tasks[ti]
        return {"exact_match": exact_match(text, t.middle), "reference": t.middle,
                "start_line": t.start_line, "num_lines": t.num_lines}

    meta = {"mode": mode, "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": top_k, "seed": seed}
    return evaluate_generated(f"fim-{mode}", tasks, generate, n=n, meta=meta, workers=workers, config=config,
                              progress=progress, ks=ks, out_dir=out_dir, extra=extra)
