"""The attention paths side by side: forward+backward time and compiled temporaries.

    python bench/attention.py [--batch 8] [--seq 512] [--heads 12] [--head-dim 64] [--rounds 5]

On the CPU it compares the exact paths `auto` may pick there: reference, chunked (its default
1024-query blocks, and 64/128/256), jax.nn.dot_product_attention's "xla" implementation with
the dense mask, and sc_jax's CPU kernel (`cpu`, sc_jax.cpu_attention); fp32, 3 documents +
10% padding per row. Every path runs in this one process,
interleaved round by round; a path's time is its best round (each round --iters calls). The
ratio against the reference uses this process's CPU time on the CPU (what other work on a
shared machine disturbs least; wall time is printed beside it), wall time elsewhere.
bench/gpu.py --parts attention times the GPU paths (cuDNN included) through `table`.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from sc_jax import attention as A


def packed_segments(B: int, T: int, docs: int = 3, pad: float = 0.1, seed: int = 0) -> np.ndarray:
    """[B,T] int32 segment ids: each row `docs` documents of random lengths, then ~pad*T padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    used = T - int(T * pad)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, used), docs - 1, replace=False)) if docs > 1 else []
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used])):
            seg[b, lo:hi] = i + 1
    return seg


def inputs(B, T, H, K, D, dtype, seg):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k, v = (jax.random.normal(kk, (B, T, K, D), dtype) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, H, D), jnp.float32) * (seg[..., None, None] > 0)  # no loss at padding
    return q, k, v, w


def cpu_paths(seg):
    mask = A.AttentionMask.causal(seg)
    return {
        "reference": lambda q, k, v: A.reference_attention(q, k, v, mask),
        "chunked": lambda q, k, v: A.chunked_attention(q, k, v, mask),
        **{f"chunked, {c}-query blocks": functools.partial(lambda q, k, v, c: A.chunked_attention(q, k, v, mask, chunk=c), c=c)
           for c in (64, 128, 256)},
        'jax.nn.dot_product_attention "xla"': lambda q, k, v: A.xla_attention(q, k, v, mask),
        "cpu (sc_jax's kernel)": lambda q, k, v: A.cpu_kernel_attention(q, k, v, seg),
    }


def table(paths: dict, q, k, v, w, *, rounds: int = 5, iters: int = 3, reference: str = "reference",
          real=None) -> list[dict]:
    """Times jit(value_and_grad) of sum(path(q,k,v) * w) for every path, interleaved, best of
    `rounds`; prints a markdown table (ms; on the CPU also CPU ms, which the ratio then uses;
    ratio to `reference`, compiled temporaries, max
    |out - reference| and max |dq,dk,dv - reference| relative to the largest reference
    gradient, over real tokens) and returns its rows."""
    def loss(f):
        return lambda q, k, v: (f(q, k, v).astype(jnp.float32) * w).sum()

    compiled, results = {}, {}
    for name, f in paths.items():
        step = jax.jit(jax.value_and_grad(loss(f), argnums=(0, 1, 2)))
        try:
            compiled[name] = step.lower(q, k, v).compile()
        except Exception as e:  # a path this machine can't compile: say so, time the others
            print(f"{name}: not compiled here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        results[name] = (jax.jit(f)(q, k, v), compiled[name](q, k, v)[1])
        jax.block_until_ready(results[name])
    # Wall time, and this process's CPU time (all its threads): on a shared machine the
    # second is what other processes disturb least, so the ratios come from it there.
    best = {name: float("inf") for name in compiled}
    best_cpu = dict(best)
    for _ in range(rounds):
        for name, c in compiled.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                out = c(q, k, v)
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - t0) / iters)
            best_cpu[name] = min(best_cpu[name], (time.process_time() - c0) / iters)
    on_cpu = jax.devices()[0].platform == "cpu"
    timing = best_cpu if on_cpu else best
    ref_name = reference if reference in results else next(iter(results))
    ref_out, ref_grads = results[ref_name]
    real = np.ones(q.shape[:2], bool) if real is None else np.asarray(real)
    r4 = real[..., None, None]
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    scale = max(float(np.max(np.abs(f32(g)) * r4)) for g in ref_grads)
    rows = []
    print(f"| path | fwd+bwd ms (wall) |{' CPU ms |' if on_cpu else ''} x {ref_name} | temp MiB | "
          "max abs out err | max grad err / max grad |")
    print("|---|---|" + ("---|" if on_cpu else "") + "---|---|---|---|")
    for name, c in compiled.items():
        out, grads = results[name]
        mem = c.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else float("nan")
        out_err = float(np.max(np.abs(f32(out) - f32(ref_out)) * r4))
        grad_err = max(float(np.max(np.abs(f32(a) - f32(b)) * r4)) for a, b in zip(grads, ref_grads)) / scale
        row = dict(path=name, ms=best[name] * 1e3, cpu_ms=best_cpu[name] * 1e3,
                   ratio=timing[name] / timing[ref_name], temp_mib=temp, out_err=out_err, grad_rel_err=grad_err)
        rows.append(row)
        cpu_col = f" {row['cpu_ms']:.0f} |" if on_cpu else ""
        print(f"| {name} | {row['ms']:.2f} |{cpu_col} {row['ratio']:.2f}x | {temp:.1f} | {out_err:.2e} | "
              f"{grad_err:.2e} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    B, T, H, D = args.batch, args.seq, args.heads, args.head_dim
    K = args.kv_heads or H
    seg = packed_segments(B, T)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; B={B} T={T} H={H} K={K} D={D} "
          f"fp32, 3 documents + 10% padding per row, forward+backward, best of {args.rounds} rounds x {args.iters}")
    q, k, v, w = inputs(B, T, H, K, D, jnp.float32, jnp.asarray(seg))
    return table(cpu_paths(jnp.asarray(seg)), q, k, v, w, rounds=args.rounds, iters=args.iters, real=seg > 0)


if __name__ == "__main__":
    main()
