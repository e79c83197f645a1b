"""pass@k with the unbiased estimator of Chen et al. (2021), and per-task aggregation.

Only arithmetic on counts; nothing here runs or reads programs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) passes.

    1 - C(n-c, k) / C(n, k), computed as a running product (no huge binomials).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def aggregate(correct_by_problem: Mapping[str, Sequence[bool]], ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean pass@k over problems, for each k that every problem has enough samples for."""
    if not correct_by_problem:
        return {}
    ns = [len(v) for v in correct_by_problem.values()]
    out = {}
    for k in ks:
        if k <= min(ns):
            vals = [pass_at_k(len(v), sum(map(bool, v)), k) for v in correct_by_problem.values()]
            out[f"pass@{k}"] = float(np.mean(vals))
    return out
