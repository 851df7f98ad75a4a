"""Hyper-parameter sweeps (`python -m sc_jax.sweep`, the command line in __main__).

Modules: `grid` (the points: names, run directories, overrides, configs checked), `status` (what a
point's run directory shows), `summary` (summary.md, summary.csv, loss_curves.png), `runners`
(training the points here, in this process or one child each), `templates` (the SLURM and TPU-pod
launcher scripts, shared with experiments/launch/) and `jobs` (one job script per point).
"""
