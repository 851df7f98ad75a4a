"""Fakes an 8-device CPU mesh for every test: must run before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import os, sys; sys.path.insert(0, os.path.dirname(__file__))
