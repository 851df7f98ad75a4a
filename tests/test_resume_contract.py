"""The run directory is a contract: a rerun resumes it or refuses, and never quietly turns it into
another run. A changed config is refused (the directory byte-identical) unless only resume-safe
keys changed; --restart moves the old run aside; a damaged checkpoint is moved aside and saved
again; a run directory written before this version still resumes; Ctrl-C during start-up exits
130 with one line and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from damage import damage_params
from sc_jax import checkpoint
from sc_jax.config import ConfigError
from sc_jax.sweep.runners import CompileCache
from sc_jax.train import load_config, run
from sc_jax.train.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["model.preset=tiny", "train.data=synthetic", "train.seq_len=32", "train.global_batch_size=8",
        "optimizer.peak_lr=3e-3", "optimizer.warmup_steps=1", "logging.progress=false", "logging.tensorboard=false",
        "mesh.num_devices=1", "checkpoint.every=2", "checkpoint.keep=null"]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """Every run here compiles the same tiny programs: compile them once (JAX's persistent cache,
    as the sweep uses it), here and in the subprocesses."""
    cache = str(tmp_path_factory.mktemp("compile_cache"))
    with CompileCache(cache):
        yield cache


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, compile_cache):
    """A run stopped after 2 of its 4 steps (checkpoint at step 2); tests resume copies of it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    train(run_dir, "train.stop_after_steps=2")
    return run_dir


@pytest.fixture(scope="module")
def finished(tmp_path_factory, compile_cache):
    """The same run trained straight to step 4 (checkpoints at 2 and 4)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(run_dir)
    return run_dir


def copy_of(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def args(run_dir, *extra):
    return [*BASE, f"train.run_dir={run_dir}", "train.steps=4", *extra]


def train(run_dir, *extra):
    return run(load_config(None, args(run_dir, *extra)))


def contents(root) -> dict:
    """Every file's bytes and every directory under root: what 'untouched' means."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            found[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = fh.read()
    return found


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "loss" in r}


def steps(run_dir):
    return checkpoint.valid_steps(os.path.join(run_dir, "checkpoints"))


# ----------------------------------------------------------------------------- changed config


def test_changed_model_is_refused_and_the_run_directory_is_untouched(stopped, tmp_path):
    run_dir = copy_of(stopped, tmp_path)
    before = contents(run_dir)
    with pytest.raises(ConfigError, match=r"model\.hidden_size 64 -> 128.*--restart.*train\.run_dir"):
        train(run_dir, "model.hidden_size=128")
    assert contents(run_dir) == before
    # Without config.yaml the checkpoint's own copy of the config still guards the resume.
    os.remove(run_dir / "config.yaml")
    before = contents(run_dir)
    with pytest.raises(ConfigError, match=r"its checkpoint of step 2\): data\.num_workers 0 -> 1"):
        train(run_dir, "data.num_workers=1")
    assert contents(run_dir) == before


def test_resume_safe_changes_resume_and_say_what_changes(stopped, tmp_path, capsys):
    run_dir = copy_of(stopped, tmp_path)
    summary = train(run_dir, "train.steps=6", "checkpoint.every=3", "logging.print_every=1")
    out = capsys.readouterr().out
    assert summary["step"] == 6 and "resumed from step 2" in out
    assert "train.steps 4 -> 6" in out and "checkpoint.every 2 -> 3" in out
    assert "the learning-rate schedule now spans 6 steps, not 4: from step 2 on it follows the new one" in out
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    from sc_jax.train import RESUME_SAFE, resume_safe

    assert all(resume_safe(k) for k in ("train.steps", "logging.progress", "mesh.fsdp", "checkpoint.keep"))
    assert not any(resume_safe(k) for k in ("data.num_workers", "optimizer.peak_lr", "train.seed", "model.dtype"))
    assert "train.steps" in RESUME_SAFE


def test_restart_moves_the_old_run_aside_and_starts_over(stopped, tmp_path, capsys):
    run_dir = copy_of(stopped, tmp_path)
    old = contents(run_dir)
    assert main([*args(run_dir, "data.num_workers=1"), "--restart"]) == 0  # a change a resume refuses
    out = capsys.readouterr().out
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert f"moved the previous run to {aside}" in out
    assert contents(aside) == old  # nothing lost
    assert steps(run_dir) == [2, 4] and sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert yaml.safe_load(open(run_dir / "config.yaml"))["data"]["num_workers"] == 1


# ----------------------------------------------------------------------------- saved before this version


def test_a_run_directory_written_by_the_previous_version_resumes(stopped, finished, tmp_path, capsys):
    """The previous version's config.yaml and checkpoint meta lack the keys added since
    (logging.print_every, logging.print_seconds) and may hold keys removed since: the resume
    must neither refuse nor restart, and tokens_seen counts the steps before it."""
    run_dir = copy_of(stopped, tmp_path)

    def as_previous_version(cfg: dict) -> dict:
        for key in ("print_every", "print_seconds"):
            del cfg["logging"][key]
        cfg["train"]["a_key_removed_since"] = 1
        return cfg

    config_yaml = run_dir / "config.yaml"
    config_yaml.write_text(yaml.safe_dump(as_previous_version(yaml.safe_load(config_yaml.read_text()))))
    meta_path = run_dir / "checkpoints" / "2" / "meta" / "metadata"  # orbax's JsonSave file
    meta = json.loads(meta_path.read_text())
    meta["config"] = as_previous_version(meta["config"])
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    summary = train(run_dir)
    out = capsys.readouterr().out
    assert summary["step"] == 4 and "resumed from step 2" in out and "warning" not in out
    assert losses(run_dir) == losses(finished)  # exact, every step
    records = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [r["tokens_seen"] for r in records if r["step"] > 2] == [3 * 256, 4 * 256]


# ----------------------------------------------------------------------------- damaged checkpoints


def test_time_sliced_run_moves_a_damaged_checkpoint_aside_and_saves_that_step_again(tmp_path, capsys):
    run_dir = tmp_path / "run"
    every_step = ("checkpoint.every=1", "train.stop_after_steps=1")  # a slice of one step, a checkpoint per step
    train(run_dir, "checkpoint.every=1", "train.stop_after_steps=2")
    damage_params(run_dir / "checkpoints" / "2")
    capsys.readouterr()
    summary = train(run_dir, *every_step)  # falls back to step 1, trains step 2 again, stops there
    out = capsys.readouterr().out
    (aside,) = os.listdir(run_dir / "checkpoints" / "damaged")
    assert aside.startswith("2-")
    assert f"checkpoint step 2 in {run_dir / 'checkpoints'} could not be restored" in out
    assert f"moved it to {run_dir / 'checkpoints' / 'damaged' / aside}; falling back to step 1" in out
    assert summary["stopped_by"] == "train.stop_after_steps" and summary["step"] == 2
    assert "stopped by train.stop_after_steps at step 2: checkpoint saved" in out
    assert steps(run_dir) == [1, 2]
    # The new step 2 is a real checkpoint: the next slice resumes from it, with no warning.
    summary = train(run_dir, *every_step)
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "warning" not in out and summary["step"] == 3


def test_finished_run_with_a_damaged_final_checkpoint_redoes_the_last_steps(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    first = losses(run_dir)
    damage_params(run_dir / "checkpoints" / "4")
    summary = train(run_dir)  # used to raise StepAlreadyExistsError, on every rerun
    out = capsys.readouterr().out
    assert "falling back to step 2" in out and summary["step"] == 4
    assert steps(run_dir) == [2, 4] and losses(run_dir) == first
    summary = train(run_dir)
    out = capsys.readouterr().out
    assert "resumed from step 4" in out and "warning" not in out and not summary["trained"]


def test_when_no_checkpoint_reads_back_the_run_stops_and_moves_nothing(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    for step in (2, 4):
        damage_params(run_dir / "checkpoints" / str(step))
    before = sorted(os.listdir(run_dir / "checkpoints")), (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="no checkpoint in .* reads back .*rerun with --restart"):
        train(run_dir)
    assert (sorted(os.listdir(run_dir / "checkpoints")), (run_dir / "metrics.jsonl").read_bytes()) == before


def test_running_out_of_memory_while_restoring_is_not_damage(finished, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    run_dir = copy_of(finished, tmp_path)
    real_restore = ocp.CheckpointManager.restore

    def restore(self, step, *a, args=None, **kw):
        if args is not None and "params" in args.keys():
            raise MemoryError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 11.18GiB")
        return real_restore(self, step, *a, args=args, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    with pytest.raises(ConfigError, match="out of memory restoring checkpoint step 4 .*the checkpoints are left"):
        train(run_dir)
    assert steps(run_dir) == [2, 4] and not (run_dir / "checkpoints" / "damaged").exists()


def test_the_final_checkpoint_is_saved_before_the_final_evaluation(tmp_path, monkeypatch):
    from sc_jax.train import hooks

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("the held-out data went away")

    monkeypatch.setattr(hooks, "evaluate", failing_evaluation)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="held-out data went away"):
        train(run_dir, "train.steps=3", "train.eval_batches=1", "train.eval_every=3")  # checkpoint.every=2
    assert steps(run_dir) == [2, 3]


def test_stop_says_saved_only_when_a_checkpoint_was_saved(tmp_path, capsys):
    summary = train(tmp_path / "run", "checkpoint.enabled=false", "train.stop_after_steps=2")
    out = capsys.readouterr().out
    assert summary["stopped_by"] == "train.stop_after_steps"
    assert "stopped by train.stop_after_steps at step 2: no checkpoint was saved (checkpoint.enabled=false); " \
           "a rerun starts from scratch" in out
    assert "checkpoint saved" not in out


# ----------------------------------------------------------------------------- interrupted start-up


def _start(run_dir, sig_after_pause, cache):
    env = dict(os.environ)  # the devices of the runs above: their compiled programs are in the cache
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", SC_JAX_PAUSE_AT_STEP="0", JAX_COMPILATION_CACHE_DIR=cache)
    proc = subprocess.Popen([sys.executable, "-m", "sc_jax.train", *args(run_dir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    for line in proc.stdout:  # the pause at start-up: before the state is restored or compiled
        if line.startswith("paused at step 0"):
            break
        assert time.time() - t0 < 240, "timed out waiting for the start-up pause"
    else:
        raise AssertionError(f"run ended before its start-up pause: {proc.communicate()}")
    proc.send_signal(sig_after_pause)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("sig, code, resuming", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)],
                         ids=["ctrl-c-fresh", "sigterm-resuming"])
def test_signal_during_start_up_exits_with_one_line_and_writes_nothing(stopped, tmp_path, sig, code, resuming,
                                                                      compile_cache):
    run_dir = copy_of(stopped, tmp_path) if resuming else tmp_path / "run"
    before = contents(run_dir) if resuming else None
    rc, out, err = _start(run_dir, sig, compile_cache)
    assert rc == code, (out, err)
    assert "Traceback" not in out + err
    assert err.strip().splitlines() == [f"interrupted by {signal.Signals(sig).name} during start-up: nothing was saved"]
    if resuming:
        assert contents(run_dir) == before
    else:
        assert not run_dir.exists()
