"""Device mesh and logical-axis sharding rules (MaxText style).

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded, ZeRO-3), `sequence` (reserved for sequence/context
parallelism), `tensor` (Megatron-style). A degree of -1 takes the remaining devices.
Across slices/nodes (DCN) there is a separate degree per axis, giving a hybrid mesh.

Parameters and activations are annotated with logical names (see model.py); the
rules table maps each logical name to mesh axes. A dimension the mapped axes do not
divide is replicated instead, so every preset runs on every mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sc_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    # activations
    "act_batch": ("data", "fsdp"),
    "act_seq": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


@dataclasses.dataclass
class MeshConfig:
    """Parallelism degrees per mesh axis (-1: the remaining devices) and across slices."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1
    dcn_data: int = 1  # degrees across slices/nodes (hybrid mesh); their product = number of slices
    dcn_fsdp: int = 1
    num_devices: int = -1  # use only the first N devices (-1: all), e.g. to compare layouts on one host
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of DEFAULT_RULES

    def degrees(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def dcn_degrees(self) -> dict[str, int]:
        return {"data": self.dcn_data, "fsdp": self.dcn_fsdp, "sequence": 1, "tensor": 1}


def resolve_degrees(degrees: dict[str, int], num_devices: int) -> dict[str, int]:
    """Replaces one -1 by whatever makes the product equal num_devices."""
    free = [a for a, d in degrees.items() if d == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(d for d in degrees.values() if d != -1)
    if any(d == 0 or d < -1 for d in degrees.values()):
        raise ConfigError(f"mesh degrees must be positive or -1, got {degrees}")
    if free:
        if num_devices % fixed:
            raise ConfigError(f"mesh degrees {degrees} do not divide the {num_devices} devices")
        degrees = {**degrees, free[0]: num_devices // fixed}
    if math.prod(degrees.values()) != num_devices:
        raise ConfigError(f"mesh degrees {degrees} use {math.prod(degrees.values())} devices but there are "
                          f"{num_devices}: set one axis to -1 or fix the degrees")
    return degrees


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if cfg.num_devices != -1:
        if not 0 < cfg.num_devices <= len(devices):
            raise ConfigError(f"mesh.num_devices {cfg.num_devices} is not between 1 and the {len(devices)} devices")
        devices = devices[: cfg.num_devices]
    dcn = cfg.dcn_degrees()
    num_slices = math.prod(dcn.values())
    if len(devices) % num_slices:
        raise ConfigError(f"{len(devices)} devices cannot be split into {num_slices} slices (dcn degrees {dcn})")
    ici = resolve_degrees(cfg.degrees(), len(devices) // num_slices)
    shape = tuple(ici[a] for a in MESH_AXES)
    if num_slices > 1:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(shape, tuple(dcn[a] for a in MESH_AXES), devices)
    else:
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices)
        except Exception:  # CPU and other platforms without a physical topology
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rules_for(cfg: MeshConfig | None) -> dict[str, Any]:
    rules = dict(DEFAULT_RULES)
    if cfg is not None:
        unknown = set(cfg.rules) - set(DEFAULT_RULES)
        if unknown:
            raise ConfigError(f"mesh.rules has unknown logical axes {sorted(unknown)}; known: {sorted(DEFAULT_RULES)}")
        rules.update(cfg.rules)
    return rules


def logical_to_spec(axes: Sequence[str | None], rules: dict, mesh: Mesh, shape: Sequence[int] | None = None) -> P:
    """Maps logical names to a PartitionSpec, replicating a dim its mesh axes don't divide
    and never using one mesh axis twice."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and shape is not None and shape[i] % size:
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh, rules: dict):
    """NamedShardings for a tree of arrays given a matching tree of logical axes."""
    return jax.tree.map(lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)),
                        abstract_tree, axes_tree, is_leaf=lambda a: isinstance(a, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("act_batch", "act_seq"), DEFAULT_RULES, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- activations

_ACTIVE: list[tuple[Mesh, dict]] = []


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: dict):
    """While tracing inside this block, `constrain` pins activations to the mesh."""
    _ACTIVE.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def constrain(x, axes: Sequence[str | None]):
    """A sharding constraint by logical names; a no-op outside `activation_rules`."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))
