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
import os
import sys

from sc_jax.cli import Parser
from sc_jax.config import ConfigError
from sc_jax.sweep.grid import parse_grid, plan_points, validate
from sc_jax.sweep.jobs import write_jobs
from sc_jax.sweep.runners import run_local
from sc_jax.sweep.status import point_result
from sc_jax.sweep.summary import write_summary


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m sc_jax.sweep", description=__doc__,
        epilog="examples:\n"
               "  python -m sc_jax.sweep --config experiments/configs/quickstart.yaml --steps 300 \\\n"
               "      --grid data.fim_rate=0,0.5,0.9 --grid model.partial_rotary_factor=0.25,1.0\n"
               "  python -m sc_jax.sweep --config cfg.yaml --steps 20000 --grid optimizer.peak_lr=1e-4,3e-4 \\\n"
               "      --launcher slurm --out /shared/sweeps/lr && bash /shared/sweeps/lr/jobs/submit_all.sh -p gpu\n"
               "  python -m sc_jax.sweep --config cfg.yaml --steps 20000 --grid optimizer.peak_lr=1e-4,3e-4 \\\n"
               "      --out /shared/sweeps/lr --summarize-only\n"
               "exit codes: 0 ok; 1 a point failed (or the sweep was interrupted); 2 a config or usage error.")
    parser.add_argument("--config", help="training YAML, as for sc_jax.train (default: none, the defaults + overrides)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its comma-separated values; repeat for more keys: the points are "
                             "the cartesian product (default: none, one point)")
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
    try:
        grid = parse_grid(args.grid)
        points = plan_points(grid, list(args.overrides), args.steps, args.out)
        cfgs = validate(args.config, points)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep: {len(points)} point(s) x {args.steps} steps in {args.out}"
          + (f" ({' x '.join(f'{len(v)} {k}' for k, v in grid)})" if grid else ""), flush=True)
    failed, interrupted = _launch(args, points, cfgs, _compile_cache(args))
    results = [point_result(p, args.steps) for p in points]
    md = write_summary(args.out, results, [k for k, _ in grid], args.steps, args.log_y)
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


def _compile_cache(args) -> str | None:
    if args.compile_cache is None:
        return None if os.environ.get("JAX_COMPILATION_CACHE_DIR") else os.path.join(args.out, "compile_cache")
    return None if args.compile_cache.lower() in ("none", "off", "") else args.compile_cache


def _launch(args, points, cfgs, cache) -> tuple[int, str | None]:
    """Trains the points here, or writes their job scripts. Returns (failed points, interrupting signal)."""
    if args.summarize_only:
        return 0, None
    if args.launcher == "local":
        try:
            return run_local(points, cfgs, steps=args.steps, config=args.config, in_subprocess=args.subprocess,
                             cache=cache)
        except KeyboardInterrupt as e:  # sc_jax.train's Interrupted (a point's start-up) names its signal
            return 0, getattr(e, "signal", "SIGINT")
    submit, todo = write_jobs(points, launcher=args.launcher, out=args.out, config=args.config, steps=args.steps,
                              cache=cache)
    print(f"wrote {len(points)} job script(s) to {os.path.join(args.out, 'jobs')}; {len(todo)} unfinished point(s) "
          f"in {submit}")
    if args.launcher == "slurm":
        print(f"submit:  bash {submit} [sbatch options, e.g. --partition=gpu --time=12:00:00]")
    else:
        print(f"run:     TPU_NAME=... TPU_ZONE=... [SC_JAX_DIR=...] bash {submit}")
    print("then:    rerun this command with --summarize-only to build the summary")
    return 0, None


if __name__ == "__main__":
    sys.exit(main())
