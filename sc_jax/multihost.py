"""What processes of one multi-host run agree on: a barrier, and each process's small JSON
value gathered everywhere. One process: both are no-ops."""

from __future__ import annotations

import json


def sync(name: str) -> None:
    """A barrier across processes (no-op for one): after process 0 changed the run directory."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_json(value) -> list:
    """[value of process 0, value of process 1, ...] on every process (a collective: all call it)."""
    import jax

    if jax.process_count() == 1:
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(row[:n].tobytes()) for row, n in zip(rows, sizes)]
