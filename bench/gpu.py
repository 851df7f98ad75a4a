"""What only a GPU can show: the attention paths (reference, chunked, cuDNN unpacked and
packed) side by side, MFU of the real stable-code-3b train step, and memory at 16k context.

    python bench/gpu.py [--parts attention,4k-b4-chunked,4k-b4-cudnn] [--dry-run]

Prints one table per part; every comparison is side by side in this one run. --dry-run runs
the same code at toy sizes on whatever device there is (the CPU: the cuDNN rows then say
they cannot compile, and the train run uses the tiny preset), to check the script itself."""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sc_jax import attention as A

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as attention_bench  # noqa: E402  bench/attention.py: inputs, the timing table


def attention_paths(T=4096, B=2, H=32, D=80, max_segments=32, rounds=5, iters=10):
    """Each attention path forward+backward at stable-code-3b's attention shape (H=32, D=80),
    bf16, side by side: time, compiled temporaries (memory_analysis().temp_size_in_bytes),
    error against the reference over real tokens. Two tables, the same padding in both:
    packed rows (3 documents per row) and one document per row; each with the reference,
    chunked, and cudnn_attention as the model runs it (its cond takes the packed call with
    `max_segments` for the first, the unpacked call for the second; both are compiled, so
    the temporaries are those of the whole cond). A machine that cannot compile the cudnn
    rows says why and times the others."""
    seg = attention_bench.packed_segments(B, T, docs=3, pad=0.07)
    one = (seg > 0).astype(np.int32)  # the same padding, one document per row
    rows = {}
    for name, ids in (("packed rows (3 documents + padding)", seg), ("one document per row (+ padding)", one)):
        ids_j = jnp.asarray(ids)
        q, k, v, w = attention_bench.inputs(B, T, H, H, D, jnp.bfloat16, ids_j)
        mask = A.AttentionMask.causal(ids_j)
        paths = {"reference": lambda q, k, v: A.reference_attention(q, k, v, mask),
                 "chunked": lambda q, k, v: A.chunked_attention(q, k, v, mask),
                 # what the model runs: the cond takes the unpacked call for `one`, packed for `seg`
                 f"cudnn (max_segments={max_segments}), {'unpacked' if ids is one else 'packed'} call":
                     lambda q, k, v: A.cudnn_attention(q, k, v, ids_j, max_segments)}
        print(f"\n## attention, {name}, B={B} T={T} H={H} D={D} bf16, forward+backward")
        rows[name] = attention_bench.table(paths, q, k, v, w, rounds=rounds, iters=iters, real=ids > 0)
    return rows


def train_run(name, *overrides, steps=8, preset="stable-code-3b"):
    from sc_jax.train import load_config, run

    run_dir = f"/tmp/bench-{name}"
    os.system(f"rm -rf {run_dir}")
    cfg = load_config(None, [f"model.preset={preset}", "model.dtype=bfloat16", "train.data=synthetic",
                             f"train.steps={steps}", "checkpoint.enabled=false", "logging.tensorboard=false",
                             "logging.progress=false", f"train.run_dir={run_dir}", "optimizer.warmup_steps=1",
                             *overrides])
    t0 = time.time()
    summary = run(cfg)
    wall = time.time() - t0
    recs = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl")]
    timed = [r for r in recs[2:] if "tokens_per_sec" in r] or recs[-1:]  # skip compile and the first timed step
    stats = jax.local_devices()[0].memory_stats() or {}
    mean = lambda key: float(np.mean([r.get(key, np.nan) for r in timed]))  # noqa: E731 (no MFU off known devices)
    res = {"name": name, "tokens_per_sec": mean("tokens_per_sec"), "mfu": mean("mfu"),
           "tflops": mean("tflops_per_device"),
           "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": (recs[0]["loss"], recs[-1]["loss"]),
           "wall_s": wall}
    del summary
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="attention,4k-b4-chunked,4k-b4-cudnn",
                   help="attention and/or train runs CONTEXT-bBATCH-ATTENTION[-REMAT], e.g. 16k-b1-cudnn")
    p.add_argument("--dry-run", action="store_true",
                   help="toy sizes on any device (attention T=256 H=4; train runs: the tiny preset, 256 tokens)")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}")
    results = {}
    parts = args.parts.split(",")
    if "attention" in parts:
        small = dict(T=256, B=2, H=4, rounds=2, iters=2) if args.dry_run else {}
        results["attention"] = attention_paths(**small)
    runs = []
    for part in parts:  # e.g. 4k-b4-chunked: context, batch, attention (full remat)
        if part.count("-") in (2, 3) and part[0].isdigit():  # optional 4th field: the remat policy
            ctx, batch, attn, *remat = part.split("-")
            seq = 256 if args.dry_run else int(ctx.rstrip("k")) * 1024
            runs.append(train_run(f"3b-{part}", f"train.seq_len={seq}", f"train.global_batch_size={batch[1:]}",
                                  f"model.remat={(remat or ['full'])[0]}", f"model.attention={attn}",
                                  steps=4 if args.dry_run else 8 if seq <= 4096 else 5,
                                  preset="tiny" if args.dry_run else "stable-code-3b"))
    if runs:
        model = "tiny (dry run)" if args.dry_run else "stable-code-3b"
        print(f"\n## {model} train step (AdamW fp32 master + moments, bf16 compute), one device")
        print("| run | tokens/s | TFLOP/s | MFU | peak GiB (process so far) | loss first -> last | wall s |")
        print("|---|---|---|---|---|---|---|")
        for r in runs:
            print(f"| {r['name']} | {r['tokens_per_sec']:.0f} | {r['tflops']:.0f} | {r['mfu'] * 100:.1f}% | "
                  f"{r['peak_gib']:.1f} | {r['loss'][0]:.3f} -> {r['loss'][1]:.3f} | {r['wall_s']:.0f} |")
        results["runs"] = runs
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
