"""Soundness at the hard cases, against computations that do not share the code's formulas.

* Clopper-Pearson: the one-sided (1 - alpha) lower bound L of k successes in n is defined by
  P[X >= k | p = L] = alpha, X ~ Binomial(n, L), i.e. ``binom.sf(k - 1, n, L) = alpha`` (the upper bound
  U by P[X <= k | p = U] = alpha). The code computes them as Beta quantiles; here the binomial tail
  checks them, at small and large n and at the extremes of k.
* Fixed-N CERTIFY at pA just below a certification threshold t = Phi(r / sigma), where certifying r is
  false: the exact probability of it, summed over the binomial law, is at most alpha, and close to
  alpha (so the check could fail: the same bound at 2 alpha does). Smooth.certify certifies r from
  exactly the least count k with P[X >= k | p = t] <= alpha, found by the binomial tail alone.
* The mixture martingale of the sequential mode, recomputed in plain Python (``math`` on floats,
  the alternatives and weights as sequential.py's docstring defines them): the sample size at which an
  all-correct stream, or one with 1 to 3 failures, stops is the least n where it reaches
  1 / (alpha * share), and mixture_lower is the largest p0 where it does.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

import sequential
from core import Smooth, cp_lower, cp_upper
from test_core import Scripted, scripted_sequence

SIGMA = 0.25


# --------------------------------------------------------------------------- Clopper-Pearson

CP_CASES = [(1, 10, 0.05), (7, 10, 0.05), (10, 10, 0.001), (9, 10, 0.2), (500, 1000, 0.001), (1, 1000, 0.001),
            (999, 1000, 0.001), (1000, 1000, 1e-6), (99990, 100000, 0.001), (100000, 100000, 0.001),
            (50123, 100000, 0.0005), (3, 100000, 0.01)]


@pytest.mark.parametrize("k, n, alpha", CP_CASES)
def test_clopper_pearson_lower_bound_solves_its_defining_equation(k, n, alpha):
    """P[X >= k | p = L] = alpha, and any p above L makes k successes or more likelier than alpha."""
    lower = cp_lower(k, n, alpha)
    assert Smooth.lower_confidence_bound(k, n, alpha) == float(lower)
    assert 0 < lower < k / n
    assert binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-7)
    step = 1e-6 * min(lower, 1 - lower)
    assert binom.sf(k - 1, n, lower - step) < alpha < binom.sf(k - 1, n, lower + step)


@pytest.mark.parametrize("k, n, alpha", [(k - 1, n, a) for k, n, a in CP_CASES])
def test_clopper_pearson_upper_bound_solves_its_defining_equation(k, n, alpha):
    """P[X <= k | p = U] = alpha for k < n; U = 1 at k = n would need no equation."""
    upper = cp_upper(k, n, alpha)
    assert k / n < upper < 1
    assert binom.cdf(k, n, upper) == pytest.approx(alpha, rel=1e-7)


def test_clopper_pearson_ends():
    assert cp_lower(0, 50, 0.05) == 0.0 and Smooth.lower_confidence_bound(0, 50, 0.05) == 0.0
    assert cp_upper(50, 50, 0.05) == 1.0


# --------------------------------------------------------------------------- fixed-N CERTIFY just below a threshold

def least_certifying_count(n, threshold, alpha):
    """The least k with P[X >= k | p = threshold] <= alpha (X ~ Binomial(n, threshold)): the least count from which
    a valid (1 - alpha) lower bound may exceed the threshold. From the binomial tail alone."""
    ks = np.arange(n + 1)
    return int(ks[binom.sf(ks - 1, n, threshold) <= alpha][0])


@pytest.mark.parametrize("n", [100, 1000, 10000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_certify_at_p_just_below_a_threshold_is_false_with_probability_at_most_alpha(n, alpha):
    """pA = t - 1e-9 for the thresholds of radius 0 (t = 1/2) and 0.25, 0.5, 0.75 at sigma 0.25: a certificate of
    that radius is false. Its probability is at most alpha and at least alpha / 20 at the worst of these
    (so a bound at 2 alpha fails this check; it is checked to)."""
    worst, worst_doubled = 0.0, 0.0
    for radius in (0.0, 0.25, 0.5, 0.75):
        threshold = 0.5 if radius == 0 else norm.cdf(radius / SIGMA)
        p = threshold - 1e-9
        ks = np.arange(n + 1)
        pmf = binom.pmf(ks, n, p)
        false = pmf[cp_lower(ks, n, alpha) >= threshold].sum()
        assert false <= alpha * (1 + 1e-9), (radius, false)
        # the count from which the code certifies is the one the binomial tail gives
        certified = ks[cp_lower(ks, n, alpha) >= threshold]
        if len(certified):
            assert certified[0] == least_certifying_count(n, threshold, alpha)
        worst = max(worst, false)
        worst_doubled = max(worst_doubled, pmf[cp_lower(ks, n, 2 * alpha) >= threshold].sum())
    assert worst >= alpha / 20
    assert worst_doubled > alpha


@pytest.mark.parametrize("radius", [0.0, 0.5])
def test_smooth_certify_certifies_a_radius_from_the_least_count_the_binomial_tail_allows(radius):
    """Scripted samples: Smooth.certify reports at least ``radius`` with k* estimation samples of the selected class,
    k* the least count with P[X >= k* | p = Phi(radius / sigma)] <= alpha, and less with k* - 1."""
    n0, n, alpha = 10, 400, 0.001
    threshold = 0.5 if radius == 0 else norm.cdf(radius / SIGMA)
    k_star = least_certifying_count(n, threshold, alpha)
    for k, certified in ((k_star, True), (k_star - 1, False)):
        model = Scripted([2] * n0 + scripted_sequence([n - k, 0, k], seed=k), 3)
        prediction, certified_radius = Smooth(model, 3, SIGMA).certify(torch.zeros(2), n0, n, alpha, 64)
        if certified:
            assert prediction == 2 and certified_radius >= radius
        else:
            assert prediction == Smooth.ABSTAIN if radius == 0 else certified_radius < radius


# --------------------------------------------------------------------------- the mixture martingale by hand

def plain_log_martingale(count, num, p0, point_weight):
    """log M_n(p0) = log sum_j w_j (p1_j / p0)^count ((1 - p1_j) / (1 - p0))^(num - count) over p1_j > p0, with
    p1 = 1 at weight ``point_weight`` and p1 = 1 - 2^(-j/2), j = 1..40, sharing the rest (sequential.py)."""
    alternatives = [(1.0, point_weight)] + [(1 - 2 ** (-j / 2), (1 - point_weight) / 40) for j in range(1, 41)]
    logs = []
    for p1, weight in alternatives:
        if p1 <= p0:
            continue
        failures = num - count
        if p1 == 1.0:
            if failures:
                continue          # (1 - p1)^failures = 0
            fail_term = 0.0
        else:
            fail_term = failures * (math.log(1 - p1) - math.log(1 - p0))
        logs.append(math.log(weight) + count * (math.log(p1) - math.log(p0)) + fail_term)
    if not logs:
        return -math.inf
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs))


def plain_stopping_sample(failures, p0, level, point_weight):
    """The least n with a stream of n - ``failures`` successes in n reaching M_n(p0) >= 1 / level.

    With the failures fixed, every term of M_n grows with n (p1 > p0), so bisection finds it.
    """
    reached = lambda n: plain_log_martingale(n - failures, n, p0, point_weight) >= math.log(1 / level)  # noqa: E731
    low, high = failures, failures + 1
    while not reached(high):
        low, high = high, 2 * high
    while high - low > 1:      # reached(high), not reached(low)
        middle = (low + high) // 2
        low, high = (low, middle) if reached(middle) else (middle, high)
    return high


@pytest.mark.parametrize("unanimous", [True, False])
def test_streams_with_few_failures_stop_where_the_plain_martingale_reaches_its_level(unanimous):
    """Radii 0.25 ... 1.0 at sigma 0.25, alpha 0.001, N-max 10^5: the top level reachable is Phi(3) (radius 0.75).
    The rule's precomputed stops for 0 to 3 failures, and a simulated all-correct stream's stop, are the least n
    at which the plain martingale at p0 = Phi(3) reaches 1 / (alpha * share)."""
    shares = sequential.RADII_SHARES_UNANIMOUS if unanimous else sequential.RADII_SHARES_SPLIT
    certifier = sequential.sequential_certifier(SIGMA, 0.001, 100000, 1000, radii=[0.25, 0.5, 0.75, 1.0],
                                                pilot_unanimous=unanimous)
    top = norm.cdf(3.0)
    stops = [plain_stopping_sample(f, top, 0.001 * shares.mixture, shares.point_weight)
             for f in range(sequential.FEW_FAILURES + 1)]
    assert certifier.few_failures_looks() == stops
    assert stops[0] == (5329 if unanimous else 7120)   # the figures test_sequential.py and docs/SEQUENTIAL.md quote
    # an all-correct stream stops there, certified at 0.75, and not one batch look before
    counts_so_far = np.array([0])
    for look, num in enumerate(certifier.looks):
        stop, lower = certifier.step(look, counts_so_far + num)
        if stop[0]:
            break
    assert num == stops[0] and certifier.radius(lower)[0] >= 0.75


@pytest.mark.parametrize("count, num", [(990, 1000), (4990, 5000), (700, 1000), (60000, 100000)])
def test_mixture_lower_is_the_largest_p0_the_plain_martingale_rejects(count, num):
    alpha, weight = 0.001, 0.5
    lower = float(sequential.mixture_lower(np.array([count]), num, alpha, point_weight=weight)[0])
    threshold = math.log(1 / alpha)
    assert 0 < lower < count / num
    assert plain_log_martingale(count, num, lower, weight) >= threshold - 1e-9
    assert plain_log_martingale(count, num, lower + 1e-9 * max(1.0, 1 / (1 - lower)), weight) < threshold + 1e-6
    assert plain_log_martingale(count, num, lower + 1e-6, weight) < threshold
