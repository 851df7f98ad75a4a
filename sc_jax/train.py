"""Training: `python -m sc_jax.train --config FILE [key.sub=value ...]`.

One loop for pre-training, SFT and DPO on any mesh: build the mesh, initialise or
restore the sharded state, then dispatch jitted steps, fetching each step's metrics
only after the next one is dispatched so the host never stalls the device.

Multi-host: `jax.distributed.initialize` is called automatically on TPU pods and
under SLURM, or explicitly with --coordinator/--num-processes/--process-id.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import numpy as np

from sc_jax.config import ConfigError, ModelConfig, dump_yaml, load_yaml, model_preset, to_dict
from sc_jax.data.config import DataConfig
from sc_jax.optimizer import OptimizerConfig
from sc_jax.sharding import MeshConfig


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
    enabled: bool = True
    every: int = 1000
    keep: int | None = 3
    keep_period: int | None = None  # also keep every N-th step forever
    async_save: bool = True


@dataclasses.dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = True
    device_kind: str | None = None  # overrides the detected kind for MFU (e.g. "h100")


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
        return self


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    return load_yaml(Config, path, overrides).validate()


class TrainingError(RuntimeError):
    """A run that must stop; the message says why and at which step."""


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
    """metrics.jsonl (one object per logged step), TensorBoard, and the progress bar."""

    def __init__(self, run_dir: str, cfg: Config, total: int, start: int, is_main: bool):
        self.is_main, self.path = is_main, os.path.join(run_dir, "metrics.jsonl")
        self.tb = self.bar = None
        if not is_main:
            return
        _truncate_after(self.path, start)  # steps after the resumed checkpoint are redone
        if cfg.logging.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.bar:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record.get('lr', 0):.2e}",
                                 tok_s=f"{record.get('tokens_per_sec', 0):.0f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar:
            self.bar.update(n)

    def print(self, msg: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar else print)(msg)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- the run


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the current step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

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
    """Parameters from a HF directory or an orbax checkpoint, placed on this mesh."""
    import jax

    from sc_jax import checkpoint
    from sc_jax.convert import load_hf

    path = cfg.train.init_from
    target = checkpoint.abstract_like(s.abs_state["params"], s.param_sh)
    if os.path.exists(os.path.join(path, "config.json")):
        src_cfg, params = load_hf(path)
        _check_same_shapes(params, target, path)
        params = jax.tree.map(lambda a, t: jax.device_put(a.astype(t.dtype), t.sharding), params, target)
    else:
        try:
            src_cfg, params, _ = checkpoint.load_params(path, target=target)
        except ValueError as e:
            raise ConfigError(f"train.init_from '{path}' does not match the configured model ({str(e)[:200]}): "
                              "set the model section (preset, sizes) to the checkpoint's architecture") from None
    log(f"initialised parameters from {path} ({src_cfg.num_params():,} parameters)")
    return params


def _check_same_shapes(params, target, path):
    import jax

    got = jax.tree.map(lambda a: tuple(a.shape), params)
    want = jax.tree.map(lambda a: tuple(a.shape), target)
    if got != want:
        raise ConfigError(f"train.init_from '{path}' does not match the configured model's shapes: "
                          "set the model section (preset, sizes) to the checkpoint's architecture")


def run(cfg: Config) -> dict:
    """Trains to cfg.train.steps (resuming from the run directory). Returns a summary."""
    import jax

    from sc_jax import checkpoint, sharding
    from sc_jax.model import use_cudnn
    from sc_jax.step import flops_per_token, peak_flops

    cfg.validate()
    t = cfg.train
    pi, pc = jax.process_index(), jax.process_count()
    is_main = pi == 0
    run_dir = os.path.abspath(t.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    if is_main:
        dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))

    tokenizer = None
    if t.data == "pipeline":
        from sc_jax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(cfg.data.tokenizer)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                              f"{cfg.model.vocab_size}: raise model.vocab_size")
        if is_main and not os.path.exists(os.path.join(run_dir, "tokenizer.json")):
            shutil.copy(_tokenizer_file(cfg.data.tokenizer), os.path.join(run_dir, "tokenizer.json"))

    s = setup(cfg)
    mngr = checkpoint.manager(os.path.join(run_dir, checkpoint.CHECKPOINTS), save_every=cfg.checkpoint.every,
                              keep=cfg.checkpoint.keep, keep_period=cfg.checkpoint.keep_period,
                              async_save=cfg.checkpoint.async_save) if cfg.checkpoint.enabled else None
    log_fn = print if is_main else (lambda *_: None)
    data = make_data(cfg, cfg.model.vocab_size, pi, pc, tokenizer)
    trained = {k: v for k, v in s.abs_state.items() if k != "ref_params"}
    restored = checkpoint.restore_train_state(
        mngr, checkpoint.abstract_like(trained, {k: s.state_sh[k] for k in trained}), log_fn) if mngr else None
    if restored:
        state, meta = restored
        data.set_state(meta["data_state"])
        if cfg.train.task == "dpo":
            state["ref_params"] = reference_params(cfg, s, log_fn)
        log_fn(f"resumed from step {meta['step']} in {run_dir}")
    else:
        state = init_state(cfg, s, log_fn)
    start = int(jax.device_get(state["step"]))

    tokens_per_step = t.global_batch_size * t.seq_len
    flops_step = flops_per_token(cfg.model, t.seq_len) * tokens_per_step
    if t.task == "dpo":  # each row is a chosen and a rejected sequence, each also run forward by the reference
        tokens_per_step *= 2
        flops_step *= 2 * 8 / 6
    kind = cfg.logging.device_kind or jax.devices()[0].device_kind
    peak = peak_flops(kind)
    n_dev = jax.device_count()
    log = MetricsLog(run_dir, cfg, t.steps, start, is_main)
    log.print(f"{cfg.model.num_params():,} parameters | mesh {dict(s.mesh.shape)} on {n_dev} {kind} device(s), "
              f"{pc} process(es) | {tokens_per_step:,} tokens/step | steps {start} -> {t.steps}")

    fused_attention = use_cudnn(cfg.model)

    def to_global(batch):
        if fused_attention and "segment_ids" in batch and int(np.max(batch["segment_ids"])) > cfg.model.max_segments:
            raise ConfigError(f"a batch row packs {int(np.max(batch['segment_ids']))} documents, more than the fused "
                              f"attention's model.max_segments={cfg.model.max_segments}: raise it")
        return {k: jax.make_array_from_process_local_data(s.batch_sh, np.asarray(v),
                                                          (t.global_batch_size, *np.shape(v)[1:]))
                for k, v in batch.items()}

    pending, last_time, skipped, stopped_by = None, time.time(), 0, None
    summary: dict[str, Any] = {"first_loss": None, "last_loss": None}

    def fetch(pending):
        nonlocal last_time, skipped
        step_no, metrics, timed = pending
        m = jax.device_get(metrics)
        now = time.time()
        dt, last_time = now - last_time, now
        if not bool(m["finite"]):
            if t.on_nonfinite == "stop":
                raise TrainingError(f"non-finite loss ({float(m['loss'])}) or gradient norm "
                                    f"({float(m['grad_norm'])}) at step {step_no}: the update was not applied; "
                                    "lower optimizer.peak_lr, check the data, or set train.on_nonfinite=skip")
            skipped += 1
            log.print(f"warning: step {step_no} had a non-finite loss; its update was skipped ({skipped} so far)")
        rec = {"step": step_no, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens": int(m["tokens"])}
        rec.update({k: float(v) for k, v in m.items() if k not in rec and k not in ("finite",)})
        if timed:  # the first step of a process includes compilation: no speed for it
            rec["tokens_per_sec"] = tokens_per_step / dt
            rec["tflops_per_device"] = flops_step / dt / n_dev / 1e12
            if peak:
                rec["mfu"] = flops_step / dt / (peak * n_dev)
        summary["first_loss"] = summary["first_loss"] if summary["first_loss"] is not None else rec["loss"]
        summary["last_loss"] = rec["loss"]
        if step_no % t.log_every == 0 or step_no == t.steps or step_no == start + 1:
            log.write(rec)

    def run_eval():
        return evaluate(cfg, s, state, make_data(cfg, cfg.model.vocab_size, pi, pc, tokenizer, eval_=True), to_global)

    try:
        with _Preemption() as preempt, sharding.activation_rules(s.mesh, s.rules):
            for step_no in range(start + 1, t.steps + 1):
                batch = to_global(next(data))
                state, metrics = s.step_fn(state, batch)
                if pending:
                    fetch(pending)
                pending = (step_no, metrics, step_no > start + 1)
                log.advance()
                if mngr and (mngr.should_save(step_no) or step_no == t.steps):
                    checkpoint.save_train_state(mngr, step_no, state, cfg.model,
                                                {"data_state": data.get_state(), "config": to_dict(cfg)},
                                                force=step_no == t.steps)
                if t.eval_every and t.eval_batches and step_no % t.eval_every == 0:
                    fetch(pending)
                    pending = None
                    summary["eval_loss"] = run_eval()
                    log.write({"step": step_no, "eval_loss": summary["eval_loss"],
                               "eval_perplexity": math.exp(min(summary["eval_loss"], 50.0))})
                _fault_injection_pause(step_no, preempt)
                if _preempted(preempt, step_no, pc):
                    stopped_by = preempt.signal or "preemption"
                    break
                if t.stop_after_steps and step_no - start >= t.stop_after_steps and step_no < t.steps:
                    stopped_by = "train.stop_after_steps"
                    break
            if pending:
                fetch(pending)
            if stopped_by and mngr and step_no not in mngr.all_steps():
                checkpoint.save_train_state(mngr, step_no, state, cfg.model,
                                            {"data_state": data.get_state(), "config": to_dict(cfg)}, force=True)
            if t.eval_batches and not stopped_by and (not t.eval_every or t.steps % t.eval_every):
                summary["eval_loss"] = run_eval()
                log.write({"step": t.steps, "eval_loss": summary["eval_loss"],
                           "eval_perplexity": math.exp(min(summary["eval_loss"], 50.0))})
        if mngr:
            mngr.wait_until_finished()
    finally:  # a failed run must not leave an open checkpoint manager or event file
        if mngr:
            mngr.close()
        log.close()
    final = int(jax.device_get(state["step"]))
    if stopped_by:
        log_fn(f"stopped by {stopped_by} at step {final}: checkpoint saved in {run_dir}; rerun the same command to resume")
    summary.update(step=final, run_dir=run_dir, stopped_by=stopped_by, skipped=skipped, state=state, setup=s)
    return summary


def _fault_injection_pause(step: int, preempt: _Preemption) -> None:
    """Tests of crash recovery set SC_JAX_PAUSE_AT_STEP=N: the run waits after step N
    until a signal arrives, or until it is killed."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sc_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (sections: model, mesh, optimizer, data, train, checkpoint, logging)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100 model.remat=full")
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-process runs off TPU/SLURM)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        init_distributed(args.coordinator, args.num_processes, args.process_id)
        summary = run(cfg)
    except (ConfigError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["first_loss"] is not None:
        print(f"done: step {summary['step']}, loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
              f"run directory {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
