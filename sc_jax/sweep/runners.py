"""Running a sweep's points here, one after another: in this process (sharing JAX's
persistent compilation cache) or one `python -m sc_jax.train` child per point. A point
already at its steps is skipped, a partial one resumes, a failed one is recorded
(OUT/<point>/sweep_error.txt) and the sweep goes on."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys

from sc_jax.config import ConfigError
from sc_jax.sweep.grid import Point
from sc_jax.sweep.status import SWEEP_ERROR, config_changes, point_result, read_error, steps_done
from sc_jax.sweep.summary import final_line


class CompileCache:
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

    from sc_jax.train.loop import run

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

def run_local(points: list[Point], cfgs: dict, *, steps: int, config: str | None, in_subprocess: bool,
              cache: str | None) -> tuple[int, str | None]:
    """Trains the points one after another. Returns (failed count, interrupting signal or None)."""
    failed, n = 0, len(points)
    with CompileCache(None if in_subprocess else cache):
        for i, p in enumerate(points, 1):
            print(f"[{i}/{n}] {p.name}", flush=True)
            _warn_if_another_run(p, cfgs[p.name])
            done = steps_done(p.run_dir)
            if done >= steps and not read_error(p.run_dir):
                print(f"  skipped: already at step {done}/{steps}", flush=True)
                continue
            error, stopped_by = _run_point(p, cfgs[p.name], config, in_subprocess, cache)
            failed += bool(error)
            print(final_line(point_result(p, steps), steps), flush=True)
            if stopped_by in ("SIGTERM", "SIGINT", "preemption"):
                return failed, stopped_by
    return failed, None


def _warn_if_another_run(p: Point, cfg) -> None:
    changes = config_changes(p.run_dir, cfg)
    if changes:
        print(f"  warning: {p.run_dir} holds a run with a different config ({'; '.join(changes[:3])}"
              f"{'; ...' if len(changes) > 3 else ''}): it is not this point's; use a new --out, or "
              "move the directory away to train this point afresh", flush=True)


def _run_point(p: Point, cfg, config: str | None, in_subprocess: bool, cache: str | None):
    """(error line or None, stopped_by or None) of one attempt; the error is also left in the run directory."""
    os.makedirs(p.run_dir, exist_ok=True)
    err_path = os.path.join(p.run_dir, SWEEP_ERROR)
    if os.path.exists(err_path):
        os.remove(err_path)
    error, stopped_by = run_subprocess(config, p, cache) if in_subprocess else run_in_process(cfg)
    if error:
        with open(err_path, "w") as f:
            f.write(error + "\n")
    return error, stopped_by
