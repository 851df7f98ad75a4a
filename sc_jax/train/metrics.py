"""Where a run's numbers go: metrics.jsonl and TensorBoard (MetricsLog), the terminal
(Progress), and what a step costs (tokens, FLOPs) for its speed and MFU."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsLog:
    """metrics.jsonl (one object per logged step) and TensorBoard (tags train/... and eval/...)."""

    def __init__(self, run_dir: str, cfg, start: int, is_main: bool):
        self.is_main, self.path = is_main, os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not is_main:
            return
        _truncate_after(self.path, start)  # steps after the resumed checkpoint are redone
        if cfg.logging.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for tag, value in tensorboard_scalars(record):
                self.tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()


_NOT_CURVES = ("step", "time", "elapsed")  # TensorBoard keeps wall time itself


def tensorboard_scalars(record: dict):
    """(tag, value) pairs: eval records' eval_x as eval/x, training records' keys as train/key."""
    is_eval = any(k.startswith("eval_") for k in record)
    for key, value in record.items():
        if key in _NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if is_eval:
            if key.startswith("eval_"):
                yield f"eval/{key[len('eval_'):]}", value
        else:
            yield f"train/{key}", value


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and _step_of(line) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut short by a kill: dropped
        return math.inf


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def step_cost(cfg) -> tuple[int, float]:
    """(tokens, training FLOPs) per step."""
    from sc_jax.train.step import flops_per_token

    t = cfg.train
    tokens = t.global_batch_size * t.seq_len
    flops = flops_per_token(cfg.model, t.seq_len) * tokens
    if t.task == "dpo":  # each row is a chosen and a rejected sequence, each also run forward by the reference
        tokens *= 2
        flops *= 2 * 8 / 6
    return tokens, flops


def clock(step: int, now: float, t0: float, tokens_per_step: int) -> dict:
    """time (unix seconds), elapsed (seconds since this invocation started) and tokens_seen
    (cumulative over the whole run, resumes included: every step has the same token count)."""
    return {"time": round(now, 3), "elapsed": round(now - t0, 3), "tokens_seen": step * tokens_per_step}


class Progress:
    """What the terminal shows while training: a tqdm bar when logging.progress is on and stderr is
    a terminal; otherwise (cluster logs, or progress off) a plain line every logging.print_every
    steps, or every logging.print_seconds when that is 0, plus the first and the last step. Both
    start at the first finished step, so compilation inflates neither speed nor ETA. Evaluations
    only set the bar's eval field (they have no training loss)."""

    def __init__(self, cfg, total: int, t0: float, is_main: bool):
        self.total, self.t0, self.is_main = total, t0, is_main
        self.use_bar = cfg.logging.progress and _is_terminal(sys.stderr)
        self.every, self.seconds = cfg.logging.print_every, cfg.logging.print_seconds
        self.bar = None
        self.first: tuple[int, float] | None = None  # (step, time) of the first finished step
        self.last_line = 0.0
        self.fields: dict[str, str] = {}

    def step(self, rec: dict) -> None:
        """A finished training step's record."""
        if not self.is_main:
            return
        now = time.time()
        if self.first is None:
            self.first = (rec["step"], now)
        self.fields.update(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
        if rec.get("tokens_per_sec"):
            self.fields["tok_s"] = f"{rec['tokens_per_sec']:,.0f}"
        if self.use_bar:
            self._advance_bar(rec["step"])
        elif self._line_due(rec["step"], now):
            self.last_line = now
            speed = f" | {rec['tokens_per_sec']:,.0f} tokens/s" if rec.get("tokens_per_sec") else ""
            eta = self._eta(rec["step"], now)
            print(f"step {rec['step']}/{self.total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e}{speed} | "
                  f"elapsed {duration(now - self.t0)}" + (f" | eta {duration(eta)}" if eta is not None else ""),
                  flush=True)

    def eval(self, rec: dict) -> None:
        if not self.is_main:
            return
        self.fields["eval"] = f"{rec['eval_loss']:.4f}"
        if self.bar:
            self.bar.set_postfix(self.fields, refresh=True)
        elif not self.use_bar:
            print(f"step {rec['step']}/{self.total} | eval loss {rec['eval_loss']:.4f} | "
                  f"perplexity {rec['eval_perplexity']:.2f}", flush=True)

    def print(self, msg: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar else print)(msg)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None

    def _advance_bar(self, step: int) -> None:
        if self.bar is None:  # created at the first finished step: its clock starts after compilation
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)
        else:
            self.bar.update(step - self.bar.n)
        self.bar.set_postfix(self.fields, refresh=False)

    def _line_due(self, step: int, now: float) -> bool:
        if step in (self.first[0], self.total):
            return True
        if self.every:
            return step % self.every == 0
        return self.seconds > 0 and now - self.last_line >= self.seconds

    def _eta(self, step: int, now: float) -> float | None:
        first_step, first_time = self.first
        if step <= first_step or now <= first_time:
            return None
        return (self.total - step) * (now - first_time) / (step - first_step)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
