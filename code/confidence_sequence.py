"""The statistics of the sequential scheme that depend on no rule: the looks and the mixture sequence.

* ``look_schedule`` and ``batch_looks``: the looks, fixed before any sample.
* ``mixture_lower``: an anytime-valid lower confidence sequence for a
  binomial proportion (Robbins' method of mixtures; Waudby-Smith and Ramdas,
  "Estimating means of bounded random variables by betting", JRSS-B 2024).

Why the mixture is valid: docs/SEQUENTIAL.md.
"""
import math
from typing import List

import numpy as np

# --------------------------------------------------------------------------- looks

def look_schedule(n_max: int, batch_size: int, growth: float = 1.5) -> List[int]:
    """The sample sizes n_1 < n_2 < ... < n_K = n_max of geometric looks, fixed by the arguments alone.

    Each look is about ``growth`` times the last, in whole batches of ``batch_size`` samples, except
    the last look, which is ``n_max``.
    """
    if n_max <= 0 or batch_size <= 0 or growth <= 1:
        raise ValueError(f"need n_max > 0, batch_size > 0 and growth > 1, got {n_max}, {batch_size}, {growth}")
    looks, batches, total = [], 1.0, 0
    while True:
        size = int(math.ceil(batches - 1e-9)) * batch_size
        if size >= n_max:
            break
        if size > total:
            looks.append(size)
            total = size
        batches *= growth
    return looks + [n_max]


def batch_looks(n_max: int, batch_size: int) -> List[int]:
    """A look after every batch: batch_size, 2 batch_size, ..., and n_max last."""
    if n_max <= 0 or batch_size <= 0:
        raise ValueError(f"need n_max > 0 and batch_size > 0, got {n_max}, {batch_size}")
    return list(range(batch_size, n_max, batch_size)) + [n_max]


# --------------------------------------------------------------------------- the mixture confidence sequence

# The alternatives of the mixture confidence sequence (``mixture_lower``): p1 = 1 with weight
# ``point_weight``, and p1 = 1 - 2^(-j/2), j = 1..40 (1 - p1 from 0.71 down to 1e-6), sharing the rest.
MIXTURE_POINT_WEIGHT = 0.9
MIXTURE_ALTERNATIVES = np.concatenate([[1.0], 1.0 - 2.0 ** (-np.arange(1, 41) / 2.0)])


def mixture_weights(point_weight: float = MIXTURE_POINT_WEIGHT) -> np.ndarray:
    """The prior weights of ``MIXTURE_ALTERNATIVES``: ``point_weight`` at p1 = 1, the rest shared equally."""
    if not 0 <= point_weight < 1:
        raise ValueError(f"point_weight must be in [0, 1), got {point_weight}")
    others = len(MIXTURE_ALTERNATIVES) - 1
    return np.concatenate([[point_weight], np.full(others, (1 - point_weight) / others)])


def mixture_log_martingale(count, num, p0, point_weight: float = MIXTURE_POINT_WEIGHT):
    """log M_n(p0), for arrays ``count`` (successes among ``num`` draws) and ``p0`` of the same shape.

    M_n(p0) = sum over the alternatives p1_j > p0 of w_j (p1_j / p0)^count ((1 - p1_j) / (1 - p0))^(num - count):
    a nonnegative supermartingale with M_0 <= 1 under any p <= p0 (docs/SEQUENTIAL.md).
    """
    count = np.asarray(count, dtype=float)[..., None]
    p0 = np.asarray(p0, dtype=float)[..., None]
    p1, weights = MIXTURE_ALTERNATIVES, mixture_weights(point_weight)
    failures = num - count
    with np.errstate(divide="ignore", invalid="ignore"):
        # (1 - p1)^failures: 1 when there are no failures (also for p1 = 1), 0 when p1 = 1 and there are some
        fail_term = np.where(failures > 0, failures * (np.log1p(-np.minimum(p1, 1.0)) - np.log1p(-p0)),
                             0.0)
        terms = np.log(weights) + count * (np.log(p1) - np.log(p0)) + fail_term
    terms = np.where((p1 > p0) & (weights > 0), terms, -np.inf)
    return np.logaddexp.reduce(terms, axis=-1)


def mixture_lower(count, num, alpha, iterations=40, point_weight: float = MIXTURE_POINT_WEIGHT):
    """Anytime-valid (1 - alpha) lower confidence sequence for a binomial proportion (arrays of counts).

    For draws X_1, X_2, ... i.i.d. Bernoulli(p) and S_n = X_1 + ... + X_n:
    P[exists n: mixture_lower(S_n, n, alpha) > p] <= alpha (Ville's inequality for
    ``mixture_log_martingale``; proof in docs/SEQUENTIAL.md). The bound is the largest p0 that
    bisection finds with M_n(p0) >= 1 / alpha, rounded down; 0 when none is.
    """
    count = np.asarray(count, dtype=float)
    threshold = math.log(1.0 / alpha)
    low = np.zeros_like(count)                       # rejected (or 0, where nothing is)
    high = np.where(num > 0, count / max(num, 1), 0.0)   # not rejected: M_n(k / n) <= 1 < 1 / alpha
    for _ in range(iterations):
        middle = (low + high) / 2
        rejected = mixture_log_martingale(count, num, np.maximum(middle, 1e-300), point_weight) >= threshold
        low = np.where(rejected, middle, low)
        high = np.where(rejected, high, middle)
    return low
