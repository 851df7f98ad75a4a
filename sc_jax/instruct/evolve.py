"""Evolve seed prompts into harder and new ones with Evol-Instruct (WizardLM, WizardCoder).

    python -m sc_jax.instruct.evolve --seeds code_alpaca_20k.json --checkpoint runs/sft/run --rounds 4 \\
        --out evolved.jsonl

Each round rewrites every seed's current prompt by one operation drawn per (seed, round): in
depth (constraints, deepen, concretise, reasoning; for code misleading_code and complexity) or in
breadth (a new prompt of the same domain). The model (--checkpoint: a HF directory, an orbax
checkpoint or a training run directory, on whatever devices are present, in batches) writes the
new prompt and then answers it; evolutions that copy the template's words, add no new
information, are too short, or get an apology or an empty answer are eliminated (the seed keeps
its previous prompt for the next round). OUT is SFT JSONL ({"messages": [user, assistant],
"lineage": {"seed_id", "round", "operation", "parent_round"}}), trainable with train.task=sft as
is. Seeds: CodeAlpaca's JSON ({instruction, input, output} records) or JSON lines of those or of
SFT records (the first user turn).

Progress goes to OUT.progress.jsonl (--progress), one line per chunk of --batch-size prompts,
fsync'd; a rerun of the same command after a kill goes on from there and writes the same OUT as
an uninterrupted run (every chunk's sampling seeds come from --seed, the round and the chunk).
The progress file names the checkpoint step loaded: a rerun after the run directory gained a
newer step is refused (pass the step directory to go on).
OUT is written when every round is done, to a temporary file moved into place.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

from sc_jax.cli import Parser, bounded, exit_code_of, whole_number
from sc_jax.config import ConfigError


def _ops(text: str) -> tuple[str, ...]:
    from sc_jax.instruct.evolution import OPERATIONS

    ops = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in ops if x not in OPERATIONS]
    if bad or not ops:
        raise ConfigError(f"--ops: unknown operation {', '.join(bad) or '(none given)'}; choose from "
                          f"{', '.join(OPERATIONS)}")
    return ops


def _parser() -> Parser:
    from sc_jax.instruct.evolution import OPERATIONS, Settings

    d = Settings()
    doc = __doc__.split("\n\n", 1)
    p = Parser(prog="python -m sc_jax.instruct.evolve", description=doc[0], epilog=doc[1])
    p.add_argument("--seeds", required=True, metavar="FILE", help="CodeAlpaca JSON or JSONL, or SFT JSONL")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="HF directory, orbax checkpoint or run dir")
    p.add_argument("--out", required=True, metavar="FILE", help="the SFT JSONL file to write")
    p.add_argument("--tokenizer", default=None, metavar="FILE", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--rounds", type=whole_number(1), default=d.rounds, metavar="N", help="rounds of evolution")
    p.add_argument("--limit", type=whole_number(0), default=0, metavar="N", help="use the first N seeds (0 = all)")
    p.add_argument("--ops", default=",".join(OPERATIONS), metavar="LIST", help="operations drawn from, comma-separated")
    p.add_argument("--batch-size", type=whole_number(1), default=d.batch_size, metavar="N",
                   help="prompts generated together (a chunk of the progress file)")
    p.add_argument("--prompt-tokens", type=whole_number(1), default=d.prompt_tokens, metavar="N",
                   help="new tokens for an evolved prompt")
    p.add_argument("--answer-tokens", type=whole_number(1), default=d.answer_tokens, metavar="N",
                   help="new tokens for its answer")
    p.add_argument("--temperature", type=bounded(float, 0.0), default=d.temperature, metavar="T",
                   help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=bounded(float, 0.0, 1.0, low_open=True), default=d.top_p, metavar="P", help="nucleus sampling mass")
    p.add_argument("--seed", type=whole_number(0), default=d.seed, metavar="N", help="operations and sampling seed")
    p.add_argument("--min-words", type=whole_number(1), default=d.min_words, metavar="N",
                   help="an evolved prompt of fewer words is eliminated (too short)")
    p.add_argument("--progress", default=None, metavar="FILE", help="progress file (default: OUT.progress.jsonl)")
    p.add_argument("--force", action="store_true", help="replace OUT when it exists")
    return p


def _settings(args):
    from sc_jax.instruct.evolution import Settings

    return Settings(rounds=args.rounds, ops=_ops(args.ops), batch_size=args.batch_size,
                    prompt_tokens=args.prompt_tokens, answer_tokens=args.answer_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, min_words=args.min_words)


def _header(args, settings, prompter, model: str) -> dict:
    """What the progress file must have been made with to be resumed (`model`: the checkpoint loaded)."""
    from sc_jax.instruct.evolution import settings_digest

    return {"seeds": settings_digest(args.seeds), "limit": args.limit, "checkpoint": model,
            "format": prompter.format, **{k: (list(v) if isinstance(v, tuple) else v)
                                          for k, v in settings.__dict__.items()}}


def _step_path(directory: str, step: int) -> str:
    return os.path.join(os.path.abspath(directory), str(step))


def _newest_model(path: str) -> str:
    """The checkpoint --checkpoint loads now: a HF directory itself, else the directory of its
    newest step (a run directory that trains on gains newer ones)."""
    from sc_jax.checkpoint import resolve
    from sc_jax.loading import check_checkpoint_path, is_hf_directory

    check_checkpoint_path(path, "--checkpoint")
    return os.path.abspath(path) if is_hf_directory(path) else _step_path(*resolve(path))


def _load_model(path: str, tokenizer: str | None, batch_size: int):
    """(Generator, the checkpoint it was loaded from): an orbax step that does not read back is
    reported and the one before it used, as sc_jax.loading does."""
    from sc_jax.checkpoint import first_readable, resolve
    from sc_jax.generate import load_generator
    from sc_jax.loading import is_hf_directory

    if is_hf_directory(path):
        return load_generator(path, tokenizer, batch_size=batch_size), os.path.abspath(path)
    gen, step = first_readable(path, None, lambda d, s: load_generator(_step_path(d, s), tokenizer,
                                                                      batch_size=batch_size))
    return gen, _step_path(resolve(path)[0], step)


def _checked_model(progress_path: str, checkpoint: str) -> str | None:
    """Before loading: refuses a progress file made with another model than the one --checkpoint
    names now (e.g. an older step of a run directory that trained on: one OUT would mix two models'
    outputs). Returns what a progress file written before headers named the step recorded (the path
    as given) to go on with, else None."""
    from sc_jax.instruct.evolution import Progress

    newest = _newest_model(checkpoint)
    made_with = (Progress.saved_header(progress_path) or {}).get("checkpoint", newest)
    if made_with == os.path.abspath(checkpoint) != newest:
        return made_with
    if made_with != newest:
        raise ConfigError(f"progress file {progress_path} was made with the model at {made_with}, but --checkpoint "
                          f"now loads {newest}: rerun with --checkpoint {made_with} to go on, or delete the progress "
                          "file to start over with the new model")
    return None


def _pause_hook():
    """Crash tests set SC_JAX_EVOLVE_PAUSE_AFTER=N: after N chunks written, wait to be killed."""
    after = os.environ.get("SC_JAX_EVOLVE_PAUSE_AFTER")
    if not after:
        return None
    written = []

    def hook(r, k):
        written.append((r, k))
        if len(written) == int(after):
            print(f"paused after round {r} chunk {k}", flush=True)
            while True:
                time.sleep(1)

    return hook


def _reporter(n_seeds: int, batch: int):
    chunks = -(-n_seeds // batch)

    def report(r, k, done):
        why = collections.Counter(x["eliminated"] for x in done if x["eliminated"])
        print(f"round {r} chunk {k + 1}/{chunks}: kept {sum(x['eliminated'] is None for x in done)}/{len(done)}"
              + (f" (eliminated: {', '.join(f'{w}={n}' for w, n in sorted(why.items()))})" if why else ""),
              flush=True)

    return report


def _summary(results: list[dict], rounds: int) -> str:
    lines = []
    for r in range(1, rounds + 1):
        mine = [x for x in results if x["round"] == r]
        why = collections.Counter(x["eliminated"] for x in mine if x["eliminated"])
        ops = collections.Counter(x["operation"] for x in mine if x["eliminated"] is None)
        lines.append(f"round {r}: kept {sum(ops.values())} of {len(mine)}; by operation "
                     f"{dict(sorted(ops.items()))}; eliminated {dict(sorted(why.items()))}")
    return "\n".join(lines)


def run(args) -> int:
    from sc_jax.fileio import atomic_file, check_new_file
    from sc_jax.instruct import evolution as ev

    out = check_new_file(args.out, args.force)
    settings = _settings(args)
    seeds = ev.read_seeds(args.seeds, args.limit)
    progress_path = args.progress or out + ".progress.jsonl"
    recorded = _checked_model(progress_path, args.checkpoint)
    t0 = time.time()
    gen, model = _load_model(args.checkpoint, args.tokenizer, settings.batch_size)
    prompter = ev.Prompter(gen)
    progress = ev.Progress(progress_path, _header(args, settings, prompter, recorded or model))
    print(f"evolving {len(seeds)} seeds from {args.seeds}, {settings.rounds} round(s), {prompter.format} prompts, "
          f"model {model} ({time.time() - t0:.1f}s to load); progress in {progress_path} "
          f"({len(progress.done)} chunk(s) done before)", flush=True)
    results = ev.run_rounds(prompter, seeds, settings, progress, _reporter(len(seeds), settings.batch_size),
                            _pause_hook())
    records = ev.sft_records(results)
    with atomic_file(out, args.force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(_summary(results, settings.rounds))
    print(f"wrote {len(records)} evolved prompt(s) with answers to {out} ({time.time() - t0:.1f}s)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
