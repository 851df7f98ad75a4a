"""The real train step of a preset on whatever accelerator this process sees: step time,
tokens/s, MFU, HFU and peak memory per configuration (attention path x remat policy x
batch x seq), plus a calibration of the device and the recompute each remat policy costs.

    python bench/mfu.py --out results.json --budget-s 500      # the default plan (below)
    python bench/mfu.py --configs cudnn:full:4:4096,cudnn:minimal:2:4k
    python bench/mfu.py --dry-run                               # the same code on the CPU, tiny preset
    python bench/mfu.py --flops [--seq 4096]                    # XLA-counted FLOPs per remat policy, CPU

On one GPU (the device check; `run` executes it in the repository root, $OUT comes back):

    set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/mfu.py --out $OUT/results.json --budget-s 500 2>&1 | tee $OUT/log.txt

Every configuration runs in its own subprocess (its own GPU memory pool, so a peak or an
out-of-memory is its own) under a timeout, and each result is appended to --out as one
JSON object per line, flushed as it comes (a run cut short keeps what it measured). This
process never touches the accelerator: only its children do.

The default plan, in the order of expected gain, for one H100/H200 in ~9 minutes:
  1. calibration (<= 60 s): versions, the allocator's limit, an 8192^3 bf16 matmul's TFLOP/s
     (the real ceiling), each attention path forward+backward at B=2, T=4096 (time and the
     compiled temporaries);
  2. at 4096 tokens: cudnn + full remat at batch 4 (the baseline), then save_dot_except_mlp
     and minimal at the largest batch <= 4 that fits (halved until the compiled step fits);
  3. the fastest of those at twice its batch, or, if that does not fit, twice the batch in 2
     micro-batches (the activations of one);
  4. 16384 tokens, batch 1, with the fastest policy (full remat if that does not fit);
  5. the fastest 4k configuration once more with another XLA_FLAGS (--xla-variant; by
     default XLA's own defaults, i.e. without the launch flags): skipped with < 90 s left.
16k comes before the flag variant, so a short budget loses the most speculative part.
A point starts only if its share of --budget-s is left, and its timeout is cut to what is left.

What the numbers mean:
  MFU  model FLOPs (sc_jax.train.step.flops_per_token: 6 x params + causal attention, per
       token) per second over the device's dense bf16 peak (step.peak_flops).
  HFU  hardware FLOPs, the recompute of the remat policy included, over the same peak:
       MFU x the policy's recompute factor, which XLA counts (cost_analysis) on the CPU in
       a background process while the GPU runs. XLA counts a `scan` body once, so that
       compile is unscanned (scan_layers=False), untiled (loss_tile=0, the tiles are a scan
       too) and at 1 and 2 layers; a layer is the difference, and L layers are the rest of
       the step plus L layers. The factor is those FLOPs over the same with remat=none. The
       attention core is counted by its reference math, inside the recomputed region for
       model.attention=reference and outside it for the other paths (as the model runs
       them). Not counted: the fused kernels' own recompute of scores in their backward
       pass, the recompute of chunked's score blocks, the loss tiles' logits (~1.4% at
       stable-code-3b's vocabulary). --flops prints these factors.
  of matmul  the model FLOP/s as a share of the calibration's matmul (reachable) rate.
  peak GiB   the device's peak_bytes_in_use (jax memory_stats, this child alone); where the
       device keeps no statistics (CPU) the compiled step's arguments + outputs - aliased +
       temporaries, marked "c".

The parameters are created on the device by a jitted init with out_shardings, their
random values drawn in the compute dtype and cast to the master dtype there (no host
init: an fp32 host init once cost a device session 270 s). The step is the training one:
sc_jax.train.state.setup's jitted, donated step, compiled ahead of time; the batch is
synthetic (random tokens, --docs packed documents per row, every target learned).

Launch environment: the GPU launchers' XLA_PYTHON_CLIENT_MEM_FRACTION and XLA_FLAGS
(sc_jax.sweep.templates.gpu_env_defaults) are set here too, each only where the
environment leaves it unset; flags this jaxlib does not know are dropped, with a note.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/mfu.py` from a checkout that is not pip-installed (the GPU machine)
    sys.path.insert(0, REPO)

from sc_jax.cli import Parser, first_line, whole_number  # noqa: E402
from sc_jax.config import ATTENTION_PATHS, REMAT_POLICIES  # noqa: E402
from sc_jax.sweep.templates import gpu_env_defaults  # noqa: E402

GIB = 2**30
TAG = "@@mfu "  # a child's result line on its stdout; everything else it prints is its log
CACHE_DIR = os.path.join(tempfile.gettempdir(), "sc_jax_mfu_cache")
OOM_WORDS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")

# Sizes of the default plan: the real ones, and the dry run's (tiny preset, CPU). The tiny
# preset's context is 256, so its "16k" is 256.
# min_left: scales each point's min_left_s (the dry run's compiles take seconds, not a minute).
REAL = dict(preset="stable-code-3b", batch=4, seq=4096, long_seq=16384, matmul=8192, attn_batch=2, attn_seq=4096,
            steps=5, budget=500.0, timeout=240.0, flops_seqs=(4096, 16384), min_left=1.0)
DRY = dict(preset="tiny", batch=4, seq=64, long_seq=256, matmul=512, attn_batch=2, attn_seq=256,
           steps=3, budget=110.0, timeout=60.0, flops_seqs=(64,), min_left=0.2)
CALIBRATION_S = 60.0  # the calibration's share of a device run (what it measured by then is kept)
PLAN_POLICIES = ("none", "full", "save_dot_except_mlp", "minimal")  # what the background FLOP count covers
FLOPS_POLICIES = ("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full")  # --flops' default


@dataclasses.dataclass
class Point:
    """One configuration of the train step."""

    attention: str
    remat: str
    batch: int  # global batch (sequences per step)
    seq: int
    micro: int = 1  # train.micro_batches
    xla: str | None = None  # None: the launch XLA_FLAGS; a string: this point's XLA_FLAGS ("" = XLA's defaults)
    fit: bool = False  # halve the batch until the compiled step fits the device's memory
    min_left_s: float = 45.0  # start only with this much of the budget left
    role: str = ""

    @property
    def name(self) -> str:
        name = f"{self.attention} {self.remat} {self.batch}x{self.seq}"
        if self.micro > 1:
            name += f" m{self.micro}"
        if self.xla is not None:
            name += " xla=" + ("defaults" if not self.xla.strip() else "variant")
        return name


# ----------------------------------------------------------------------------- arguments


def parse_seq(text: str) -> int:
    """4096, or 4k (= 4096)."""
    text = text.strip().lower()
    n = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    if n < 1:
        raise ValueError(text)
    return n


def parse_configs(text: str) -> list[Point]:
    """--configs: ATTENTION:REMAT:BATCH:SEQ[:MICRO], comma-separated (ValueError: what is wrong)."""
    points = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        fields = item.split(":")
        if len(fields) not in (4, 5):
            raise ValueError(f"'{item}' is not ATTENTION:REMAT:BATCH:SEQ[:MICRO], e.g. cudnn:full:4:4096")
        attention, remat = fields[0], fields[1]
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"'{item}': attention '{attention}' is not one of {', '.join(ATTENTION_PATHS)}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"'{item}': remat '{remat}' is not one of {', '.join(REMAT_POLICIES)}")
        try:
            batch, seq = int(fields[2]), parse_seq(fields[3])
            micro = int(fields[4]) if len(fields) == 5 else 1
        except ValueError:
            raise ValueError(f"'{item}': BATCH, SEQ and MICRO must be whole numbers (SEQ may be 4k)") from None
        if batch < 1 or micro < 1 or batch % micro:
            raise ValueError(f"'{item}': the batch must be at least 1 and a multiple of the micro-batches")
        points.append(Point(attention, remat, batch, seq, micro))
    if not points:
        raise ValueError("no configuration given: pass e.g. --configs cudnn:full:4:4096")
    return points


def build_parser() -> Parser:
    p = Parser(prog="python bench/mfu.py", description=__doc__)
    p.add_argument("--out", metavar="FILE", help="append every result to FILE, one JSON object per line")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"model preset (default: {REAL['preset']}; {DRY['preset']} with --dry-run)")
    p.add_argument("--configs", metavar="LIST",
                   help="run these instead of the default plan: ATTENTION:REMAT:BATCH:SEQ[:MICRO], comma-separated, "
                        "e.g. cudnn:full:4:4096,cudnn:minimal:2:4k:1 (default: the plan in the description)")
    p.add_argument("--attention", default="cudnn", choices=ATTENTION_PATHS,
                   help="the default plan's attention path (off a GPU, cudnn becomes auto)")
    p.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help=f"wall-clock budget of the whole run; later points are skipped when it runs out "
                        f"(default: {REAL['budget']:.0f}; {DRY['budget']:.0f} with --dry-run)")
    p.add_argument("--timeout-s", type=float, default=None, metavar="S",
                   help=f"the most one configuration may take (default: {REAL['timeout']:.0f}; "
                        f"{DRY['timeout']:.0f} with --dry-run)")
    p.add_argument("--steps", type=whole_number(1), default=None,
                   help=f"timed steps per configuration (default: {REAL['steps']}; {DRY['steps']} with --dry-run)")
    p.add_argument("--warmup", type=whole_number(1), default=1, help="untimed steps first (the first one autotunes)")
    p.add_argument("--docs", type=whole_number(1), default=4,
                   help="packed documents per synthetic row (1: unpacked rows)")
    p.add_argument("--xla-variant", default="", metavar="FLAGS",
                   help="XLA_FLAGS of the plan's flag variant: '' = XLA's own defaults; a leading '+' adds the "
                        "rest to the launch flags (default: '')")
    p.add_argument("--device-memory-gib", type=float, default=None, metavar="GIB",
                   help="treat this as the device's memory when fitting batches (default: the allocator's limit; "
                        "none on the CPU)")
    p.add_argument("--devices", type=whole_number(1), default=1,
                   help="devices each step runs on (mesh.num_devices; fsdp over them); MFU and HFU are per device, "
                        "tokens/s for all of them")
    p.add_argument("--no-calibration", action="store_true", help="skip the calibration part")
    p.add_argument("--no-hfu", action="store_true", help="skip the background FLOP count (HFU column empty)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same code on the CPU with the tiny preset and small sizes (< 2 minutes)")
    p.add_argument("--flops", action="store_true",
                   help="only compile unscanned 1- and 2-layer models on the CPU and print XLA-counted FLOPs / "
                        "analytic FLOPs and the recompute factor per remat policy")
    p.add_argument("--seq", default=None, metavar="SEQ",
                   help=f"--flops' sequence length (default: {REAL['seq']}; {DRY['seq']} with --dry-run)")
    p.add_argument("--policies", default=",".join(FLOPS_POLICIES), metavar="LIST",
                   help="--flops' remat policies, comma-separated")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sc_jax.train config override for every configuration, e.g. model.param_dtype=bfloat16 "
                        "(repeatable)")
    p.add_argument("--child", help=__import__("argparse").SUPPRESS)  # a subprocess' job (JSON)
    return p


def check_args(args) -> str | None:
    """The first bad option as a message (what and how to fix), or None."""
    import math

    from sc_jax.config import MODEL_PRESETS

    if args.preset is not None and args.preset not in MODEL_PRESETS:
        return f"--preset '{args.preset}' is not a model preset: one of {', '.join(MODEL_PRESETS)}"
    for name in ("budget_s", "timeout_s", "device_memory_gib"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            return f"--{name.replace('_', '-')} must be a positive number, got {v}"
    if args.configs is not None:
        try:
            parse_configs(args.configs)
        except ValueError as e:
            return f"--configs: {e}"
    if args.seq is not None:
        try:
            parse_seq(args.seq)
        except ValueError:
            return f"--seq '{args.seq}' is not a sequence length: pass e.g. 4096 or 4k"
    for policy in args.policies.split(","):
        if policy.strip() not in REMAT_POLICIES:
            return f"--policies: '{policy.strip()}' is not one of {', '.join(REMAT_POLICIES)}"
    for item in args.set:
        if "=" not in item or not item.split("=", 1)[0].strip():
            return f"--set '{item}' is not KEY=VALUE, e.g. --set model.param_dtype=bfloat16"
    if args.flops and args.configs:
        return "--flops compiles on the CPU only: leave out --configs"
    return None


# ----------------------------------------------------------------------------- the parent


class Results:
    """Records appended to --out as they come (one JSON object per line, flushed)."""

    def __init__(self, path: str | None):
        self.path, self.records = path, []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def add(self, record: dict) -> dict:
        record = {"time": round(time.time(), 3), **record}
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        return record


def launch_env(dry_run: bool) -> tuple[dict, dict]:
    """(the children's environment: the launch defaults where unset, the CPU for a dry run;
    {variable: where its value came from})."""
    env = dict(os.environ)
    sources = {}
    for key, value in gpu_env_defaults().items():
        sources[key] = "environment" if key in env else "launch default"
        env.setdefault(key, value)
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "1")
    return env, sources


def drop_unknown_flags(env: dict, log) -> list[str]:
    """XLA refuses to start on a flag it does not know (a newer jaxlib removes some): try the
    launch flags in a CPU-only process and drop each one it names. Returns the dropped ones."""
    dropped = []
    for _ in range(len(env.get("XLA_FLAGS", "").split()) + 1):
        probe = dict(env, JAX_PLATFORMS="cpu")
        r = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], env=probe,
                           capture_output=True, text=True, timeout=120)
        bad = re.findall(r"Unknown flags? in XLA_FLAGS:\s*(.*)", r.stderr)
        if r.returncode == 0 or not bad:
            break
        names = bad[0].split()
        flags = [f for f in env["XLA_FLAGS"].split() if f not in names and f.split("=")[0] not in names]
        if len(flags) == len(env["XLA_FLAGS"].split()):
            break
        dropped += [f for f in env["XLA_FLAGS"].split() if f not in flags]
        env["XLA_FLAGS"] = " ".join(flags)
    if dropped:
        log(f"note: this jaxlib does not know {' '.join(dropped)}: dropped from XLA_FLAGS")
    return dropped


def run_child(job: dict, env: dict, timeout: float) -> tuple[dict | None, str, str]:
    """(the child's result record or None, 'ok' | 'timeout' | 'crashed', the end of its log).
    The child runs in its own process group, so a timeout ends all of it (and frees the GPU)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=max(1.0, timeout))
        how = "ok"
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        how = "timeout"
    result = None
    for line in out.splitlines():  # the last result line counts: a child may report as it goes
        if line.startswith(TAG):
            result = json.loads(line[len(TAG):])
    log = "\n".join((out + "\n" + err).strip().splitlines()[-12:])
    if result is None and how == "ok":
        how = "crashed"
    if result is not None and how == "timeout":  # what it had measured before the timeout
        result["status"] = "timeout"
    return result, how, log


class Run:
    """The parent: runs the calibration and the points, each in a child, within the budget."""

    def __init__(self, args):
        self.args = args
        self.sizes = DRY if args.dry_run else REAL
        self.preset = args.preset or self.sizes["preset"]
        self.budget = args.budget_s or self.sizes["budget"]
        self.timeout = args.timeout_s or self.sizes["timeout"]
        self.steps = args.steps or self.sizes["steps"]
        self.t0 = time.time()
        self.deadline = self.t0 + self.budget
        self.results = Results(args.out)
        self.env, self.env_sources = launch_env(args.dry_run)
        self.platform = "cpu" if args.dry_run else None  # else the calibration says
        self.calibration = None
        self.steps_done: list[dict] = []  # every point's final record, in order
        self.skipped: list[dict] = []
        self.resolved: dict[str, str | None] = {}  # model.attention -> the path it takes on the device

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, text: str) -> None:
        print(text, flush=True)

    def job(self, what: str, **kw) -> dict:
        return {"what": what, "preset": self.preset, "cache_dir": CACHE_DIR, "set": self.args.set,
                "devices": self.args.devices, **kw}

    def attention_names(self) -> list[str]:
        """The model.attention values this run's points use (the default plan's may become auto)."""
        if self.args.configs:
            return sorted({p.attention for p in parse_configs(self.args.configs)})
        return sorted({self.args.attention, "auto"})

    def calibrate(self) -> None:
        job = self.job("calibrate", matmul=self.sizes["matmul"], attn_batch=self.sizes["attn_batch"],
                       attn_seq=self.sizes["attn_seq"], docs=self.args.docs, resolve=self.attention_names(),
                       seq=self.sizes["seq"])
        timeout = min(CALIBRATION_S if not self.args.dry_run else self.timeout, self.left())
        rec, how, log = run_child(job, self.env, timeout)
        if rec is None:
            rec = {"status": how, "log": log}
        self.calibration = self.results.add({"kind": "calibration", **rec})
        self.platform = rec.get("platform") or self.platform
        self.resolved = rec.get("resolved") or {}
        if rec.get("matmul"):  # complete, or cut short by its timeout after the matmul
            self.log(f"calibration: {rec['device_kind']} ({rec['platform']}), jax {rec['versions'].get('jax')}, "
                     f"matmul {rec['matmul']['n']}^3 bf16 {rec['matmul']['tflops']:.3g} TFLOP/s, allocator limit "
                     f"{_gib(rec['memory'].get('bytes_limit'))} GiB [{rec.get('wall_s', 0):.0f} s, {rec['status']}]")
            for a in rec["attention"]:
                self.log(f"  attention {a['path']}: " + (f"{a['ms']:.2f} ms fwd+bwd, {_gib(a['temp_bytes'])} GiB temp"
                                                         if a.get("ms") is not None else a.get("error", "")))
        else:
            self.log(f"calibration {how}: {log}")

    def start_flops(self):
        """The background FLOP count (CPU, low priority) for the HFU column, or None."""
        if self.args.no_hfu:
            return None
        env = dict(self.env, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
        # Every path but the reference runs the attention core outside the recomputed region
        # ("fused"); which path a name takes on the device the calibration said (auto: both
        # structures when it could not).
        structures = set()
        for name in self.attention_names():
            path = self.resolved.get(name) or (name if name != "auto" else None)
            structures |= {"reference", "fused"} if path is None else {"reference" if path == "reference" else "fused"}
        if self.args.configs:
            points = parse_configs(self.args.configs)
            policies, seqs = sorted({p.remat for p in points} | {"none"}), sorted({p.seq for p in points})
        else:
            policies, seqs = list(PLAN_POLICIES), list(self.sizes["flops_seqs"])
        structures = sorted(structures)
        # Beside a GPU child (which mostly waits on the GPU) the count takes half the cores at a
        # low priority; a dry run's children compete for the same CPU, so there it takes its turn.
        job = self.job("flops", seqs=seqs, policies=policies, structures=structures,
                       nice=0 if self.args.dry_run else 10, workers=max(1, (os.cpu_count() or 2) // 2))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                start_new_session=True)

    def finish_flops(self, proc) -> dict:
        """{(seq, policy, structure): factor} from the background count, waiting at most until
        the deadline (+10 s); a count not done by then is ended and its factors are missing."""
        if proc is None:
            return {}
        try:
            out, _ = proc.communicate(timeout=max(1.0, self.left() + 10))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            self.log("note: the background FLOP count did not finish in the budget: no HFU")
            return {}
        rec = next((json.loads(x[len(TAG):]) for x in out.splitlines() if x.startswith(TAG)), None)
        if rec is None:
            self.log("note: the background FLOP count crashed: no HFU")
            return {}
        self.results.add({"kind": "flops", **rec})
        if rec["status"] != "ok":
            self.log(f"note: the background FLOP count failed ({rec.get('error')}): no HFU")
            return {}
        for r in rec["rows"]:
            if r.get("error"):
                self.log(f"note: no recompute factor for {r['policy']} at {r['seq']}: {r['error']}")
        return {(r["seq"], r["policy"], r["structure"]): r["factor"] for r in rec.get("rows", [])
                if r.get("factor") is not None}

    def run_point(self, point: Point) -> dict:
        """Runs one point (halving its batch on an out-of-memory when it may), records it."""
        while True:
            left, need = self.left(), point.min_left_s * self.sizes["min_left"]
            if left < need:
                rec = {"kind": "skipped", "name": point.name, "point": dataclasses.asdict(point),
                       "reason": f"{max(left, 0):.0f} s of the budget left, the point needs {need:.0f} s"}
                self.log(f"skipped {point.name}: {rec['reason']}")
                self.skipped.append(rec)
                return self.results.add(rec)
            env = dict(self.env)
            if point.xla is not None:
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + point.xla[1:]).strip() \
                    if point.xla.startswith("+") else point.xla
            job = self.job("step", point=dataclasses.asdict(point), steps=self.steps, warmup=self.args.warmup,
                           docs=self.args.docs, memory_gib=self.args.device_memory_gib)
            t0 = time.time()
            timeout = min(self.timeout, left)
            rec, how, log = run_child(job, env, timeout)
            if rec is None:
                last = (log.splitlines() or [""])[-1][:200]
                rec = {"status": how, "log": log,
                       "error": f"stopped after {timeout:.0f} s" if how == "timeout" else f"the child died: {last}"}
            rec = {"kind": "step", "name": point.name, "point": dataclasses.asdict(point), "role": point.role,
                   "xla_flags": env.get("XLA_FLAGS", ""), "wall_s": round(time.time() - t0, 1),
                   "batch": point.batch, "seq": point.seq, **rec}
            self.log(self.line(rec))
            if rec["status"] == "oom" and point.fit and point.batch // 2 >= point.micro and \
                    (point.batch // 2) % point.micro == 0:
                self.results.add(rec)
                point = dataclasses.replace(point, batch=point.batch // 2)
                continue
            self.steps_done.append(rec)
            return self.results.add(rec)

    def line(self, r: dict) -> str:
        if r["status"] != "ok":
            why = r.get("error") or r.get("log", "").splitlines()[-1:] or [""]
            return f"{r['name']}: {r['status']} [{r['wall_s']:.0f} s] {why if isinstance(why, str) else why[0]}"
        return (f"{r['name']}: batch {r['batch']}, {r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {_pct(r.get('mfu'))}, peak {_gib(r.get('peak_bytes') or r.get('compiled_bytes'))} GiB "
                f"[compile {r['compile_s']:.0f} s, wall {r['wall_s']:.0f} s]")

    def best(self, seq: int, records=None) -> dict | None:
        """The fastest finished point at `seq` with the launch flags."""
        ok = [r for r in (records or self.steps_done) if r["status"] == "ok" and r["seq"] == seq
              and r["point"]["xla"] is None]
        return max(ok, key=lambda r: r["tokens_per_s"], default=None)

    def default_points(self):
        """The default plan (module docstring), each point chosen after the ones before ran."""
        s = self.sizes
        attn = self.args.attention
        if attn == "cudnn" and self.platform not in (None, "gpu"):
            attn = "auto"  # no cuDNN here (the dry run): the path auto picks, with the same plan
        B, T = s["batch"], s["seq"]
        yield Point(attn, "full", B, T, role="baseline: full remat")
        yield Point(attn, "save_dot_except_mlp", B, T, fit=True, role="keeps q, k, v, context, out_proj")
        yield Point(attn, "minimal", B, T, fit=True, role="keeps every projection")
        best = self.best(T)
        if best is not None:
            p = Point(**best["point"])
            bigger = dataclasses.replace(p, batch=best["batch"] * 2, micro=1, fit=False, role="fastest, 2x batch")
            yield bigger
            last = self.steps_done[-1] if self.steps_done else {}
            if last.get("status") in ("oom", "does-not-fit"):
                yield dataclasses.replace(bigger, micro=2, role="fastest, 2x batch in 2 micro-batches")
        best = self.best(T)
        remat = best["point"]["remat"] if best else "full"
        yield Point(attn, remat, 1, s["long_seq"], min_left_s=60.0, role=f"long context, {remat}")
        last = self.steps_done[-1] if self.steps_done else {}
        if last.get("status") in ("oom", "does-not-fit") and remat != "full":
            yield Point(attn, "full", 1, s["long_seq"], min_left_s=60.0, role="long context, full remat")
        if best is not None:
            yield dataclasses.replace(Point(**best["point"]), batch=best["batch"], fit=False,
                                      xla=self.args.xla_variant, min_left_s=90.0, role="XLA flag variant")

    def main(self) -> int:
        a = self.args
        self.results.add({"kind": "env", "argv": sys.argv[1:], "preset": self.preset, "budget_s": self.budget,
                          "python": sys.version.split()[0], "versions": _versions(),
                          "env": {k: self.env.get(k) for k in gpu_env_defaults()}, "env_sources": self.env_sources})
        self.log(f"bench/mfu.py: {self.preset}, budget {self.budget:.0f} s, {self.steps} timed steps per point; "
                 + ", ".join(f"{k}={self.env.get(k)!r} ({self.env_sources[k]})" for k in gpu_env_defaults()))
        if self.env_sources["XLA_FLAGS"] == "launch default":
            drop_unknown_flags(self.env, self.log)
        if not a.no_calibration:
            self.calibrate()
        flops = self.start_flops()  # after the calibration, which says which attention path runs
        points = iter(parse_configs(a.configs)) if a.configs else self.default_points()
        for point in points:
            self.run_point(point)
        factors = self.finish_flops(flops)
        rows = summary_rows(self.steps_done, self.calibration, factors)
        rows += [{"name": r["name"], "status": "skipped", "batch": r["point"]["batch"], "seq": r["point"]["seq"],
                  "error": r["reason"]} for r in self.skipped]
        self.results.add({"kind": "summary", "rows": rows, "wall_s": round(time.time() - self.t0, 1)})
        print()
        print(markdown(self.preset, self.calibration, rows, self.env, self.args.devices))
        return 0 if any(r["status"] == "ok" for r in rows) else 1


def summary_rows(records: list[dict], calibration: dict | None, factors: dict) -> list[dict]:
    """The final table's rows: each finished point with its HFU (MFU x the counted recompute
    factor of its policy, sequence and attention structure) and its share of the matmul rate."""
    matmul = ((calibration or {}).get("matmul") or {}).get("tflops")
    rows = []
    for r in records:
        row = {k: r.get(k) for k in ("name", "status", "batch", "seq", "step_s", "tokens_per_s", "mfu", "model_tflops",
                                     "peak_bytes", "compiled_bytes", "compile_s", "wall_s", "role", "error")}
        row.update(remat=r["point"]["remat"], attention=r.get("attention_path") or r["point"]["attention"],
                   micro=r["point"]["micro"], xla=r["point"]["xla"])
        structure = "reference" if row["attention"] == "reference" else "fused"
        factor = 1.0 if row["remat"] == "none" else factors.get((r.get("seq"), row["remat"], structure))
        row["recompute"] = factor
        row["hfu"] = row["mfu"] * factor if row.get("mfu") is not None and factor else None
        row["of_matmul"] = row["model_tflops"] / matmul if row.get("model_tflops") and matmul else None
        rows.append(row)
    return rows


def markdown(preset: str, calibration: dict | None, rows: list[dict], env: dict, devices: int = 1) -> str:
    cal = calibration or {}
    kind = cal.get("device_kind", "device")
    lines = [f"## {preset} train step, {'one ' + kind if devices == 1 else f'{devices} x {kind}'} "
             f"(jax {(cal.get('versions') or {}).get('jax', '?')}), compute bfloat16, AdamW"]
    if cal.get("matmul"):
        m = cal["matmul"]
        peak = cal.get("peak_tflops") or 0
        lines.append(f"calibration: {m['n']}^3 bf16 matmul {m['tflops']:.3g} TFLOP/s"
                     + (f" ({100 * m['tflops'] / peak:.0f}% of the {peak:.0f} TFLOP/s peak)" if peak else "")
                     + f"; allocator limit {_gib(cal['memory'].get('bytes_limit'))} GiB "
                     f"(XLA_PYTHON_CLIENT_MEM_FRACTION={env.get('XLA_PYTHON_CLIENT_MEM_FRACTION')})"
                     + ("" if cal.get("status") == "ok" else f"; calibration {cal.get('status')}"))
        lines += ["", f"| attention, B={cal['attn_shape'][0]} T={cal['attn_shape'][1]}, fwd+bwd | ms | temp GiB |",
                  "|---|---|---|"]
        for a in cal["attention"]:
            lines.append(f"| {a['path']} | {a['ms']:.2f} | {_gib(a['temp_bytes'])} |" if a.get("ms") is not None
                         else f"| {a['path']} | {a.get('error', 'failed')[:80]} | - |")
    lines += ["", "| configuration | batch x seq | status | s/step | tokens/s | MFU | recompute | HFU | of matmul "
              "| peak GiB | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seq = f"{r['batch']} x {r['seq']}" if r.get("batch") else "-"
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {seq} | {r['status']}: {(r.get('error') or '')[:90]} | | | | | | | | |")
            continue
        peak = f"{_gib(r['peak_bytes'])}" if r.get("peak_bytes") else f"{_gib(r['compiled_bytes'])} c"
        recompute = f"{r['recompute']:.3f}" if r.get("recompute") else "-"
        lines.append(f"| {r['name']} | {seq} | ok | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {_pct(r['mfu'])} "
                     f"| {recompute} | {_pct(r['hfu'])} | {_pct(r['of_matmul'])} | {peak} | {r['compile_s']:.0f} |")
    ok = [r for r in rows if r["status"] == "ok"]
    lines.append("")
    for seq in sorted({r["seq"] for r in ok}):
        b = max((r for r in ok if r["seq"] == seq), key=lambda r: r["tokens_per_s"])
        lines.append(f"fastest at {seq}: {b['name']}, {b['tokens_per_s']:,.0f} tokens/s"
                     + (f", {_pct(b['mfu'])} MFU" if b.get("mfu") is not None else ""))
    lines.append("recompute = the step's FLOPs with its remat policy / without remat, counted by XLA "
                 "(bench/mfu.py --flops); HFU = MFU x recompute; c = compiled estimate (no device statistics)")
    return "\n".join(lines)


def _gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.1f}" if b >= GIB / 10 else f"{b / GIB:.4f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _versions() -> dict:
    """Package versions, read without importing them (this process keeps off the accelerator)."""
    from importlib import metadata

    names = ["jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint"]
    names += sorted(d.metadata["Name"] for d in metadata.distributions()
                    if (d.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax_cuda", "libtpu")))
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------- --flops


def flops_main(args) -> int:
    sizes = DRY if args.dry_run else REAL
    seq = parse_seq(args.seq) if args.seq else sizes["seq"]
    preset = args.preset or sizes["preset"]
    policies = [p.strip() for p in args.policies.split(",")]
    if "none" not in policies:
        policies.insert(0, "none")  # the denominator of every recompute factor
    env, _ = launch_env(dry_run=True)
    job = {"what": "flops", "preset": preset, "seqs": [seq], "policies": policies,
           "structures": ["reference", "fused"], "cache_dir": CACHE_DIR, "set": args.set, "devices": 1}
    timeout = args.timeout_s or 1800.0
    rec, how, log = run_child(job, env, timeout)
    if rec is None:
        print(f"error: the FLOP count {how}: {log}", file=sys.stderr)
        return 1
    Results(args.out).add({"kind": "flops", **rec})
    print(flops_markdown(rec))
    return 0


def flops_markdown(rec: dict) -> str:
    lines = [f"## XLA-counted FLOPs of the train step / analytic (step.flops_per_token), {rec['preset']}, "
             f"seq {rec['seqs'][0] if len(rec['seqs']) == 1 else rec['seqs']}, batch 1, unscanned, loss untiled, CPU",
             f"(a layer = the 2-layer compile minus the 1-layer one; {rec['layers']} layers = the rest of the step "
             "+ that many layers; recompute = those FLOPs / the same with remat=none)", "",
             "| seq | policy | attention core | 2 layers: compiled / analytic | one layer: compiled / analytic "
             f"| {rec['layers']} layers: compiled / analytic | recompute factor (HFU / MFU) |",
             "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        if r.get("error"):
            lines.append(f"| {r['seq']} | {r['policy']} | {r['structure']} | could not compile: {r['error'][:70]} "
                         "| | | |")
            continue
        core = {"reference": "recomputed (reference)", "fused": "kept (cudnn, splash, chunked)",
                "any": "-"}[r["structure"]]
        lines.append(f"| {r['seq']} | {r['policy']} | {core} | {r['ratio_2']:.3f} | {r['layer_ratio']:.3f} "
                     f"| {r['full_ratio']:.3f} | {r['factor']:.3f} |")
    lines.append("")
    lines.append("The reference math counts the whole [T,T] score matrix where the analytic count halves it "
                 "(causal): that is most of the 'none' row's excess over 1.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the children


def child_main(job: dict) -> int:
    """Runs one job in this (fresh) process and prints its result as one TAG line."""
    if job.get("nice"):
        os.nice(job["nice"])
    import jax

    jax.config.update("jax_compilation_cache_dir", job["cache_dir"])  # init/optimizer compiles reused across children
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    t0 = time.time()
    try:
        rec = {"calibrate": child_calibrate, "step": child_step, "flops": child_flops}[job["what"]](job)
    except Exception as e:  # noqa: BLE001 - reported as this configuration's result
        text = f"{type(e).__name__}: {e}"
        status = "oom" if any(w in text for w in OOM_WORDS) else "error"
        rec = {"status": status, "error": first_line(e)[:300]}
    rec.setdefault("status", "ok")
    rec["child_wall_s"] = round(time.time() - t0, 1)
    emit(rec)
    return 0


def emit(rec: dict) -> None:
    """A (possibly partial) result line for the parent; the last one it reads counts."""
    sys.stdout.write(TAG + json.dumps(rec) + "\n")
    sys.stdout.flush()


def _config(job: dict, overrides: list[str]):
    from sc_jax.train import load_config

    # mesh.num_devices: the first N devices (default 1, the per-device numbers; a host with more
    # GPUs would otherwise shard over all of them, and the plan's batches need not divide them).
    base = [f"model.preset={job['preset']}", "model.dtype=bfloat16", "train.data=synthetic", "train.steps=1000",
            "optimizer.warmup_steps=10", f"mesh.num_devices={job.get('devices', 1)}"]
    return load_config(None, base + overrides + list(job.get("set", [])))


def _device_info():
    import jax

    from sc_jax.train.step import peak_flops

    dev = jax.devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - some backends keep none
        pass
    return dev, stats or {}, peak_flops(dev.device_kind)


def compiled_bytes(compiled) -> tuple[int | None, int | None]:
    """(what the compiled step holds at its peak: arguments + outputs - the donated ones they
    alias + temporaries, temporaries) from XLA's buffer assignment; (None, None) without one."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None, None
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return int(total), int(mem.temp_size_in_bytes)


def synthetic_batch(cfg, sharding, docs: int) -> dict:
    """[B,T] random tokens in `docs` packed documents per row (equal lengths), every target
    learned; positions restart per document. Small (B x T int32), so built on the host."""
    import jax
    import numpy as np

    from sc_jax.data.batches import batch_keys, key_dtype

    B, T, V = cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(cfg.train.seed)
    toks = rng.integers(0, V, (B, T + 1), dtype=np.int32)
    slot = np.arange(T)
    starts = (T * np.arange(docs)) // docs  # [docs]
    seg = np.searchsorted(starts, slot, side="right").astype(np.int32)  # [T] 1..docs
    pos = (slot - starts[seg - 1]).astype(np.int32)
    batch = {"input_ids": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.broadcast_to(seg, (B, T)),
             "positions": np.broadcast_to(pos, (B, T)), "loss_mask": np.ones((B, T), np.float32)}
    return {k: jax.device_put(np.ascontiguousarray(batch[k], key_dtype(k)), sharding)
            for k in batch_keys(cfg.train.task)}


def init_state(cfg, s) -> dict:
    """The train state, made on the device: parameters drawn in the compute dtype by the
    model's own initialisers inside one jitted function (out_shardings: each shard made where
    it lives), cast to the master dtype there; the optimizer's state likewise."""
    import jax
    import numpy as np
    from flax import nnx

    from sc_jax import model as M

    draw = dataclasses.replace(cfg.model, param_dtype=cfg.model.dtype)  # half the random bytes in bf16
    target = s.abs_state["params"]

    def init():
        params = nnx.split(M.create_model(draw, cfg.train.seed))[1].to_pure_dict()
        return jax.tree.map(lambda p, a: p.astype(a.dtype), params, target)

    params = jax.jit(init, out_shardings=s.param_sh)()
    opt_state = jax.jit(s.tx.init, out_shardings=s.state_sh["opt_state"])(params)
    return {"step": jax.device_put(np.asarray(0, np.int32), s.state_sh["step"]), "params": params,
            "opt_state": opt_state}


def child_step(job: dict) -> dict:
    """Compiles the point's step (halving the batch until it fits, when the point may), makes
    the state on the device, runs warm-up and timed steps."""
    import jax
    import numpy as np

    from sc_jax.plan import lower_step
    from sc_jax.train.step import flops_per_token

    p = Point(**job["point"])
    dev, stats, peak = _device_info()
    limit = job["memory_gib"] * GIB if job.get("memory_gib") else stats.get("bytes_limit")
    batch, tried = p.batch, []
    while True:
        cfg = _config(job, [f"model.attention={p.attention}", f"model.remat={p.remat}", f"train.seq_len={p.seq}",
                            f"train.global_batch_size={batch}", f"train.micro_batches={p.micro}"])
        t0 = time.time()
        s, lowered, _ = lower_step(cfg)
        compiled = lowered.compile()
        compile_s = time.time() - t0
        need, temp = compiled_bytes(compiled)
        if limit is None or need is None or need <= limit:
            break
        tried.append({"batch": batch, "compiled_bytes": need, "compile_s": round(compile_s, 1)})
        half = batch // 2
        if not p.fit or half < p.micro or half % p.micro:
            return {"status": "does-not-fit", "batch": batch, "seq": p.seq, "compiled_bytes": need, "limit": limit,
                    "tried": tried, "error": f"the compiled step needs {need / GIB:.1f} GiB of {limit / GIB:.1f} GiB"}
        batch = half
    path = None
    try:
        from sc_jax.attention import attention_path

        path = attention_path(cfg.model, p.seq)
    except Exception:  # noqa: BLE001 - an older/newer signature: the configured name is reported
        pass
    t0 = time.time()
    state = init_state(cfg, s)
    data = synthetic_batch(cfg, s.batch_sh, job["docs"])
    jax.block_until_ready((state, data))
    init_s = time.time() - t0
    losses, times = [], []
    t0 = time.time()
    for _ in range(job["warmup"]):
        state, metrics = compiled(state, data)
        losses.append(float(metrics["loss"]))
    first_s = time.time() - t0
    for _ in range(job["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    step_s = float(np.median(times))
    tokens = batch * p.seq
    devices = s.mesh.size
    model_flops = flops_per_token(cfg.model, p.seq) * tokens / devices  # per device
    _, stats_after, _ = _device_info()
    return {"status": "ok", "device_kind": dev.device_kind, "platform": dev.platform, "devices": devices,
            "batch": batch, "seq": p.seq,
            "tried": tried, "attention_path": path, "compile_s": round(compile_s, 1), "init_s": round(init_s, 1),
            "first_steps_s": round(first_s, 2), "step_s": step_s, "step_s_all": [round(t, 4) for t in times],
            "tokens_per_s": tokens / step_s, "model_tflops": model_flops / step_s / 1e12,
            "mfu": model_flops / step_s / peak if peak else None, "peak_tflops": peak / 1e12 if peak else None,
            "peak_bytes": stats_after.get("peak_bytes_in_use"), "bytes_limit": stats_after.get("bytes_limit"),
            "compiled_bytes": need, "temp_bytes": temp, "loss_first": losses[0], "loss_last": losses[-1],
            "finite": bool(np.isfinite(losses).all())}


def child_calibrate(job: dict) -> dict:
    """Versions, the allocator, a big bf16 matmul, each attention path forward+backward."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sc_jax import attention as A
    from sc_jax.config import model_preset

    dev, stats, peak = _device_info()
    t_start = time.time()
    versions = {"jax": jax.__version__}
    try:
        import jaxlib

        versions["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        versions["platform_version"] = dev.client.platform_version
    except Exception:  # noqa: BLE001
        pass
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            versions["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:  # noqa: BLE001
        pass
    n = job["matmul"]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)  # [n,n]; random, not zeros (zeros run faster, KINDS.md)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)  # [n,n] bf16 out, fp32 accumulation: what the model's matmuls do
    for _ in range(3):
        mm(a, b).block_until_ready()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        c = mm(a, b)
    c.block_until_ready()
    mm_s = (time.perf_counter() - t0) / reps
    del a, b, c

    model = model_preset(job["preset"], dtype="bfloat16")
    B, T, H, K, D = job["attn_batch"], min(job["attn_seq"], model.max_position_embeddings), \
        model.num_attention_heads, model.num_key_value_heads, model.head_dim
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)  # [B,T,H,D]
    k, v = (jax.random.normal(kk, (B, T, K, D), jnp.bfloat16) for kk in ks[1:3])  # [B,T,K,D]
    w = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)  # a random cotangent: every output matters
    starts = (T * np.arange(job["docs"])) // job["docs"]
    # [B,T] segment ids 1..docs: packed rows, as pretraining's are (the cuDNN path's packed call)
    seg = jnp.asarray(np.broadcast_to(np.searchsorted(starts, np.arange(T), side="right"), (B, T)).astype(np.int32))
    mask = A.AttentionMask.causal(seg)
    keep = ("bytes_limit", "bytes_in_use", "peak_bytes_in_use", "largest_free_block_bytes", "bytes_reservable_limit")
    rec = {"status": "partial", "device_kind": dev.device_kind, "platform": dev.platform,
           "device_count": jax.device_count(), "versions": versions, "peak_tflops": peak / 1e12 if peak else None,
           "memory": {k: stats[k] for k in keep if k in stats},
           "matmul": {"n": n, "s": mm_s, "tflops": 2 * n**3 / mm_s / 1e12},
           "attn_shape": [B, T, H, K, D], "attention": []}
    emit(rec)  # so that a timeout still leaves the versions, the allocator and the matmul
    # The fused kernel first, the reference (the slowest, the most memory) last.
    paths = {"gpu": ["cudnn"], "tpu": ["splash"]}.get(dev.platform, []) + ["chunked", "reference"]
    rows = rec["attention"]
    for path in paths:
        cfg = dataclasses.replace(model, attention=path)

        def loss(q, k, v, cfg=cfg):
            return (A.attend(cfg, q, k, v, mask, seg).astype(jnp.float32) * w).sum()

        try:
            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            compiled = grad.lower(q, k, v).compile()
            mem = compiled.memory_analysis()
            jax.block_until_ready(compiled(q, k, v))
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v))
                times.append(time.perf_counter() - t0)
            rows.append({"path": path, "ms": 1e3 * float(np.median(times)),
                         "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None})
        except Exception as e:  # noqa: BLE001 - a path this device cannot run: its error is the result
            rows.append({"path": path, "error": first_line(e)[:200]})
        emit(dict(rec, wall_s=round(time.time() - t_start, 1)))
    rec["resolved"] = {}
    for name in job.get("resolve", []):  # which path each model.attention value takes on this device
        try:
            rec["resolved"][name] = A.attention_path(dataclasses.replace(model, attention=name), job["seq"])
        except Exception:  # noqa: BLE001 - it cannot run here (that point's own error will say why)
            rec["resolved"][name] = None
    return dict(rec, status="ok", wall_s=round(time.time() - t_start, 1))


def child_flops(job: dict) -> dict:
    """XLA-counted FLOPs per policy: unscanned, untiled loss, 1 and 2 layers, batch 1 (see the
    module docstring). For the "fused" structure the model is configured with a non-reference
    path (chunked), so its layers are split around the attention core as for cudnn/splash,
    and chunked_attention is replaced by the reference math for this count only: chunked's
    own block scan would hide all but one block from the count."""
    import concurrent.futures

    from sc_jax import attention as A
    from sc_jax.plan import lower_step
    from sc_jax.train.step import flops_per_token

    A.chunked_attention = lambda q, k, v, mask, chunk=None: A.reference_attention(q, k, v, mask)
    layers_full = _config(job, [f"train.seq_len={min(job['seqs'])}"]).model.num_hidden_layers
    combos = {}  # (seq, layers, policy, structure) -> lowered or error
    for seq in job["seqs"]:
        for layers in (1, 2):
            combos[(seq, layers, "none", "any")] = None
        for policy in job["policies"]:
            if policy != "none":
                for structure in job["structures"]:
                    combos[(seq, 2, policy, structure)] = None
    t0 = time.time()
    lowered = {}
    for key in combos:
        seq, layers, policy, structure = key
        try:
            cfg = _config(job, [f"model.num_hidden_layers={layers}", "model.scan_layers=false", "model.loss_tile=0",
                                f"model.remat={policy}", f"train.seq_len={seq}", "train.global_batch_size=1",
                                "model.attention=" + ("reference" if structure in ("reference", "any") else "chunked")])
            lowered[key] = (cfg, lower_step(cfg)[1])
        except Exception as e:  # noqa: BLE001
            combos[key] = first_line(e)

    def count(item):
        cfg, low = item
        cost = low.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    workers = max(1, min(len(lowered), job.get("workers") or os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(count, item) for key, item in lowered.items()}
        for key, f in futures.items():
            try:
                combos[key] = f.result()
            except Exception as e:  # noqa: BLE001
                combos[key] = first_line(e)
    rows = []
    for seq in job["seqs"]:
        def analytic(layers):
            return flops_per_token(_config(job, [f"model.num_hidden_layers={layers}", f"train.seq_len={seq}"]).model,
                                   seq) * seq

        c1, c2 = combos[(seq, 1, "none", "any")], combos[(seq, 2, "none", "any")]
        if isinstance(c1, str) or isinstance(c2, str):
            rows.append({"seq": seq, "policy": "none", "structure": "any", "error": c1 if isinstance(c1, str) else c2})
            continue
        a1, a2 = analytic(1), analytic(2)
        rest = 2 * c1 - c2  # embedding, head, loss and optimizer: no remat applies to them
        base_full = rest + layers_full * (c2 - c1)
        a_full = analytic(layers_full)
        for policy in job["policies"]:
            for structure in (["any"] if policy == "none" else job["structures"]):
                c = combos.get((seq, 2, policy, structure))
                if isinstance(c, str) or c is None:
                    rows.append({"seq": seq, "policy": policy, "structure": structure, "error": c or "not counted"})
                    continue
                layer = (c - rest) / 2
                full = rest + layers_full * layer
                rows.append({"seq": seq, "policy": policy, "structure": structure, "compiled_2": c, "analytic_2": a2,
                             "ratio_2": c / a2, "layer_ratio": layer / (a2 - a1), "full_ratio": full / a_full,
                             "factor": full / base_full})
    return {"status": "ok", "preset": job["preset"], "seqs": job["seqs"], "layers": layers_full, "rows": rows,
            "compile_s": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.flops:
        return flops_main(args)
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
