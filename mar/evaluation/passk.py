"""Unbiased pass@k from n samples per problem, c of them correct.

pass@k = 1 - C(n-c, k) / C(n, k): the chance that k samples drawn without replacement
from the n include a correct one. Computed as a product of ratios,
C(n-c, k)/C(n, k) = prod_{i=n-c+1..n} (1 - k/i), which never forms huge binomials.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k of the n samples is correct, c correct in all."""
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, found n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, found n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
    """Mean pass@k over problems; `correct` is bool/0-1 of shape [problems, n samples]."""
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[0] == 0:
        raise ValueError(f"mean_pass_at_k: expected correct of shape [problems, n], found {correct.shape}")
    n = correct.shape[1]
    counts = (correct != 0).sum(axis=1)
    return float(np.mean([pass_at_k(n, c, k) for c in counts]))


def pass_at_ks(correct: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """{k: mean pass@k} for each k <= n (larger k are skipped)."""
    n = np.asarray(correct).shape[-1]
    return {int(k): mean_pass_at_k(correct, k) for k in ks if 1 <= int(k) <= n}
