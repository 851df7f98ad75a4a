"""Checkpoint conversion at full size: wall time and peak memory against the checkpoint's size.

    python bench/convert.py [--preset stable-code-3b] [--work DIR] [--keep]

1. Makes a random full-size StableLM with `transformers` in bf16: built on the meta device,
   allocated empty and filled in place, then `save_pretrained` (5 GB shards), so making it
   fits in memory too.
2. `python -m sc_jax.convert hf-to-orbax` of it (the parameters keep their bf16).
3. `python -m sc_jax.convert orbax-to-hf --dtype bfloat16` of the result.
4. Compares the round trip bitwise, tensor by tensor (read with the `safetensors` library,
   not our reader).
5. `train.init_from` of the HF directory and of the orbax checkpoint: the parameter load
   alone (`sc_jax.train.load_init_params` onto one CPU device, fp32 master weights), which
   needs at least the fp32 model itself (2x the bf16 checkpoint) in memory.

Each step runs in its own process; its peak RSS comes from the kernel (wait4's
ru_maxrss). The table gives each next to the checkpoint's size; the goal for the two
conversions is peak RSS <= 1.5x the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOAL = 1.5


# Runs a command and prints its peak RSS. A child's ru_maxrss starts at its parent's RSS
# (the kernel carries the high-water mark across fork and exec), so the measured command
# is started from this small process, never from a big one such as a test runner.
PEAK_RSS_SHIM = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(f"peak_rss_bytes={usage.ru_maxrss * 1024}", file=sys.stderr, flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], echo: bool = True) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in bytes, output) of one command in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS_SHIM, *cmd], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    lines, rss = [], None
    for line in proc.stdout:  # stream the child's progress
        if line.startswith("peak_rss_bytes="):
            rss = float(line.split("=")[1])
            continue
        lines.append(line)
        if echo:
            print("    " + line, end="", flush=True)
    proc.wait()
    if proc.returncode != 0 or rss is None:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{''.join(lines[-30:])}")
    return time.perf_counter() - t0, rss, "".join(lines)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- child steps


def make_checkpoint(out: str, preset: str, *overrides: str) -> None:
    """A random bf16 StableLM of `preset`'s size (with `key=value` ModelConfig overrides),
    saved by transformers."""
    import torch
    import transformers
    import yaml

    from sc_jax.config import model_preset

    sizes = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    hf_config = transformers.StableLmConfig(**model_preset(preset, **sizes).to_hf_dict())
    with torch.device("meta"):
        model = transformers.StableLmForCausalLM(hf_config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=gen)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")


def load_for_training(path: str, preset: str) -> None:
    """train.init_from's parameter load onto one CPU device."""
    import jax

    from sc_jax import train

    cfg = train.load_config(None, [f"model.preset={preset}", f"train.init_from={path}", "train.seq_len=128",
                                   "train.global_batch_size=1", "train.data=synthetic"])
    t0 = time.perf_counter()
    params = train.load_init_params(cfg, train.setup(cfg), print)
    jax.block_until_ready(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
    print(f"loaded {n:,} parameters as {dtypes} in {time.perf_counter() - t0:.1f}s")


def compare(a_dir: str, b_dir: str) -> str:
    """Bitwise comparison of every tensor of two HF directories, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def where(d):
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                return {k: os.path.join(d, v) for k, v in json.load(f)["weight_map"].items()}
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            return {k: os.path.join(d, "model.safetensors") for k in f.keys()}

    wa, wb = where(a_dir), where(b_dir)
    if sorted(wa) != sorted(wb):
        return f"DIFFERENT tensor names: {sorted(set(wa) ^ set(wb))[:5]}"
    for name in sorted(wa):
        with safe_open(wa[name], "pt") as fa, safe_open(wb[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                return f"DIFFERENT: {name} ({x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)})"
    return f"bitwise equal ({len(wa)} tensors)"


# ----------------------------------------------------------------------------- the run


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        step, *args = sys.argv[1:]
        {"_make": make_checkpoint, "_init_from": load_for_training}[step](*args)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="stable-code-3b", help="model size (default: stable-code-3b)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one; needs ~3x the "
                   "checkpoint's size on disk)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints made")
    p.add_argument("--skip-init-from", action="store_true", help="skip step 5 (it needs 2x the checkpoint in memory)")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="sc_jax-bench-convert-")
    os.makedirs(work, exist_ok=True)
    hf, ck, back = (os.path.join(work, n) for n in ("hf", "orbax", "hf-back"))
    for d in (ck, back):
        shutil.rmtree(d, ignore_errors=True)
    me = [sys.executable, os.path.abspath(__file__)]
    convert = [sys.executable, "-m", "sc_jax.convert"]
    rows = [("baseline: python + jax + orbax imported", *measure([sys.executable, "-c", "import sc_jax.checkpoint"])[:2])]
    try:
        if not os.path.exists(os.path.join(hf, "config.json")):
            print(f"[1] making a random bf16 {args.preset} with transformers in {hf} ...", flush=True)
            rows.append(("make (transformers, meta device)", *measure(me + ["_make", hf, args.preset])[:2]))
        size = dir_bytes(hf)
        print(f"checkpoint: {size / 1e9:.2f} GB in {hf}", flush=True)
        print("[2] hf-to-orbax ...", flush=True)
        rows.append(("hf-to-orbax", *measure(convert + ["hf-to-orbax", "--hf", hf, "--out", ck])[:2]))
        print("[3] orbax-to-hf ...", flush=True)
        rows.append(("orbax-to-hf", *measure(convert + ["orbax-to-hf", "--ckpt", ck, "--out", back,
                                                        "--dtype", "bfloat16"])[:2]))
        print("[4] comparing ...", flush=True)
        verdict = compare(hf, back)
        if not args.skip_init_from:
            for name, path in (("train.init_from=HF dir (load alone)", hf), ("train.init_from=orbax (load alone)", ck)):
                print(f"[5] {name} ...", flush=True)
                rows.append((name, *measure(me + ["_init_from", path, args.preset])[:2]))
        report(args.preset, size, dir_bytes(ck), rows, verdict)
    finally:
        if not args.keep:
            for d in (ck, back) + ((hf,) if not args.work else ()):
                shutil.rmtree(d, ignore_errors=True)
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)


def report(preset: str, size: int, orbax_size: int, rows, verdict: str) -> None:
    print(f"\n{preset}, bf16 safetensors checkpoint {size / 1e9:.2f} GB (orbax copy {orbax_size / 1e9:.2f} GB); "
          f"goal for the conversions: peak RSS <= {GOAL}x = {GOAL * size / 1e9:.2f} GB\n")
    print("| step | wall | peak RSS | x checkpoint |")
    print("|---|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.0f} s | {rss / 1e9:.2f} GB | {rss / size:.2f}x |")
    print(f"\nround trip HF -> orbax -> HF: {verdict}")


if __name__ == "__main__":
    main()
