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

It also compiles the step with each model.remat policy of --remat-policies and
prints their memory side by side, marking which fit and the one expected fastest
(the least recompute) among those that do. The exit code is the configured
policy's: 0 fits, 1 does not, 2 bad input.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

from sc_jax.cli import Parser
from sc_jax.config import REMAT_POLICIES
from sc_jax.plan import device_kinds, plan, report

# The policies compared by default: MaxText's ladder, from no recompute to all; "dots" and
# "dots_no_batch" (jax's generic policies) only on request, as they are near "minimal".
DEFAULT_POLICIES = ("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full")


def _ensure_devices(n: int, argv: list[str]) -> bool:
    """jax fixes its device count at import: re-run in a fresh process with N fake CPU devices."""
    if os.environ.get("SC_JAX_PLAN_CHILD") == "1":
        return False
    env = dict(os.environ, SC_JAX_PLAN_CHILD="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip())
    sys.exit(subprocess.run([sys.executable, "-m", "sc_jax.plan", *argv], env=env).returncode)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m sc_jax.plan", description=__doc__)
    parser.add_argument("--config", help="training YAML, as for sc_jax.train (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config, e.g. train.seq_len=4096")
    parser.add_argument("--devices", type=int, required=True, help="number of accelerator devices in the run")
    parser.add_argument("--device-memory", type=float, required=True, metavar="GIB",
                        help="memory per device in GiB, e.g. 80 for an H100")
    parser.add_argument("--device-kind", default="h100", metavar="KIND",
                        help="the accelerator, for its peak FLOP/s: one of " + ", ".join(device_kinds())
                             + " (default: %(default)s)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation in (0, 1] assumed for the step time (default: %(default)s)")
    parser.add_argument("--remat-policies", default=",".join(DEFAULT_POLICIES), metavar="LIST",
                        help="model.remat policies to compile side by side (comma-separated), 'all' for every one "
                             "(" + ", ".join(REMAT_POLICIES) + "), 'off' for none; the configured one is always "
                             "among them (default: %(default)s)")
    parser.add_argument("--on-device", action="store_true",
                        help="compile for this machine's real devices instead of N fake CPU ones, "
                             "e.g. to check the plan on one GPU (default: off)")
    return parser


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
    policies = remat_policies(args.remat_policies)
    if isinstance(policies, str):
        return policies
    if args.config is not None and not os.path.isfile(args.config):
        return f"--config '{args.config}' is not a file: pass a training YAML, e.g. experiments/configs/stage1.yaml"
    return None


def remat_policies(text: str):
    """--remat-policies as a tuple of names, or the error message (a str)."""
    import difflib

    text = text.strip()
    if text == "off":
        return ()
    if text == "all":
        return tuple(REMAT_POLICIES)
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    for name in names:
        if name not in REMAT_POLICIES:
            close = difflib.get_close_matches(name, REMAT_POLICIES, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            return (f"--remat-policies: '{name}' is not a model.remat policy: {hint}known: {', '.join(REMAT_POLICIES)} "
                    "(or 'all', 'off')")
    if not names:
        return "--remat-policies is empty: pass policy names, e.g. --remat-policies none,full, or 'off'"
    return names


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
    from sc_jax.train.config import load_config

    try:
        overrides = list(args.overrides)
        if not any(o.startswith("model.attention=") for o in overrides) and not args.on_device:
            overrides.append("model.attention=chunked")
        cfg = load_config(args.config, overrides)
        policies = remat_policies(args.remat_policies)
        if policies:
            policies = (*policies, cfg.model.remat)
        r = plan(cfg, devices=args.devices, device_memory_gb=args.device_memory, device_kind=kind, mfu=args.mfu,
                 remat_policies=policies)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(cfg, r, args.devices, kind, args.mfu))
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
