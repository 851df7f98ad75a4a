"""The CPU quick start: the whole stack end to end on this machine, in minutes.

    python experiments/quickstart.py [--out runs/quickstart] [--steps 250] [key.sub=value ...]

1. corpus     copies some packages of this interpreter's standard library, one
              repository each, into OUT/corpus
2. tokenizer  trains a byte-level BPE with the FIM/repository/chat special tokens
3. dataset    builds TFDS ArrayRecord files (one record per repository)
4. train      a small Stable Code-architecture model with FIM and repository packing
              (experiments/configs/quickstart.yaml), with a progress bar and checkpoints
5. export     the final checkpoint to the Hugging Face format (OUT/hf)
6. infill     loads the exported model back and prints a fill-in-the-middle completion

Every step is skipped when its output already exists, so a rerun resumes; the run
directory holds everything it made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "experiments", "configs", "quickstart.yaml")
PACKAGES = ("json", "email", "http", "urllib", "logging", "asyncio", "concurrent", "importlib", "xml", "unittest",
            "collections", "wsgiref", "html", "sqlite3", "dbm", "zoneinfo", "tomllib", "venv", "ensurepip", "curses")
PREFIX = "class Request:\n    def __init__(self, url, method='GET'):\n        self.url = url\n"
SUFFIX = "\n\n    def get_method(self):\n        return self.method\n"


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "quickstart"), help="where everything goes")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of quickstart.yaml")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_all = time.time()

    t = step("1/6 corpus: packages of the Python standard library, one repository each")
    corpus = build_corpus(out)
    n_files = sum(len(f) for _, _, f in os.walk(corpus))
    size = sum(os.path.getsize(os.path.join(d, x)) for d, _, fs in os.walk(corpus) for x in fs)
    print(f"{corpus}: {len(os.listdir(corpus))} repositories, {n_files} files, {size / 1e6:.1f} MB ({time.time() - t:.1f}s)")

    tokenizer = os.path.join(out, "tokenizer.json")
    t = step("2/6 tokenizer: byte-level BPE with <fim_*>, <repo_name>, <file_sep>, ChatML tokens")
    if not os.path.exists(tokenizer):
        run_module("sc_jax.tokenizer", "train", "--corpus", corpus, "--vocab-size", "2048", "--out", tokenizer)
    print(f"{tokenizer} ({time.time() - t:.1f}s)")

    tfds_dir = os.path.join(out, "tfds")
    dataset = os.path.join(tfds_dir, "code_repositories", "1.0.0")
    t = step("3/6 dataset: TFDS ArrayRecord, one record per repository")
    if not os.path.isdir(dataset):
        run_module("sc_jax.data.tfds_builder", "--source", f"dir:{corpus}", "--data-dir", tfds_dir, "--languages",
                   "python")
    print(f"{dataset} ({time.time() - t:.1f}s)")

    from sc_jax.train import load_config, run

    run_dir = os.path.join(out, "run")
    overrides = [f"data.tokenizer={tokenizer}", f"data.sources=[{{kind: tfds, path: '{dataset}'}}]",
                 "data.languages=[python]", f"train.run_dir={run_dir}", *args.overrides]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(CONFIG, overrides)
    t = step(f"4/6 train: {cfg.model.num_params():,} parameters, FIM {cfg.data.fim_rate}, "
             f"{cfg.data.document} documents, seq {cfg.train.seq_len}, {cfg.train.steps} steps")
    summary = run(cfg)
    if summary.get("stopped_by"):
        return 1
    print(f"trained in {time.time() - t:.0f}s")

    hf_dir = os.path.join(out, "hf")
    t = step("5/6 export: orbax checkpoint -> Hugging Face safetensors")
    if not os.path.isdir(hf_dir):
        run_module("sc_jax.convert", "orbax-to-hf", "--ckpt", run_dir, "--out", hf_dir, "--dtype", "float32")
    print(f"{hf_dir}: {sorted(os.listdir(hf_dir))}")

    t = step("6/6 fill-in-the-middle with the exported model loaded back")
    from sc_jax.generate import load_generator

    gen = load_generator(hf_dir)
    middle = gen.infill([PREFIX], [SUFFIX], max_new_tokens=48, temperature=0.0)[0]
    print("<fim_prefix>" + PREFIX + "<fim_suffix>" + SUFFIX + "<fim_middle>")
    print("--- the model wrote:")
    print(middle if middle.strip() else repr(middle))
    losses = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    losses = [r for r in losses if "loss" in r]
    print(f"\nloss {losses[0]['loss']:.3f} (step {losses[0]['step']}) -> {losses[-1]['loss']:.3f} "
          f"(step {losses[-1]['step']}); everything is in {out} (total {time.time() - t_all:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
