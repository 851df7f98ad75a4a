"""Defog sql-eval's text-to-SQL protocol: ``python -m sc_jax.eval sql``.

1. Questions in sql-eval's CSV layout (:mod:`sc_jax.eval.sql_data`), over the `defog-data`
   databases.
2. Prompt: sql-eval's template filled with the question and the schema as DDL with the column
   descriptions defog-data ships; generation through the model's ``Generator.complete`` (greedy
   by default, 600 new tokens, as sql-eval's hf_runner), the completion cut at the first
   ```` ``` ```` and ``;``. Or completions made elsewhere (``--samples``), or the gold queries
   themselves (``--check-gold``).
3. The generated query and each gold alternative run on the database (PostgreSQL, restored from
   defog-data's dumps into a temporary server or one at ``--dsn``; or SQLite copies), read-only
   and under a time limit (:mod:`sc_jax.eval.sql_db`).
4. Exact and subset ("correct") match as sql-eval decides them (:mod:`sc_jax.eval.sql_compare`);
   a generated query that fails is ``error_db_exec``, one cancelled at the limit ``timeout``.
5. Report: samples.jsonl (one record per sample), problems.jsonl, summary.json and summary.md
   (exact match, correct, errors and timeouts per query category and overall).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from sc_jax.eval import humaneval
from sc_jax.eval.execution import EvalError
from sc_jax.eval.sql_compare import GoldQueryError, compare_query_results
from sc_jax.eval.sql_data import (
    DEFAULT_QUESTIONS,
    DataError,
    Question,
    build_prompts,
    extract_query,
    gold_alternatives,
    load_prompt_template,
    load_questions,
)
from sc_jax.eval.sql_db import (
    DEFAULT_MAX_ROWS,
    PostgresEngine,
    QueryError,
    QueryTimeout,
    SqliteEngine,
    TemporaryPostgres,
    build_sqlite_dir,
    check_dsn,
    find_pg_bin,
    restore_missing,
    sqlite_path,
)

ENGINES = ("postgres", "sqlite")
DEFAULT_TIMEOUT = 10.0  # sql-eval's --timeout_exec


# ----------------------------------------------------------------------------- arguments


def _engine_name(args) -> str:
    if args.sqlite_dir and args.engine == "postgres":
        raise EvalError("--sqlite-dir is for --engine sqlite: leave one of them out")
    if args.dsn and (args.engine == "sqlite" or args.sqlite_dir):
        raise EvalError("--dsn is a PostgreSQL server: leave out --engine sqlite / --sqlite-dir")
    if args.restore and not args.dsn:
        raise EvalError("--restore is for --dsn (the temporary server is always restored): leave it out or give --dsn")
    return args.engine or ("sqlite" if args.sqlite_dir else "postgres")


def check_sql_args(args) -> str:
    """Everything checkable before any work; returns the engine name."""
    sources = [name for name, given in (("--ckpt", args.ckpt), ("--samples", args.samples),
                                        ("--check-gold", args.check_gold)) if given]
    if len(sources) != 1:
        raise EvalError("give exactly one of --ckpt (generate), --samples (score a JSONL of completions) or "
                        f"--check-gold{'' if not sources else ', not ' + ' and '.join(sources)}")
    engine = _engine_name(args)
    if args.dsn:
        check_dsn(args.dsn)
    elif engine == "postgres":
        find_pg_bin(args.pg_bin)
    if args.sqlite_dir and not os.path.isdir(args.sqlite_dir):
        raise EvalError(f"--sqlite-dir {args.sqlite_dir} is not a directory: give the directory of <db_name>.sqlite "
                        "files, or leave it out to build them from defog-data")
    return engine


# ----------------------------------------------------------------------------- samples


def load_sql_samples(path: str, questions: Sequence[Question]) -> list[list[tuple[str | None, str]]]:
    """``[question][sample] = (completion or None, generated query)`` from a JSONL file; every
    question must have a sample (records for questions beyond --limit are skipped)."""
    by_name = {q.name: q for q in questions}
    out: list[list[tuple[str | None, str]]] = [[] for _ in questions]
    for lineno, rec in humaneval.read_jsonl(path):
        where = f"{path}:{lineno}"
        q = _sample_question(rec, where, by_name, questions)
        if q is None:
            continue
        if isinstance(rec.get("generated_query"), str):
            out[q.index].append((rec.get("completion"), rec["generated_query"]))
        elif isinstance(rec.get("completion"), str):
            out[q.index].append((rec["completion"], extract_query(rec["completion"], q.prompt)))
        else:
            raise DataError(f"{where}: needs a string 'completion' (the model's text after the prompt) or "
                            "'generated_query' (the SQL to run)")
    missing = [q.name for q, s in zip(questions, out) if not s]
    if missing:
        raise DataError(f"{path}: {len(missing)} question(s) have no sample, first {missing[0]}: add a line for each "
                        "question, or --limit to score a prefix")
    return out


def _sample_question(rec: dict, where: str, by_name: dict, questions: Sequence[Question]) -> Question | None:
    if isinstance(rec.get("index"), int) and not isinstance(rec["index"], bool):
        index = rec["index"]
        if index < 0:
            raise DataError(f"{where}: 'index' {index} is negative: 0-based row of the questions CSV")
        return questions[index] if index < len(questions) else None
    if isinstance(rec.get("problem"), str):
        if rec["problem"] in by_name:
            return by_name[rec["problem"]]
        index = rec["problem"].rsplit("/", 1)[-1]
        if index.isdigit() and int(index) >= len(questions):
            return None  # beyond --limit
        raise DataError(f"{where}: problem {rec['problem']!r} is not a question of the questions file "
                        "(names are db_name/index)")
    raise DataError(f"{where}: needs 'index' (0-based row of the questions CSV) or 'problem' (db_name/index)")


# ----------------------------------------------------------------------------- scoring


def score_sample(engine, q: Question, query: str, *, timeout: float, decimal_points: int | None) -> dict[str, Any]:
    """sql-eval's per-row fields for one generated query."""
    rec = {"exact_match": False, "correct": False, "error_db_exec": False, "timeout": False, "error_msg": ""}
    t0 = time.monotonic()
    try:
        exact, correct = compare_query_results(engine, q, query, timeout=timeout, decimal_points=decimal_points)
        rec.update(exact_match=exact, correct=correct)
    except GoldQueryError as e:
        rec.update(error_db_exec=True, error_msg=f"GOLD QUERY ERROR: {e}", gold_error=True)
    except QueryTimeout as e:
        rec.update(timeout=True, error_msg=f"QUERY EXECUTION TIMEOUT: {e}")
    except QueryError as e:
        rec.update(error_db_exec=True, error_msg=f"QUERY EXECUTION ERROR: {e}")
    rec["exec_seconds"] = round(time.monotonic() - t0, 3)
    return rec


def score_samples(benchmark: str, questions: Sequence[Question], samples: Sequence[Sequence[tuple[str | None, str]]],
                  engine, *, timeout: float = DEFAULT_TIMEOUT, decimal_points: int | None = None,
                  progress: bool = True, meta: dict[str, Any] | None = None) -> humaneval.EvalReport:
    """Runs every sample's query against its gold query; the report of records and summary."""
    total = sum(len(s) for s in samples)
    bar = humaneval._bar(total, "sql", progress)
    records = []
    for q, q_samples in zip(questions, samples):
        for si, (completion, query) in enumerate(q_samples):
            rec = {"benchmark": benchmark, "problem": q.name, "index": q.index, "db_name": q.db_name,
                   "query_category": q.query_category, "question": q.question, "sample": si,
                   "completion": completion, "generated_query": query, "gold_query": q.query}
            rec.update(score_sample(engine, q, query, timeout=timeout, decimal_points=decimal_points))
            rec["passed"] = rec["correct"]
            records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"correct {sum(r['correct'] for r in records)}/{len(records)}")
    if bar is not None:
        bar.close()
    summary = summarize(benchmark, questions, records)
    summary["meta"] = {**(meta or {}), "engine": engine.db_type, "timeout": timeout, "decimal_points": decimal_points}
    return humaneval.EvalReport(benchmark, summary, records, markdown_table(summary))


SUMMARY_FIELDS = ("exact_match", "correct", "error_db_exec", "timeout")


def summarize(benchmark: str, questions: Sequence[Question], records: Sequence[dict]) -> dict[str, Any]:
    """Per query category and overall ("all"): questions, samples and the mean of each sql-eval field."""
    per_problem = {q.name: {"db_name": q.db_name, "query_category": q.query_category, "n": 0,
                            **{f: 0 for f in SUMMARY_FIELDS}} for q in questions}
    for r in records:
        pp = per_problem[r["problem"]]
        pp["n"] += 1
        for f in SUMMARY_FIELDS:
            pp[f] += int(r[f])
    categories = sorted({q.query_category for q in questions})
    rows = []
    for cat in categories + ["all"]:
        recs = [r for r in records if cat == "all" or r["query_category"] == cat]
        row = {"benchmark": benchmark, "query_category": cat,
               "questions": len({r["problem"] for r in recs}), "samples": len(recs)}
        row.update({f: (sum(bool(r[f]) for r in recs) / len(recs) if recs else 0.0) for f in SUMMARY_FIELDS})
        rows.append(row)
    return {"benchmark": benchmark, "rows": rows, "per_problem": per_problem}


def markdown_table(summary: dict[str, Any]) -> str:
    head = ["benchmark", "query category", "questions", "samples", "exact match", "correct", "error_db_exec", "timeout"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in summary["rows"]:
        cells = [r["benchmark"], r["query_category"], str(r["questions"]), str(r["samples"])]
        cells += [f"{100 * r[f]:.2f}" for f in SUMMARY_FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- databases


@contextlib.contextmanager
def open_engine(engine: str, db_names: Sequence[str], *, dsn: str | None = None, restore: bool = False,
                pg_bin: str | None = None, sqlite_dir: str | None = None, max_rows: int = DEFAULT_MAX_ROWS,
                progress: bool = True):
    """The engine the questions run on, with the databases `db_names` in place; closed (and a
    temporary server or SQLite directory removed) at the end."""
    with contextlib.ExitStack() as stack:
        if engine == "sqlite":
            if sqlite_dir is None:
                sqlite_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sc-jax-sqlite-"))
                build_sqlite_dir(db_names, sqlite_dir, progress=progress)
            missing = [d for d in sorted(set(db_names)) if sqlite_path(sqlite_dir, d) is None]
            if missing:
                raise EvalError(f"--sqlite-dir {sqlite_dir} has no {missing[0]}.sqlite or {missing[0]}.db: add it, "
                                "or leave --sqlite-dir out to build the databases from defog-data")
            db = SqliteEngine(sqlite_dir, max_rows=max_rows)
        elif dsn is not None:
            if restore:
                restore_missing(dsn, db_names, progress=progress)
            db = PostgresEngine(dsn, max_rows=max_rows)
            for db_name in sorted(set(db_names)):
                warning = db.describe_role(db_name)
                if warning:
                    print(f"warning: {warning}", file=sys.stderr)
        else:
            server = stack.enter_context(TemporaryPostgres(pg_bin, progress=progress))
            server.restore(db_names)
            db = PostgresEngine(server.reader_dsn, max_rows=max_rows)
        stack.callback(db.close)
        yield db


# ----------------------------------------------------------------------------- the command


def _generated(questions: Sequence[Question], complete_fn: Callable, gen_kwargs: dict) -> list[list[tuple[str, str]]]:
    texts = humaneval.generate_samples(questions, complete_fn, **gen_kwargs)
    return [[(t, extract_query(t, q.prompt)) for t in q_texts] for q, q_texts in zip(questions, texts)]


def gold_samples(questions: Sequence[Question]) -> list[list[tuple[None, str]]]:
    """Each question answered by its first gold alternative (--check-gold)."""
    return [[(None, gold_alternatives(q.query)[0] + ";")] for q in questions]


def run_command(args, load_generator: Callable, gen_kwargs: dict) -> humaneval.EvalReport:
    """``python -m sc_jax.eval sql``: checks every input, then generates (or reads) and scores."""
    engine = check_sql_args(args)
    questions = load_questions(args.questions, limit=args.limit)
    template = load_prompt_template(args.prompt_file)
    build_prompts(questions, template, db_type=engine, k_shot=args.k_shot)
    samples = load_sql_samples(args.samples, questions) if args.samples else None
    db_names = [q.db_name for q in questions]
    meta: dict[str, Any] = {"questions": os.path.abspath(args.questions or DEFAULT_QUESTIONS),
                            "prompt_file": os.path.abspath(args.prompt_file) if args.prompt_file else "default",
                            "k_shot": args.k_shot}
    with open_engine(engine, db_names, dsn=args.dsn, restore=args.restore, pg_bin=args.pg_bin,
                     sqlite_dir=args.sqlite_dir, max_rows=args.max_rows, progress=not args.no_progress) as db:
        if args.check_gold:
            samples, benchmark = gold_samples(questions), "sql-gold"
        elif samples is not None:
            meta["samples"] = os.path.abspath(args.samples)
            benchmark = "sql"
        else:
            gen = load_generator(args.ckpt, args.tokenizer)
            t0 = time.monotonic()
            samples = _generated(questions, gen.complete, {**gen_kwargs, "progress": not args.no_progress})
            meta.update(gen_kwargs, ckpt=os.path.abspath(args.ckpt),
                        generation_seconds=round(time.monotonic() - t0, 2))
            benchmark = "sql"
        return score_samples(benchmark, questions, samples, db, timeout=args.timeout,
                             decimal_points=args.decimal_points, progress=not args.no_progress, meta=meta)
