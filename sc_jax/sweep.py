"""Hyper-parameter sweeps: `python -m sc_jax.sweep --config FILE --grid key=v1,v2
[--grid key2=a,b ...] --steps N [--out DIR] [--launcher local|slurm|tpu] [key.sub=value ...]`

The points are the cartesian product of the --grid lists. Each point is named from
its grid values (data.fim_rate=0 and model.partial_rotary_factor=0.25 give
`fim_rate-0_partial_rotary_factor-0.25`) and trains in its own run directory
OUT/<name> with train.run_dir=OUT/<name> and train.steps=N on top of the config
file and the common key.sub=value overrides. Every point's config is checked
before anything trains: a typo in a key or a bad value exits 2 with one line.

--launcher local (default) trains the points one after another in this process
(--subprocess: one `python -m sc_jax.train` child per point). A point whose run
directory already reached N steps is skipped, a partly trained one resumes from its
checkpoint, a failed one is recorded as failed (OUT/<name>/sweep_error.txt) and the
sweep goes on; the exit code is 1 when any point failed.

--launcher slurm | tpu writes one job per point to OUT/jobs/ plus
OUT/jobs/submit_all.sh (points already done are left out of it) and prints how to
submit. slurm: an sbatch script running `srun python -m sc_jax.train ...`; sbatch
options given to submit_all.sh override its #SBATCH lines. tpu: a shell script that
runs the same command on every worker of a pod slice with
`gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $TPU_ZONE --worker=all`; submit_all.sh
runs the points one after another. When the jobs have finished, run the same sweep
command with --summarize-only (or --launcher local, which skips finished points).

Every invocation ends by writing OUT/summary.md and OUT/summary.csv (point, grid
values, steps done, first loss, final loss = mean training loss of the last 10% of
logged steps, eval loss = the last eval_loss record, tokens/s = median over logged
steps, status) and OUT/loss_curves.png (training loss against step, one line per
point), and prints the markdown table.

Compilation is cached across points, resumes and re-runs in OUT/compile_cache (JAX's
persistent cache; --compile-cache DIR or none).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from typing import Any

from sc_jax.config import ConfigError

SWEEP_ERROR = "sweep_error.txt"  # in a point's run directory while its last attempt failed
RESERVED = ("train.run_dir", "train.steps")  # set by the sweep for every point


@dataclasses.dataclass
class Point:
    name: str
    values: dict[str, str]  # grid key -> value as written on the command line
    overrides: list[str]  # everything after --config for sc_jax.train (common, grid, run_dir, steps)
    run_dir: str


# ----------------------------------------------------------------------------- planning


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    grid, seen = [], set()
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")] if sep else []
        if not key or not sep or not values or any(v == "" for v in values):
            raise ConfigError(f"--grid '{spec}' is not of the form key.sub=v1,v2,...")
        if key in seen:
            raise ConfigError(f"--grid key '{key}' is given twice: list all its values in one --grid")
        if key in RESERVED:
            raise ConfigError(f"'{key}' is set by the sweep for each point (use --steps and --out)")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid '{spec}' repeats a value")
        seen.add(key)
        grid.append((key, values))
    return grid


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that tells it apart from the others."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        out[key] = suffix
    return out


def point_name(values: dict[str, str], shorts: dict[str, str]) -> str:
    if not values:
        return "default"
    name = "_".join(f"{shorts[k]}-{re.sub(r'[^A-Za-z0-9.+-]', '_', v)}" for k, v in values.items())
    if len(name) > 120:  # keep file names sane; the hash keeps them distinct
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def plan_points(grid, common: list[str], steps: int, out: str) -> list[Point]:
    for o in common:
        key = o.split("=", 1)[0]
        if key in RESERVED:
            raise ConfigError(f"'{key}' is set by the sweep for each point (use --steps and --out)")
        if key in dict(grid):
            raise ConfigError(f"'{key}' is both a --grid key and a common override: keep one")
    shorts = short_keys([k for k, _ in grid])
    points, names = [], {}
    for combo in itertools.product(*[vals for _, vals in grid]):
        values = dict(zip([k for k, _ in grid], combo))
        name = point_name(values, shorts)
        if name in names:
            raise ConfigError(f"grid points {names[name]} and {values} get the same name '{name}': "
                              "use values that differ in letters, digits, '.', '+' or '-'")
        names[name] = values
        run_dir = os.path.join(out, name)
        overrides = [*common, *(f"{k}={v}" for k, v in values.items()), f"train.run_dir={run_dir}",
                     f"train.steps={steps}"]
        points.append(Point(name, values, overrides, run_dir))
    return points


def validate(config: str | None, points: list[Point]) -> dict:
    """Every point's Config. A ConfigError names the first bad point unless every point
    fails the same way (a mistyped key, a bad common override)."""
    from sc_jax.train import load_config

    cfgs, errors = {}, {}
    for p in points:
        try:
            cfgs[p.name] = load_config(config, p.overrides)
        except ConfigError as e:
            errors[p.name] = str(e)
    if errors:
        name, msg = next(iter(errors.items()))
        if len(errors) < len(points) or len(set(errors.values())) > 1:
            msg += f" (point {name})"
        raise ConfigError(msg)
    return cfgs


# ----------------------------------------------------------------------------- reading run directories


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
    return records


def checkpoint_steps(run_dir: str) -> list[int]:
    from sc_jax import checkpoint

    return checkpoint.valid_steps(os.path.join(run_dir, checkpoint.CHECKPOINTS))


def steps_done(run_dir: str, records: list[dict] | None = None) -> int:
    """The furthest step a run directory shows: its last logged training step or its newest checkpoint."""
    records = read_metrics(run_dir) if records is None else records
    logged = [r["step"] for r in records if "loss" in r and "step" in r]
    ckpts = checkpoint_steps(run_dir) if os.path.isdir(run_dir) else []
    return max([0, *logged, *ckpts])


def read_error(run_dir: str) -> str | None:
    path = os.path.join(run_dir, SWEEP_ERROR)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or "failed"


def config_changes(run_dir: str, cfg) -> list[str]:
    """What differs between the run directory's config.yaml and `cfg` beyond the keys a
    resume may change (sc_jax.train.RESUME_SAFE): such a run directory is another experiment."""
    from sc_jax.train import config_changes as changes, resume_safe, saved_run_config

    saved = saved_run_config(run_dir)
    if saved is None:
        return []
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in changes(saved, cfg) if not resume_safe(k)]


# ----------------------------------------------------------------------------- summary


def point_result(p: Point, steps: int) -> dict:
    records = read_metrics(p.run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    done = steps_done(p.run_dir, records)
    k = max(1, math.ceil(0.1 * len(train)))
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    error = read_error(p.run_dir)
    if error:
        status = f"failed: {error}"
    elif done >= steps:
        status = "done"
    elif done > 0:
        status = f"partial ({done}/{steps})"
    else:
        status = "not run"
    return {"point": p.name, **p.values, "steps_done": done,
            "first_loss": train[0]["loss"] if train else None,
            "final_loss": statistics.fmean(r["loss"] for r in train[-k:]) if train else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens_per_sec": statistics.median(speeds) if speeds else None,
            "status": status, "_curve": [(r["step"], r["loss"]) for r in train],
            "_eval": [(r["step"], r["eval_loss"]) for r in evals]}


COLUMNS = [("steps_done", "steps done"), ("first_loss", "first loss"), ("final_loss", "final loss¹"),
           ("eval_loss", "eval loss²"), ("tokens_per_sec", "tokens/s³"), ("status", "status")]
FOOTNOTES = ("¹ mean training loss over the last 10% of logged steps (at least one).  \n"
             "² the last eval_loss record (train.eval_batches > 0), else blank.  \n"
             "³ median over logged steps that have a speed (a process's first step includes compilation and has none).")


def _fmt(key: str, v: Any, steps: int) -> str:
    if v is None:
        return ""
    if key == "steps_done":
        return f"{v}/{steps}"
    if key == "tokens_per_sec":
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")


def write_summary(out: str, results: list[dict], grid_keys: list[str], steps: int, log_y: bool = False) -> str:
    """Writes summary.md, summary.csv and loss_curves.png in `out`; returns the markdown."""
    os.makedirs(out, exist_ok=True)
    cols = ["point", *grid_keys, *(k for k, _ in COLUMNS)]
    with open(os.path.join(out, "summary.csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow(["" if r.get(c) is None else r[c] for c in cols])
    os.replace(os.path.join(out, "summary.csv.tmp"), os.path.join(out, "summary.csv"))
    header = ["point", *grid_keys, *(h for _, h in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        lines.append("| " + " | ".join(_fmt(c, r.get(c), steps) for c in cols) + " |")
    md = "\n".join(lines) + "\n\n" + FOOTNOTES + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Sweep summary ({len(results)} points, {steps} steps each)\n\n{md}\n"
                f"![loss curves](loss_curves.png)\n")
    plot_curves(os.path.join(out, "loss_curves.png"), results, log_y)
    return md


def plot_curves(path: str, results: list[dict], log_y: bool = False) -> None:
    """Training loss against step, one line per point (eval losses as dots in the same colour)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for r in results:
        if not r["_curve"]:
            continue
        xs, ys = zip(*r["_curve"])
        (line,) = ax.plot(xs, ys, label=r["point"], linewidth=1.2, marker="." if len(xs) < 30 else None)
        if r["_eval"]:
            ex, ey = zip(*r["_eval"])
            ax.plot(ex, ey, linestyle="none", marker="o", color=line.get_color())
        plotted += 1
    if plotted:
        ax.legend(fontsize="small", loc="best")
        if log_y:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no logged steps yet", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (" (log)" if log_y else ""))
    ax.set_title("loss curves" + (" (dots: eval loss)" if any(r["_eval"] for r in results) else ""))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


# ----------------------------------------------------------------------------- local runs


class _CompileCache:
    """JAX's persistent compilation cache in `directory` while the sweep runs in this
    process (the previous setting is restored afterwards)."""

    def __init__(self, directory: str | None):
        self.directory = directory

    def __enter__(self):
        if not self.directory:
            return self
        import jax
        from jax.experimental.compilation_cache import compilation_cache as cc

        self.old = jax.config.jax_compilation_cache_dir
        os.makedirs(self.directory, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(self.directory))
        cc.reset_cache()  # the cache object is created once: let it pick up the new directory
        return self

    def __exit__(self, *exc):
        if not self.directory:
            return
        import jax
        from jax.experimental.compilation_cache import compilation_cache as cc

        jax.config.update("jax_compilation_cache_dir", self.old)
        cc.reset_cache()


def _one_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, ConfigError) or type(e).__name__ == "TrainingError":
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def run_in_process(cfg) -> tuple[str | None, str | None]:
    """Trains one point here. Returns (error line or None, stopped_by or None)."""
    import jax

    from sc_jax.train import run

    try:
        summary = run(cfg)
        stopped_by = summary.get("stopped_by")
        del summary  # holds the train state: free its buffers before the next point
        return None, stopped_by
    except Exception as e:  # noqa: BLE001 - any failure of one point is recorded and the sweep goes on
        if not isinstance(e, ConfigError) and type(e).__name__ != "TrainingError":
            import traceback

            traceback.print_exc()
        return _one_line(e), None
    finally:
        gc.collect()
        jax.clear_caches()


def run_subprocess(config: str | None, p: Point, cache: str | None) -> tuple[str | None, str | None]:
    """Trains one point in a `python -m sc_jax.train` child, echoing its output."""
    env = dict(os.environ)
    if cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(cache))
    cmd = [sys.executable, "-m", "sc_jax.train", *(["--config", config] if config else []), *p.overrides]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    last, error_line, stopped_by = "", None, None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            last = line.strip()
        if line.startswith("error:"):
            error_line = line[len("error:"):].strip()
        m = re.match(r"stopped by (\S+) at step", line)
        if m:
            stopped_by = m.group(1)
    rc = proc.wait()
    if rc == 0:
        return None, stopped_by
    if rc < 0:
        return f"killed by signal {-rc}", None
    return error_line or f"exit code {rc}: {last[:300]}", None


def final_line(r: dict, steps: int) -> str:
    if r["status"].startswith("failed"):
        return f"  {r['status']}"
    parts = [f"step {r['steps_done']}/{steps}"]
    if r["first_loss"] is not None:
        parts.append(f"loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}")
    if r["eval_loss"] is not None:
        parts.append(f"eval loss {r['eval_loss']:.4f}")
    if r["tokens_per_sec"]:
        parts.append(f"{r['tokens_per_sec']:,.0f} tokens/s")
    return f"  {'done' if r['status'] == 'done' else 'stopped'}: " + ", ".join(parts)


def run_local(args, points: list[Point], cfgs: dict, cache: str | None) -> tuple[int, str | None]:
    """Trains the points one after another. Returns (failed count, interrupting signal or None)."""
    failed, n = 0, len(points)
    with _CompileCache(None if args.subprocess else cache):
        for i, p in enumerate(points, 1):
            print(f"[{i}/{n}] {p.name}", flush=True)
            changes = config_changes(p.run_dir, cfgs[p.name])
            if changes:
                print(f"  warning: {p.run_dir} holds a run with a different config ({'; '.join(changes[:3])}"
                      f"{'; ...' if len(changes) > 3 else ''}): it is not this point's; use a new --out, or "
                      "move the directory away to train this point afresh", flush=True)
            done = steps_done(p.run_dir)
            if done >= args.steps and not read_error(p.run_dir):
                print(f"  skipped: already at step {done}/{args.steps}", flush=True)
                continue
            os.makedirs(p.run_dir, exist_ok=True)
            err_path = os.path.join(p.run_dir, SWEEP_ERROR)
            if os.path.exists(err_path):
                os.remove(err_path)
            if args.subprocess:
                error, stopped_by = run_subprocess(args.config, p, cache)
            else:
                error, stopped_by = run_in_process(cfgs[p.name])
            if error:
                failed += 1
                with open(err_path, "w") as f:
                    f.write(error + "\n")
            print(final_line(point_result(p, args.steps), args.steps), flush=True)
            if stopped_by in ("SIGTERM", "SIGINT", "preemption"):
                return failed, stopped_by
    return failed, None


# ----------------------------------------------------------------------------- job scripts

SLURM = """#!/bin/bash
# sc_jax sweep point {name} ({values}).
# Resources: edit the #SBATCH lines, or pass sbatch options to submit_all.sh (they override these), e.g.
#   bash {jobs}/submit_all.sh --partition=gpu --gpus-per-node=8 --time=12:00:00
# One task per node: each process drives all of its node's accelerators; jax.distributed
# is initialised from the SLURM environment when the job has more than one task.
#SBATCH --job-name=sweep-{name}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output={jobs}/{name}.%j.log
#SBATCH --signal=TERM@120
# ^ SIGTERM two minutes before the time limit: training saves a checkpoint and exits;
#   resubmitting the same script resumes from it.
set -euo pipefail
cd {cwd}
{cache_export}srun ${{PYTHON:-python}} {command}
"""

TPU = """#!/bin/bash
# sc_jax sweep point {name} ({values}) on every worker of a TPU pod slice.
# Set TPU_NAME and TPU_ZONE (and TPU_PROJECT if not gcloud's default project). SC_JAX_DIR is
# the repository checkout on the workers (default: sc_jax under the home directory); relative
# paths below are relative to it. The run directory must be on storage all workers share
# (checkpoints are written by every worker) and that this machine can read for the summary.
set -euo pipefail
: "${{TPU_NAME:?set TPU_NAME to the TPU VM name}}"
: "${{TPU_ZONE:?set TPU_ZONE, e.g. us-central2-b}}"
SC_JAX_DIR="${{SC_JAX_DIR:-sc_jax}}"
PYTHON="${{PYTHON:-python3}}"  # the workers' interpreter (e.g. a virtualenv's bin/python)
ARGS={command}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$TPU_ZONE" ${{TPU_PROJECT:+--project="$TPU_PROJECT"}} \\
  --worker=all --command="cd $SC_JAX_DIR && {cache_env}$PYTHON $ARGS" 2>&1 | tee -a {jobs}/{name}.log
"""


def write_jobs(args, points: list[Point], cache: str | None) -> tuple[str, list[Point]]:
    """One job script per point in OUT/jobs and submit_all.sh for the unfinished ones."""
    slurm = args.launcher == "slurm"
    jobs = os.path.join(args.out, "jobs")
    os.makedirs(jobs, exist_ok=True)
    # sbatch runs on a shared file system: absolute paths. TPU workers: paths relative to SC_JAX_DIR.
    absolute = os.path.abspath if slurm else (lambda x: x)
    todo = []
    for p in points:
        overrides = [o if not o.startswith("train.run_dir=") else f"train.run_dir={absolute(p.run_dir)}"
                     for o in p.overrides]
        argv = ["python", "-m", "sc_jax.train", *(["--config", absolute(args.config)] if args.config else []),
                *overrides]
        values = ", ".join(f"{k}={v}" for k, v in p.values.items()) or "no grid"
        if slurm:
            cache_export = (f'export JAX_COMPILATION_CACHE_DIR="${{JAX_COMPILATION_CACHE_DIR:-{os.path.abspath(cache)}}}"\n'
                            if cache else "")
            text = SLURM.format(name=p.name, values=values, jobs=os.path.abspath(jobs), cwd=shlex.quote(os.getcwd()),
                                cache_export=cache_export, command=shlex.join(argv[1:]))
            path = os.path.join(jobs, f"{p.name}.sbatch")
        else:
            cache_env = f"JAX_COMPILATION_CACHE_DIR={shlex.quote(cache)} " if cache else ""
            text = TPU.format(name=p.name, values=values, jobs=shlex.quote(os.path.abspath(jobs)),
                              cache_env=cache_env, command=shlex.quote(shlex.join(argv[1:])))
            path = os.path.join(jobs, f"{p.name}.sh")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        done = steps_done(p.run_dir)
        if done < args.steps or read_error(p.run_dir):
            todo.append(p)
    lines = ["#!/bin/bash"]
    if slurm:
        lines += ["# Submits the sweep's unfinished points; sbatch options given here override the scripts' "
                  "#SBATCH lines:", f"#   bash {jobs}/submit_all.sh --partition=gpu --time=12:00:00",
                  'set -euo pipefail', 'cd "$(dirname "$0")"']
        lines += [f'sbatch "$@" {shlex.quote(p.name + ".sbatch")}' for p in todo]
    else:
        lines += ["# Runs the sweep's unfinished points one after another on the pod slice $TPU_NAME in $TPU_ZONE.",
                  'set -uo pipefail', 'cd "$(dirname "$0")"', "failed=0"]
        lines += [f'bash {shlex.quote(p.name + ".sh")} || {{ echo "point {p.name} failed" >&2; failed=1; }}'
                  for p in todo]
        lines += ['exit "$failed"']
    done_names = [p.name for p in points if p not in todo]
    if done_names:
        lines.insert(1, f"# Already done, not submitted: {', '.join(done_names)}")
    path = os.path.join(jobs, "submit_all.sh")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path, todo


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line (exit 2), like every other refusal."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m sc_jax.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m sc_jax.sweep --config experiments/configs/quickstart.yaml --steps 300 \\\n"
               "      --grid data.fim_rate=0,0.5,0.9 --grid model.partial_rotary_factor=0.25,1.0\n"
               "  python -m sc_jax.sweep --config cfg.yaml --steps 20000 --grid optimizer.peak_lr=1e-4,3e-4 \\\n"
               "      --launcher slurm --out /shared/sweeps/lr && bash /shared/sweeps/lr/jobs/submit_all.sh -p gpu\n"
               "  python -m sc_jax.sweep --config cfg.yaml --steps 20000 --grid optimizer.peak_lr=1e-4,3e-4 \\\n"
               "      --out /shared/sweeps/lr --summarize-only\n"
               "exit codes: 0 ok; 1 a point failed (or the sweep was interrupted); 2 a config or usage error.")
    parser.add_argument("--config", help="training YAML, as for sc_jax.train (optional: defaults + overrides)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its comma-separated values; repeat for more keys "
                             "(points = the cartesian product)")
    parser.add_argument("--steps", type=int, required=True, help="train.steps for every point")
    parser.add_argument("--out", help="sweep directory: OUT/<point> run directories, OUT/summary.{md,csv}, "
                                      "OUT/loss_curves.png, OUT/jobs/ (default: runs/sweeps/<config name>)")
    parser.add_argument("--launcher", choices=("local", "slurm", "tpu"), default="local",
                        help="local: train here, one point after another (default); slurm: write sbatch scripts; "
                             "tpu: write TPU-pod scripts (gcloud ... ssh --worker=all)")
    parser.add_argument("--subprocess", action="store_true",
                        help="local: train each point in its own `python -m sc_jax.train` process (isolates "
                             "crashes and device memory; costs a JAX start-up per point)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="train nothing: build the summary from the run directories (e.g. after the jobs ran)")
    parser.add_argument("--compile-cache", metavar="DIR|none",
                        help="JAX persistent compilation cache for the points (default: OUT/compile_cache, or "
                             "$JAX_COMPILATION_CACHE_DIR when set); 'none' turns it off")
    parser.add_argument("--log-y", action="store_true", help="log-scale loss axis in loss_curves.png")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides common to every point, e.g. train.eval_batches=4")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.subprocess and args.launcher != "local":
        parser.error("--subprocess applies to --launcher local only")
    if not args.out:
        stem = os.path.splitext(os.path.basename(args.config))[0] if args.config else "default"
        args.out = os.path.join("runs", "sweeps", stem)
    if args.compile_cache is None:
        cache = None if os.environ.get("JAX_COMPILATION_CACHE_DIR") else os.path.join(args.out, "compile_cache")
    else:
        cache = None if args.compile_cache.lower() in ("none", "off", "") else args.compile_cache
    try:
        grid = parse_grid(args.grid)
        points = plan_points(grid, list(args.overrides), args.steps, args.out)
        cfgs = validate(args.config, points)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grid_keys = [k for k, _ in grid]
    n = len(points)
    print(f"sweep: {n} point(s) x {args.steps} steps in {args.out}"
          + (f" ({' x '.join(f'{len(v)} {k}' for k, v in grid)})" if grid else ""), flush=True)

    failed, interrupted = 0, None
    if args.summarize_only:
        pass
    elif args.launcher == "local":
        try:
            failed, interrupted = run_local(args, points, cfgs, cache)
        except KeyboardInterrupt as e:  # sc_jax.train.Interrupted (a point's start-up) names its signal
            interrupted = getattr(e, "signal", "SIGINT")
    else:
        submit, todo = write_jobs(args, points, cache)
        print(f"wrote {n} job script(s) to {os.path.join(args.out, 'jobs')}; {len(todo)} unfinished point(s) "
              f"in {submit}")
        if args.launcher == "slurm":
            print(f"submit:  bash {submit} [sbatch options, e.g. --partition=gpu --time=12:00:00]")
        else:
            print(f"run:     TPU_NAME=... TPU_ZONE=... [SC_JAX_DIR=...] bash {submit}")
        print("then:    rerun this command with --summarize-only to build the summary")

    results = [point_result(p, args.steps) for p in points]
    md = write_summary(args.out, results, grid_keys, args.steps, args.log_y)
    print("\n" + md)
    print(f"summary: {os.path.join(args.out, 'summary.md')}, {os.path.join(args.out, 'summary.csv')}, "
          f"{os.path.join(args.out, 'loss_curves.png')}")
    if interrupted:
        print(f"sweep interrupted ({interrupted}): rerun the same command to resume", file=sys.stderr)
        return 1
    if failed:
        print(f"{failed} point(s) failed (see the status column); rerun to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
