"""pass@k: the product form against the combinatorial definition."""

import itertools
import math

import numpy as np
import pytest

from sc_jax.eval.passk import aggregate_pass_at_k, estimate_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> float:
    """Probability that a uniformly drawn k-subset of the n samples contains a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_matches_binomials_for_large_n():
    for n, c, k in [(200, 13, 1), (200, 13, 10), (200, 13, 100), (1000, 1, 500), (50, 0, 10), (300, 299, 1)]:
        expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 5, 6) == 1.0  # n - c < k
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # no overflow / NaN for big n
    v = pass_at_k(100_000, 50, 1000)
    assert 0.0 < v <= 1.0 and np.isfinite(v)
    for bad in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_aggregate_over_problems():
    per = estimate_pass_at_k(10, [0, 5, 10], 1)
    np.testing.assert_allclose(per, [0.0, 0.5, 1.0])
    agg = aggregate_pass_at_k([10, 10, 10], [0, 5, 10], ks=(1, 10, 100))
    assert set(agg) == {"pass@1", "pass@10"}  # k=100 > n is left out
    assert agg["pass@1"] == pytest.approx(0.5)
    assert agg["pass@10"] == pytest.approx((0 + 1 + 1) / 3)
    assert aggregate_pass_at_k([], [], ks=(1,)) == {}
    with pytest.raises(ValueError):
        estimate_pass_at_k([10, 10], [1], 1)
