"""Will it fit? The real train step compiled ahead of time for a mesh of N devices (abstract
arrays: nothing is allocated), and what one device would hold: parameters, optimizer state,
batch and the compiler's temporaries, plus FLOPs per step and the step time at a given MFU.
`python -m sc_jax.plan` is the command line (sc_jax.plan.__main__).

    r = plan(cfg, devices=256, device_memory_gb=40, device_kind="a100", mfu=0.4)
    print(report(cfg, r, 256, "a100", 0.4))
"""

from __future__ import annotations

import math
import time

GIB = 2**30


def sharded_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree sharded as given."""
    import jax

    total = 0
    for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = s.shard_shape(a.shape) if a.shape else ()
        total += math.prod(shard) * a.dtype.itemsize
    return total


def abstract_batch(cfg, batch_sharding) -> dict:
    """One global batch of `train.task` as ShapeDtypeStructs on the batch sharding."""
    import jax

    from sc_jax.data.batches import batch_keys, key_dtype

    t = cfg.train
    return {k: jax.ShapeDtypeStruct((t.global_batch_size, t.seq_len), key_dtype(k), sharding=batch_sharding)
            for k in batch_keys(t.task)}


def plan(cfg, *, devices: int, device_memory_gb: float, device_kind: str, mfu: float) -> dict:
    from sc_jax import sharding
    from sc_jax.checkpoint import abstract_like
    from sc_jax.train.state import setup
    from sc_jax.train.step import flops_per_token, peak_flops

    t = cfg.train
    s = setup(cfg)
    abs_state = abstract_like(s.abs_state, s.state_sh)
    abs_batch = abstract_batch(cfg, s.batch_sh)
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


def device_kinds() -> list[str]:
    """The device kinds with a known peak (those of sc_jax.train.step.PEAK_FLOPS)."""
    from sc_jax.train.step import PEAK_FLOPS

    return sorted(PEAK_FLOPS)
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
