"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling,
stop tokens and stop strings, batches of prompts of different lengths, and
fill-in-the-middle.

    python -m sc_jax.generate --ckpt PATH --prompt "def fib(n):"
    python -m sc_jax.generate --ckpt PATH --prefix $'def add(a, b):\\n    ' --suffix $'\\n\\nprint(add(1, 2))'
    [--max-new-tokens N --temperature T --top-p P --top-k K --seed S --stop STR --tokenizer PATH --dtype D]

PATH is a Hugging Face model directory, an orbax checkpoint (a directory or one step
in it) or a training run directory. The tokenizer is found beside the checkpoint
(`tokenizer.json` or `tokenizer/`); otherwise pass --tokenizer. Options are checked
before the model loads; what the context cuts is said in one `warning:` line each.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from sc_jax.cli import Parser
from sc_jax.config import ConfigError
from sc_jax.generate import Generator, load_generator
from sc_jax.generate.generator import PRECISIONS
from sc_jax.generate.text import FIM_SPECIAL_TOKENS
from sc_jax.loading import check_checkpoint_path


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sc_jax.generate", description=__doc__.split("\n\n")[0],
                epilog="Give --prompt for a completion, or --prefix/--suffix for fill-in-the-middle. "
                       "Texts are taken literally (use the shell's $'...' for newlines); --prompt - reads stdin. "
                       "Generation stops at the model's context (max_position_embeddings tokens, prompt "
                       "included): asking for more prints a warning line with how many will come; a prompt "
                       "too long for the context keeps its end (for FIM: the code nearest the gap), with a "
                       "warning line.")
    p.add_argument("--ckpt", required=True,
                   help="HF model directory, orbax checkpoint (or a step in it), or training run directory")
    p.add_argument("--prompt", help="text to continue ('-' reads it from stdin)")
    p.add_argument("--prefix", help="fill-in-the-middle: the code before the gap")
    p.add_argument("--suffix", help="fill-in-the-middle: the code after the gap")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="most tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy; > 0 samples from softmax(logits / T) (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: sample among the most likely tokens holding mass P, in (0, 1] "
                        "(default: %(default)s = off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens (default: %(default)s = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, 0 to 2**32-1 (default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable); the output is cut before it (default: none)")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (default: found beside --ckpt)")
    p.add_argument("--dtype", choices=PRECISIONS,
                   help="compute dtype (default: float32 on CPU, bfloat16 otherwise); int8: weight-only int8 "
                        "kernels (per-output-channel scales, quantized at load), computing in the default dtype")
    return p


def _check_cli_args(args) -> None:
    """Refuses bad options by their flag names, with the fix, before any model is loaded."""
    _check_prompt_args(args)
    _check_sampling_args(args)
    check_checkpoint_path(args.ckpt, "--ckpt")
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        raise ConfigError(f"--tokenizer '{args.tokenizer}' does not exist: pass a tokenizer.json or a directory "
                          "holding one (or leave it out to use the one beside --ckpt)")


def _check_prompt_args(args) -> None:
    if args.prompt is not None and (args.prefix is not None or args.suffix is not None):
        raise ConfigError("give either --prompt or --prefix/--suffix, not both")
    if args.prompt is None and args.prefix is None and args.suffix is None:
        raise ConfigError("give --prompt TEXT, or --prefix TEXT --suffix TEXT for fill-in-the-middle")
    if args.prompt == "":  # would continue a bare <|endoftext|>: noise
        raise ConfigError("--prompt is empty: give the text to continue, e.g. --prompt 'def fib(n):' "
                          "(or --prompt - to read it from stdin)")
    if args.prompt is None and not (args.prefix or args.suffix):
        raise ConfigError("--prefix and --suffix are both empty: give the code before and/or after the gap")


def _check_sampling_args(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}: pass how many tokens "
                          "to generate, e.g. --max-new-tokens 128")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a number >= 0, got {args.temperature}: pass 0 for greedy "
                          "decoding, or e.g. --temperature 0.7 to sample")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be within (0, 1], got {args.top_p}: pass 1 to turn nucleus sampling off, "
                          "or e.g. --top-p 0.95")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be 0 or more, got {args.top_k}: pass 0 to turn it off, or e.g. --top-k 50")
    if not 0 <= args.seed < 2**32:  # jax folds larger seeds onto smaller ones
        raise ConfigError(f"--seed must be within [0, 2**32), got {args.seed}: pass e.g. --seed 0")


def _read_prompt(args) -> str | None:
    """The --prompt text (stdin for '-'), None for fill-in-the-middle."""
    if args.prompt != "-":
        return args.prompt
    text = sys.stdin.read()
    if not text:
        raise ConfigError("--prompt - read an empty prompt from stdin: pipe the text to continue into the command")
    return text


def _cli_prompt(gen: Generator, args, prompt: str | None) -> tuple[list[int], list[int], list[str]]:
    """(the ids the CLI runs, the ids that end them, warning lines for the user). The same
    cuts as `complete` / `infill`, said in plain words instead of a Python warning."""
    ids, stops, notes = _cli_fim(gen, args) if prompt is None else _cli_completion(gen, args, prompt)
    n_ctx, want = gen.cfg.max_position_embeddings, args.max_new_tokens
    can = n_ctx - len(ids)
    if want > can:
        notes.append(f"--max-new-tokens {want} does not fit: the model's context is {n_ctx} tokens "
                     f"(max_position_embeddings) and the prompt takes {len(ids)}, so at most {can} new tokens "
                     "will be generated")
    return ids, stops, notes


def _cli_fim(gen: Generator, args) -> tuple[list[int], list[int], list[str]]:
    room = gen.prompt_room(args.max_new_tokens, special=FIM_SPECIAL_TOKENS)
    ids, cut = gen.fim_prompt(args.prefix or "", args.suffix or "", room)
    notes = [f"--prefix and --suffix are too long for the model's context of {gen.cfg.max_position_embeddings} "
             f"tokens (max_position_embeddings): kept the {room} tokens nearest the gap, to leave room to generate"]
    return ids, gen.infill_stop_ids(), notes if cut else []


def _cli_completion(gen: Generator, args, prompt: str) -> tuple[list[int], list[int], list[str]]:
    room = gen.prompt_room(args.max_new_tokens)
    (ids,), (full,) = gen.completion_prompts([prompt], room)
    notes = [f"the prompt has {full} tokens, too many for the model's context of {gen.cfg.max_position_embeddings} "
             f"tokens (max_position_embeddings): kept its last {room}, to leave room to generate"]
    return ids, gen.completion_stop_ids(), notes if full > room else []


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_cli_args(args)
        prompt = _read_prompt(args)
        t0 = time.perf_counter()
        gen = load_generator(args.ckpt, tokenizer=args.tokenizer, dtype=args.dtype)
        t1 = time.perf_counter()
        ids, stop_ids, notes = _cli_prompt(gen, args, prompt)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        text = gen.generate_text([ids], stop_ids, list(args.stop), args.max_new_tokens, args.temperature,
                                 args.top_p, args.top_k, args.seed)[0]
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    s = gen.stats
    print(f"[{s.new_tokens} tokens in {s.seconds:.2f}s incl. compile; model loaded in {t1 - t0:.1f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
