"""Training-step throughput on the CPU: our jitted train step against transformers'
`StableLmForCausalLM` + `torch.optim.AdamW`, same architecture, same batch, side by side.

    python bench/train.py                       # 162M StableLM, seq 512, batch 8, fp32, best of 3
    python bench/train.py --quick               # a tiny model: a smoke run of a minute
    python bench/train.py --variant "untiled: model.loss_tile=0" --variant "onednn: --xla_cpu_use_onednn=true"
    python bench/train.py --xla-flags '' --variant "launch flags: --xla_cpu_experimental_ynn_fusion_type= ..."

Ours is what `python -m sc_jax.train` runs: a `sc_jax.train` config (train.data=synthetic)
-> `sc_jax.train.setup` -> `init_state` -> the jitted, donated step fed by the run's own
synthetic iterator and batch placer. Theirs is `transformers.StableLmForCausalLM` built
from the same `ModelConfig.to_hf_dict()` (partial rotary 0.25, LayerNorm, untied head, no
qkv bias; attention by --torch-attn, sdpa by default), forward, fp32 cross-entropy over the
same tokens, backward, `clip_grad_norm_(1.0)` and `torch.optim.AdamW` (b 0.9/0.95, eps 1e-6,
weight decay 0.1 on matrices only, as ours). Both in fp32 on the same FLOPs
(`sc_jax.train.step.flops_per_token`).

Each side runs in its own process (spawned from this small one, so the kernel's peak RSS
of each, from wait4, is its own), pinned to the same --threads cores (torch.set_num_threads
and XLA's thread pool, which sizes itself from the CPU affinity). The processes take turns:
one step of each in a round, alternating which goes first, after --warmup steps (the first
of ours compiles), so load from other work on the machine hits both alike; best of --steps.
Each also times its own library's large fp32 matmul (--matmul N: N x N @ N x N, best of
--matmul-repeats, interleaved the same way), its peak FLOP/s on this machine, and the
table gives each step's model FLOP/s as a share of it.

--variant "LABEL: TOKENS" adds another of ours to the same rounds: TOKENS are sc_jax.train
config overrides (key=value), XLA flags (--xla_...), on top of --ours / --xla-flags, and
src=DIR to import sc_jax from another checkout (an A/B of a code change).

Times are wall clock; "CPU" is the process's CPU time over the step (all its threads), which
other work on a shared machine inflates less.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "@@bench "  # the workers' replies on stdout; any other line is passed through to stderr

QUICK = dict(layers=2, hidden=128, heads=4, intermediate=352, vocab=1024, seq=64, batch=4, steps=2, matmul=512)


# ----------------------------------------------------------------------------- workers


def reply(**msg) -> None:
    sys.stdout.write(TAG + json.dumps(msg) + "\n")
    sys.stdout.flush()


def model_config(spec: dict):
    from sc_jax.config import model_preset

    return model_preset("tiny", vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                        intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
                        num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
                        max_position_embeddings=max(4096, spec["seq"]), rope_theta=10_000.0)


def batches(spec: dict):
    """The run's synthetic batches (sc_jax.train.data, numpy only): the same tokens for both."""
    from types import SimpleNamespace

    from sc_jax.train.data import synthetic_batches

    cfg = SimpleNamespace(train=SimpleNamespace(seq_len=spec["seq"], seed=0))
    return synthetic_batches(cfg, spec["vocab"], spec["batch"], 0, 0)


class Ours:
    """sc_jax's training step as `python -m sc_jax.train` builds and feeds it."""

    def __init__(self, spec: dict):
        import jax

        from sc_jax import sharding
        from sc_jax.train import global_placer, init_state, load_config, make_data, setup
        from sc_jax.train.step import flops_per_token

        self.jax = jax
        overrides = ["model.preset=tiny", f"model.vocab_size={spec['vocab']}", f"model.hidden_size={spec['hidden']}",
                     f"model.intermediate_size={spec['intermediate']}", f"model.num_hidden_layers={spec['layers']}",
                     f"model.num_attention_heads={spec['heads']}", f"model.num_key_value_heads={spec['heads']}",
                     f"model.max_position_embeddings={max(4096, spec['seq'])}", "model.rope_theta=10000.0",
                     "model.dtype=float32", "model.param_dtype=float32",
                     "train.data=synthetic", f"train.seq_len={spec['seq']}", f"train.global_batch_size={spec['batch']}",
                     "train.steps=1000", "mesh.num_devices=1", "checkpoint.enabled=false",
                     "logging.progress=false", "logging.tensorboard=false", *spec["overrides"]]
        self.cfg = cfg = load_config(None, overrides)
        assert model_config(spec) == cfg.model or spec["overrides"], "the two sides' architectures differ"
        self.s = s = setup(cfg)
        self.state = init_state(cfg, s, lambda *_: None)
        self.data = make_data(cfg, cfg.model.vocab_size, 0, 1)
        self.to_global = global_placer(cfg, s.batch_sh)
        self.rules = lambda: sharding.activation_rules(s.mesh, s.rules)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.params = cfg.model.num_params()
        self.describe = (f"jax {jax.__version__} ({jax.devices()[0].platform}), model.attention={cfg.model.attention}, "
                         f"model.loss_tile={cfg.model.loss_tile}, model.remat={cfg.model.remat}, "
                         f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    def step(self) -> tuple[float, float]:
        batch = self.to_global(next(self.data))
        self.jax.block_until_ready(batch)
        t0, c0 = time.perf_counter(), time.process_time()
        with self.rules():
            self.state, metrics = self.s.step_fn(self.state, batch)  # the old state is donated
        self.jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0, time.process_time() - c0, float(metrics["loss"])

    def matmul(self, n: int, repeats: int) -> float:
        import jax.numpy as jnp

        a, b = (self.jax.random.normal(self.jax.random.key(i), (n, n), jnp.float32) for i in (1, 2))
        f = self.jax.jit(jnp.matmul)
        f(a, b).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return best


class Theirs:
    """transformers' StableLmForCausalLM + torch.optim.AdamW, the usual eager training step."""

    def __init__(self, spec: dict):
        import torch
        import transformers

        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        self.torch = torch
        cfg = model_config(spec)
        hf = transformers.StableLmConfig(**cfg.to_hf_dict())
        self.model = transformers.StableLmForCausalLM._from_config(hf, attn_implementation=spec["torch_attn"],
                                                                   dtype=torch.float32)
        self.model.train()
        decay = [p for n, p in self.model.named_parameters() if "norm" not in n and "bias" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if "norm" in n or "bias" in n]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                     lr=3.2e-4, betas=(0.9, 0.95), eps=1e-6)
        self.data = batches(spec)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.describe = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
                         f"attn_implementation={spec['torch_attn']}, {torch.get_num_threads()} threads")

    def step(self) -> tuple[float, float]:
        torch = self.torch
        b = next(self.data)
        ids, pos, targets = (torch.from_numpy(b[k]).long() for k in ("input_ids", "positions", "targets"))
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0, float(loss.detach())

    def matmul(self, n: int, repeats: int) -> float:
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        return best


def worker(side: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    t0 = time.perf_counter()
    impl = Ours(spec) if side == "ours" else Theirs(spec)
    reply(ready=True, params=impl.params, describe=impl.describe, build_s=time.perf_counter() - t0,
          flops_per_token=getattr(impl, "flops_per_token", None))
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "step":
            seconds, cpu, loss = impl.step()
            reply(seconds=seconds, cpu=cpu, loss=loss)
        elif cmd["op"] == "matmul":
            reply(seconds=impl.matmul(cmd["n"], cmd["repeats"]))
        elif cmd["op"] == "quit":
            return


# ----------------------------------------------------------------------------- the parent


class Side:
    """One worker process: spawned from this (small) process; its peak RSS from wait4."""

    def __init__(self, label: str, side: str, spec: dict, xla_flags: str, cores: list[int] | None, src: str = REPO):
        self.label, self.side, self.spec = label, side, spec
        env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        env["XLA_FLAGS"] = xla_flags
        if side == "theirs":
            env.pop("XLA_FLAGS")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_worker", side, json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        self.steps: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []
        self.first_s = self.matmul_s = self.rss = None
        self.info: dict = {}

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
            sys.stderr.write(f"[{self.label}] {line}")
        raise SystemExit(f"error: the {self.label} worker exited ({self.close()}): see its output above")

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> int:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.rss = usage.ru_maxrss * 1024
        return self.proc.returncode


def parse_variant(text: str) -> tuple[str, list[str], list[str], str]:
    """'LABEL: key=value --xla_flag src=DIR ...' -> (label, config overrides, XLA flags, source dir)."""
    label, _, rest = text.partition(":")
    tokens = shlex.split(rest)
    src = [os.path.abspath(t[4:]) for t in tokens if t.startswith("src=")]
    tokens = [t for t in tokens if not t.startswith("src=")]
    return (label.strip(), [t for t in tokens if not t.startswith("--")], [t for t in tokens if t.startswith("--")],
            src[-1] if src else REPO)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        worker(*argv[1:])
        return 0
    cores = sorted(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048,
                   help="2048 = 2.67x hidden (Stable Code 3B: 6912 / 2560 = 2.7x, 2074 here; rounded to 2048)")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (best of)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (ours compiles in the first)")
    p.add_argument("--threads", type=int, default=len(cores),
                   help="cores both sides are pinned to (torch.set_num_threads; XLA sizes its pool from the affinity)")
    p.add_argument("--matmul", type=int, default=4096, help="N of the N x N x N fp32 matmul peak (0: skip)")
    p.add_argument("--matmul-repeats", type=int, default=3)
    p.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers' attn_implementation")
    p.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                   help="sc_jax.train config override for our side (repeatable), e.g. model.loss_tile=0")
    p.add_argument("--xla-flags", default=None,
                   help="XLA_FLAGS of our side ('' = XLA's own defaults; default: the environment's, or where it "
                        "has none, what `python -m sc_jax.train` sets: sc_jax.sweep.templates.CPU_TRAIN_XLA_FLAGS)")
    p.add_argument("--src", default=REPO, help="the checkout our side imports sc_jax from (default: this one)")
    p.add_argument("--variant", action="append", default=[], metavar="'LABEL: TOKENS'",
                   help="another of ours in the same rounds: config overrides and --xla_ flags on top of the base")
    p.add_argument("--no-torch", action="store_true", help="ours (and the variants) only")
    p.add_argument("--quick", action="store_true",
                   help="tiny model for a smoke run: " + ", ".join(f"--{k} {v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if not 1 <= args.threads <= len(cores):
        p.error(f"--threads must be within 1..{len(cores)} (this process may use cores {cores})")
    pinned = cores[:args.threads] if args.threads < len(cores) else None
    spec = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "intermediate", "vocab", "seq", "batch",
                                          "threads", "torch_attn")}
    if args.xla_flags is None:
        sys.path.insert(0, REPO)  # this checkout's launch flags, whichever --src our side imports
        from sc_jax.sweep.templates import cpu_train_xla_flags

        args.xla_flags = os.environ.get("XLA_FLAGS", cpu_train_xla_flags())
    base_flags = args.xla_flags.split()
    plan = [("sc_jax", "ours", args.ours, base_flags, os.path.abspath(args.src))]
    for text in args.variant:
        label, overrides, flags, src = parse_variant(text)
        plan.append((label, "ours", args.ours + overrides, base_flags + flags, src))
    if not args.no_torch:
        plan.append(("transformers", "theirs", [], [], REPO))

    load0 = os.getloadavg()[0]
    print(f"StableLM {args.layers} layers, hidden {args.hidden}, {args.heads} heads, intermediate {args.intermediate}, "
          f"vocab {args.vocab}; seq {args.seq} x batch {args.batch} = {args.seq * args.batch} tokens per step; fp32; "
          f"{args.threads} threads each{f' (cores {pinned})' if pinned else ''}; load average {load0:.1f}", flush=True)
    sides = []
    try:
        for label, side, overrides, flags, src in plan:  # built one after another: no contention in the builds
            s = Side(label, side, {**spec, "overrides": overrides}, " ".join(flags), pinned, src)
            s.info = s.read()
            sides.append(s)
            print(f"  {label}: {s.info['params']:,} parameters, built in {s.info['build_s']:.1f}s; "
                  f"{s.info['describe']}", flush=True)
        flops_tok = next(s.info["flops_per_token"] for s in sides if s.side == "ours")
        step_flops = flops_tok * args.seq * args.batch
        for r in range(args.warmup + args.steps):
            order = sides if r % 2 == 0 else sides[::-1]
            for s in order:
                out = s.ask(op="step")
                if r < args.warmup:
                    s.first_s = out["seconds"] if r == 0 else s.first_s
                else:
                    s.steps.append(out["seconds"])
                    s.cpu.append(out["cpu"])
                s.losses.append(out["loss"])
                what = "warmup" if r < args.warmup else "step"
                print(f"  round {r + 1}: {s.label} {what} {out['seconds']:.2f}s, CPU {out['cpu']:.2f}s "
                      f"(loss {out['loss']:.4f})", flush=True)
        if args.matmul:
            for r in range(args.matmul_repeats):
                for s in (sides if r % 2 == 0 else sides[::-1]):
                    t = s.ask(op="matmul", n=args.matmul, repeats=1)["seconds"]
                    s.matmul_s = t if s.matmul_s is None else min(s.matmul_s, t)
    finally:
        for s in sides:
            s.close()
        for s in sides:
            if s.proc.poll() is None:
                s.proc.kill()
    report(args, sides, step_flops, flops_tok, load0)
    return 0


def report(args, sides, step_flops: float, flops_tok: float, load0: float) -> None:
    tokens = args.seq * args.batch
    ref = next((s for s in sides if s.side == "theirs"), sides[0])  # the ratios' reference: torch, else ours
    print(f"\n{flops_tok / 1e9:.3f} GFLOP per token (sc_jax.train.step.flops_per_token), {step_flops / 1e12:.2f} TFLOP "
          f"per step; best of {args.steps} steps after {args.warmup} warmup; matmul peak: {args.matmul}^3 fp32, best of "
          f"{args.matmul_repeats}; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print("| side | first step | step (best) | CPU (best) | tokens/s | GFLOP/s | matmul peak | share of peak | peak RSS "
          f"| vs {ref.label} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in sides:
        best = min(s.steps)
        gflops = step_flops / best / 1e9
        peak = 2 * args.matmul ** 3 / s.matmul_s / 1e9 if s.matmul_s else None
        ratio = f"{min(ref.steps) / best:.2f}x (CPU {min(ref.cpu) / min(s.cpu):.2f}x)"
        print(f"| {s.label} | {s.first_s:.1f} s | {best:.2f} s | {min(s.cpu):.2f} s | {tokens / best:,.0f} | {gflops:.0f} | "
              + (f"{peak:.0f} GFLOP/s | {gflops / peak:.0%}" if peak else "- | -")
              + f" | {s.rss / 1e9:.2f} GB | {ratio} |")
    print("\nall timed steps, wall (CPU) s: " + "; ".join(
        f"{s.label} " + ", ".join(f"{t:.2f} ({c:.2f})" for t, c in zip(s.steps, s.cpu)) for s in sides))


if __name__ == "__main__":
    sys.exit(main())
