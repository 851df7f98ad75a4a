"""The run config: the sections a training YAML holds, their validation, and which keys a
resumed run may change (RESUME_SAFE)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sc_jax.config import ConfigError, ModelConfig, from_dict, known_only, load_yaml, model_preset, to_dict
from sc_jax.data.config import LEGACY_WEIGHT_UNIT, DataConfig
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
               "model.max_segments", "model.loss_tile", "model.preset", "data.on_source_change", "mesh.", "checkpoint.", "logging.")


def resume_safe(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE)


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key where `cfg` differs from a saved config (a
    checkpoint's meta or config.yaml, perhaps written by another version: keys it lacks take
    their defaults, keys this version does not know are ignored)."""
    known = with_legacy_values(known_only(Config, saved))
    try:
        known = to_dict(from_dict(Config, known))
    except ConfigError:  # a value this version reads differently: compare what is there
        pass
    old, new = by_key(known), by_key(to_dict(cfg))
    return [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]


# Keys whose value, in a config saved before they existed, is not today's default (what that code
# did), and which a resumed run keeps from its saved config unless given another value than the default.
LEGACY_VALUES = {("data", "weight_unit"): LEGACY_WEIGHT_UNIT}


def with_legacy_values(saved: dict) -> dict:
    """A saved config dict with the LEGACY_VALUES of the keys it lacks (in sections it has)."""
    out = dict(saved)
    for (section, key), value in LEGACY_VALUES.items():
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section] = {**out[section], key: value}
    return out


def keep_saved_values(saved: dict, cfg: Config) -> list[str]:
    """Before a resume: the LEGACY_VALUES keys left at today's default take the saved run's value
    (a run mixed by documents goes on mixed by documents); returns notes for the log."""
    notes = []
    saved = with_legacy_values(known_only(Config, saved))
    for (section, key), _ in LEGACY_VALUES.items():
        if not isinstance(saved.get(section), dict):  # with_legacy_values gave every saved section its key
            continue
        part = getattr(cfg, section)
        default = getattr(type(part)(), key)
        was = saved[section][key]
        if getattr(part, key) == default and was != default:
            setattr(part, key, was)
            if key == "weight_unit" and len(cfg.data.sources) < 2:
                continue  # one source: nothing is mixed, nothing to say
            notes.append(f"{section}.{key}: the resumed run keeps its saved value {was!r} (today's default is "
                         f"{default!r}; --restart to start over with it)")
    return notes


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
