"""Binomial statistics of Monte Carlo certification: Clopper-Pearson bounds and PREDICT's test.

Pure functions of counts, vectorised over arrays, used by fixed-N CERTIFY and PREDICT (core.py)
and by their sequential variants (sequential.py).
"""
import math

import numpy as np
from scipy.stats import beta, binom


def cp_lower(count, num, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound: the alpha-quantile of Beta(k, n - k + 1).

    ``count`` (and ``num``) may be arrays; 0 where the count is 0.
    """
    count = np.asarray(count, dtype=float)
    safe = np.maximum(count, 1)
    return np.where(count > 0, beta.ppf(alpha, safe, num - safe + 1), 0.0)


def cp_upper(count, num, alpha):
    """One-sided (1 - alpha) Clopper-Pearson upper bound: the (1 - alpha)-quantile of Beta(k + 1, n - k).

    ``count`` (and ``num``) may be arrays; 1 where the count is ``num``.
    """
    count = np.asarray(count, dtype=float)
    safe = np.minimum(count, np.asarray(num) - 1)
    return np.where(count < num, beta.isf(alpha, safe + 1, num - safe), 1.0)


def two_sided_binomial_pvalue(successes, trials):
    """The two-sided p-value of ``successes`` in ``trials`` fair coin flips: ``binomtest(k, n, 0.5).pvalue``.

    PREDICT's test. P[X <= low] + P[X >= n - low] with low = min(k, n - k), capped at 1, summed as
    scipy's ``binomtest`` sums it (``binom.cdf`` plus ``binom.sf``), so the two agree bit for bit;
    1 where k = n - k or ``trials`` is 0. Vectorised over arrays of counts.
    """
    successes, trials = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    low = np.minimum(successes, trials - successes)
    safe = np.maximum(trials, 1)
    tails = binom.cdf(low, safe, 0.5) + binom.sf(safe - low - 1, safe, 0.5)
    return np.where((trials > 0) & (2 * low < trials), np.minimum(1.0, tails), 1.0)


def smallest_certifying_n(alpha: float) -> int:
    """The fewest estimation samples with which CERTIFY can certify at ``alpha``.

    With N of N samples of cA the lower bound is alpha^(1/N), at least 1/2 from N = log2(1 / alpha) on;
    the count is found with ``cp_lower`` itself, so that it agrees with what CERTIFY computes.
    """
    n = max(1, math.floor(math.log2(1.0 / alpha)) - 1)
    while cp_lower(n, n, alpha) < 0.5:
        n += 1
    return n


def smallest_predicting_n(alpha: float) -> int:
    """The fewest samples with which PREDICT can predict at ``alpha``: N of N samples of one class give
    the p-value 2^(1 - N), at most alpha from N = log2(2 / alpha) on (found with PREDICT's own test)."""
    n = max(1, math.floor(math.log2(2.0 / alpha)) - 1)
    while two_sided_binomial_pvalue(n, n) > alpha:
        n += 1
    return n
