"""The CPU quick start: the whole stack end to end on this machine, in minutes.

    python experiments/quickstart.py [--out runs/quickstart] [--steps 700] [key.sub=value ...]

1. corpus     copies some packages of this interpreter's standard library, one
              repository each, into OUT/corpus
2. tokenizer  trains a byte-level BPE with the FIM/repository/chat special tokens
3. dataset    builds TFDS ArrayRecord files (one record per repository)
4. step 0     measures the untrained model (the run's own initial parameters): loss on
              the held-out repositories (data.holdout_fraction, split by name: never
              trained on), and fill-in-the-middle on 64 lines of their files: exact
              match of the greedy middle, and the loss of the masked line itself
5. train      a small Stable Code-architecture model with FIM and repository packing
              (experiments/configs/quickstart.yaml), with a progress bar, checkpoints
              and the held-out loss every train.eval_every steps
6. export     the final checkpoint to the Hugging Face format (OUT/hf)
7. results    loads the exported model back, measures it as in step 4 and prints the
              before/after table and one completion; the loss curve goes to OUT/loss.png

Every step is skipped when its output already exists, so a rerun resumes; the run
directory holds everything it made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "experiments", "configs", "quickstart.yaml")
PACKAGES = ("json", "email", "http", "urllib", "logging", "asyncio", "concurrent", "importlib", "xml", "unittest",
            "collections", "wsgiref", "html", "sqlite3", "dbm", "zoneinfo", "tomllib", "venv", "ensurepip", "curses")

# The FIM measure: one masked line per task, with the code around it. Prompt and answer
# fit in the 256-token rows the model trains on (3 FIM tokens + 150 + 60 + the line).
FIM_TASKS = 64
FIM_NEW_TOKENS = 32
LINE_TOKENS = 24  # longest masked line: the answer must fit in FIM_NEW_TOKENS
PREFIX_TOKENS, SUFFIX_TOKENS = 150, 60


def step(title: str):
    print(f"\n=== {title}", flush=True)
    return time.time()


def build_corpus(out: str) -> str:
    corpus = os.path.join(out, "corpus")
    if os.path.isdir(corpus):
        return corpus
    stdlib = sysconfig.get_paths()["stdlib"]
    tmp = corpus + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in PACKAGES:
        src = os.path.join(stdlib, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(tmp, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    os.replace(tmp, corpus)
    return corpus


def run_module(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))


# ----------------------------------------------------------------------------- held-out measures


def heldout_repos(corpus: str, fraction: float) -> list[str]:
    """The repositories the pipeline holds out: its split by name (a repository is held
    out when holdout_value(name) < data.holdout_fraction)."""
    from sc_jax.data.documents import holdout_value

    return sorted(r for r in os.listdir(corpus) if holdout_value(r) < fraction)


def heldout_fim_tasks(corpus: str, repos: list[str], tok, n: int = FIM_TASKS, seed: int = 0) -> list:
    """n single-line FIM tasks on the held-out repositories' Python files: a random
    non-blank line of at most LINE_TOKENS tokens (every such line equally likely), the
    whole lines before it up to PREFIX_TOKENS as the prefix and after it up to
    SUFFIX_TOKENS as the suffix."""
    from sc_jax.eval.fim import FimTask

    files, candidates = {}, []
    for repo in repos:
        for d, _, names in sorted(os.walk(os.path.join(corpus, repo))):
            for name in sorted(x for x in names if x.endswith(".py")):
                path = os.path.join(d, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines(keepends=True)
                if not lines:
                    continue
                counts = [len(ids) for ids in tok.encode_batch(lines, allow_special=False)]
                files[path] = (lines, counts)
                candidates += [(path, i) for i, line in enumerate(lines) if line.strip() and counts[i] <= LINE_TOKENS]
    tasks = []
    for path, i in sorted(random.Random(seed).sample(candidates, min(n, len(candidates)))):
        lines, counts = files[path]
        tasks.append(FimTask(name=f"{os.path.relpath(path, corpus)}:{i + 1}", middle=lines[i], tests="", mode="line",
                             prefix=_context(lines, counts, i, PREFIX_TOKENS, before=True),
                             suffix=_context(lines, counts, i, SUFFIX_TOKENS, before=False), start_line=i))
    return tasks


def _context(lines: list[str], counts: list[int], i: int, budget: int, before: bool) -> str:
    """The whole lines next to line i (before it, or after it) that fit in `budget` tokens."""
    way = -1 if before else 1
    j = i
    while 0 <= j + way < len(lines) and counts[j + way] <= budget:
        j += way
        budget -= counts[j]
    return "".join(lines[j:i]) if before else "".join(lines[i + 1:j + 1])


def fim_middles(gen, tasks) -> list[str]:
    """The model's middle for each task (greedy), normalised as the FIM benchmark does."""
    from sc_jax.eval.fim import generate_middles

    return [m[0] for m in generate_middles(tasks, gen.infill, max_new_tokens=FIM_NEW_TOKENS, progress=False)]


def masked_line_loss(model_cfg, params, gen, tasks) -> float:
    """Mean loss (nats/token) of the masked lines after their FIM prompts, teacher-forced,
    with the training loss: how close the model is to writing them, where exact match
    counts whole lines only."""
    import jax
    import numpy as np
    from flax import nnx

    from sc_jax import model as M
    from sc_jax.train.step import loss_sums

    rows = [(gen.fim_ids(t.prefix, t.suffix, FIM_NEW_TOKENS), gen.tokenizer.encode(t.middle, allow_special=False))
            for t in tasks]
    width = max(len(prompt) + len(line) for prompt, line in rows) - 1
    batch = {k: np.zeros((len(rows), width), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((len(rows), width), np.float32)
    for r, (prompt, line) in enumerate(rows):
        seq = prompt + line
        n = len(seq) - 1
        batch["input_ids"][r, :n], batch["targets"][r, :n] = seq[:-1], seq[1:]
        batch["segment_ids"][r, :n], batch["positions"][r, :n] = 1, np.arange(n)
        batch["loss_mask"][r, len(prompt) - 1:n] = 1  # the targets that are the line's tokens
    graphdef = nnx.split(M.abstract_model(model_cfg))[0]
    total, count = jax.jit(lambda p, b: loss_sums(graphdef, p, b))(params, batch)
    return float(total) / float(count)


def exact_matches(tasks, middles) -> int:
    from sc_jax.eval.fim import exact_match

    return sum(exact_match(m, t.middle) for m, t in zip(middles, tasks))


def measure_step0(cfg, tasks, tok) -> dict:
    """The untrained model, measured as the run measures itself: the run's own initial
    parameters (train.init_state, same seed), train.evaluate over the held-out iterator,
    and the FIM tasks."""
    import jax

    from sc_jax import sharding, train
    from sc_jax.generate import Generator

    s = train.setup(cfg)
    state = train.init_state(cfg, s, print)
    data = train.make_data(cfg, cfg.model.vocab_size, 0, 1, tok, eval_=True)
    with sharding.activation_rules(s.mesh, s.rules):
        loss = train.evaluate(cfg, s, state, data, lambda batch: batch)  # one process: local = global
    params = jax.device_get(state["params"])
    del state
    gen = Generator(cfg.model, params, tokenizer=tok)
    middles = fim_middles(gen, tasks)
    return {"step": 0, "eval_loss": loss, "fim_hits": exact_matches(tasks, middles), "middles": middles,
            "line_loss": masked_line_loss(cfg.model, params, gen, tasks)}


def step0_key(cfg) -> str:
    """What the step-0 numbers depend on: a cached OUT/step0.json is reused only for the same."""
    what = {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data), "seed": cfg.train.seed,
            "eval_batches": cfg.train.eval_batches, "seq_len": cfg.train.seq_len,
            "batch": cfg.train.global_batch_size, "fim": [FIM_TASKS, FIM_NEW_TOKENS, LINE_TOKENS, PREFIX_TOKENS,
                                                          SUFFIX_TOKENS], "measures": ["eval_loss", "fim", "line_loss"]}
    return json.dumps(what, sort_keys=True, default=str)


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl: a record with "loss" is a
    training step's, one with "eval_loss" a held-out evaluation (other fields vary)."""
    train, evals = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a crash
                continue
            if isinstance(rec, dict) and "eval_loss" in rec:
                evals.append(rec)
            elif isinstance(rec, dict) and "loss" in rec:
                train.append(rec)
    return train, evals


def plot_losses(train: list[dict], evals: list[dict], step0_loss: float, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="training batch loss")
    held = [(0, step0_loss)] + [(r["step"], r["eval_loss"]) for r in evals]
    ax.plot(*zip(*held), "o-", label="held-out loss (repositories never trained on)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("quick start")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def results_table(before: dict, after: dict, n_tasks: int) -> str:
    def ppl(loss):
        return f"{math.exp(min(loss, 50.0)):,.1f}"

    def fim(hits):
        return f"{hits}/{n_tasks} ({100 * hits / n_tasks:.0f}%)"

    rows = [("", "step 0 (untrained)", f"step {after['step']} (trained)"),
            ("held-out loss (nats/token)", f"{before['eval_loss']:.3f}", f"{after['eval_loss']:.3f}"),
            ("held-out perplexity", ppl(before["eval_loss"]), ppl(after["eval_loss"])),
            (f"FIM exact match, {n_tasks} held-out lines", fim(before["fim_hits"]), fim(after["fim_hits"])),
            ("FIM masked-line loss (nats/token)", f"{before['line_loss']:.3f}", f"{after['line_loss']:.3f}")]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c:>{len(rows[0][2])}}" for a, b, c in rows)


def show_completion(task, before: str, after: str, steps: int) -> str:
    """One task as a programmer sees it: the code around the gap, the masked line and what
    each model wrote there."""
    tail = "".join(task.prefix.splitlines(keepends=True)[-4:])
    head = "".join(task.suffix.splitlines(keepends=True)[:2])
    wrote = [("held out", task.middle), ("step 0", before), (f"step {steps}", after)]
    return (f"--- {task.name} (the first task, not picked): the code before the gap\n{tail}"
            "--- the masked line, and what each model wrote there\n"
            + "".join(f"{label + ':':<12}{text.rstrip()!r}\n" for label, text in wrote)
            + f"--- the code after it\n{head}")


def cached_step0(path: str, cfg, tasks, tok) -> dict:
    """The step-0 measures, from OUT/step0.json when it was made for the same settings."""
    key = step0_key(cfg)
    before = json.load(open(path)) if os.path.exists(path) else {}
    if before.get("key") != key:
        before = {**measure_step0(cfg, tasks, tok), "key": key}
        with open(path, "w") as f:
            json.dump(before, f)
    return before


def report_results(out: str, cfg, final_step: int, before: dict, tasks) -> bool:
    """Measures the exported model as step 0 was measured, prints one task and the
    before/after table, writes OUT/loss.png and OUT/results.json. False when the run
    logged no held-out loss at its last step."""
    from sc_jax.convert import load_hf
    from sc_jax.generate import load_generator

    run_dir, hf_dir = os.path.join(out, "run"), os.path.join(out, "hf")
    train_recs, eval_recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    final = [r for r in eval_recs if r["step"] == final_step]
    if not final:
        print(f"error: {run_dir}/metrics.jsonl has no held-out loss at step {final_step}", file=sys.stderr)
        return False
    gen = load_generator(hf_dir)
    middles = fim_middles(gen, tasks)
    after = {"step": final_step, "eval_loss": final[-1]["eval_loss"], "fim_hits": exact_matches(tasks, middles),
             "line_loss": masked_line_loss(cfg.model, load_hf(hf_dir)[1], gen, tasks)}
    png = os.path.join(out, "loss.png")
    plot_losses(train_recs, eval_recs, before["eval_loss"], png)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"step0": {k: before[k] for k in ("eval_loss", "fim_hits", "line_loss")}, "trained": after,
                   "fim_tasks": [dataclasses.asdict(x) for x in tasks], "middles": middles}, f, indent=1)
    print(show_completion(tasks[0], before["middles"][0], middles[0], final_step))
    print(results_table(before, after, len(tasks)))
    print(f"\nloss curve: {png}")
    return True


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "quickstart"), help="where everything goes")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of quickstart.yaml")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_all = time.time()

    t = step("1/7 corpus: packages of the Python standard library, one repository each")
    corpus = build_corpus(out)
    n_files = sum(len(f) for _, _, f in os.walk(corpus))
    size = sum(os.path.getsize(os.path.join(d, x)) for d, _, fs in os.walk(corpus) for x in fs)
    print(f"{corpus}: {len(os.listdir(corpus))} repositories, {n_files} files, {size / 1e6:.1f} MB ({time.time() - t:.1f}s)")

    tokenizer = os.path.join(out, "tokenizer.json")
    t = step("2/7 tokenizer: byte-level BPE with <fim_*>, <repo_name>, <file_sep>, ChatML tokens")
    if not os.path.exists(tokenizer):
        run_module("sc_jax.tokenizer", "train", "--corpus", corpus, "--vocab-size", "2048", "--out", tokenizer)
    print(f"{tokenizer} ({time.time() - t:.1f}s)")

    tfds_dir = os.path.join(out, "tfds")
    dataset = os.path.join(tfds_dir, "code_repositories", "1.0.0")
    t = step("3/7 dataset: TFDS ArrayRecord, one record per repository")
    if not os.path.isdir(dataset):
        run_module("sc_jax.data.tfds_builder", "--source", f"dir:{corpus}", "--data-dir", tfds_dir, "--languages",
                   "python")
    print(f"{dataset} ({time.time() - t:.1f}s)")

    import jax

    # jax's persistent compilation cache: step 0 compiles the same initialisation, held-out
    # evaluation and generation code as the run and the exported model, so each compiles
    # once (and a rerun compiles nothing).
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from sc_jax.tokenizer import Tokenizer
    from sc_jax.train import load_config, run

    run_dir = os.path.join(out, "run")
    overrides = [f"data.tokenizer={tokenizer}", f"data.sources=[{{kind: tfds, path: '{dataset}'}}]",
                 "data.languages=[python]", f"train.run_dir={run_dir}", *args.overrides]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(CONFIG, overrides)
    tok = Tokenizer.from_file(tokenizer)
    repos = heldout_repos(corpus, cfg.data.holdout_fraction)
    tasks = heldout_fim_tasks(corpus, repos, tok)
    if len(tasks) < FIM_TASKS or cfg.train.eval_batches < 1:
        print(f"error: the quick start measures held-out data, and the held-out repositories {repos} give "
              f"{len(tasks)} of the {FIM_TASKS} FIM lines: raise data.holdout_fraction (now "
              f"{cfg.data.holdout_fraction}) and keep train.eval_batches >= 1 (now {cfg.train.eval_batches})",
              file=sys.stderr)
        return 2

    t = step(f"4/7 step 0: the untrained model on the held-out repositories {', '.join(repos)}")
    before = cached_step0(os.path.join(out, "step0.json"), cfg, tasks, tok)
    print(f"held-out loss {before['eval_loss']:.3f} over {cfg.train.eval_batches} batches; FIM exact match "
          f"{before['fim_hits']}/{len(tasks)} ({time.time() - t:.1f}s)")

    t = step(f"5/7 train: {cfg.model.num_params():,} parameters, FIM {cfg.data.fim_rate}, "
             f"{cfg.data.document} documents, seq {cfg.train.seq_len}, {cfg.train.steps} steps")
    summary = run(cfg)
    if summary.get("stopped_by"):
        return 1
    print(f"trained in {time.time() - t:.0f}s")

    hf_dir = os.path.join(out, "hf")
    t = step("6/7 export: orbax checkpoint -> Hugging Face safetensors")
    if not os.path.isdir(hf_dir):
        run_module("sc_jax.convert", "orbax-to-hf", "--ckpt", run_dir, "--out", hf_dir, "--dtype", "float32")
    print(f"{hf_dir}: {sorted(os.listdir(hf_dir))}")

    step("7/7 results: the exported model loaded back, measured as at step 0")
    if not report_results(out, cfg, summary["step"], before, tasks):
        return 1
    print(f"everything is in {out} (total {time.time() - t_all:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
