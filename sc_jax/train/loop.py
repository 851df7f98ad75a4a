"""The training run: start (sc_jax.train.trainer), the loop, the summary.

The loop dispatches one jitted step after another; reporting, checkpoints and evaluation
attach to it as hooks (sc_jax.train.hooks)."""

from __future__ import annotations

import time

from sc_jax.train.hooks import Evaluate, Hooks, ReportMetrics, SaveCheckpoints, StepInfo
from sc_jax.train.preemption import Preemption
from sc_jax.train.trainer import Trainer, start


def run(cfg, restart: bool = False) -> dict:
    """Trains to cfg.train.steps, resuming the run directory (`restart`: moves an existing one
    aside and starts over). Returns a summary. Before it writes anything it raises ConfigError
    when the config, mesh, tokenizer, data, initial state or the run directory's saved config
    do not fit, and Interrupted when SIGINT/SIGTERM arrives during start-up."""
    cfg.validate()
    with Preemption() as preempt:
        trainer = start(cfg, preempt, restart)
        try:  # a failed run must not leave an open checkpoint manager or event file
            trainer.progress.print(trainer.header())
            report = ReportMetrics(trainer)
            evaluation = Evaluate(trainer, report)
            hooks = Hooks()
            hooks.add_hook(report, every=1)
            if trainer.saving:
                hooks.add_hook(SaveCheckpoints(trainer), every=1)
            if cfg.train.eval_batches:
                hooks.add_hook(evaluation, every=cfg.train.eval_every)
            info = train_loop(trainer, hooks)
            return finish(trainer, info, report, evaluation)
        finally:
            trainer.close()


def train_loop(trainer: Trainer, hooks: Hooks) -> StepInfo:
    """Steps from where the run is to train.steps, or until it must stop (a signal,
    train.stop_after_steps); the hooks run after each step and once at the end."""
    info = StepInfo(trainer.start, trainer.state)
    trainer.state = None  # the first step donates it: no reference to deleted buffers stays behind
    with trainer.activation_rules():
        for step in range(trainer.start + 1, trainer.steps + 1):
            state, metrics = trainer.step_fn(info.state, trainer.next_batch())  # the old state is donated
            info = StepInfo(step, state, metrics)
            hooks.run(info)
            info.stopped_by = trainer.stop_reason(step)
            if info.stopped_by:
                break
        hooks.run_at_end(info)
    return info


def finish(trainer: Trainer, info: StepInfo, report: ReportMetrics, evaluation: Evaluate) -> dict:
    """Waits for the saves, says why a stopped run stopped, and sums the run up."""
    import jax

    if trainer.mngr:
        trainer.mngr.wait_until_finished()
    final = int(jax.device_get(info.state["step"]))
    if info.stopped_by:
        trainer.progress.close()
        trainer.log(f"stopped by {info.stopped_by} at step {final}: {trainer.stop_outcome(final)}")
    summary = {"first_loss": report.first_loss, "last_loss": report.last_loss}
    if evaluation.loss is not None:
        summary["eval_loss"] = evaluation.loss
    summary.update(step=final, run_dir=trainer.run_dir, stopped_by=info.stopped_by, skipped=report.skipped,
                   state=info.state, setup=trainer.s, elapsed=time.time() - trainer.t0,
                   checkpoints=trainer.saved_steps(), trained=info.step > trainer.start)
    return summary
