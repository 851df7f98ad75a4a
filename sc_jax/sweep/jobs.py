"""Job scripts for the cluster: one per point in OUT/jobs/ (rendered from the launcher templates
that experiments/launch/ uses, sc_jax.sweep.templates), and OUT/jobs/submit_all.sh for the
points not done yet. slurm: sbatch scripts (options given to submit_all.sh go to sbatch and
override their #SBATCH lines); tpu: scripts that run the point on every worker of a pod slice,
one point after another."""

from __future__ import annotations

import os
import shlex

from sc_jax.sweep.grid import Point
from sc_jax.sweep.status import read_error, steps_done
from sc_jax.sweep.templates import SLURM, TPU, render


def write_jobs(points: list[Point], *, launcher: str, out: str, config: str | None, steps: int,
               cache: str | None) -> tuple[str, list[Point]]:
    """One job script per point in OUT/jobs and submit_all.sh for the unfinished ones.
    Returns (submit_all.sh, the unfinished points)."""
    jobs = os.path.join(out, "jobs")
    os.makedirs(jobs, exist_ok=True)
    for p in points:
        if launcher == "slurm":
            _write_script(os.path.join(jobs, f"{p.name}.sbatch"), slurm_job(p, jobs, config, cache))
        else:
            _write_script(os.path.join(jobs, f"{p.name}.sh"), tpu_job(p, jobs, config, cache))
    todo = [p for p in points if steps_done(p.run_dir) < steps or read_error(p.run_dir)]
    path = os.path.join(jobs, "submit_all.sh")
    _write_script(path, submit_all(launcher, jobs, points, todo))
    return path, todo


def _train_args(p: Point, config: str | None, absolute) -> list[str]:
    """`python -m sc_jax.train`'s arguments for the point, its paths made `absolute` or not."""
    overrides = [o if not o.startswith("train.run_dir=") else f"train.run_dir={absolute(p.run_dir)}"
                 for o in p.overrides]
    return [*(["--config", absolute(config)] if config else []), *overrides]


def _about(p: Point) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.values.items()) or "no grid"


def slurm_job(p: Point, jobs: str, config: str | None, cache: str | None) -> str:
    """The point's sbatch script. sbatch runs on a shared file system: absolute paths."""
    jobs = os.path.abspath(jobs)
    about = (f"# sc_jax sweep point {p.name} ({_about(p)}).\n"
             "# Resources: edit the #SBATCH lines, or pass sbatch options to submit_all.sh (they override these), "
             f"e.g.\n#   bash {jobs}/submit_all.sh --partition=gpu --gpus-per-node=8 --time=12:00:00\n"
             "# One task per node: each process drives all of its node's accelerators; jax.distributed\n"
             "# is initialised from the SLURM environment when the job has more than one task.")
    cache_export = (f'export JAX_COMPILATION_CACHE_DIR="${{JAX_COMPILATION_CACHE_DIR:-{os.path.abspath(cache)}}}"'
                    if cache else "")
    return render(SLURM, about=about, job_name=f"sweep-{p.name}",
                  resources="#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=1", log=f"{jobs}/{p.name}.%j.log",
                  arguments="", workdir=shlex.quote(os.getcwd()), cache=cache_export,
                  train_args=shlex.join(_train_args(p, config, os.path.abspath)))


def tpu_job(p: Point, jobs: str, config: str | None, cache: str | None) -> str:
    """The point's TPU-pod script. Paths stay relative: the workers resolve them in SC_JAX_DIR."""
    about = (f"# sc_jax sweep point {p.name} ({_about(p)}) on every worker of a TPU pod slice.\n"
             "# The summary reads the run directory: it must be readable from this machine too.\n"
             "# SKIP_SETUP=0 first copies this checkout to every worker and installs it there.")
    args = shlex.join(_train_args(p, config, lambda path: path))
    return render(TPU, about=about, arguments=f"ARGS={shlex.quote(args)}", skip_setup="1",
                  cache=f"JAX_COMPILATION_CACHE_DIR={shlex.quote(cache)} " if cache else "",
                  log=shlex.quote(os.path.join(os.path.abspath(jobs), f"{p.name}.log")))


def submit_all(launcher: str, jobs: str, points: list[Point], todo: list[Point]) -> str:
    """submit_all.sh: sbatch for each unfinished point (slurm), or each one's script in turn (tpu)."""
    lines = ["#!/bin/bash"]
    if launcher == "slurm":
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
    return "\n".join(lines) + "\n"


def _write_script(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
