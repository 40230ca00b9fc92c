"""Binomial statistics of Monte Carlo certification: Clopper-Pearson bounds, PREDICT's test, a beta-binomial tail.

Pure functions of counts, vectorised over arrays, used by fixed-N CERTIFY and PREDICT (core.py)
and by their sequential variants (sequential.py).
"""
import math

import numpy as np
from scipy.special import betaln, gammaln
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


def betabinom_sf(k, n, a, b):
    """P[Y > k] for Y ~ BetaBinomial(n, a, b): scipy's ``betabinom.sf``, summed over the far side only.

    scipy sums the pmf from 0 to k for each entry (about 6 ms at k = 88,000); this sums the side of k
    away from the mean, from k outwards, until the terms fall below 1e-17 of the sum (the pmf is
    unimodal, so the rest is negligible): the upper tail itself, or 1 minus the lower one. Successive
    terms come from the ratio pmf(j + 1) / pmf(j) = (n - j)(j + a) / ((j + 1)(n - j - 1 + b)). Arrays
    broadcast; ``n`` whole.
    """
    k, n, a, b = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (k, n, a, b)))
    out = np.array([_betabinom_sf_one(*args) for args in zip(k.flat, n.flat, a.flat, b.flat)], dtype=float)
    return out.reshape(k.shape)


def _betabinom_sf_one(k: float, n: float, a: float, b: float) -> float:
    k = math.floor(k)
    if k < 0:
        return 1.0
    if k >= n:
        return 0.0
    mean = n * a / (a + b)
    sd = math.sqrt(n * a * b * (a + b + n) / ((a + b) ** 2 * (a + b + 1)))
    width = int(6 * sd) + 32
    upper = k + 1 > mean   # sum j = k + 1, k + 2, ... (the upper tail), else j = k, k - 1, ... (1 minus it)
    start = k + 1 if upper else k
    log_start = float(gammaln(n + 1) - gammaln(start + 1) - gammaln(n - start + 1)
                      + betaln(start + a, n - start + b) - betaln(a, b))
    total = 0.0
    while True:
        if upper:
            j = np.arange(start, min(start + width, n + 1), dtype=float)
            steps = np.log((n - j[:-1]) * (j[:-1] + a)) - np.log((j[:-1] + 1) * (n - j[:-1] - 1 + b))
        else:
            j = np.arange(start, max(start - width, -1), -1, dtype=float)
            steps = np.log(j[:-1] * (n - j[:-1] + b)) - np.log((n - j[:-1] + 1) * (j[:-1] - 1 + a))
        logs = log_start + np.concatenate([[0.0], np.cumsum(steps)])
        terms = np.exp(logs)
        total += float(terms.sum())
        if j[-1] in (0, n) or terms[-1] <= 1e-17 * total:
            break
        # the next chunk starts one step beyond this one's last term
        last = j[-1]
        step = (math.log((n - last) * (last + a)) - math.log((last + 1) * (n - last - 1 + b))) if upper \
            else (math.log(last * (n - last + b)) - math.log((n - last + 1) * (last - 1 + a)))
        start, log_start = last + 1 if upper else last - 1, logs[-1] + step
    return min(total, 1.0) if upper else max(1.0 - total, 0.0)


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
