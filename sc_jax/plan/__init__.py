"""Will it fit? The real train step compiled ahead of time for a mesh of N devices (abstract
arrays: nothing is allocated), and what one device would hold: parameters, optimizer state,
batch and the compiler's temporaries, plus FLOPs per step and the step time at a given MFU.
`python -m sc_jax.plan` is the command line (sc_jax.plan.__main__).

    r = plan(cfg, devices=256, device_memory_gb=40, device_kind="a100", mfu=0.4)
    print(report(cfg, r, 256, "a100", 0.4))

`plan(..., remat_policies=POLICIES)` also compiles the same step with each of those
`model.remat` policies (one compile each: they differ only in the temporaries, i.e. what the
backward pass keeps) and `report` prints which of them fit, and the one expected fastest.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import time

GIB = 2**30
FIT_SHARE = 0.92  # of device memory a plan may fill: the rest for the runtime and fragmentation

# model.remat policies from the least recomputed to the most (so, for the same memory,
# fastest first): "dots" keeps every matmul output (the reference path's [B,H,T,S] scores
# too), "minimal" and "dots_no_batch" the layer's projections (minimal by name: q, k, v, the
# attention output, out_proj, the MLP's), "save_dot_except_mlp" recomputes the MLP,
# "save_qkv_proj" keeps only q, k, v, "full" only each layer's input. (With the attention
# core outside the recomputed region, i.e. every path but reference, the core keeps q, k, v
# itself, so save_qkv_proj and full recompute alike: bench/mfu.py --flops counts 1.13x at 4k.)
REMAT_SPEED_ORDER = ("none", "dots", "minimal", "dots_no_batch", "save_dot_except_mlp", "save_qkv_proj", "full")


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


def lower_step(cfg):
    """(setup, the train step lowered for abstract state and batch, that batch): nothing allocated."""
    from sc_jax import sharding
    from sc_jax.checkpoint import abstract_like
    from sc_jax.train.state import setup

    s = setup(cfg)
    abs_batch = abstract_batch(cfg, s.batch_sh)
    with sharding.activation_rules(s.mesh, s.rules):  # the rules apply while tracing, not compiling
        lowered = s.step_fn.lower(abstract_like(s.abs_state, s.state_sh), abs_batch)
    return s, lowered, abs_batch


def temporaries(compiled) -> int:
    """The compiler's temporaries of a compiled step, in bytes (activations, gradients, workspace)."""
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes) if mem is not None else 0


def plan(cfg, *, devices: int, device_memory_gb: float, device_kind: str, mfu: float,
         remat_policies=()) -> dict:
    """The plan of `cfg` (see the module docstring); `remat_policies`: also compile these."""
    from sc_jax.train.step import flops_per_token, peak_flops

    t = cfg.train
    t0 = time.time()
    s, lowered, abs_batch = lower_step(cfg)
    compiled = lowered.compile()
    compile_s = time.time() - t0
    params_b = sharded_bytes(s.abs_state["params"], s.state_sh["params"])
    opt_b = sharded_bytes(s.abs_state["opt_state"], s.state_sh["opt_state"])
    ref_b = sharded_bytes(s.abs_state["ref_params"], s.state_sh["ref_params"]) if "ref_params" in s.abs_state else 0
    batch_b = sharded_bytes(abs_batch, [s.batch_sh] * len(abs_batch))
    temp_b = temporaries(compiled)
    fixed_b = params_b + opt_b + ref_b + batch_b
    total_b = fixed_b + temp_b
    capacity = device_memory_gb * GIB
    tokens = t.global_batch_size * t.seq_len
    flops = flops_per_token(cfg.model, t.seq_len) * tokens
    peak = peak_flops(device_kind)
    step_s = flops / (mfu * peak * devices) if peak else float("nan")
    r = {"mesh": dict(s.mesh.shape), "compile_s": compile_s, "params": params_b, "optimizer": opt_b,
         "reference": ref_b, "batch": batch_b, "temporaries": temp_b, "total": total_b,
         "capacity": capacity, "fits": total_b <= FIT_SHARE * capacity,
         "flops_per_step": flops, "step_s": step_s,
         "tokens_per_step": tokens, "tokens_per_s": tokens / step_s if peak else float("nan"), "peak": peak}
    if remat_policies:
        r["remat"] = remat_table(cfg, remat_policies, fixed_b, capacity, known={cfg.model.remat: temp_b})
    return r


def remat_table(cfg, policies, fixed_bytes: int, capacity: float, known: dict | None = None) -> list[dict]:
    """One row per policy, in REMAT_SPEED_ORDER: {policy, temporaries, total, fits, error}.

    Parameters, optimizer state and batch do not depend on the policy (`fixed_bytes`); the
    step is compiled once per policy for its temporaries (`known`: {policy: bytes} already
    compiled). Tracing holds the GIL, so the steps are lowered one after another; XLA's
    compiles run in threads, side by side. A policy whose step cannot be built is a row
    with its error (e.g. a name the model does not implement), not a failed plan."""
    known = dict(known or {})
    order = {p: i for i, p in enumerate(REMAT_SPEED_ORDER)}
    policies = sorted(dict.fromkeys(policies), key=lambda p: order.get(p, len(order)))
    rows, pending = {}, {}
    for p in policies:
        if p in known:
            continue
        try:
            variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=p))
            pending[p] = lower_step(variant)[1]
        except Exception as e:  # noqa: BLE001 - reported in the table, the plan goes on
            rows[p] = {"error": _first_line(e)}
    workers = max(1, min(len(pending), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {p: pool.submit(lambda low: temporaries(low.compile()), low) for p, low in pending.items()}
        for p, f in futures.items():
            try:
                known[p] = f.result()
            except Exception as e:  # noqa: BLE001
                rows[p] = {"error": _first_line(e)}
    table = []
    for p in policies:
        row = {"policy": p, "temporaries": None, "total": None, "fits": False, "error": None, **rows.get(p, {})}
        if p in known:
            total = fixed_bytes + known[p]
            row.update(temporaries=known[p], total=total, fits=total <= FIT_SHARE * capacity)
        table.append(row)
    return table


def fastest_fitting(table: list[dict]) -> dict | None:
    """The row of the least-recomputing policy that fits (the table is in REMAT_SPEED_ORDER)."""
    return next((row for row in table if row["fits"]), None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


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
    best = fastest_fitting(r.get("remat", []))
    if best is not None and best["policy"] != m.remat:
        tips.append(f"model.remat={best['policy']} (now '{m.remat}'): fits at {best['total'] / GIB:.1f} GiB/device, "
                    "the least recompute of the policies that do")
    if r["temporaries"] > 0.3 * r["total"]:
        if m.remat != "full" and best is None:
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
    if r.get("remat"):
        lines[-1:-1] = remat_lines(cfg, r)
    if r["peak"]:
        lines.append(f"at {100 * mfu:.0f}% MFU of {r['peak'] / 1e12:.0f} TFLOP/s/device: {r['step_s']:.2f} s/step, "
                     f"{r['tokens_per_s']:,.0f} tokens/s, {r['tokens_per_s'] / devices:,.0f} tokens/s/device")
    else:
        lines.append(f"(no peak FLOP/s for device kind '{kind}': pass the accelerator's kind, e.g. --device-kind h100)")
    lines.append("")
    if r["fits"]:
        lines.append(f"FITS: {r['total'] / GIB:.1f} GiB of {r['capacity'] / GIB:.1f} GiB per device "
                     f"({100 - round(100 * FIT_SHARE)}% kept for the runtime and fragmentation)")
    else:
        lines.append(f"DOES NOT FIT: needs {r['total'] / GIB:.1f} GiB per device, the device has "
                     f"{r['capacity'] / GIB:.1f} GiB. Try:")
        lines += [f"  - {tip}" for tip in advice(cfg, r)] or ["  - more devices"]
    return "\n".join(lines)


def remat_lines(cfg, r: dict) -> list[str]:
    """The per-policy table of the report: memory per device with each model.remat policy."""
    table = r["remat"]
    cap = r["capacity"]
    lines = [f"model.remat policies: the same step compiled with each (least recompute first; "
             f"fits = within {round(100 * FIT_SHARE)}% of {cap / GIB:.1f} GiB)",
             f"  {'policy':<22}{'temporaries':>14}{'total':>12}   fits"]
    for row in table:
        mark = " *" if row["policy"] == cfg.model.remat else ""
        if row["error"]:
            lines.append(f"  {row['policy'] + mark:<22}  could not compile: {row['error']}")
            continue
        lines.append(f"  {row['policy'] + mark:<22}{_size(row['temporaries']):>14}{_size(row['total']):>12}"
                     f"   {'yes' if row['fits'] else 'no'} ({100 * row['total'] / cap:.0f}%)")
    best = fastest_fitting(table)
    lines.append("  (* = configured) " + (f"expected fastest that fits: model.remat={best['policy']}" if best
                                          else "none of these fits"))
    lines.append("")
    return lines


def _size(b: float) -> str:
    """Bytes as GiB, or MiB below a tenth of a GiB (tiny test models)."""
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"
