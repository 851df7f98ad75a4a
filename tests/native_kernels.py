"""The C++ kernels' tests need them built: under CI (.ci/run installs g++) a kernel that does
not build fails its tests; only a CPU without AVX-512 skips them."""

import os

import pytest

from sc_jax import native


def built(library: native.Library) -> bool:
    """Whether the kernel is there; under CI, a failed build (not a CPU without AVX-512) fails."""
    if not library.available():
        why = library.state.get("why")
        if os.environ.get("CI") and why != native.NO_AVX512:
            pytest.fail(f"the {library.what} did not build: {why}")  # a defect, not a skip
    return library.available()


def require(library: native.Library) -> None:
    if not built(library):
        pytest.skip(f"the {library.what} is not available: {library.state.get('why')}")
