"""The C++ kernels' tests need them built: under CI (.ci/run installs g++) a kernel that does
not build fails its tests; only a CPU without AVX-512 skips them."""

import os

import pytest

from sc_jax import native


def require(library: native.Library) -> None:
    if not library.available():
        why = library.state.get("why")
        if os.environ.get("CI") and why != native.NO_AVX512:
            pytest.fail(f"the {library.what} did not build: {why}")  # a defect, not a skip
        pytest.skip(f"the {library.what} is not available: {why}")
