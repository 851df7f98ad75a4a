"""Orbax checkpoints.

Layout: a checkpoint directory is an orbax `CheckpointManager` directory with one
sub-directory per step; a training run keeps its own in `RUN/checkpoints/`. Each
step holds the items
    params      the model parameters (a pure dict, fp32 master weights)
    opt_state   the optimizer state (training checkpoints only)
    model       the ModelConfig as JSON
    meta        JSON: step, the resolved run config, the data iterator state
Orbax writes each step to a temporary directory and renames it when complete, so
a crash never leaves a half-written step that looks valid.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sc_jax.config import ConfigError, ModelConfig, from_dict

CHECKPOINTS = "checkpoints"
# orbax reports every read-only open and every item it was not asked to restore at WARNING.
logging.getLogger("absl").setLevel(logging.ERROR)


def manager(directory: str, *, save_every: int = 1, keep: int | None = None, keep_period: int | None = None,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        # Save on multiples of save_every only (orbax would also save the first step it sees).
        should_save_fn=lambda step, _last: step % save_every == 0, max_to_keep=keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(os.path.join(path, "model"))


def resolve(path: str, step: int | None = None) -> tuple[str, int]:
    """(manager directory, step) for a run directory, a checkpoint directory or a step directory."""
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint path '{path}' does not exist")
    if _is_step_dir(path):
        return os.path.dirname(os.path.normpath(path)), int(os.path.basename(os.path.normpath(path)))
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        path = os.path.join(path, CHECKPOINTS)
    steps = valid_steps(path)
    if not steps:
        raise ConfigError(f"'{path}' holds no complete orbax checkpoint (expected step directories)")
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise ConfigError(f"step {step} is not among the checkpoints in '{path}': {steps}")
    return path, step


def valid_steps(directory: str) -> list[int]:
    """Finalised step directories, oldest first (orbax's temporaries are skipped)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d, "model")))


def load_model_config(path: str, step: int | None = None) -> ModelConfig:
    directory, step = resolve(path, step)
    with manager(directory, read_only=True) as mngr:
        data = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
    return from_dict(ModelConfig, data).validate()


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs for restore, carrying the target shardings (resharding on load)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_params(path: str, step: int | None = None, target: Any = None) -> tuple[ModelConfig, Any, int]:
    """Restores parameters (as a pure dict). `target`: a tree of ShapeDtypeStructs with
    shardings to restore onto (any mesh); None restores onto the default device."""
    directory, step = resolve(path, step)
    model_cfg = load_model_config(directory, step)
    with manager(directory, read_only=True) as mngr:
        if target is None:
            meta = mngr.item_metadata(step)["params"]
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                 sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                                  meta)
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return model_cfg, params, step


def save_params(out_dir: str, params: Any, model_cfg: ModelConfig, step: int = 0) -> None:
    """Writes a parameters-only checkpoint into the (new or empty) directory out_dir."""
    with manager(out_dir, async_save=False) as mngr:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            model=ocp.args.JsonSave(dataclasses.asdict(model_cfg))))
        mngr.wait_until_finished()


def to_numpy(tree):
    """Gathers a (possibly sharded) tree onto the host as numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ----------------------------------------------------------------------------- training state


def save_train_state(mngr: ocp.CheckpointManager, step: int, state: dict, model_cfg: ModelConfig, meta: dict,
                     force: bool = False) -> bool:
    """Queues an (async) save of {params, opt_state} plus the model config and `meta`
    (resolved run config, data iterator state). Returns whether a save was started."""
    return mngr.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        model=ocp.args.JsonSave(dataclasses.asdict(model_cfg)),
        meta=ocp.args.JsonSave({"step": int(step), **meta})))


def restore_train_state(mngr: ocp.CheckpointManager, abstract_state: dict, log=print) -> tuple[dict, dict] | None:
    """Restores the newest checkpoint that reads back whole onto `abstract_state`'s
    shardings (any mesh). A corrupt or incomplete newest step is reported and the one
    before it is tried. Returns (state, meta) or None when there is nothing to resume."""
    for step in reversed(valid_steps(str(mngr.directory))):
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state["params"]),
                opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            log(f"warning: checkpoint step {step} in {mngr.directory} could not be restored "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); falling back to the previous one")
            continue
        meta = restored["meta"]
        state = {"step": jax.device_put(np.asarray(meta["step"], np.int32), abstract_state["step"].sharding),
                 "params": restored["params"], "opt_state": restored["opt_state"]}
        return state, meta
    return None
