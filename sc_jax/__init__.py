"""sc_jax: the Stable Code 3B training stack in JAX/Flax."""

__version__ = "0.1.0"
