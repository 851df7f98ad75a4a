"""sc_jax: the Stable Code 3B training stack in JAX/Flax.

`python -m sc_jax` lists the commands (train, plan, generate, eval, ...), each run as
`python -m sc_jax.NAME`; the quick start is `python experiments/quickstart.py`."""

__version__ = "0.1.0"
