"""The training command's CPU launch flags (sc_jax.sweep.templates.CPU_TRAIN_XLA_FLAGS): set
where XLA_FLAGS is unset, a user's own XLA_FLAGS (even empty) kept whole, and XLA accepts them."""

import os
import subprocess
import sys
import textwrap

from sc_jax.sweep import templates

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_set_only_where_unset():
    environ = {}
    assert templates.set_cpu_train_env(environ) and environ["XLA_FLAGS"] == templates.cpu_train_xla_flags()
    assert "--xla_cpu_experimental_ynn_fusion_type=" in environ["XLA_FLAGS"].split()
    for mine in ("", "--xla_force_host_platform_device_count=8"):
        environ = {"XLA_FLAGS": mine}
        assert not templates.set_cpu_train_env(environ) and environ == {"XLA_FLAGS": mine}


def test_vector_width_only_with_avx512(monkeypatch):
    monkeypatch.setattr(templates, "_has_avx512", lambda: False)
    assert "--xla_cpu_prefer_vector_width=512" not in templates.cpu_train_xla_flags()
    monkeypatch.setattr(templates, "_has_avx512", lambda: True)
    assert "--xla_cpu_prefer_vector_width=512" in templates.cpu_train_xla_flags()


def train_command_environment(xla_flags):
    """XLA_FLAGS as `python -m sc_jax.train --help` leaves it, and whether XLA then compiles a
    dot without YNNPACK's fusion (the first flag's effect)."""
    script = textwrap.dedent("""
        import os, runpy, sys
        sys.argv = ["sc-train", "--help"]
        try:
            runpy.run_module("sc_jax.train", run_name="__main__")
        except SystemExit:
            pass
        import jax, jax.numpy as jnp
        hlo = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
        print(repr(os.environ.get("XLA_FLAGS")), "ynn_fusion" in hlo, file=sys.stderr)
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    flags, ynn = done.stderr.strip().splitlines()[-1].rsplit(" ", 1)
    return eval(flags), ynn == "True"


def test_the_train_command_sets_them_before_jax_starts():
    flags, ynn = train_command_environment(None)
    assert flags == templates.cpu_train_xla_flags() and not ynn  # XLA read them: no YNNPACK dot fusion
    assert train_command_environment("") == ("", True)  # an empty XLA_FLAGS: XLA's own defaults
