"""What only a GPU can show: the fused cuDNN attention path against the reference,
MFU of the real stable-code-3b train step, and memory at 16k context.

    python bench/gpu.py [--quick]

Prints one table per part; every comparison is side by side in this one run."""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sc_jax import attention as A
from sc_jax import model as M


def attention_parity(T=4096, B=2, H=32, D=80):
    """cuDNN (packed segments as offsets) vs reference attention, bf16: values, grads, time."""
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks[:3])
    w = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)
    cuts = [0, 700, 2500, T - 300, T]  # three documents then padding
    seg = np.zeros((B, T), np.int32)
    for i in range(3):
        seg[:, cuts[i]:cuts[i + 1]] = i + 1
    seg = jnp.asarray(seg)
    mask = A.AttentionMask.causal(seg)

    def loss(f):
        return lambda q, k, v: (f(q, k, v).astype(jnp.float32) * w * (seg[..., None, None] > 0)).sum()

    ref = lambda q, k, v: A.reference_attention(q, k, v, mask)  # noqa: E731
    fused = lambda q, k, v: A.cudnn_attention(q, k, v, seg)  # noqa: E731
    rows = {}
    for name, f in (("reference", ref), ("cudnn", fused)):
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))
        out, g = fwd(q, k, v), grad(q, k, v)
        jax.block_until_ready((out, g))
        t0 = time.perf_counter()
        for _ in range(10):
            g = grad(q, k, v)
        jax.block_until_ready(g)
        rows[name] = (out, g, (time.perf_counter() - t0) / 10)
    real = np.asarray(seg > 0)[..., None, None]
    out_err = float(jnp.max(jnp.abs(rows["cudnn"][0].astype(jnp.float32) - rows["reference"][0].astype(jnp.float32)) * real))
    grad_err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)) * real))
                   for a, b in zip(rows["cudnn"][1], rows["reference"][1]))
    scale = max(float(jnp.max(jnp.abs(b.astype(jnp.float32)) * real)) for b in rows["reference"][1])
    pad_grad = max(float(jnp.max(jnp.abs(a.astype(jnp.float32)) * (1 - real))) for a in rows["cudnn"][1])
    print(f"\n## attention, packed rows (3 documents + padding), B={B} T={T} H={H} D={D} bf16")
    print("| path | fwd+bwd ms | max |out - ref| | max |grad - ref| / max |grad| |")
    print("|---|---|---|---|")
    print(f"| reference | {rows['reference'][2] * 1e3:.2f} | - | - |")
    print(f"| cudnn | {rows['cudnn'][2] * 1e3:.2f} | {out_err:.4f} | {grad_err / scale:.4f} |")
    print(f"max |grad| at padding tokens (cudnn): {pad_grad}")
    print(f"speedup cudnn / reference: {rows['reference'][2] / rows['cudnn'][2]:.2f}x")
    return {"out_err": out_err, "grad_rel_err": grad_err / scale, "pad_grad": pad_grad,
            "ms": {k: v[2] * 1e3 for k, v in rows.items()}}


def train_run(name, *overrides, steps=8):
    from sc_jax.train import load_config, run

    run_dir = f"/tmp/bench-{name}"
    os.system(f"rm -rf {run_dir}")
    cfg = load_config(None, ["model.preset=stable-code-3b", "model.dtype=bfloat16", "train.data=synthetic",
                             f"train.steps={steps}", "checkpoint.enabled=false", "logging.tensorboard=false",
                             "logging.progress=false", f"train.run_dir={run_dir}", "optimizer.warmup_steps=1",
                             *overrides])
    t0 = time.time()
    summary = run(cfg)
    wall = time.time() - t0
    recs = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl")]
    timed = [r for r in recs[2:] if "mfu" in r]  # skip compile and the first timed step
    stats = jax.local_devices()[0].memory_stats() or {}
    res = {"name": name, "tokens_per_sec": float(np.mean([r["tokens_per_sec"] for r in timed])),
           "mfu": float(np.mean([r["mfu"] for r in timed])),
           "tflops": float(np.mean([r["tflops_per_device"] for r in timed])),
           "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": (recs[0]["loss"], recs[-1]["loss"]),
           "wall_s": wall}
    del summary
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="attention,4k-b4-chunked,4k-b2-cudnn",
                   help="attention and/or train runs CONTEXT-bBATCH-ATTENTION, e.g. 16k-b1-cudnn")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}")
    results = {}
    parts = args.parts.split(",")
    if "attention" in parts:
        results["attention"] = attention_parity()
    runs = []
    for part in parts:  # e.g. 4k-b4-chunked: context, batch, attention (full remat)
        if part.count("-") in (2, 3) and part[0].isdigit():  # optional 4th field: the remat policy
            ctx, batch, attn, *remat = part.split("-")
            seq = int(ctx.rstrip("k")) * 1024
            runs.append(train_run(f"3b-{part}", f"train.seq_len={seq}", f"train.global_batch_size={batch[1:]}",
                                  f"model.remat={(remat or ['full'])[0]}", f"model.attention={attn}",
                                  steps=8 if seq <= 4096 else 5))
    if runs:
        print("\n## stable-code-3b train step (AdamW fp32 master + moments, bf16 compute), one device")
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
