"""Data pipeline throughput: tokens/s with and without FIM, with worker processes and without.

    python bench/data.py [--seq-len 2048] [--batch-size 8] [--batches 100] [--workers 2]
                         [--tokenizer tokenizer.json] [--corpus DIR]

Corpus: by default a few packages of this machine's Python standard library (each package one
repository). Without --tokenizer, a byte-level BPE (--vocab-size) is trained on it first. Each
variant builds a fresh training iterator; tokens/s counts non-padding tokens of the batches after
the first one (start-up - scanning, spawning workers - is reported separately).
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time


from sc_jax.data import DataConfig, SourceConfig, make_train_iterator
from sc_jax.tokenizer import iter_corpus_texts, train_tokenizer

DEFAULT_PACKAGES = ["json", "html", "http", "email", "urllib", "logging", "concurrent", "importlib", "xmlrpc",
                    "wsgiref", "sqlite3", "dbm", "tomllib", "zoneinfo", "asyncio", "unittest", "collections"]


def run_variant(cfg: DataConfig, *, seq_len: int, batch_size: int, batches: int, seed: int) -> dict:
    t0 = time.perf_counter()
    it = make_train_iterator(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed)
    next(it)
    startup = time.perf_counter() - t0
    tokens = 0
    t1 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        tokens += int((b["segment_ids"] > 0).sum())
    wall = time.perf_counter() - t1
    st = it.stats()
    it.close()
    return {"tokens_per_s": tokens / wall, "startup_s": startup, "fill": st["fill_rate"],
            "fim": st["fim_fraction"], "docs_per_row": st["documents_per_row"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--packages", default=",".join(DEFAULT_PACKAGES),
                   help="repositories to include (subdirectories of --corpus); '' = all")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: train one on the corpus)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="worker processes in the multi-process variants")
    p.add_argument("--packing", default="concat", choices=("concat", "first_fit"))
    p.add_argument("--document", default="repository", choices=("repository", "file"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    include = [x for x in args.packages.split(",") if x]
    tok_path = args.tokenizer
    if not tok_path:
        t = time.perf_counter()
        texts = [x for pkg in (include or [""]) for x in iter_corpus_texts(os.path.join(args.corpus, pkg))]
        tok_path = os.path.join(tempfile.mkdtemp(prefix="sc_bench_"), "tokenizer.json")
        train_tokenizer(texts, args.vocab_size).backend.save(tok_path)
        print(f"trained a {args.vocab_size}-token BPE on {len(texts)} files in {time.perf_counter() - t:.1f}s")

    src = SourceConfig(kind="dir", path=args.corpus, layout="repos", include=include)
    print(f"corpus {args.corpus} ({len(include) or 'all'} repositories), seq_len {args.seq_len}, "
          f"batch {args.batch_size}, {args.batches} batches, packing {args.packing}, documents {args.document}, "
          f"{os.cpu_count()} CPUs")
    rows = []
    for workers in (0, args.workers):
        for fim_rate in (0.0, 0.5):
            cfg = DataConfig(sources=[src], tokenizer=tok_path, fim_rate=fim_rate, num_workers=workers,
                             packing=args.packing, document=args.document)
            r = run_variant(cfg, seq_len=args.seq_len, batch_size=args.batch_size, batches=args.batches,
                            seed=args.seed)
            rows.append((workers, fim_rate, r))
            print(f"  workers={workers} fim_rate={fim_rate}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)

    print()
    print(f"{'':18}" + "".join(f"{f'fim_rate={f}':>16}" for f in (0.0, 0.5)))
    for workers in (0, args.workers):
        cells = [r for w, f, r in rows if w == workers]
        label = "in-process" if workers == 0 else f"{workers} workers"
        print(f"{label + ' tokens/s':18}" + "".join(f"{c['tokens_per_s']:>16,.0f}" for c in cells))
        print(f"{label + ' start s':18}" + "".join(f"{c['startup_s']:>16.2f}" for c in cells))
    fims = [f"{r['fim']:.2f}" for _, _, r in rows]
    print(f"fill rate {min(r['fill'] for _, _, r in rows):.3f}+, FIM fraction per variant {', '.join(fims)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
