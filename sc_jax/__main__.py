"""`python -m sc_jax`: lists the commands. Each is `python -m sc_jax.NAME [options]`
(`python -m sc_jax NAME [options]` runs it too); `--help` of each shows its options."""

from __future__ import annotations

import difflib
import runpy
import sys

# Every `python -m sc_jax.X` entry point: a package's __main__.py or a command-only module
# (tests/test_bad_inputs_cli.py checks that this table and the entry points in the tree agree).
COMMANDS = {
    "train": "train a model (pre-training, SFT or DPO) from a YAML config; a rerun resumes from its checkpoints",
    "plan": "will it fit? per-device memory, FLOPs and step time of a config on N devices, compiled on this CPU",
    "sweep": "a hyper-parameter grid of training runs, one after another here or on SLURM / a TPU pod",
    "convert": "checkpoints between Hugging Face (safetensors) and orbax, both directions; GGUF for llama.cpp",
    "generate": "complete a prompt or fill in the middle with a checkpoint (greedy or sampled)",
    "eval": "HumanEval, MultiPL-E (9 languages), fill-in-the-middle and sql-eval, run in a sandbox; `eval score`: samples made elsewhere",
    "tokenizer": "train a byte-level BPE with the FIM, repository and chat special tokens on local code",
    "data.inspect": "look at the rows the data pipeline feeds the model, and its statistics",
    "data.tfds_builder": "write code repositories (directories, JSONL, Parquet) as TFDS ArrayRecord files",
    "instruct.dedup": "remove exact duplicates from SFT / DPO JSONL files, across files and inputs",
    "instruct.evolve": "Evol-Instruct: evolve seed prompts (CodeAlpaca or SFT JSONL) with a checkpoint, resumable",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m sc_jax.COMMAND [options]   (or python -m sc_jax COMMAND [options])", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "python -m sc_jax.COMMAND --help shows a command's options and their defaults.",
              "Start with python experiments/quickstart.py (README.md, 'Quick start')."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"error: '{name}' is not a command: {hint}run python -m sc_jax to list them", file=sys.stderr)
        return 2
    # Run it as `python -m sc_jax.NAME` would (some commands re-run themselves that way).
    sys.argv = [f"python -m sc_jax.{name}", *argv[1:]]
    runpy.run_module(f"sc_jax.{name}", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
