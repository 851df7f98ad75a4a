"""A started run (Trainer) and its start-up: everything before the first step is checked
before anything is written, so a failed or interrupted start leaves no run directory behind,
or an existing one untouched."""

from __future__ import annotations

import os
import time

from sc_jax.train.config import keep_saved_values, refuse_changed_config, resume_notes
from sc_jax.train.data import global_placer, make_data
from sc_jax.train.metrics import MetricsLog, Progress, step_cost
from sc_jax.train.preemption import Preemption, fault_injection_pause
from sc_jax.train.run_dir import checked_run_dir, open_tokenizer, saved_run_config, write_run_dir
from sc_jax.train.state import init_state, manager, own_data_state, reference_params, restore, setup


class Trainer:
    """A started run: its config, compiled setup, the state it starts from (donated to its
    first step), data, checkpoint manager and run directory, and where its numbers go
    (MetricsLog, Progress)."""

    def __init__(self, cfg, s, run_dir, state, data, tokenizer, mngr, t0, preempt: Preemption, log):
        import jax

        from sc_jax.train.step import peak_flops

        self.cfg, self.s, self.run_dir, self.state, self.data, self.tokenizer = cfg, s, run_dir, state, data, tokenizer
        self.mngr, self.t0, self.preempt, self.log = mngr, t0, preempt, log
        self.pi, self.pc = jax.process_index(), jax.process_count()
        self.start, self.steps = int(jax.device_get(state["step"])), cfg.train.steps
        self.saving = mngr is not None and cfg.checkpoint.enabled
        self.step_fn, self.to_global = s.step_fn, global_placer(cfg, s.batch_sh)
        self.tokens_per_step, self.flops_step = step_cost(cfg)
        self.kind = cfg.logging.device_kind or jax.devices()[0].device_kind
        self.peak, self.n_dev = peak_flops(self.kind), jax.device_count()
        self.metrics = MetricsLog(run_dir, cfg, self.start, self.pi == 0)
        self.progress = Progress(cfg, cfg.train.steps, t0, self.pi == 0)

    def next_batch(self) -> dict:
        return self.to_global(next(self.data))

    def activation_rules(self):
        from sc_jax import sharding

        return sharding.activation_rules(self.s.mesh, self.s.rules)

    def stop_reason(self, step: int) -> str | None:
        """Why the run stops after `step` before train.steps: a signal, or train.stop_after_steps."""
        signal = self.preempt.stop_reason(step, self.pc)
        if signal:
            return signal
        t = self.cfg.train
        if t.stop_after_steps and step - self.start >= t.stop_after_steps and step < t.steps:
            return "train.stop_after_steps"
        return None

    def header(self) -> str:
        return (f"{self.cfg.model.num_params():,} parameters | mesh {dict(self.s.mesh.shape)} on {self.n_dev} "
                f"{self.kind} device(s), {self.pc} process(es) | {self.tokens_per_step:,} tokens/step | "
                f"steps {self.start} -> {self.steps}")

    def saved_steps(self) -> list[int]:
        """The checkpoints on disk (after the saves finished): what a rerun can resume."""
        from sc_jax import checkpoint

        return checkpoint.valid_steps(os.path.join(self.run_dir, checkpoint.CHECKPOINTS))

    def stop_outcome(self, step: int) -> str:
        steps = self.saved_steps()
        if step in steps:
            return f"checkpoint saved in {self.run_dir}; rerun the same command to resume"
        why = "checkpoint.enabled=false" if not self.cfg.checkpoint.enabled else "the save did not complete"
        then = f"a rerun resumes from step {steps[-1]}" if steps else "a rerun starts from scratch"
        return f"no checkpoint was saved ({why}); {then}"

    def close(self) -> None:
        if self.mngr:
            self.mngr.close()
        self.progress.close()
        self.metrics.close()


def start(cfg, preempt: Preemption, restart: bool) -> Trainer:
    """Everything before the first step. Only reads until the state is ready, then creates the
    run directory. `restart`: the old run directory is moved aside instead of resumed."""
    import jax

    t0 = time.time()
    pi = jax.process_index()
    log = print if pi == 0 else (lambda *_: None)
    run_dir = checked_run_dir(cfg.train.run_dir)
    saved = None if restart else saved_run_config(run_dir)
    if saved is not None:
        for note in keep_saved_values(saved, cfg):
            log(note)
        refuse_changed_config(run_dir, saved, cfg, "config.yaml")
    tokenizer, tokenizer_json = open_tokenizer(cfg)
    s = setup(cfg)
    data = make_data(cfg, cfg.model.vocab_size, pi, jax.process_count(), tokenizer)
    preempt.check()
    fault_injection_pause(0, preempt)
    mngr = None
    try:
        mngr, restored = (None, None) if restart else restore(cfg, s, run_dir, log, _refuse_other_run(cfg, run_dir))
        state = _resumed(cfg, s, data, restored, run_dir, log) if restored else init_state(cfg, s, log)
        preempt.check()
        # Everything is known good: only now is anything written.
        write_run_dir(run_dir, cfg, tokenizer_json, restart, pi, log)
        if mngr is None and cfg.checkpoint.enabled:
            mngr = manager(cfg, run_dir)
        return Trainer(cfg, s, run_dir, state, data, tokenizer, mngr, t0, preempt, log)
    except BaseException:
        if mngr:
            mngr.close()
        raise


def _refuse_other_run(cfg, run_dir: str):
    """check_meta for a restore: a checkpoint saved with another config is refused before any array is read."""
    def check(meta: dict) -> None:
        refuse_changed_config(run_dir, meta.get("config") or {}, cfg, f"its checkpoint of step {meta['step']}")

    return check


def _resumed(cfg, s, data, restored, run_dir: str, log) -> dict:
    """The restored state, with the data iterator moved to where it was saved (and DPO's reference reloaded)."""
    import jax

    state, meta = restored
    data.set_state(own_data_state(meta, jax.process_index(), jax.process_count()))
    if cfg.train.task == "dpo":
        state["ref_params"] = reference_params(cfg, s, log)
    for note in resume_notes(meta.get("config") or {}, cfg, meta["step"]):
        log(note)
    log(f"resumed from step {meta['step']} in {run_dir}")
    return state
