"""A run's state and what it is compiled for: the mesh, shardings, optimizer and jitted steps
(setup, shared with sc_jax.plan), and the state itself: fresh, from `train.init_from`, or
restored from the run directory's checkpoints."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from sc_jax.config import ConfigError


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


def setup(cfg) -> Setup:
    """The mesh, shardings, optimizer and jitted step for `cfg` (shared with sc_jax.plan)."""
    import jax
    from flax import nnx

    from sc_jax import model as M, sharding, tasks
    from sc_jax.optimizer import make_optimizer
    from sc_jax.train.step import make_train_step

    mesh = sharding.build_mesh(cfg.mesh)
    rules = sharding.rules_for(cfg.mesh)
    _check_batch_split(cfg, mesh)
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
    step = make_train_step(graphdef, tx, schedule, micro_batches=cfg.train.micro_batches, z_loss=cfg.train.z_loss,
                           loss_fn=tasks.loss_fn(cfg))
    step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
    eval_fn = jax.jit(tasks.eval_fn(cfg, graphdef), in_shardings=(param_sh, batch_sh, state_sh.get("ref_params")))
    return Setup(mesh, rules, graphdef, abs_train_state, state_sh, batch_sh, tx, schedule, step_fn, param_sh, eval_fn)


def _check_batch_split(cfg, mesh) -> None:
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    per_micro = cfg.train.global_batch_size // cfg.train.micro_batches
    if per_micro % batch_ways:
        raise ConfigError(f"a micro-batch of {per_micro} sequences (train.global_batch_size / train.micro_batches) "
                          f"cannot be split over data x fsdp = {batch_ways} devices: make it a multiple of {batch_ways}")


def _opt_shardings(tx, abs_opt, param_sh, replicated):
    """Optimizer moments are sharded like their parameters; counters are replicated."""
    import jax
    import optax

    mapped = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    return jax.tree.map(lambda s: s if s is not None else replicated, mapped,
                        is_leaf=lambda x: x is None or hasattr(x, "spec"))


def init_state(cfg, s: Setup, log) -> dict:
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


def reference_params(cfg, s: Setup, log):
    """DPO's frozen reference: the `train.init_from` model, loaded as its own buffers
    (the policy's are donated every step). Never checkpointed: reloaded on resume."""
    if not cfg.train.init_from:
        raise ConfigError("train.task=dpo needs train.init_from (the SFT model, which is also the reference)")
    return load_init_params(cfg, s, log)


def load_init_params(cfg, s: Setup, log):
    """Parameters from a HF directory or an orbax checkpoint, each placed straight onto
    this mesh's shardings (a host reads only its shards; no whole host copy)."""
    from sc_jax import checkpoint
    from sc_jax.loading import load_params

    path = cfg.train.init_from
    target = checkpoint.abstract_like(s.abs_state["params"], s.param_sh)
    src_cfg, params = load_params(path, target=target, log=log)
    log(f"initialised parameters from {path} ({src_cfg.num_params():,} parameters)")
    differences = model_differences(src_cfg, cfg.model)
    if differences:  # deliberate in a recipe (stage 2 raises rope_theta), but never silent
        log(f"note: the configured model differs from train.init_from's in {', '.join(differences)}: "
            "the configured values are used")
    return params


# What the architecture computes, as opposed to how it is run (dtype, remat, attention path, ...).
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "partial_rotary_factor", "rope_theta", "max_position_embeddings",
                     "layer_norm_eps", "use_qkv_bias", "qk_layernorm", "use_parallel_residual", "tie_word_embeddings",
                     "bos_token_id", "eos_token_id")


def model_differences(source, configured) -> list[str]:
    """'key source -> configured' for each architecture key where two ModelConfigs differ."""
    return [f"{k} {getattr(source, k)} -> {getattr(configured, k)}" for k in ARCHITECTURE_KEYS
            if getattr(source, k) != getattr(configured, k)]


# ----------------------------------------------------------------------------- checkpoints


def manager(cfg, run_dir: str):
    """The run directory's checkpoint manager, saving as the checkpoint section says."""
    from sc_jax import checkpoint

    c = cfg.checkpoint
    return checkpoint.manager(os.path.join(run_dir, checkpoint.CHECKPOINTS), save_every=c.every, keep=c.keep,
                              keep_period=c.keep_period, async_save=c.async_save)


def restore(cfg, s: Setup, run_dir: str, log, check_meta):
    """(checkpoint manager, (state, meta) or None) from the run directory's checkpoints; (None, None)
    when it has none. `check_meta(meta)` may refuse a checkpoint before any array is read."""
    from sc_jax import checkpoint

    if not os.path.isdir(os.path.join(run_dir, checkpoint.CHECKPOINTS)):
        return None, None
    mngr = manager(cfg, run_dir)
    trained = {k: v for k, v in s.abs_state.items() if k != "ref_params"}
    target = checkpoint.abstract_like(trained, {k: s.state_sh[k] for k in trained})
    try:
        return mngr, checkpoint.restore_train_state(mngr, target, log, check_meta=check_meta)
    except BaseException:
        mngr.close()
        raise


def save(mngr, step: int, state: dict, cfg, data_state: dict, force: bool) -> bool:
    """Queues an (async) save of the state, every process's data iterator state and the
    resolved config. Each host reads its own slice of the data, so each needs its own state
    back: `data_states[i]` is process i's; `data_state` (process 0's) is what older code reads."""
    from sc_jax import checkpoint
    from sc_jax.config import to_dict
    from sc_jax.multihost import gather_json

    states = gather_json(data_state)
    meta = {"data_state": states[0], "data_states": states, "config": to_dict(cfg)}
    return checkpoint.save_train_state(mngr, step, state, cfg.model, meta, force=force)


def own_data_state(meta: dict, process_index: int, process_count: int) -> dict:
    """This process's data iterator state from a checkpoint's meta. A checkpoint from older
    code, or saved with another process count, has only process 0's (the data pipeline then
    says whether that can resume here)."""
    states = meta.get("data_states")
    if states and len(states) == process_count:
        return states[process_index]
    return meta["data_state"]
