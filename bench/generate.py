"""Decode throughput: sc_jax.generate against `transformers` generate, same weights, same batch.

    python bench/generate.py                  # the grid: two model sizes x batch 1 and 8
    python bench/generate.py --point [--hidden 512 --layers 8 --heads 8 --intermediate 1376 --vocab 50304
                              --batch 8 --prompt-len 64 --new-tokens 128 --repeats 3 --dtype float32]
    python bench/generate.py --point --preset stable-code-3b --dtype bfloat16 --no-hf   # ours alone (GPU)
    python bench/generate.py --precisions [--batch 1 --precision-list float32,bfloat16,int8 + the size flags]

Builds a random StableLM of the given size with `transformers`, saves it, converts it
with sc_jax.convert.load_hf, and runs greedy generation of a batch of prompts of
different lengths (left-padded on both sides) with no stop token, so both produce
exactly batch x new-tokens tokens. Runs alternate between the two and the best of
--repeats counts (compilation excluded, shown separately). Reports end-to-end tokens/s
and decode-only tokens/s (the time of a 1-token run, i.e. the prefill, subtracted),
and how many rows came out token-for-token identical. transformers runs on the GPU
when JAX does and torch sees one, else on the CPU with --threads threads.

It also times the step's matrix products alone, each library's own (a jitted chain of
the same weight shapes under XLA; the model's nn.Linear modules called in turn under
torch): a decode step that runs these products cannot be faster than they are, so
"HF step / XLA matmuls" is the most such a decode could gain over transformers there.

The grid (the default) runs the quick start's model (2.6M params) and a 77M model
(vocab 50304) at batch 1 and 8 and prints one summary table.

--precisions: the precision table. One random model of the size flags (default the 77M
one) loaded as one sc_jax Generator per precision (fp32, bf16, weight-only int8, and int8-xla: int8
whose products are XLA's convert + dot instead of sc_jax.int8_kernel's), runs
interleaved, best of --repeats: decode tokens/s, prefill tokens/s (the prompt tokens over
the time of a 1-token run), the weights' resident bytes and each one's ratio to fp32,
and how many greedy rows equal fp32's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time


import numpy as np


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def profile(fn, steps: int, top: int = 15) -> None:
    """Runs fn under the JAX profiler and prints the XLA ops that took longest, per step."""
    import collections
    import glob
    import gzip
    import json
    import re

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            fn()
        (path,) = glob.glob(os.path.join(tmp, "**", "*perfetto_trace.json.gz"), recursive=True)
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or "Execute" in name or "Await" in name or "asarray" in name:
            continue
        name = re.sub(r"\.\d+$", "", name)
        total[name] += e.get("dur", 0)
        count[name] += 1
    print("\nsc_jax, XLA ops by time (ms per decode step, ops per step):")
    for name, us in total.most_common(top):
        print(f"  {us / steps / 1000:7.3f} ms  x{count[name] / steps:6.1f}  {name[:90]}")


GRID_MODELS = (  # (hidden, layers, heads, intermediate, vocab)
    (192, 4, 4, 512, 2048),  # the quick start's model
    (512, 8, 8, 1376, 50304),  # 77M, Stable Code's vocabulary
)
GRID_BATCHES = (1, 8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--point", action="store_true", help="one point given by the flags below instead of the grid")
    p.add_argument("--preset", default=None, help="a sc_jax model preset (e.g. stable-code-3b) instead of the sizes")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA, as Stable Code 3B)")
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64, help="longest prompt; the others are shorter")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    p.add_argument("--no-hf", action="store_true", help="time sc_jax alone (random weights from our own init)")
    p.add_argument("--no-matmuls", action="store_true", help="skip timing the matmuls alone")
    p.add_argument("--profile", action="store_true", help="also print sc_jax's most expensive XLA ops per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", action="store_true", help="the precision table (fp32 / bf16 / int8) instead")
    p.add_argument("--precision-list", default="float32,bfloat16,int8,int8-xla",
                   help="the precisions of --precisions (int8-xla: int8 with XLA's convert + dot, not sc_jax.int8_kernel)")
    return p.parse_args(argv)


def best_time(fn, repeats: int) -> float:
    fn()
    return min(timed(fn)[0] for _ in range(repeats))


def xla_matmul_step(cfg, batch: int, dtype: str, steps: int = 32, repeats: int = 5) -> float:
    """Seconds per decode step of the step's matmuls alone under XLA, laid out as the
    model's DecodeModel lays them out ([in,out] per layer, the head [V,E]), chained so
    that each product waits for the one before, `steps` steps in one fori_loop."""
    import jax
    import jax.numpy as jnp

    E, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    HD, KD = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8 * cfg.num_hidden_layers + 2))
    rand = lambda *shape: (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)  # noqa: E731
    layers = [dict(q=rand(E, HD), k=rand(E, KD), v=rand(E, KD), o=rand(HD, E), gate=rand(E, F), up=rand(E, F),
                   down=rand(F, E)) for _ in range(cfg.num_hidden_layers)]
    head = rand(V, E)

    def steps_of(layers, head, x):  # the weights are arguments, not constants folded into the program
        return jax.lax.fori_loop(0, steps, lambda _, x: step(layers, head, x), x)

    def step(layers, head, x):  # x [B,E]
        for w in layers:
            q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
            x = x + (q + jnp.tile(k + v, HD // KD)) @ w["o"]
            x = x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
        logits = jnp.einsum("be,ve->bv", x, head)
        return x + logits[:, :E] * 1e-6

    run = jax.jit(steps_of)
    x = rand(batch, E)
    return best_time(lambda: run(layers, head, x).block_until_ready(), repeats) / steps


def torch_matmul_step(hf, batch: int, steps: int = 32, repeats: int = 5) -> float:
    """Seconds per decode step of the HF model's own nn.Linear modules called in turn."""
    import torch

    E = hf.config.hidden_size
    x0 = torch.randn(batch, 1, E, dtype=hf.dtype, device=hf.device)

    def run():
        with torch.no_grad():
            x = x0
            for _ in range(steps):
                for layer in hf.model.layers:
                    a, m = layer.self_attn, layer.mlp
                    q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
                    x = x + a.o_proj(q + (k + v).repeat(1, 1, q.shape[-1] // k.shape[-1]))
                    x = x + m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
                x = x + hf.lm_head(x)[..., :E] * 1e-6
            return x.sum().item()  # waits for a GPU

    return best_time(run, repeats) / steps


def build(args, cfg):
    """(cfg, our Generator, the transformers model or None) for one point: the same random
    weights on both sides (saved by transformers, read by sc_jax.convert.load_hf)."""
    import jax
    import torch

    from sc_jax.generate import Generator

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf = None
    if args.no_hf:
        from flax import nnx

        from sc_jax import model as M

        # Initialised in the compute dtype (a 3B model in fp32 on the CPU takes minutes):
        # the peak memory below may include this second copy of the weights.
        init_cfg = dataclasses.replace(cfg, param_dtype=args.dtype)
        params = nnx.split(M.create_model(init_cfg, seed=args.seed))[1].to_pure_dict()
    else:
        import transformers

        from sc_jax.convert import load_hf

        hf = transformers.StableLmForCausalLM(transformers.StableLmConfig(**cfg.to_hf_dict())).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp, safe_serialization=True)
            cfg, params = load_hf(tmp)
        hf_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
        hf = hf.to(device=hf_device, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    return cfg, Generator(cfg, params, dtype=args.dtype, batch_size=args.batch), hf


def hf_runs(hf, prompts) -> dict:
    """transformers' timed runs: a left-padded batch with an attention mask, greedy, no early stop."""
    import torch

    B, P = len(prompts), max(map(len, prompts))
    ids = torch.zeros((B, P), dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for r, pr in enumerate(prompts):
        ids[r, P - len(pr):] = torch.tensor(pr)
        mask[r, P - len(pr):] = 1
    ids, mask = ids.to(hf.device), mask.to(hf.device)

    def theirs(n):
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=0)
        return out[:, P:].tolist()  # .tolist() waits for the GPU

    theirs(4)  # warm-up
    return theirs


def interleaved_best(runs: dict, repeats: int) -> tuple[dict, dict]:
    """({name: best seconds}, {name: last output}), the runs interleaved: a busy machine slows all alike."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs: dict = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            t, outs[name] = timed(fn)
            times[name].append(t)
    return {k: min(v) for k, v in times.items()}, outs


def bench_prompts(args, vocab: int) -> tuple[np.ndarray, list[list[int]]]:
    """(lengths, prompts): --batch random prompts from --prompt-len tokens down to half of it."""
    rng = np.random.RandomState(args.seed)
    lengths = np.linspace(args.prompt_len, max(1, args.prompt_len // 2), args.batch).astype(int)[::-1]
    return lengths, [rng.randint(1, vocab, size=n).tolist() for n in lengths]


def run_point(args, cfg) -> dict:
    """Times one (model, batch) point; prints its table; returns its numbers."""
    import jax
    import torch

    cfg, gen, hf = build(args, cfg)
    lengths, prompts = bench_prompts(args, cfg.vocab_size)
    B, N = args.batch, args.new_tokens
    print(f"\nmodel: {cfg.num_params() / 1e6:.1f}M params (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}), {args.dtype}; batch {B}, prompts "
          f"{lengths.min()}-{lengths.max()} tokens, {N} new tokens; jax {jax.__version__} on {jax.devices()[0].device_kind}"
          + ("" if hf is None else f", torch {torch.__version__} on {hf.device} ({args.threads} threads)")
          + f"; {len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    def ours(n):
        return gen.generate_ids(prompts, max_new_tokens=n, stop_tokens=())

    t0 = time.perf_counter()
    ours(N), ours(1)
    compile_s = time.perf_counter() - t0
    runs = {"ours": lambda: ours(N), "ours_pre": lambda: ours(1)}
    if hf is not None:
        theirs = hf_runs(hf, prompts)
        runs.update(hf=lambda: theirs(N), hf_pre=lambda: theirs(1))
    best, outs = interleaved_best(runs, args.repeats)
    assert all(len(o) == N for o in outs["ours"])
    res = report(args, cfg, hf, best, outs, compile_s)
    if args.profile:
        profile(lambda: ours(N), N)
    return res


def report(args, cfg, hf, best: dict, outs: dict, compile_s: float) -> dict:
    """Prints the point's table (and the matmuls alone); returns its numbers."""
    import jax

    B, N = args.batch, args.new_tokens

    def row(name, total, pre, extra=""):
        return name, total, B * N / total, B * (N - 1) / max(total - pre, 1e-9), extra

    res = {"model": f"{cfg.num_params() / 1e6:.1f}M", "batch": B}
    rows = [row("sc_jax generate", best["ours"], best["ours_pre"], f"compile {compile_s:.1f}s")]
    res["ours"] = rows[0][3]
    if hf is not None:
        rows.insert(0, row(f"transformers ({hf.device.type})", best["hf"], best["hf_pre"]))
        res["hf"] = rows[0][3]
    print(f"| {'implementation':<22} | {'time (s)':>8} | {'tokens/s':>9} | {'decode tokens/s':>15} | note")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 11}|{'-' * 17}|------")
    for name, total, e2e, dec, extra in rows:
        print(f"| {name:<22} | {total:8.2f} | {e2e:9.1f} | {dec:15.1f} | {extra}")
    if hf is not None:
        print(f"| {'ratio (sc_jax / HF)':<22} | {'':8} | {rows[1][2] / rows[0][2]:8.2f}x | "
              f"{rows[1][3] / rows[0][3]:14.2f}x |")
        same = sum(a == b for a, b in zip(outs["ours"], outs["hf"]))
        res["same"] = f"{same}/{B}"
        print(f"greedy outputs identical for {same}/{B} rows (rounding can flip a near-tie and diverge after it)")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")
    if not args.no_matmuls:
        res["xla_mm"] = xla_matmul_step(cfg, B, args.dtype)
        line = f"matmuls alone per step: XLA {res['xla_mm'] * 1e3:.2f} ms"
        if hf is not None:
            res["torch_mm"] = torch_matmul_step(hf, B)
            hf_step = B / res["hf"]
            line += (f", torch {res['torch_mm'] * 1e3:.2f} ms; transformers' whole step {hf_step * 1e3:.2f} ms, "
                     f"ours {B / res['ours'] * 1e3:.2f} ms: at most {hf_step / res['xla_mm']:.2f}x with XLA's matmuls")
        print(line)
    return res


def model_config(args):
    from sc_jax.config import ModelConfig, model_preset

    if args.preset:
        return model_preset(args.preset)
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads or args.heads, rope_theta=1e6,
                       max_position_embeddings=4096).validate()


def precision_table(args, cfg) -> list[dict]:
    """The precision table: one Generator per precision on the same random weights, timed
    interleaved; prints it and returns its rows."""
    import jax
    from flax import nnx

    from sc_jax import model as M

    params = nnx.split(M.create_model(dataclasses.replace(cfg, param_dtype="float32"), seed=args.seed))[1]
    params = jax.device_get(params.to_pure_dict())  # numpy: each Generator puts its own copy
    names = args.precision_list.split(",")
    gens = {n: make_generator(cfg, params, n, args.batch) for n in names}
    del params
    lengths, prompts = bench_prompts(args, cfg.vocab_size)
    B, N = args.batch, args.new_tokens
    print(f"\nprecision table: {cfg.num_params() / 1e6:.1f}M params (hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}); batch {B}, prompts {lengths.min()}-{lengths.max()} "
          f"tokens, {N} new tokens, greedy; jax {jax.__version__} on {jax.devices()[0].device_kind}; "
          f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    runs, compile_s = {}, {}
    for name, gen in gens.items():
        run = (lambda g: lambda n: g.generate_ids(prompts, max_new_tokens=n, stop_tokens=()))(gen)
        compile_s[name] = timed(lambda: (run(N), run(1)))[0]
        runs[name], runs[name + "_pre"] = (lambda r: lambda: r(N))(run), (lambda r: lambda: r(1))(run)
    best, outs = interleaved_best(runs, args.repeats)
    rows = []
    for name, gen in gens.items():
        total, pre = best[name], best[name + "_pre"]
        same = sum(sum(a == b for a, b in zip(r, r0)) for r, r0 in zip(outs[name], outs[names[0]]))
        rows.append({"precision": name, "decode": B * (N - 1) / max(total - pre, 1e-9),
                     "prefill": sum(lengths) / pre, "weights": gen.weight_bytes, "same": same / (B * N),
                     "compile": compile_s[name]})
    base = rows[0]
    print(f"| precision | decode tokens/s | x {names[0]} | prefill tokens/s | x {names[0]} | weights (MB) | "
          f"x {names[0]} | greedy tokens = {names[0]}'s | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['decode']:,.1f} | {r['decode'] / base['decode']:.2f}x | {r['prefill']:,.0f} | "
              f"{r['prefill'] / base['prefill']:.2f}x | {r['weights'] / 1e6:,.1f} | {r['weights'] / base['weights']:.2f}x "
              f"| {100 * r['same']:.0f}% | {r['compile']:.1f} |")
    print(f"peak RSS of this process {peak_rss_gb():.2f} GB (all {len(gens)} models loaded at once); "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    return rows


def make_generator(cfg, params, name: str, batch: int):
    """The Generator of a precision name; "int8-xla" is int8 built with sc_jax.int8_kernel off
    (its compiled code is its own and traces with the kernel off: `generator._kernels`)."""
    from sc_jax import int8_kernel
    from sc_jax.generate import Generator

    with int8_kernel.switched(not name.endswith("-xla")):
        return Generator(cfg, params, dtype=name.removesuffix("-xla"), batch_size=batch)


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.precisions:
        precision_table(args, model_config(args))
        return 0
    if args.point or args.preset or args.no_hf:
        run_point(args, model_config(args))
    else:
        results = []
        for hidden, layers, heads, inter, vocab in GRID_MODELS:
            for batch in GRID_BATCHES:
                point = argparse.Namespace(**{**vars(args), "hidden": hidden, "layers": layers, "heads": heads,
                                              "kv_heads": None, "intermediate": inter, "vocab": vocab, "batch": batch})
                results.append(run_point(point, model_config(point)))
        print("\nsummary (decode tokens/s; the ceiling is transformers' step time over XLA's matmuls alone)")
        print("| model | batch | transformers | sc_jax | ratio | ceiling | identical |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            ceiling = (r["batch"] / r["hf"]) / r["xla_mm"] if "xla_mm" in r else float("nan")
            print(f"| {r['model']} | {r['batch']} | {r['hf']:,.0f} | {r['ours']:,.0f} | {r['ours'] / r['hf']:.2f}x | "
                  f"{ceiling:.2f}x | {r['same']} |")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine slows transformers' threads most)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
