"""Training: `python -m sc_jax.train --config FILE [key.sub=value ...]`.

One loop for pre-training, SFT and DPO on any mesh: build the mesh, initialise or
restore the sharded state, then dispatch jitted steps, fetching each step's metrics
only after the next one is dispatched so the host never stalls the device.

Start-up checks everything (config, mesh, tokenizer, data, the initial or resumed
state) before it writes anything, so a failed start leaves no run directory behind,
or an existing one untouched. Rerunning the same command resumes the run directory;
a rerun whose config differs from the saved one in more than the resume-safe keys
(RESUME_SAFE) is refused; --restart moves the old run aside and starts over.

Exit codes: 0 trained to train.steps, or stopped with a checkpoint (SIGTERM/SIGINT
during training, train.stop_after_steps); 2 a config or usage error, or a run that
had to stop (non-finite loss); 130 (SIGINT) or 143 (SIGTERM) interrupted during
start-up, before anything was written.

Multi-host: `jax.distributed.initialize` is called automatically on TPU pods and
under SLURM, or explicitly with --coordinator/--num-processes/--process-id.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import textwrap
import time
from typing import Any


def _interrupted_while_loading(*_):
    """SIGINT while the libraries below load (seconds; nothing started): one line and 130, not
    an import traceback (run() installs its own handler for the rest)."""
    sys.stderr.write("interrupted by SIGINT during start-up: nothing was saved\n")
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import numpy as np  # noqa: E402

from sc_jax.config import (ConfigError, ModelConfig, dump_yaml, from_dict, known_only, load_yaml,  # noqa: E402
                           model_preset, to_dict)
from sc_jax.data.config import DataConfig  # noqa: E402
from sc_jax.optimizer import OptimizerConfig  # noqa: E402
from sc_jax.sharding import MeshConfig  # noqa: E402


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 100
    seq_len: int = 4096
    global_batch_size: int = 8  # sequences per step, all processes together
    micro_batches: int = 1  # gradient accumulation inside one step
    seed: int = 0
    task: str = "pretrain"  # pretrain | sft | dpo
    data: str = "pipeline"  # pipeline (grain) | synthetic (in-memory tokens, for tests and benchmarks)
    z_loss: float = 0.0
    on_nonfinite: str = "stop"  # stop | skip
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end when eval_batches > 0
    eval_batches: int = 0
    init_from: str | None = None  # HF directory or orbax checkpoint: parameters only, fresh optimizer
    stop_after_steps: int | None = None  # end this invocation (with a checkpoint) after N steps; rerun to go on
    dpo_beta: float = 0.1


@dataclasses.dataclass
class CheckpointConfig:
    enabled: bool = True  # false: nothing is saved (an existing checkpoint is still resumed)
    every: int = 1000
    keep: int | None = 3
    keep_period: int | None = None  # also keep every N-th step forever
    async_save: bool = True


@dataclasses.dataclass
class LoggingConfig:
    progress: bool = True  # a progress bar when stderr is a terminal; plain lines otherwise
    tensorboard: bool = True
    device_kind: str | None = None  # overrides the detected kind for MFU (e.g. "h100")
    print_every: int = 0  # plain lines (no bar): one every N steps; 0: one every print_seconds
    print_seconds: float = 30.0


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=lambda: model_preset("stable-code-3b"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def validate(self) -> "Config":
        self.model.validate()
        _check_counts(self)
        t = self.train
        if t.task not in ("pretrain", "sft", "dpo"):
            raise ConfigError(f"train.task '{t.task}' must be pretrain, sft or dpo")
        if t.data not in ("pipeline", "synthetic"):
            raise ConfigError(f"train.data '{t.data}' must be pipeline or synthetic")
        if t.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite '{t.on_nonfinite}' must be stop or skip")
        if t.global_batch_size % t.micro_batches:
            raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                              f"train.micro_batches {t.micro_batches}")
        if t.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"train.seq_len {t.seq_len} exceeds model.max_position_embeddings "
                              f"{self.model.max_position_embeddings}")
        if t.task == "dpo" and not t.init_from:
            raise ConfigError("train.task=dpo needs train.init_from (the SFT model, which is also the reference)")
        self.optimizer.validate(t.steps)
        if t.data == "pipeline":
            self.data.validate()
        return self


# Counts that must be at least this (a 0 trains nothing, or divides by zero later); None: may be null.
_AT_LEAST = {"train.steps": 1, "train.seq_len": 1, "train.global_batch_size": 1, "train.micro_batches": 1,
             "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 0, "train.stop_after_steps": 1,
             "train.z_loss": 0, "checkpoint.every": 1, "checkpoint.keep": 1, "checkpoint.keep_period": 1,
             "logging.print_every": 0, "logging.print_seconds": 0}
_NULLABLE = ("train.stop_after_steps", "checkpoint.keep", "checkpoint.keep_period")


def _check_counts(cfg: Config) -> None:
    for key, low in _AT_LEAST.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None and key in _NULLABLE:
            continue
        if not value >= low:  # NaN fails too
            raise ConfigError(f"{key} must be at least {low}{' (or null)' if key in _NULLABLE else ''}, got {value}")
    if not cfg.train.dpo_beta > 0:
        raise ConfigError(f"train.dpo_beta must be positive, got {cfg.train.dpo_beta}")


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    return load_yaml(Config, path, overrides).validate()


class TrainingError(RuntimeError):
    """A run that must stop; the message says why and at which step."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during start-up: the run stopped before writing anything."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


# ----------------------------------------------------------------------------- resuming

# Keys that may differ from a run directory's saved config when it is resumed: they change how
# the run executes, logs or checkpoints, not what it computes (micro-batches and attention kernels
# give the same update up to rounding; another mesh reshards the checkpoint on load). Keys ending
# in "." cover their whole section. train.steps may change too, but the learning-rate schedule is
# a function of it (warmup_fraction x steps, the cosine's length): a resumed run follows the new
# schedule from the resumed step on, and a note says so. Anything else (model shapes or numerics,
# data and its order, e.g. data.num_workers; optimizer; batch; seed; task; init_from) would make it
# another run: refused, with --restart or a new train.run_dir to start over. model.preset is only a
# name for the model keys, which are compared one by one.
RESUME_SAFE = ("train.run_dir", "train.steps", "train.stop_after_steps", "train.log_every", "train.eval_every",
               "train.eval_batches", "train.on_nonfinite", "train.micro_batches", "model.remat", "model.attention",
               "model.max_segments", "model.preset", "mesh.", "checkpoint.", "logging.")


def resume_safe(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE)


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key where `cfg` differs from a saved config (a
    checkpoint's meta or config.yaml, perhaps written by another version: keys it lacks take
    their defaults, keys this version does not know are ignored)."""
    known = known_only(Config, saved)
    try:
        known = to_dict(from_dict(Config, known))
    except ConfigError:  # a value this version reads differently: compare what is there
        pass
    old, new = by_key(known), by_key(to_dict(cfg))
    return [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]


def by_key(cfg: dict) -> dict:
    """{"section.key": value} of a config dict (a mapping or list value is one value)."""
    return {f"{section}.{k}": v for section, keys in cfg.items() if isinstance(keys, dict) for k, v in keys.items()}


def refuse_changed_config(run_dir: str, saved: dict, cfg: Config, source: str) -> None:
    """A ConfigError (one line) when resuming `saved` with `cfg` would be another run."""
    refused = [c for c in config_changes(saved, cfg) if not resume_safe(c[0])]
    if not refused:
        return
    shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in refused[:6])
    more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
    raise ConfigError(f"{run_dir} holds a run with another config ({source}): {shown}{more}; rerun with the saved "
                      "values to resume it, or start over with --restart (moves it aside) or a new train.run_dir")


def resume_notes(saved: dict, cfg: Config, step: int) -> list[str]:
    """What a resume with changed resume-safe keys does differently, for the log."""
    from sc_jax.optimizer import lr_schedule

    changes = config_changes(saved, cfg)
    shown = [f"{k} {old!r} -> {new!r}" for k, old, new in changes if k != "train.run_dir"]
    notes = [f"resuming with changed {', '.join(shown)}"] if shown else []
    old_steps = dict((k, old) for k, old, _ in changes).get("train.steps")
    if old_steps is not None:
        before = float(lr_schedule(cfg.optimizer, old_steps)(step))
        after = float(lr_schedule(cfg.optimizer, cfg.train.steps)(step))
        if not math.isclose(before, after, rel_tol=1e-6):
            notes.append(f"note: the learning-rate schedule now spans {cfg.train.steps} steps, not {old_steps}: "
                         f"from step {step} on it follows the new one (lr {before:.3e} -> {after:.3e})")
    return notes


def saved_run_config(run_dir: str) -> dict | None:
    """config.yaml of a run directory as a raw dict (None: there is none)."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None  # unreadable: the checkpoints' own copies still guard a resume
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------- multi-host


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Starts jax.distributed when this is one process of many (before any device use)."""
    import jax

    if coordinator:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator needs --num-processes and --process-id")
        if _cpu_only():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 \
            or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # auto-detects SLURM and TPU pod environments


def _cpu_only() -> bool:
    return os.environ.get("JAX_PLATFORMS", "").strip() == "cpu"


def _sync(name: str) -> None:
    """A barrier across processes (no-op for one): after process 0 changed the run directory."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- data


def synthetic_batches(cfg: Config, vocab: int, batch_size: int, process_index: int, start_step: int):
    """Learnable token rows (arithmetic progressions mod vocab), a pure function of
    (seed, step, global row), so any process count yields the same global batches."""
    T, per_process = cfg.train.seq_len, batch_size
    step = start_step
    while True:
        rows = []
        for r in range(process_index * per_process, (process_index + 1) * per_process):
            rng = np.random.default_rng([cfg.train.seed, step, r])
            start, stride = rng.integers(0, vocab), rng.integers(1, 4)
            rows.append((start + stride * np.arange(T + 1)) % vocab)
        toks = np.asarray(rows, np.int32)
        yield {"input_ids": toks[:, :-1], "targets": toks[:, 1:],
               "segment_ids": np.ones((per_process, T), np.int32),
               "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (per_process, T)).copy(),
               "loss_mask": np.ones((per_process, T), np.float32)}
        step += 1


class SyntheticIterator:
    def __init__(self, cfg, vocab, batch_size, process_index, start_step=0):
        self.args = (cfg, vocab, batch_size, process_index)
        self.step = start_step
        self._gen = synthetic_batches(*self.args, start_step)

    def __next__(self):
        self.step += 1
        return next(self._gen)

    def __iter__(self):
        return self

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]
        self._gen = synthetic_batches(*self.args, self.step)


def make_data(cfg: Config, vocab: int, process_index: int, process_count: int, tokenizer=None, eval_: bool = False):
    t = cfg.train
    if t.global_batch_size % process_count:
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by the "
                          f"{process_count} processes")
    per_process = t.global_batch_size // process_count
    if t.data == "synthetic":
        return SyntheticIterator(cfg, vocab, per_process, process_index, start_step=10**6 if eval_ else 0)
    from sc_jax import tasks

    return tasks.make_iterator(cfg, seq_len=t.seq_len, batch_size=per_process, process_index=process_index,
                               process_count=process_count, tokenizer=tokenizer, eval_=eval_)


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """metrics.jsonl (one object per logged step) and TensorBoard (tags train/... and eval/...)."""

    def __init__(self, run_dir: str, cfg: Config, start: int, is_main: bool):
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


class Progress:
    """What the terminal shows while training: a tqdm bar when logging.progress is on and stderr is
    a terminal; otherwise (cluster logs, or progress off) a plain line every logging.print_every
    steps, or every logging.print_seconds when that is 0, plus the first and the last step. Both
    start at the first finished step, so compilation inflates neither speed nor ETA. Evaluations
    only set the bar's eval field (they have no training loss)."""

    def __init__(self, cfg: Config, total: int, t0: float, is_main: bool):
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


# ----------------------------------------------------------------------------- the run


class _Preemption:
    """SIGTERM/SIGINT over the whole run set a flag, never an exception in the middle of a
    library call. During start-up `check` then raises Interrupted (nothing written yet); in the
    loop the run saves a checkpoint at the current step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def check(self) -> None:
        if self.signal:
            raise Interrupted(self.signal)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass
class Setup:
    """Everything a run (or a plan) derives from its config before touching data."""

    mesh: Any
    rules: dict
    graphdef: Any
    abs_state: dict  # ShapeDtypeStructs of {step, params, opt_state[, ref_params]}
    state_sh: dict  # their NamedShardings
    batch_sh: Any
    tx: Any
    schedule: Any
    step_fn: Any  # jitted (state, batch) -> (state, metrics), state donated
    param_sh: Any
    eval_fn: Any  # jitted (params, batch, ref_params) -> (loss_sum, count)


def setup(cfg: Config) -> Setup:
    """The mesh, shardings, optimizer and jitted step for `cfg` (shared with sc_jax.plan)."""
    import jax
    from flax import nnx

    from sc_jax import model as M, sharding, tasks
    from sc_jax.optimizer import make_optimizer
    from sc_jax.step import make_train_step

    mesh = sharding.build_mesh(cfg.mesh)
    rules = sharding.rules_for(cfg.mesh)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    per_micro = cfg.train.global_batch_size // cfg.train.micro_batches
    if per_micro % batch_ways:
        raise ConfigError(f"a micro-batch of {per_micro} sequences (train.global_batch_size / train.micro_batches) "
                          f"cannot be split over data x fsdp = {batch_ways} devices: make it a multiple of {batch_ways}")
    graphdef, abs_state = nnx.split(M.abstract_model(cfg.model))
    abs_params = abs_state.to_pure_dict()
    axes = M.logical_axes(abs_state).to_pure_dict()
    param_sh = sharding.tree_shardings(abs_params, axes, mesh, rules)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    repl = sharding.replicated(mesh)
    opt_sh = _opt_shardings(tx, abs_opt, param_sh, repl)
    state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh}
    abs_train_state = {"step": jax.ShapeDtypeStruct((), np.int32), "params": abs_params, "opt_state": abs_opt}
    if cfg.train.task == "dpo":  # the frozen reference model, sharded like the policy
        state_sh["ref_params"], abs_train_state["ref_params"] = param_sh, abs_params
    batch_sh = sharding.batch_sharding(mesh)
    loss_fn = tasks.loss_fn(cfg)
    step = make_train_step(graphdef, tx, schedule, micro_batches=cfg.train.micro_batches, z_loss=cfg.train.z_loss,
                           loss_fn=loss_fn)
    step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
    eval_fn = jax.jit(tasks.eval_fn(cfg, graphdef), in_shardings=(param_sh, batch_sh, state_sh.get("ref_params")))
    return Setup(mesh, rules, graphdef, abs_train_state, state_sh, batch_sh, tx, schedule, step_fn, param_sh, eval_fn)


def _opt_shardings(tx, abs_opt, param_sh, replicated):
    """Optimizer moments are sharded like their parameters; counters are replicated."""
    import jax
    import optax

    mapped = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    return jax.tree.map(lambda s: s if s is not None else replicated, mapped,
                        is_leaf=lambda x: x is None or hasattr(x, "spec"))


def init_state(cfg: Config, s, log) -> dict:
    """Fresh parameters (or `train.init_from`) and a fresh optimizer, created sharded."""
    import jax
    from flax import nnx

    from sc_jax import model as M

    if cfg.train.init_from:
        params = load_init_params(cfg, s, log)
    else:
        def init():
            return nnx.split(M.create_model(cfg.model, cfg.train.seed))[1].to_pure_dict()

        params = jax.jit(init, out_shardings=s.param_sh)()
    opt_state = jax.jit(s.tx.init, out_shardings=s.state_sh["opt_state"])(params)
    step = jax.device_put(np.asarray(0, np.int32), s.state_sh["step"])
    state = {"step": step, "params": params, "opt_state": opt_state}
    if cfg.train.task == "dpo":
        state["ref_params"] = reference_params(cfg, s, log)
    return state


def reference_params(cfg: Config, s, log):
    """DPO's frozen reference: the `train.init_from` model, loaded as its own buffers
    (the policy's are donated every step). Never checkpointed: reloaded on resume."""
    if not cfg.train.init_from:
        raise ConfigError("train.task=dpo needs train.init_from (the SFT model, which is also the reference)")
    return load_init_params(cfg, s, log)


def load_init_params(cfg: Config, s, log):
    """Parameters from a HF directory or an orbax checkpoint, each placed straight onto
    this mesh's shardings (a host reads only its shards; no whole host copy)."""
    from sc_jax import checkpoint
    from sc_jax.convert import hf_params_onto, is_hf_directory

    path = cfg.train.init_from
    target = checkpoint.abstract_like(s.abs_state["params"], s.param_sh)
    if is_hf_directory(path):
        src_cfg, params = hf_params_onto(path, target)
    else:
        src_cfg, params, _ = checkpoint.load_params(path, target=target, log=log)
    log(f"initialised parameters from {path} ({src_cfg.num_params():,} parameters)")
    return params


def run(cfg: Config, restart: bool = False) -> dict:
    """Trains to cfg.train.steps, resuming the run directory (`restart`: moves an existing one
    aside and starts over). Returns a summary. Before it writes anything it raises ConfigError
    when the config, mesh, tokenizer, data, initial state or the run directory's saved config
    do not fit, and Interrupted when SIGINT/SIGTERM arrives during start-up."""
    cfg.validate()
    with _Preemption() as preempt:
        r = _start(cfg, preempt, restart)
        try:
            return r.train(preempt)
        finally:  # a failed run must not leave an open checkpoint manager or event file
            r.close()


def _start(cfg: Config, preempt: _Preemption, restart: bool) -> "_Run":
    """Everything before the first step. Only reads until the state is ready, then creates the
    run directory: a failed or interrupted start leaves nothing behind."""
    import jax

    t0 = time.time()
    pi, pc = jax.process_index(), jax.process_count()
    log = print if pi == 0 else (lambda *_: None)
    run_dir = _checked_run_dir(cfg.train.run_dir)
    saved = None if restart else saved_run_config(run_dir)
    if saved is not None:
        refuse_changed_config(run_dir, saved, cfg, "config.yaml")
    tokenizer, tokenizer_json = _open_tokenizer(cfg)
    s = setup(cfg)
    data = make_data(cfg, cfg.model.vocab_size, pi, pc, tokenizer)
    preempt.check()
    _fault_injection_pause(0, preempt)
    mngr = None
    try:
        mngr, restored = (None, None) if restart else _restore(cfg, s, run_dir, log)
        if restored:
            state, meta = restored
            data.set_state(meta["data_state"])
            if cfg.train.task == "dpo":
                state["ref_params"] = reference_params(cfg, s, log)
            for note in resume_notes(meta.get("config") or {}, cfg, meta["step"]):
                log(note)
            log(f"resumed from step {meta['step']} in {run_dir}")
        else:
            state = init_state(cfg, s, log)
        preempt.check()
        # Everything is known good: only now is anything written.
        _write_run_dir(run_dir, cfg, tokenizer_json, restart, pi, log)
        if mngr is None and cfg.checkpoint.enabled:
            mngr = _manager(cfg, run_dir)
        start = int(jax.device_get(state["step"]))
        return _Run(cfg, s, run_dir, state, data, tokenizer, mngr, start, t0, pi, pc, log)
    except BaseException:
        if mngr:
            mngr.close()
        raise


def _checked_run_dir(path: str) -> str:
    run_dir = os.path.abspath(path)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"train.run_dir '{path}' is a file: point it at a directory")
    parent = run_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"train.run_dir '{path}': cannot write in {parent}")
    return run_dir


def _open_tokenizer(cfg: Config):
    """(Tokenizer, its tokenizer.json bytes for the run directory) for pipeline data, else (None, None)."""
    if cfg.train.data != "pipeline":
        return None, None
    from sc_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}: raise model.vocab_size")
    with open(_tokenizer_file(cfg.data.tokenizer), "rb") as f:  # read now: --restart may move it aside
        return tokenizer, f.read()


def _manager(cfg: Config, run_dir: str):
    from sc_jax import checkpoint

    c = cfg.checkpoint
    return checkpoint.manager(os.path.join(run_dir, checkpoint.CHECKPOINTS), save_every=c.every, keep=c.keep,
                              keep_period=c.keep_period, async_save=c.async_save)


def _restore(cfg: Config, s: Setup, run_dir: str, log):
    """(checkpoint manager, (state, meta) or None) from the run directory's checkpoints; (None, None)
    when it has none. A checkpoint saved with another config is refused before any array is read."""
    from sc_jax import checkpoint

    if not os.path.isdir(os.path.join(run_dir, checkpoint.CHECKPOINTS)):
        return None, None
    mngr = _manager(cfg, run_dir)
    trained = {k: v for k, v in s.abs_state.items() if k != "ref_params"}
    target = checkpoint.abstract_like(trained, {k: s.state_sh[k] for k in trained})

    def check(meta):
        refuse_changed_config(run_dir, meta.get("config") or {}, cfg, f"its checkpoint of step {meta['step']}")

    try:
        return mngr, checkpoint.restore_train_state(mngr, target, log, check_meta=check)
    except BaseException:
        mngr.close()
        raise


def _write_run_dir(run_dir: str, cfg: Config, tokenizer_json: bytes | None, restart: bool, process_index: int,
                   log) -> None:
    """Creates or updates the run directory (process 0; the others wait for it)."""
    if process_index == 0:
        if restart and os.path.isdir(run_dir) and os.listdir(run_dir):
            aside = _unused(f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(run_dir, aside)
            log(f"--restart: moved the previous run to {aside}")
        os.makedirs(run_dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))
        tokenizer_path = os.path.join(run_dir, "tokenizer.json")
        if tokenizer_json is not None and not os.path.exists(tokenizer_path):
            with open(tokenizer_path + ".tmp", "wb") as f:
                f.write(tokenizer_json)
            os.replace(tokenizer_path + ".tmp", tokenizer_path)
    _sync("sc_jax:run_dir")
    os.makedirs(run_dir, exist_ok=True)


def _unused(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        candidate, n = f"{path}-{n}", n + 1
    return candidate


def _step_cost(cfg: Config) -> tuple[int, float]:
    """(tokens, training FLOPs) per step."""
    from sc_jax.step import flops_per_token

    t = cfg.train
    tokens = t.global_batch_size * t.seq_len
    flops = flops_per_token(cfg.model, t.seq_len) * tokens
    if t.task == "dpo":  # each row is a chosen and a rejected sequence, each also run forward by the reference
        tokens *= 2
        flops *= 2 * 8 / 6
    return tokens, flops


class _Run:
    """A started run: the training loop and what it reports."""

    def __init__(self, cfg, s, run_dir, state, data, tokenizer, mngr, start, t0, process_index, process_count, log):
        import jax

        from sc_jax.model import use_cudnn
        from sc_jax.step import peak_flops

        self.cfg, self.s, self.run_dir, self.state, self.data, self.tokenizer = cfg, s, run_dir, state, data, tokenizer
        self.mngr, self.start, self.t0, self.pi, self.pc, self.log = mngr, start, t0, process_index, process_count, log
        self.tokens_per_step, self.flops_step = _step_cost(cfg)
        self.kind = cfg.logging.device_kind or jax.devices()[0].device_kind
        self.peak, self.n_dev = peak_flops(self.kind), jax.device_count()
        self.fused_attention = use_cudnn(cfg.model)
        self.metrics = MetricsLog(run_dir, cfg, start, process_index == 0)
        self.progress = Progress(cfg, cfg.train.steps, t0, process_index == 0)
        self.last_time, self.skipped = time.time(), 0
        self.summary: dict[str, Any] = {"first_loss": None, "last_loss": None}

    def close(self) -> None:
        if self.mngr:
            self.mngr.close()
        self.progress.close()
        self.metrics.close()

    def train(self, preempt: _Preemption) -> dict:
        import jax

        from sc_jax import sharding

        t, s, mngr = self.cfg.train, self.s, self.mngr
        saving = mngr is not None and self.cfg.checkpoint.enabled
        self.progress.print(f"{self.cfg.model.num_params():,} parameters | mesh {dict(s.mesh.shape)} on {self.n_dev} "
                            f"{self.kind} device(s), {self.pc} process(es) | {self.tokens_per_step:,} tokens/step | "
                            f"steps {self.start} -> {t.steps}")
        pending, stopped_by, step_no = None, None, self.start
        with sharding.activation_rules(s.mesh, s.rules):
            for step_no in range(self.start + 1, t.steps + 1):
                self.state, metrics = s.step_fn(self.state, self.to_global(next(self.data)))
                if pending:
                    self.fetch(*pending)
                pending = (step_no, metrics, step_no > self.start + 1)
                if saving and (mngr.should_save(step_no) or step_no == t.steps):
                    self.save(step_no, force=step_no == t.steps)
                if t.eval_every and t.eval_batches and step_no % t.eval_every == 0:
                    self.fetch(*pending)
                    pending = None
                    self.evaluate(step_no)
                _fault_injection_pause(step_no, preempt)
                if _preempted(preempt, step_no, self.pc):
                    stopped_by = preempt.signal or "preemption"
                    break
                if t.stop_after_steps and step_no - self.start >= t.stop_after_steps and step_no < t.steps:
                    stopped_by = "train.stop_after_steps"
                    break
            if pending:
                self.fetch(*pending)
            if stopped_by and saving and step_no not in mngr.all_steps():
                self.save(step_no, force=True)
            evaluated_last = t.eval_every and t.steps % t.eval_every == 0
            if t.eval_batches and not stopped_by and step_no > self.start and not evaluated_last:
                self.evaluate(t.steps)
        if mngr:
            mngr.wait_until_finished()
        final = int(jax.device_get(self.state["step"]))
        if stopped_by:
            self.progress.close()
            self.log(f"stopped by {stopped_by} at step {final}: {self.stop_outcome(final)}")
        self.summary.update(step=final, run_dir=self.run_dir, stopped_by=stopped_by, skipped=self.skipped,
                            state=self.state, setup=s, elapsed=time.time() - self.t0,
                            checkpoints=self.saved_steps(), trained=step_no > self.start)
        return self.summary

    def to_global(self, batch):
        import jax

        cfg = self.cfg
        packed = int(np.max(batch["segment_ids"])) if self.fused_attention and "segment_ids" in batch else 0
        if packed > cfg.model.max_segments:
            raise ConfigError(f"a batch row packs {packed} documents, more than the fused "
                              f"attention's model.max_segments={cfg.model.max_segments}: raise it")
        return {k: jax.make_array_from_process_local_data(self.s.batch_sh, np.asarray(v),
                                                          (cfg.train.global_batch_size, *np.shape(v)[1:]))
                for k, v in batch.items()}

    def fetch(self, step_no: int, metrics, timed: bool) -> None:
        """Step `step_no`'s metrics (it has finished): checks, logs and reports them."""
        import jax

        t = self.cfg.train
        m = jax.device_get(metrics)
        now = time.time()
        dt, self.last_time = now - self.last_time, now
        if not bool(m["finite"]):
            if t.on_nonfinite == "stop":
                raise TrainingError(f"non-finite loss ({float(m['loss'])}) or gradient norm "
                                    f"({float(m['grad_norm'])}) at step {step_no}: the update was not applied; "
                                    "lower optimizer.peak_lr (a new run: --restart or a new train.run_dir), "
                                    "check the data, or set train.on_nonfinite=skip")
            self.skipped += 1
            self.progress.print(f"warning: step {step_no} had a non-finite loss; its update was skipped "
                                f"({self.skipped} so far)")
        rec = {"step": step_no, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens": int(m["tokens"])}
        rec.update({k: float(v) for k, v in m.items() if k not in rec and k not in ("finite",)})
        if timed:  # the first step of a process includes compilation: no speed for it
            rec["tokens_per_sec"] = self.tokens_per_step / dt
            rec["tflops_per_device"] = self.flops_step / dt / self.n_dev / 1e12
            if self.peak:
                rec["mfu"] = self.flops_step / dt / (self.peak * self.n_dev)
        rec.update(self.clock(step_no, now))
        if self.summary["first_loss"] is None:
            self.summary["first_loss"] = rec["loss"]
        self.summary["last_loss"] = rec["loss"]
        if step_no % t.log_every == 0 or step_no == t.steps or step_no == self.start + 1:
            self.metrics.write(rec)
        self.progress.step(rec)

    def clock(self, step_no: int, now: float) -> dict:
        """time (unix seconds), elapsed (seconds since this invocation started) and tokens_seen
        (cumulative over the whole run, resumes included: every step has the same token count)."""
        return {"time": round(now, 3), "elapsed": round(now - self.t0, 3),
                "tokens_seen": step_no * self.tokens_per_step}

    def evaluate(self, step_no: int) -> None:
        cfg = self.cfg
        data = make_data(cfg, cfg.model.vocab_size, self.pi, self.pc, self.tokenizer, eval_=True)
        loss = evaluate(cfg, self.s, self.state, data, self.to_global)
        self.summary["eval_loss"] = loss
        rec = {"step": step_no, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
               **self.clock(step_no, time.time())}
        self.metrics.write(rec)
        self.progress.eval(rec)

    def save(self, step_no: int, force: bool) -> bool:
        from sc_jax import checkpoint

        meta = {"data_state": self.data.get_state(), "config": to_dict(self.cfg)}
        return checkpoint.save_train_state(self.mngr, step_no, self.state, self.cfg.model, meta, force=force)

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


def _fault_injection_pause(step: int, preempt: _Preemption) -> None:
    """Tests of crash recovery set SC_JAX_PAUSE_AT_STEP=N: the run waits after step N
    (N=0: during start-up, before the state is restored or compiled) until a signal
    arrives, or until it is killed."""
    if os.environ.get("SC_JAX_PAUSE_AT_STEP") == str(step):
        print(f"paused at step {step}", flush=True)
        while preempt.signal is None:
            time.sleep(0.05)


def _preempted(preempt: _Preemption, step: int, process_count: int) -> bool:
    if process_count > 1:  # all processes must agree to save together
        from jax.experimental import multihost_utils

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                return True
        except Exception:
            pass
    return preempt.signal is not None


def evaluate(cfg: Config, s: Setup, state, data, to_global) -> float:
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


def _tokenizer_file(path: str) -> str:
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


# ----------------------------------------------------------------------------- CLI

SECTIONS = {
    "model": "the architecture (Hugging Face StableLmConfig names) and numerics; preset: stable-code-3b, "
             "stablelm-3b-4e1t, stablelm-2-1_6b or tiny, the other keys override it",
    "mesh": "devices per mesh axis (-1: the rest), across slices (dcn_*), logical-axis rules",
    "optimizer": "AdamW or RMSProp, warmup then cosine (to min_lr) or constant, gradient clipping",
    "data": "tokenizer, sources and weights, documents, fill-in-the-middle, packing, workers, held-out split",
    "train": "run directory, steps, sequence length, batch, task (pretrain, sft, dpo), data kind, eval, init_from",
    "checkpoint": "how often to save, how many to keep, asynchronous saves",
    "logging": "progress bar or plain lines (print_every steps or print_seconds), TensorBoard, device kind for MFU",
}


def sections_help() -> str:
    """One line per config section, then its keys with their defaults."""
    lines = ["config sections (key.sub=value overrides; --print-config shows the resolved config):"]
    defaults = to_dict(Config())
    for section, about in SECTIONS.items():
        lines += textwrap.wrap(f"  {section:<11} {about}", width=100, subsequent_indent=" " * 14,
                               break_on_hyphens=False)
        keys = ", ".join(f"{k}={_yaml_scalar(v)}" for k, v in defaults[section].items())
        lines += textwrap.wrap(keys, width=100, initial_indent=" " * 14, subsequent_indent=" " * 14,
                               break_on_hyphens=False)
    return "\n".join(lines)


def _yaml_scalar(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None or v == "" else str(v)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line (exit 2), like every other refusal."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sc_jax.train", description=__doc__, epilog=sections_help(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML config (the sections below; default: the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides on top of --config, e.g. train.steps=100 model.remat=full")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults, --config, overrides) as YAML and exit")
    parser.add_argument("--restart", action="store_true",
                        help="start over: move an existing train.run_dir to RUN.old-<time> (nothing is deleted) "
                             "instead of resuming it")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="host:port of process 0 (multi-process runs off TPU pods and SLURM)")
    parser.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator: how many processes")
    parser.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: this process's index, 0..N-1")
    return parser


def done_lines(summary: dict) -> list[str]:
    """The end of a run: where it got, how long it took, where its outputs are, how to export."""
    run_dir, step = summary["run_dir"], summary["step"]
    head = f"{'done' if not summary['stopped_by'] else 'stopped'}: step {step}"
    if summary["first_loss"] is not None:
        head += f", loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
    elif not summary.get("trained"):
        head += " (already there: nothing to train)"
    if summary.get("eval_loss") is not None:
        head += f", eval loss {summary['eval_loss']:.4f}"
    head += f", {duration(summary['elapsed'])}"
    steps = summary.get("checkpoints") or []
    outputs = ["config.yaml", "metrics.jsonl"] + (["tb/"] if os.path.isdir(os.path.join(run_dir, "tb")) else [])
    outputs.append(f"checkpoints/ (steps {', '.join(map(str, steps))})" if steps else "no checkpoints")
    lines = [head, f"  run directory {run_dir}: {', '.join(outputs)}"]
    if steps:
        lines.append(f"  export: python -m sc_jax.convert orbax-to-hf --ckpt {shlex.quote(run_dir)} "
                     f"--out {shlex.quote(run_dir + '-hf')}")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        init_distributed(args.coordinator, args.num_processes, args.process_id)
        summary = run(cfg, restart=args.restart)
    except (ConfigError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Interrupted, or Ctrl-C before run() took over the signals
        name = getattr(e, "signal", "SIGINT")
        print(f"interrupted by {name} during start-up: nothing was saved", file=sys.stderr, flush=True)
        return 128 + signal.Signals[name].value
    for line in done_lines(summary):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
