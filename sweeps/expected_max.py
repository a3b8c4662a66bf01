"""Expected validation performance: the expected best dev score after n trials, from N observed ones.

Two estimators over the N observed scores v_(1) <= ... <= v_(N) (sorted ascending, i = 1..N):

- **Tang et al. 2020** ("Showing Your Work Doesn't Always Work"), unbiased, sampling the n trials
  *without* replacement from the N observed (defined for n <= N):
      P(max = v_(i)) = C(i-1, n-1) / C(N, n)
  (the other n-1 trials of a draw whose largest is v_(i) come from the i-1 below it).
- **Dodge et al. 2019** ("Show Your Work"), the original, sampling *with* replacement from the
  empirical distribution (biased for small N, defined for every n):
      P(max = v_(i)) = (i/N)^n - ((i-1)/N)^n

Both give E[max] = sum_i v_(i) P(max = v_(i)) and the spread std = sqrt(sum_i P_i (v_(i) - E)^2),
the standard deviation of the best-of-n score, which the study report draws as a band.
Ties need no special care: the weights are those of positions in the sorted list.
No maintained PyPI package provides the unbiased estimator, hence this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Curve:
    n: np.ndarray     # 1..n_max
    mean: np.ndarray  # expected best of n trials
    std: np.ndarray   # its standard deviation


def _sorted(scores) -> np.ndarray:
    values = np.sort(np.asarray(list(scores), dtype=float))
    if values.size == 0:
        raise ValueError("expected max needs at least one score")
    if not np.isfinite(values).all():
        raise ValueError("expected max needs finite scores")
    return values


def weights_without_replacement(N: int, n: int) -> np.ndarray:
    """P(max of n drawn without replacement = v_(i)), i = 1..N: C(i-1, n-1) / C(N, n) (Tang et al. 2020)."""
    if not 1 <= n <= N:
        raise ValueError(f"n={n} must lie in 1..N={N} when sampling without replacement")
    total = math.comb(N, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, N + 1)])


def weights_with_replacement(N: int, n: int) -> np.ndarray:
    """P(max of n drawn with replacement = v_(i)), i = 1..N: (i/N)^n - ((i-1)/N)^n (Dodge et al. 2019)."""
    if N < 1 or n < 1:
        raise ValueError(f"N={N} and n={n} must be >= 1")
    i = np.arange(1, N + 1, dtype=float)
    return (i / N) ** n - ((i - 1) / N) ** n


def _moments(values: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    mean = float(np.dot(w, values))
    var = float(np.dot(w, (values - mean) ** 2))
    return mean, math.sqrt(max(var, 0.0))


def expected_max(scores, n: int, replacement: bool = False) -> tuple[float, float]:
    """(E[best of n], its std) from the observed scores; unbiased (Tang) unless replacement=True (Dodge)."""
    values = _sorted(scores)
    N = len(values)
    w = weights_with_replacement(N, n) if replacement else weights_without_replacement(N, n)
    return _moments(values, w)


def expected_max_curve(scores, n_max: int | None = None, replacement: bool = False) -> Curve:
    """E[best of n] and its std for n = 1..n_max (default N; without replacement n_max <= N)."""
    values = _sorted(scores)
    N = len(values)
    n_max = N if n_max is None else n_max
    rows = [expected_max(values, n, replacement) for n in range(1, n_max + 1)]
    return Curve(np.arange(1, n_max + 1), np.array([r[0] for r in rows]), np.array([r[1] for r in rows]))
