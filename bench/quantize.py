"""What lower precision costs a trained model: held-out loss, greedy agreement and FIM exact match
of sc_jax.generate at fp32, bf16 and weight-only int8, side by side in one run.

    python experiments/quickstart.py --out runs/quickstart     # a trained model (or any run of it)
    python bench/quantize.py [--quickstart runs/quickstart] [--ckpt PATH] [--precisions float32,bfloat16,int8]
                             [--prompts 32 --prompt-tokens 64 --new-tokens 32]

The model is the quick start's (its run directory's newest checkpoint, or --ckpt: any
checkpoint path `load_generator` reads), measured on the quick start's held-out
repositories (data.holdout_fraction, never trained on):
  * held-out loss / perplexity: the run's own held-out batches (train.eval_batches of
    them, as its `eval_loss`), scored by each precision's DecodeModel (`score`: the
    prefill's layers, on the quantized weights);
  * greedy agreement with fp32: --prompts completion prompts (the first --prompt-tokens
    tokens of held-out files), --new-tokens greedy tokens each; the share of positions
    whose token equals fp32's, and of rows identical throughout;
  * FIM exact match: the quick start's 64 held-out single-line FIM tasks, scored as the FIM
    benchmark scores them (`sc_jax.eval.fim.exact_match`), and the share of middles equal
    to fp32's.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_module():
    """experiments/quickstart.py, for its held-out split and FIM tasks (one definition of them)."""
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "experiments", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", default=os.path.join(ROOT, "runs", "quickstart"),
                   help="a quick start's output directory (corpus, tokenizer, dataset, run) (default: %(default)s)")
    p.add_argument("--ckpt", default=None, help="the checkpoint to measure (default: QUICKSTART/run)")
    p.add_argument("--precisions", default="float32,bfloat16,int8", help="(default: %(default)s); the first is "
                   "the reference for agreement")
    p.add_argument("--prompts", type=int, default=32, help="completion prompts for greedy agreement")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    return p.parse_args(argv)


def quickstart_config(qs, out: str):
    """The quick start's training config for the output directory `out` (its data, model, held-out split)."""
    from sc_jax.train import load_config

    dataset = os.path.join(out, "tfds", "code_repositories", "1.0.0")
    overrides = [f"data.tokenizer={os.path.join(out, 'tokenizer.json')}",
                 f"data.sources=[{{kind: tfds, path: '{dataset}'}}]", "data.languages=[python]",
                 f"train.run_dir={os.path.join(out, 'run')}"]
    return load_config(qs.CONFIG, overrides)


def heldout_batches(cfg, tok) -> list[dict]:
    """The run's held-out batches, as its evaluation reads them (train.eval_batches)."""
    from sc_jax import train

    data = train.make_data(cfg, cfg.model.vocab_size, 0, 1, tok, eval_=True)
    batches = []
    for _ in range(cfg.train.eval_batches):
        try:
            batches.append({k: np.asarray(v) for k, v in next(data).items()})
        except StopIteration:
            break
    return batches


def heldout_loss(gen, batches) -> float:
    """Mean masked token loss (nats) of the held-out batches under gen's weights."""
    import jax
    import jax.numpy as jnp

    from sc_jax.train.step import token_losses

    model = gen.model()

    @jax.jit
    def sums(batch):
        logits = model.score(batch["input_ids"], batch["positions"], batch["segment_ids"])  # [B,T,V] fp32
        nll = token_losses(logits, batch["targets"])  # the run's own eval_loss per token
        mask = batch["loss_mask"] > 0
        return jnp.where(mask, nll, 0.0).sum(), mask.sum()

    total = count = 0.0
    for batch in batches:
        t, c = sums({k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


def completion_prompts(corpus: str, repos: list[str], tok, n: int, length: int) -> list[list[int]]:
    """The first `length` tokens of up to n held-out Python files (those that long)."""
    prompts = []
    for repo in repos:
        for d, _, names in sorted(os.walk(os.path.join(corpus, repo))):
            for name in sorted(x for x in names if x.endswith(".py")):
                with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                    ids = tok.encode(f.read(), allow_special=False)
                if len(ids) >= length:
                    prompts.append(ids[:length])
    return prompts[:n]


def agreement(outs, ref) -> tuple[float, int]:
    """(share of positions whose token equals the reference's, rows identical throughout)."""
    same = sum(sum(a == b for a, b in zip(o, r)) for o, r in zip(outs, ref))
    total = sum(max(len(o), len(r)) for o, r in zip(outs, ref))
    return same / max(total, 1), sum(o == r for o, r in zip(outs, ref))


def measure(qs, ckpt: str, tokenizer: str, name: str, batches, prompts, tasks, new_tokens: int) -> dict:
    """One precision's numbers (and its outputs, for agreement)."""
    from sc_jax.generate import load_generator

    t0 = time.perf_counter()
    gen = load_generator(ckpt, tokenizer=tokenizer, dtype=name)
    loss = heldout_loss(gen, batches)
    outs = gen.generate_ids(prompts, max_new_tokens=new_tokens, stop_tokens=())
    middles = qs.fim_middles(gen, tasks)
    res = {"precision": name, "loss": loss, "outs": outs, "middles": middles, "weights": gen.weight_bytes,
           "fim_hits": qs.exact_matches(tasks, middles), "seconds": time.perf_counter() - t0}
    print(f"{name}: held-out loss {loss:.4f}, FIM exact match {res['fim_hits']}/{len(tasks)} "
          f"({res['seconds']:.0f}s)", flush=True)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.quickstart)
    ckpt = args.ckpt or os.path.join(out, "run")
    tokenizer, corpus = os.path.join(out, "tokenizer.json"), os.path.join(out, "corpus")
    for path, what in ((ckpt, "the checkpoint"), (tokenizer, "the tokenizer"), (corpus, "the corpus")):
        if not os.path.exists(path):
            print(f"error: {what} {path} does not exist: run `python experiments/quickstart.py --out {out}` first "
                  "(or pass --quickstart DIR of one that ran)", file=sys.stderr)
            return 2
    import jax

    from sc_jax.tokenizer import Tokenizer

    qs = quickstart_module()
    cfg = quickstart_config(qs, out)
    tok = Tokenizer.from_file(tokenizer)
    repos = qs.heldout_repos(corpus, cfg.data.holdout_fraction)
    batches = heldout_batches(cfg, tok)
    prompts = completion_prompts(corpus, repos, tok, args.prompts, args.prompt_tokens)
    tasks = qs.heldout_fim_tasks(corpus, repos, tok)
    n_tokens = int(sum(b["loss_mask"].sum() for b in batches))
    print(f"model {ckpt} ({cfg.model.num_params() / 1e6:.1f}M params); held-out repositories {', '.join(repos)}: "
          f"{len(batches)} batches ({n_tokens:,} loss tokens), {len(prompts)} prompts x {args.new_tokens} greedy "
          f"tokens, {len(tasks)} FIM lines; jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    results = [measure(qs, ckpt, tokenizer, name, batches, prompts, tasks, args.new_tokens)
               for name in args.precisions.split(",")]
    ref = results[0]
    print(f"\n| precision | weights (MB) | held-out loss | perplexity | loss - {ref['precision']} | greedy tokens = "
          f"{ref['precision']}'s | rows identical | FIM exact match | FIM middles = {ref['precision']}'s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        share, rows = agreement(r["outs"], ref["outs"])
        middles = sum(a == b for a, b in zip(r["middles"], ref["middles"]))
        print(f"| {r['precision']} | {r['weights'] / 1e6:.1f} | {r['loss']:.4f} | {math.exp(r['loss']):.1f} | "
              f"{r['loss'] - ref['loss']:+.5f} | {100 * share:.1f}% | {rows}/{len(prompts)} | "
              f"{r['fim_hits']}/{len(tasks)} | {middles}/{len(tasks)} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
