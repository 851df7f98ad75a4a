"""Damaging a saved checkpoint step the way a full disk or a killed copy leaves it."""

import os


def damage_params(step_dir) -> None:
    """Truncates every data file of the step's parameters to a third (metadata files stay)."""
    damaged = 0
    for dirpath, _, files in os.walk(os.path.join(step_dir, "params")):
        for f in files:
            path = os.path.join(dirpath, f)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 3)
                damaged += 1
    assert damaged, f"nothing to damage in {step_dir}"
