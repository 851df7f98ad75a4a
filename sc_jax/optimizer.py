"""Optimizers and learning-rate schedules (Stable Code defaults).

AdamW b1 0.9, b2 0.95, eps 1e-6, weight decay 0.1 (not on biases and norm scales),
linear warmup to 3.2e-4 then cosine decay to 3.2e-5, global-norm clipping at 1.0.
RMSProp is there for DPO (Stable Code Instruct: peak 5e-7).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from sc_jax.config import ConfigError


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | rmsprop
    peak_lr: float = 3.2e-4
    min_lr: float = 3.2e-5  # the cosine floor
    warmup_steps: int | None = None  # None: warmup_fraction of the run
    warmup_fraction: float = 0.005
    schedule: str = "cosine"  # cosine | constant
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    moments_dtype: str = "float32"  # bfloat16 halves the optimizer's memory
    rmsprop_decay: float = 0.9

    def validate(self, total_steps: int) -> "OptimizerConfig":
        """Refuses values that would train wrongly rather than fail (a negative learning rate
        ascends the loss, a warmup longer than the run never reaches peak_lr)."""
        _choice("optimizer.name", self.name, ("adamw", "rmsprop"))
        _choice("optimizer.schedule", self.schedule, ("cosine", "constant"))
        _choice("optimizer.moments_dtype", self.moments_dtype, ("float32", "bfloat16"))
        _within("optimizer.peak_lr", self.peak_lr, 0, float("inf"), high_open=True)
        if self.schedule == "cosine":  # the floor of the cosine; a constant schedule has none
            _within("optimizer.min_lr", self.min_lr, 0, self.peak_lr, hint=f"the cosine floor, at most "
                    f"optimizer.peak_lr {self.peak_lr}")
        for key in ("b1", "b2", "rmsprop_decay"):
            _within(f"optimizer.{key}", getattr(self, key), 0, 1, high_open=True)
        _within("optimizer.eps", self.eps, 0, float("inf"), low_open=True, high_open=True)
        _within("optimizer.weight_decay", self.weight_decay, 0, float("inf"), high_open=True)
        if self.clip_norm is not None:
            _within("optimizer.clip_norm", self.clip_norm, 0, float("inf"), low_open=True, high_open=True,
                    hint="null turns clipping off")
        _within("optimizer.warmup_fraction", self.warmup_fraction, 0, 1)
        if self.warmup_steps is not None:
            _within("optimizer.warmup_steps", self.warmup_steps, 0, total_steps,
                    hint=f"at most train.steps {total_steps}, or the learning rate never reaches peak_lr")
        return self


def _choice(where: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{where} '{value}' must be {' or '.join(options)}")


def _within(where: str, value, low, high, *, low_open=False, high_open=False, hint="") -> None:
    """value in [low, high] (open ends as asked); NaN is always refused."""
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == float("inf"):
            want = "positive" if low_open else f"at least {low}"
        else:
            want = f"within {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{where} must be {want}, got {value}" + (f" ({hint})" if hint else ""))


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_fraction * total_steps))
    warmup = max(0, min(warmup, total_steps))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.peak_lr)
    elif cfg.schedule == "cosine":
        decay = max(1, total_steps - warmup)
        after = optax.cosine_decay_schedule(cfg.peak_lr, decay, alpha=cfg.min_lr / cfg.peak_lr if cfg.peak_lr else 0.0)
    else:
        raise ConfigError(f"optimizer.schedule '{cfg.schedule}' must be cosine or constant")
    if warmup == 0:
        return after
    # Step s of warmup trains with peak * (s+1)/warmup: the first step is never at lr 0.
    ramp = lambda step: cfg.peak_lr * jnp.minimum(step + 1, warmup) / warmup  # noqa: E731
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(params):
    """Weight decay on matrices and embeddings only: never on biases or norm scales."""
    def decays(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any("norm" in n or "bias" in n for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(cfg, total_steps)
    mu_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(cfg.moments_dtype)
    if mu_dtype is None:
        raise ConfigError(f"optimizer.moments_dtype must be float32 or bfloat16, got '{cfg.moments_dtype}'")
    if cfg.name == "adamw":
        core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask, mu_dtype=mu_dtype)
    elif cfg.name == "rmsprop":
        core = optax.rmsprop(schedule, decay=cfg.rmsprop_decay, eps=cfg.eps)
    else:
        raise ConfigError(f"optimizer.name '{cfg.name}' must be adamw or rmsprop")
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    return optax.chain(*parts, core), schedule
