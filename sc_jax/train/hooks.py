"""What the loop does besides stepping, attached as hooks (as Levanter's trainer hooks):
`hooks.add_hook(fn, every=N)` runs `fn(info)` after every N-th step, and once more when the
loop ends (`info.last`). The run's hooks report each step's metrics, save checkpoints and
evaluate the held-out loss."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

from sc_jax.train import state as run_state
from sc_jax.train.data import make_data
from sc_jax.train.metrics import clock


class TrainingError(RuntimeError):
    """A run that must stop; the message says why and at which step."""


@dataclasses.dataclass
class StepInfo:
    """What a hook sees: the step just dispatched, the state after it, and its metrics (still
    on the device). When the loop has ended (`last`), why it stopped early (None: it reached
    train.steps, or had nothing to train)."""

    step: int
    state: dict
    metrics: Any = None
    stopped_by: str | None = None
    last: bool = False


class Hooks:
    """Callbacks run after steps: each after every `every`-th step (0: not during the loop),
    and all of them, in the order added, once the loop has ended."""

    def __init__(self):
        self._hooks: list[tuple[Callable[[StepInfo], None], int]] = []

    def add_hook(self, fn: Callable[[StepInfo], None], every: int = 1) -> None:
        self._hooks.append((fn, every))

    def run(self, info: StepInfo) -> None:
        for fn, every in self._hooks:
            if every and info.step % every == 0:
                fn(info)

    def run_at_end(self, info: StepInfo) -> None:
        info.last = True
        for fn, _ in self._hooks:
            fn(info)


class ReportMetrics:
    """Each step's metrics, fetched one step late (the next step is already dispatched, so the
    host never stalls the device): a non-finite loss stops the run or is counted, and the record
    goes to metrics.jsonl (every train.log_every steps), TensorBoard and the terminal."""

    def __init__(self, trainer):
        self.t = trainer
        self.pending: tuple[int, Any] | None = None  # (step, its metrics on the device)
        self.last_time = time.time()
        self.first_loss = self.last_loss = None
        self.skipped = 0

    def __call__(self, info: StepInfo) -> None:
        self.flush()
        if not info.last:
            self.pending = (info.step, info.metrics)

    def flush(self) -> None:
        """Reports the pending step now (before an evaluation, or at the end)."""
        if self.pending is None:
            return
        import jax

        step, metrics = self.pending
        self.pending = None
        m = jax.device_get(metrics)
        now = time.time()
        dt, self.last_time = now - self.last_time, now
        self._check_finite(step, m)
        rec = self._record(step, m, dt, now)
        if self.first_loss is None:
            self.first_loss = rec["loss"]
        self.last_loss = rec["loss"]
        t = self.t.cfg.train
        if step % t.log_every == 0 or step == t.steps or step == self.t.start + 1:
            self.t.metrics.write(rec)
        self.t.progress.step(rec)

    def _check_finite(self, step: int, m: dict) -> None:
        if bool(m["finite"]):
            return
        if self.t.cfg.train.on_nonfinite == "stop":
            raise TrainingError(f"non-finite loss ({float(m['loss'])}) or gradient norm "
                                f"({float(m['grad_norm'])}) at step {step}: the update was not applied; "
                                "lower optimizer.peak_lr (a new run: --restart or a new train.run_dir), "
                                "check the data, or set train.on_nonfinite=skip")
        self.skipped += 1
        self.t.progress.print(f"warning: step {step} had a non-finite loss; its update was skipped "
                              f"({self.skipped} so far)")

    def _record(self, step: int, m: dict, dt: float, now: float) -> dict:
        t = self.t
        rec = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens": int(m["tokens"])}
        rec.update({k: float(v) for k, v in m.items() if k not in rec and k != "finite"})
        if step > t.start + 1:  # the first step of a process includes compilation: no speed for it
            rec["tokens_per_sec"] = t.tokens_per_step / dt
            rec["tflops_per_device"] = t.flops_step / dt / t.n_dev / 1e12
            if t.peak:
                rec["mfu"] = t.flops_step / dt / (t.peak * t.n_dev)
        rec.update(clock(step, now, t.t0, t.tokens_per_step))
        return rec


class SaveCheckpoints:
    """A checkpoint every checkpoint.every steps and of train.steps itself, saved as the step is
    dispatched (so the final one is queued before the final evaluation, and survives it), and
    one of the step the loop stopped at early, unless that one is saved already. Added with
    every=1: it decides which steps itself."""

    def __init__(self, trainer):
        self.t = trainer

    def __call__(self, info: StepInfo) -> None:
        t = self.t
        if info.last:
            if info.step == t.start or info.step in t.mngr.all_steps():
                return  # nothing trained, or saved already
        elif info.step % t.cfg.checkpoint.every and info.step != t.steps:
            return
        final = info.last or info.step == t.steps
        run_state.save(t.mngr, info.step, info.state, t.cfg, t.data.get_state(), force=final)


class Evaluate:
    """The held-out loss every train.eval_every steps (added with that `every`), and at the end of
    a run that reached train.steps unless that step was just evaluated."""

    def __init__(self, trainer, report: ReportMetrics):
        self.t, self.report = trainer, report
        self.loss: float | None = None
        self.evaluated_at: int | None = None

    def __call__(self, info: StepInfo) -> None:
        t = self.t
        if info.last and (info.stopped_by or info.step == t.start or info.step == self.evaluated_at):
            return
        self.report.flush()  # the step's own record comes before its evaluation
        data = make_data(t.cfg, t.cfg.model.vocab_size, t.pi, t.pc, t.tokenizer, eval_=True)
        self.loss = evaluate(t.cfg, t.s, info.state, data, t.to_global)
        self.evaluated_at = info.step
        rec = {"step": info.step, "eval_loss": self.loss, "eval_perplexity": math.exp(min(self.loss, 50.0)),
               **clock(info.step, time.time(), t.t0, t.tokens_per_step)}
        t.metrics.write(rec)
        t.progress.eval(rec)


def evaluate(cfg, s, state, data, to_global) -> float:
    """Mean held-out token loss over train.eval_batches batches (one host sync at the end)."""
    import jax

    total = count = 0.0
    for _ in range(cfg.train.eval_batches):
        try:
            batch = next(data)
        except StopIteration:
            break
        loss_sum, n = s.eval_fn(state["params"], to_global(batch), state.get("ref_params"))
        total, count = total + loss_sum, count + n
    total, count = jax.device_get((total, count))
    return float(total) / max(float(count), 1.0)
