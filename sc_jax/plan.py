"""Will it fit? `python -m sc_jax.plan --config FILE --devices N --device-memory GB
[--device-kind h100] [--mfu 0.4] [key.sub=value ...]`  (--help lists every option)

Compiles the real train step ahead of time for a mesh of N devices faked on this
CPU (abstract arrays: nothing is allocated) and reports per-device memory:
parameters, optimizer state, batch, and the compiler's temporaries (activations
and workspace), plus FLOPs per step and the step time and tokens/s the run would
have at a given MFU. Says clearly when it does not fit, and which knob would help.

On the CPU the fused GPU attention kernel does not exist, so for an accelerator
kind the plan compiles the query-chunked attention (model.attention=chunked),
whose score memory is one [batch, heads, 1024, seq] block, close to what a flash
kernel needs; pass model.attention=reference to plan the unfused path.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

GIB = 2**30


def _ensure_devices(n: int, argv: list[str]) -> bool:
    """jax fixes its device count at import: re-run in a fresh process with N fake CPU devices."""
    if os.environ.get("SC_JAX_PLAN_CHILD") == "1":
        return False
    env = dict(os.environ, SC_JAX_PLAN_CHILD="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip())
    sys.exit(subprocess.run([sys.executable, "-m", "sc_jax.plan", *argv], env=env).returncode)


def sharded_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree sharded as given."""
    import jax

    total = 0
    for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = s.shard_shape(a.shape) if a.shape else ()
        total += math.prod(shard) * a.dtype.itemsize
    return total


def plan(cfg, *, devices: int, device_memory_gb: float, device_kind: str, mfu: float) -> dict:
    import jax
    import numpy as np

    from sc_jax import sharding
    from sc_jax.checkpoint import abstract_like
    from sc_jax.step import flops_per_token, peak_flops
    from sc_jax.train import setup

    t = cfg.train
    s = setup(cfg)
    abs_state = abstract_like(s.abs_state, s.state_sh)
    batch_keys = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
    if t.task == "dpo":
        batch_keys = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in batch_keys)
    abs_batch = {k: jax.ShapeDtypeStruct((t.global_batch_size, t.seq_len),
                                         np.float32 if k.endswith("loss_mask") else np.int32, sharding=s.batch_sh)
                 for k in batch_keys}
    t0 = time.time()
    with sharding.activation_rules(s.mesh, s.rules):
        lowered = s.step_fn.lower(abs_state, abs_batch)
    compiled = lowered.compile()
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    params_b = sharded_bytes(s.abs_state["params"], s.state_sh["params"])
    opt_b = sharded_bytes(s.abs_state["opt_state"], s.state_sh["opt_state"])
    ref_b = sharded_bytes(s.abs_state["ref_params"], s.state_sh["ref_params"]) if "ref_params" in s.abs_state else 0
    batch_b = sharded_bytes(abs_batch, [s.batch_sh] * len(abs_batch))
    temp_b = int(mem.temp_size_in_bytes) if mem is not None else 0
    total_b = params_b + opt_b + ref_b + batch_b + temp_b
    tokens = t.global_batch_size * t.seq_len
    flops = flops_per_token(cfg.model, t.seq_len) * tokens
    peak = peak_flops(device_kind)
    step_s = flops / (mfu * peak * devices) if peak else float("nan")
    return {"mesh": dict(s.mesh.shape), "compile_s": compile_s, "params": params_b, "optimizer": opt_b,
            "reference": ref_b, "batch": batch_b, "temporaries": temp_b, "total": total_b,
            "capacity": device_memory_gb * GIB, "fits": total_b <= 0.92 * device_memory_gb * GIB,
            "flops_per_step": flops, "step_s": step_s,
            "tokens_per_step": tokens, "tokens_per_s": tokens / step_s if peak else float("nan"), "peak": peak}


def advice(cfg, r: dict) -> list[str]:
    """The knobs that would cut the biggest share of memory, biggest first."""
    tips = []
    m, t = cfg.model, cfg.train
    data_ways = r["mesh"]["data"]
    per_device_batch = t.global_batch_size // t.micro_batches // (r["mesh"]["data"] * r["mesh"]["fsdp"])
    if r["temporaries"] > 0.3 * r["total"]:
        if m.remat != "full":
            tips.append(f"model.remat=full (now '{m.remat}'): activations are {r['temporaries'] / GIB:.1f} GiB/device")
        if per_device_batch > 1:
            tips.append(f"train.micro_batches={t.micro_batches * 2}: halves the activations of each micro-batch "
                        f"(now {per_device_batch} sequence(s)/device)")
        if m.attention == "reference":
            tips.append("model.attention=chunked or cudnn: the reference path holds [batch, heads, seq, seq] scores")
    if data_ways > 1:
        tips.append(f"mesh.fsdp={r['mesh']['fsdp'] * data_ways} mesh.data=1: shard parameters and optimizer state "
                    f"over the {data_ways}-way data axis too (now replicated {data_ways}x)")
    if cfg.optimizer.moments_dtype == "float32" and r["optimizer"] > 0.3 * r["total"]:
        tips.append("optimizer.moments_dtype=bfloat16: a smaller first moment")
    if r["mesh"]["tensor"] == 1 and r["params"] + r["optimizer"] > 0.5 * r["total"]:
        tips.append("mesh.tensor=2 or 4: split every layer's weights within a node")
    return tips


def report(cfg, r: dict, devices: int, kind: str, mfu: float) -> str:
    gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [
        f"plan: {cfg.model.num_params():,} parameters, seq {cfg.train.seq_len}, global batch "
        f"{cfg.train.global_batch_size} x {cfg.train.micro_batches} micro-batch(es) = {r['tokens_per_step']:,} tokens/step",
        f"mesh {r['mesh']} on {devices} x {kind} ({r['capacity'] / GIB:.0f} GiB), remat={cfg.model.remat}, "
        f"attention={cfg.model.attention}, compute {cfg.model.dtype}, compiled in {r['compile_s']:.1f}s",
        "",
        "per-device memory",
        f"  parameters        {gib(r['params'])}",
        f"  optimizer state   {gib(r['optimizer'])}",
    ]
    if r["reference"]:
        lines.append(f"  reference model   {gib(r['reference'])}")
    lines += [
        f"  batch             {gib(r['batch'])}",
        f"  temporaries       {gib(r['temporaries'])}   (activations, gradients, workspace: XLA's buffer assignment)",
        f"  total             {gib(r['total'])}   of {r['capacity'] / GIB:.1f} GiB "
        f"({100 * r['total'] / r['capacity']:.0f}%)",
        "",
        f"FLOPs/step {r['flops_per_step']:.3e} (6 x params + attention, per token)",
    ]
    if r["peak"]:
        lines.append(f"at {100 * mfu:.0f}% MFU of {r['peak'] / 1e12:.0f} TFLOP/s/device: {r['step_s']:.2f} s/step, "
                     f"{r['tokens_per_s']:,.0f} tokens/s, {r['tokens_per_s'] / devices:,.0f} tokens/s/device")
    else:
        lines.append(f"(no peak FLOP/s for device kind '{kind}': pass the accelerator's kind, e.g. --device-kind h100)")
    lines.append("")
    if r["fits"]:
        lines.append(f"FITS: {r['total'] / GIB:.1f} GiB of {r['capacity'] / GIB:.1f} GiB per device "
                     "(8% kept for the runtime and fragmentation)")
    else:
        lines.append(f"DOES NOT FIT: needs {r['total'] / GIB:.1f} GiB per device, the device has "
                     f"{r['capacity'] / GIB:.1f} GiB. Try:")
        lines += [f"  - {tip}" for tip in advice(cfg, r)] or ["  - more devices"]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as every other bad input
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sc_jax.plan", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training YAML (as for sc_jax.train; default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config, e.g. train.seq_len=4096")
    parser.add_argument("--devices", type=int, required=True, help="number of accelerator devices in the run (required)")
    parser.add_argument("--device-memory", type=float, required=True, metavar="GIB",
                        help="memory per device in GiB, e.g. 80 for an H100 (required)")
    parser.add_argument("--device-kind", default="h100", metavar="KIND",
                        help="the accelerator, for its peak FLOP/s: one of " + ", ".join(device_kinds())
                             + " (default: %(default)s)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation in (0, 1] assumed for the step time (default: %(default)s)")
    parser.add_argument("--on-device", action="store_true",
                        help="compile for this machine's real devices instead of N fake CPU ones, "
                             "e.g. to check the plan on one GPU (default: off)")
    return parser


def device_kinds() -> list[str]:
    """The --device-kind names with a known peak (those of sc_jax.step.PEAK_FLOPS)."""
    from sc_jax.step import PEAK_FLOPS

    return sorted(PEAK_FLOPS)


def check_args(args) -> str | None:
    """The first bad option as an error message (problem and fix), or None. Runs before
    any compile (and before the re-exec with N fake devices), so bad input fails at once."""
    import difflib

    if args.devices < 1:
        return f"--devices must be at least 1, got {args.devices}: pass the number of devices of the run"
    if not (math.isfinite(args.device_memory) and args.device_memory > 0):
        return (f"--device-memory must be a positive number of GiB, got {args.device_memory}: "
                "pass each device's memory, e.g. --device-memory 80")
    if not 0 < args.mfu <= 1:
        return f"--mfu must be within (0, 1], got {args.mfu}: pass a fraction such as --mfu 0.4 (40%)"
    kinds = device_kinds()
    if args.device_kind.lower() not in kinds:
        close = difflib.get_close_matches(args.device_kind.lower(), kinds, n=1, cutoff=0.7)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"--device-kind '{args.device_kind}' is not a known device kind: {hint}known: {', '.join(kinds)}"
    if args.config is not None and not os.path.isfile(args.config):
        return f"--config '{args.config}' is not a file: pass a training YAML, e.g. experiments/configs/stage1.yaml"
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    kind = args.device_kind.lower()
    if not args.on_device:
        _ensure_devices(args.devices, argv)

    from sc_jax.config import ConfigError
    from sc_jax.train import load_config

    try:
        overrides = list(args.overrides)
        if not any(o.startswith("model.attention=") for o in overrides) and not args.on_device:
            overrides.append("model.attention=chunked")
        cfg = load_config(args.config, overrides)
        r = plan(cfg, devices=args.devices, device_memory_gb=args.device_memory, device_kind=kind, mfu=args.mfu)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(cfg, r, args.devices, kind, args.mfu))
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
