"""Multi-host start-up: jax.distributed, automatic on TPU pods and under SLURM, or explicit."""

from __future__ import annotations

import os

from sc_jax.config import ConfigError


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
