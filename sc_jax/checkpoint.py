"""Orbax checkpoints.

Layout: a checkpoint directory is an orbax `CheckpointManager` directory with one
sub-directory per step; a training run keeps its own in `RUN/checkpoints/`. Each
step holds the items
    params      the model parameters (a pure dict: fp32 master weights in training runs;
                a conversion keeps the Hugging Face checkpoint's dtype unless told otherwise)
    opt_state   the optimizer state (training checkpoints only)
    model       the ModelConfig as JSON
    meta        JSON: step, the resolved run config, the data iterator state
Orbax writes each step to a temporary directory and renames it when complete, so
a crash never leaves a half-written step that looks valid. A training step that does
not read back is moved to checkpoints/damaged/ (orbax ignores it there).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint.checkpoint_utils import STANDARD_ARRAY_TYPES
from orbax.checkpoint._src.serialization import ocdbt_utils, tensorstore_utils, type_handlers

from sc_jax.config import ConfigError, ModelConfig, from_dict
from sc_jax.fileio import unused_path
from sc_jax.loading import CHECKPOINTS  # noqa: F401 - a run's checkpoint directory, named once
from sc_jax.pytree import dotted, get_path, set_path

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


class DamagedCheckpoint(ConfigError):
    """A step directory that looks complete but does not read back."""


class RestoreOutOfMemory(ConfigError):
    """A checkpoint that does not fit where it is being restored: not damage."""


def _damaged(directory: str, step: int, e: Exception) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"checkpoint step {step} in {directory} could not be read "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")


def load_model_config(path: str, step: int | None = None) -> ModelConfig:
    directory, step = resolve(path, step)
    try:
        with manager(directory, read_only=True) as mngr:
            data = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
    except Exception as e:  # orbax raises many types for a damaged step
        raise _damaged(directory, step, e) from None
    return from_dict(ModelConfig, data).validate()


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs for restore, carrying the target shardings (resharding on load)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def candidate_steps(path: str, step: int | None = None) -> tuple[str, list[int]]:
    """(manager directory, the steps to try in order) for `path`: only the named step when
    `step` is given or `path` is a step directory, else every step, newest first (so that
    a newest step that does not read back falls back to the one before it)."""
    directory, chosen = resolve(path, step)
    if step is not None or _is_step_dir(path):
        return directory, [chosen]
    return directory, list(reversed(valid_steps(directory)))


def first_readable(path: str, step: int | None, load: Callable[[str, int], Any], log=print,
                   instead: str = "using") -> tuple[Any, int]:
    """(load(directory, step), step) for the first of `candidate_steps` that reads back;
    each one that does not is reported through `log`."""
    directory, candidates = candidate_steps(path, step)
    for n, candidate in enumerate(candidates):
        try:
            return load(directory, candidate), candidate
        except DamagedCheckpoint as e:
            if n + 1 == len(candidates):
                raise
            log(f"warning: {e}; {instead} step {candidates[n + 1]} instead")
    raise AssertionError("unreachable")


def load_params(path: str, step: int | None = None, target: Any = None, log=print) -> tuple[ModelConfig, Any, int]:
    """Restores parameters (as a pure dict). `target`: a tree of ShapeDtypeStructs with
    shardings to restore onto (any mesh; each host reads only its shards; it must name
    every stored parameter); None restores onto the default device. Without a step (an
    argument or a step directory), an unreadable newest step is reported and the one
    before it used."""
    (model_cfg, params), step = first_readable(path, step, lambda d, s: _load_step_params(d, s, target), log)
    return model_cfg, params, step


def _load_step_params(directory: str, step: int, target: Any) -> tuple[ModelConfig, Any]:
    model_cfg = load_model_config(directory, step)
    if target is not None:  # one leaf at a time: only one leaf's stored copy exists beside the result
        with ParamReader(directory, step) as reader:
            reader.check_shapes(jax.tree_util.tree_map(lambda t: t.shape, target), "the configured model")
            return model_cfg, jax.tree_util.tree_map_with_path(
                lambda p, t: reader.read(dotted(p), t.dtype, t.sharding), target)
    try:
        with manager(directory, read_only=True) as mngr:
            meta = mngr.item_metadata(step)["params"]
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
            params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    except Exception as e:
        raise _damaged(directory, step, e) from None
    return model_cfg, params


class ParamReader:
    """One step's parameters read one leaf at a time, as numpy, without restoring the
    rest: `with ParamReader(dir, step) as r: r.read("model.norm.weight")`."""

    def __init__(self, path: str, step: int | None = None):
        self.directory, self.step = resolve(path, step)

    def __enter__(self) -> "ParamReader":
        self.model_config = load_model_config(self.directory, self.step)
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers={"params": ocp.PyTreeCheckpointHandler()})
        try:
            meta = self._mngr.item_metadata(self.step)["params"]
            self.specs = {dotted(p): (tuple(m.shape), np.dtype(m.dtype))
                          for p, m in jax.tree_util.tree_leaves_with_path(meta)}
        except Exception as e:
            self._mngr.close()
            raise _damaged(self.directory, self.step, e) from None
        return self

    def __exit__(self, *exc) -> None:
        self._mngr.close()

    def check_shapes(self, want: dict | Any, what: str) -> None:
        """The stored parameters are exactly those of `want` ({dotted path: shape} or a tree
        of shapes), with those shapes."""
        if not isinstance(want, dict) or any(isinstance(v, dict) for v in want.values()):
            want = {dotted(p): s for p, s in jax.tree_util.tree_leaves_with_path(want, is_leaf=_is_shape)}
        extra = sorted(set(self.specs) - set(want))
        if extra:
            raise ConfigError(f"checkpoint step {self.step} in {self.directory} has parameter {extra[0]}, which "
                              f"{what} lacks: set the model section (preset, sizes) to the checkpoint's architecture")
        for path, shape in want.items():
            if path not in self.specs:
                raise ConfigError(f"parameter {path} of {what} is missing from checkpoint step {self.step} in "
                                  f"{self.directory}: set the model section (preset, sizes) to the checkpoint's")
            if self.specs[path][0] != tuple(shape):
                raise ConfigError(f"parameter {path} is {list(self.specs[path][0])} in checkpoint step {self.step} "
                                  f"of {self.directory} but {list(shape)} in {what}: set the model section "
                                  "(preset, sizes) to the checkpoint's architecture")

    def read(self, path: str, dtype=None, sharding=None):
        """One leaf as numpy, or as a jax.Array on `sharding` (each host reads its shards)."""
        shape, stored = self.specs[path]
        dtype = dtype or stored
        item, args = {}, {}
        set_path(item, path, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
        set_path(args, path, ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype) if sharding is None else
                 ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, global_shape=shape))
        try:
            restored = self._mngr.restore(self.step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
                item, restore_args=args, partial_restore=True)))["params"]
        except Exception as e:
            raise _damaged(self.directory, self.step, e) from None
        return get_path(restored, path)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """A parameter `save_params` writes without holding it beforehand: orbax asks for its
    data (`produce()`) only when it writes it, one leaf at a time."""

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]


class _LazyArrayHandler(type_handlers.NumpyHandler):
    """Writes LazyArray leaves exactly as orbax writes numpy arrays (same files, same
    metadata: they restore as any saved array), but one after another, so that one
    leaf's data exists at a time."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _write_one(self, value: LazyArray, info, arg) -> None:
        arr = value.produce()
        if tuple(arr.shape) != tuple(value.shape) or arr.dtype != value.dtype:
            raise ValueError(f"{info.name}: produced {arr.shape} {arr.dtype}, declared {value.shape} {value.dtype}")
        spec = tensorstore_utils.build_array_write_spec(
            info=info, arg=arg, global_shape=arr.shape, local_shape=arr.shape, dtype=arr.dtype,
            use_ocdbt=info.is_ocdbt_checkpoint, metadata_key=self._metadata_key,
            process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
        store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
        await store.write(arr, can_reference_source_data_indefinitely=True)

    async def _background_serialize(self, values, infos, args=None):
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            await self._write_one(value, info, arg)

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [ocp_future.CommitFutureAwaitingContractedSignals(self._background_serialize(values, infos, args),
                                                                 name="lazy_array_handler")]


ocp.type_handlers.register_type_handler(LazyArray, _LazyArrayHandler(), override=True)


def _params_handler() -> ocp.StandardCheckpointHandler:
    """The handler every parameters item is saved with, accepting LazyArray leaves too
    (the step records StandardCheckpointHandler, as for any other save)."""
    handler = ocp.StandardCheckpointHandler()
    handler._supported_types = (*STANDARD_ARRAY_TYPES, LazyArray)
    return handler


def save_params(out_dir: str, params: Any, model_cfg: ModelConfig, step: int = 0) -> None:
    """Writes a parameters-only checkpoint into the (new or empty) directory out_dir.
    Leaves may be arrays or LazyArrays (written one at a time, as they are produced)."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(os.path.abspath(out_dir), options=options,
                               item_handlers={"params": _params_handler(),
                                              "model": ocp.JsonCheckpointHandler()}) as mngr:
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


DAMAGED = "damaged"  # checkpoints/damaged/<step>-<time>: set-aside steps (orbax and valid_steps read only digit names)


def restore_train_state(mngr: ocp.CheckpointManager, abstract_state: dict, log=print,
                        check_meta: Callable[[dict], None] | None = None) -> tuple[dict, dict] | None:
    """Restores the newest checkpoint that reads back whole onto `abstract_state`'s
    shardings (any mesh), on every process alike. `check_meta(meta)` sees each candidate's
    meta before any of its arrays is read and may raise to refuse the resume (nothing has
    been changed then). Returns (state, meta), or None when there is nothing to resume.

    Newer steps that do not read back are reported and moved to checkpoints/damaged/: a
    step orbax still lists is never saved again (and blocks the saves before it), so a
    damaged one left in place would be resumed past forever. They are moved only once an
    older step has restored: when none does, or the device runs out of memory, it is an
    error and nothing is moved (the storage, not the checkpoints, may be at fault)."""
    from sc_jax.multihost import gather_json

    damaged, found = [], None
    for step in sorted(set(mngr.all_steps()) | set(valid_steps(str(mngr.directory))), reverse=True):
        restored, error = _restore_step(mngr, step, abstract_state, check_meta)
        # Every process learns every outcome, so all take the same branch (a failure inside
        # orbax's own restore barrier on some hosts only can still stall them there).
        outcomes = gather_json(None if error is None else [_is_resource_error(error),
                                                           f"{type(error).__name__}: {_first_line(error)}"])
        out_of_memory = [msg for o in outcomes if o and o[0] for msg in o[1:]]
        if out_of_memory:
            raise RestoreOutOfMemory(f"out of memory restoring checkpoint step {step} of {mngr.directory} "
                                     f"({out_of_memory[0]}): resume on more devices or with more memory; the "
                                     "checkpoints are left as they are")
        if any(outcomes):  # a step is used only if every process read it
            damaged.append((step, next(o[1] for o in outcomes if o)))
            continue
        found = restored
        break
    if damaged and found is None:
        raise DamagedCheckpoint(f"no checkpoint in {mngr.directory} reads back (step {damaged[0][0]}: "
                                f"{damaged[0][1]}): check the storage; to start over, rerun with --restart")
    if damaged:
        _set_aside(mngr, damaged, found[1]["step"], log)
    return found


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def _is_resource_error(e: BaseException) -> bool:
    """Out of host or device memory: a fact about this machine, not the checkpoint."""
    return isinstance(e, MemoryError) or any(s in str(e) for s in ("RESOURCE_EXHAUSTED", "Out of memory"))


def _restore_step(mngr, step: int, abstract_state: dict, check_meta) -> tuple[tuple[dict, dict] | None, Exception | None]:
    """((state, meta), None) for a step that reads back, else (None, the error)."""
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        return None, e
    if check_meta:
        check_meta(meta)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"])))
    except Exception as e:
        return None, e
    state = {"step": jax.device_put(np.asarray(meta["step"], np.int32), abstract_state["step"].sharding),
             "params": restored["params"], "opt_state": restored["opt_state"]}
    return (state, meta), None


def _set_aside(mngr: ocp.CheckpointManager, damaged: list[tuple[int, str]], resumed: int, log) -> None:
    """Moves damaged step directories to checkpoints/damaged/ (process 0, then a barrier) and
    makes the manager forget them, so those steps are saved again."""
    from sc_jax.multihost import gather_json, sync

    directory = str(mngr.directory)
    stamp = gather_json(time.strftime("%Y%m%d-%H%M%S"))[0]  # one name on every process
    for step, error in damaged:
        where = unused_path(os.path.join(directory, DAMAGED, f"{step}-{stamp}"))
        if jax.process_index() == 0 and os.path.exists(os.path.join(directory, str(step))):
            os.makedirs(os.path.dirname(where), exist_ok=True)
            os.rename(os.path.join(directory, str(step)), where)
        log(f"warning: checkpoint step {step} in {directory} could not be restored ({error}); "
            f"moved it to {where}; falling back to step {resumed}")
    sync("sc_jax:damaged_checkpoints")
    mngr.reload()
