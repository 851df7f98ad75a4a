"""Training: `python -m sc_jax.train --config FILE [key.sub=value ...]`.

One loop for pre-training, SFT and DPO on any mesh: build the mesh, initialise or
restore the sharded state, then dispatch jitted steps, fetching each step's metrics
only after the next one is dispatched so the host never stalls the device.

Start-up checks everything (config, mesh, tokenizer, data, the initial or resumed
state) before it writes anything, so a failed start leaves no run directory behind,
or an existing one untouched. Rerunning the same command resumes the run directory;
a rerun whose config differs from the saved one in more than the resume-safe keys
(RESUME_SAFE) is refused; --restart moves the old run aside and starts over.

Exit codes: 0 trained to train.steps, or stopped with a checkpoint (SIGTERM/SIGINT
during training, train.stop_after_steps); 2 a config or usage error, or a run that
had to stop (non-finite loss); 130 (SIGINT) or 143 (SIGTERM) interrupted during
start-up, before anything was written.

Multi-host: `jax.distributed.initialize` is called automatically on TPU pods and
under SLURM, or explicitly with --coordinator/--num-processes/--process-id.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import textwrap


def _interrupted_while_loading(*_):
    """SIGINT while the libraries below load (seconds; nothing started): one line and 130, not
    an import traceback (run() installs its own handler for the rest)."""
    sys.stderr.write("interrupted by SIGINT during start-up: nothing was saved\n")
    sys.stderr.flush()
    os._exit(130)


# sc_jax.train's __init__ imports nothing heavy, so this comes before jax loads, under
# `python -m sc_jax.train` and the `sc-train` console script (not when a test imports main).
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "sc-train":
    signal.signal(signal.SIGINT, _interrupted_while_loading)
    from sc_jax.sweep.templates import set_cpu_train_env

    set_cpu_train_env()  # XLA's CPU flags that train faster, where XLA_FLAGS is unset (README)

from sc_jax.cli import Parser  # noqa: E402
from sc_jax.config import ConfigError, to_dict  # noqa: E402
from sc_jax.train.config import Config, load_config  # noqa: E402
from sc_jax.train.distributed import init_distributed  # noqa: E402
from sc_jax.train.hooks import TrainingError  # noqa: E402
from sc_jax.train.loop import run  # noqa: E402
from sc_jax.train.metrics import duration  # noqa: E402

SECTIONS = {
    "model": "the architecture (Hugging Face StableLmConfig names) and numerics; preset: stable-code-3b, "
             "stablelm-3b-4e1t, stablelm-2-1_6b or tiny, the other keys override it",
    "mesh": "devices per mesh axis (-1: the rest), across slices (dcn_*), logical-axis rules",
    "optimizer": "AdamW or RMSProp, warmup then cosine (to min_lr) or constant, gradient clipping",
    "data": "tokenizer, sources and weights, documents, fill-in-the-middle, packing, workers, held-out split",
    "train": "run directory, steps, sequence length, batch, task (pretrain, sft, dpo), data kind, eval, init_from",
    "checkpoint": "how often to save, how many to keep, asynchronous saves",
    "logging": "progress bar or plain lines (print_every steps or print_seconds), TensorBoard, device kind for MFU",
}


def sections_help() -> str:
    """One line per config section, then its keys with their defaults."""
    lines = ["config sections (key.sub=value overrides; --print-config shows the resolved config):"]
    defaults = to_dict(Config())
    for section, about in SECTIONS.items():
        lines += textwrap.wrap(f"  {section:<11} {about}", width=100, subsequent_indent=" " * 14,
                               break_on_hyphens=False)
        keys = ", ".join(f"{k}={_yaml_scalar(v)}" for k, v in defaults[section].items())
        lines += textwrap.wrap(keys, width=100, initial_indent=" " * 14, subsequent_indent=" " * 14,
                               break_on_hyphens=False)
    return "\n".join(lines)


def _yaml_scalar(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None or v == "" else str(v)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m sc_jax.train", description=__doc__, epilog=sections_help())
    parser.add_argument("--config", metavar="FILE", help="YAML config: the sections below (default: none, the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides on top of --config, e.g. train.steps=100 model.remat=full")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults, --config, overrides) as YAML and exit")
    parser.add_argument("--restart", action="store_true",
                        help="start over: move an existing train.run_dir to RUN.old-<time> (nothing is deleted) "
                             "instead of resuming it")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="host:port of process 0, for multi-process runs off TPU pods and SLURM "
                             "(default: none; on TPU pods and under SLURM the processes find each other)")
    parser.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator: how many processes (default: none)")
    parser.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: this process's index, 0..N-1 (default: none)")
    return parser


def done_lines(summary: dict) -> list[str]:
    """The end of a run: where it got, how long it took, where its outputs are, how to export."""
    run_dir, step = summary["run_dir"], summary["step"]
    head = f"{'done' if not summary['stopped_by'] else 'stopped'}: step {step}"
    if summary["first_loss"] is not None:
        head += f", loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
    elif not summary.get("trained"):
        head += " (already there: nothing to train)"
    if summary.get("eval_loss") is not None:
        head += f", eval loss {summary['eval_loss']:.4f}"
    head += f", {duration(summary['elapsed'])}"
    steps = summary.get("checkpoints") or []
    outputs = ["config.yaml", "metrics.jsonl"] + (["tb/"] if os.path.isdir(os.path.join(run_dir, "tb")) else [])
    outputs.append(f"checkpoints/ (steps {', '.join(map(str, steps))})" if steps else "no checkpoints")
    lines = [head, f"  run directory {run_dir}: {', '.join(outputs)}"]
    if steps:
        lines.append(f"  export: python -m sc_jax.convert orbax-to-hf --ckpt {shlex.quote(run_dir)} "
                     f"--out {shlex.quote(run_dir + '-hf')}")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        init_distributed(args.coordinator, args.num_processes, args.process_id)
        summary = run(cfg, restart=args.restart)
    except (ConfigError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Interrupted, or Ctrl-C before run() took over the signals
        name = getattr(e, "signal", "SIGINT")
        print(f"interrupted by {name} during start-up: nothing was saved", file=sys.stderr, flush=True)
        return 128 + signal.Signals[name].value
    for line in done_lines(summary):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
