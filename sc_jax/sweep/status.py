"""What a point's run directory shows: its logged metrics, the steps it reached, whether its
last attempt failed, whether it holds another experiment, and its summary row."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics

from sc_jax.sweep.grid import Point

SWEEP_ERROR = "sweep_error.txt"  # in a point's run directory while its last attempt failed


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
    resume may change (sc_jax.train.config.RESUME_SAFE): such a run directory is another experiment.
    Compared as the trainer resumes it: keys a saved run keeps (LEGACY_VALUES) take its values first."""
    from sc_jax.train.config import config_changes as changes, keep_saved_values, resume_safe
    from sc_jax.train.run_dir import saved_run_config

    saved = saved_run_config(run_dir)
    if saved is None:
        return []
    resumed = copy.deepcopy(cfg)  # the trainer logs keep_saved_values' notes when it resumes
    keep_saved_values(saved, resumed)
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in changes(saved, resumed) if not resume_safe(k)]


def point_result(p: Point, steps: int) -> dict:
    """The point's summary row (and its loss curves, keys _curve and _eval)."""
    records = read_metrics(p.run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    done = steps_done(p.run_dir, records)
    k = max(1, math.ceil(0.1 * len(train)))
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    status = point_status(done, steps, read_error(p.run_dir))
    return {"point": p.name, **p.values, "steps_done": done,
            "first_loss": train[0]["loss"] if train else None,
            "final_loss": statistics.fmean(r["loss"] for r in train[-k:]) if train else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens_per_sec": statistics.median(speeds) if speeds else None,
            "status": status, "_curve": [(r["step"], r["loss"]) for r in train],
            "_eval": [(r["step"], r["eval_loss"]) for r in evals]}


def point_status(done: int, steps: int, error: str | None) -> str:
    if error:
        return f"failed: {error}"
    if done >= steps:
        return "done"
    return f"partial ({done}/{steps})" if done > 0 else "not run"
