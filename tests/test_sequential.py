"""Sequential (anytime-valid) certification and prediction: ``sequential.SequentialCertifier``,
``sequential.SequentialPredictor``, ``sequential.certify_sequential`` and ``--sequential``.

Soundness is checked three ways.

* On simulated count streams (numpy binomial draws, no network): the decision
  logic is a pure function of the count after each look, so many runs at a
  known pA are cheap. A certificate is false when the reported lower bound
  exceeds pA (its radius then exceeds the true one; in the radii mode the
  listed radius it decides is then above the true radius). Its rate must
  stay at or below alpha (one-sided binomial test at level 1e-3), under the
  certifier's own stopping rules and under the worst stopping rule of all
  ("stop at the first look whose bound exceeds pA"), which is what validity
  for every stopping rule means. The classic peeking mistake (the fixed-N
  Clopper-Pearson bound at level alpha re-checked at every look) must fail
  the same checks: this is what makes them able to fail. (Under the ACR
  mode's own stopping rule, which depends on the number of samples far more
  than on the direction of the count, peeking's failure rate stays close to
  alpha; the worst stopping rule exposes it for that mode's alpha spending.)
* Exactly, without sampling (``bench_sequential.exact_false_certificates``:
  dynamic programming over the count distribution at each look, checked
  against enumerating every count path): the worst false-certificate rate
  of each mode at alpha = 0.001 and 0.05 is at most alpha, and uncorrected
  peeking exceeds it.
* The mixture confidence sequence (``sequential.mixture_lower``) on its own: on
  simulated streams looked at every 250 samples it exceeds p on at most
  alpha of them, where CERTIFY's fixed-n bound re-checked at every look does
  not.
* End to end on the closed-form linear classifier of
  tests/test_certify_statistics.py, through certify.py and predict.py.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from scipy.stats import beta, betabinom, binom, norm
from statsmodels.stats.proportion import proportion_confint

import analyze
import certify
import certify_rows
import eval_utils
import predict
import sequential
from conftest import REPO
from core import Smooth, cp_lower, cp_upper
from noise_streams import noise_generator
from sequential import SEQUENTIAL_FINAL_SHARE, SequentialCertifier, SequentialPredictor, look_schedule
from test_certify_statistics import B, W, Linear, points, read_columns, wrong_certificates


class Peeking(SequentialCertifier):
    """The classic mistake: CERTIFY's fixed-N bound, at level alpha, re-checked at every look."""

    def look_alpha(self, look):
        return self.alpha

    def anytime_lower(self, look, count):
        return cp_lower(count, self.looks[look], self.alpha)


def simulate(certifier, p, runs, rng, stop_rule=None):
    """Lower bound at stopping and samples drawn, for ``runs`` count streams with success probability p.

    ``stop_rule(lower)``: an extra stopping rule on top of the certifier's (None: the certifier's own).
    """
    lower = np.zeros(runs)
    samples = np.zeros(runs, dtype=int)
    count = np.zeros(runs, dtype=int)
    active = np.ones(runs, dtype=bool)
    drawn = 0
    for look, num in enumerate(certifier.looks):
        count[active] += rng.binomial(num - drawn, p, size=int(active.sum()))
        drawn = num
        stop, low = certifier.step(look, count[active])
        if stop_rule is not None:
            stop = stop | stop_rule(low)
        index = np.flatnonzero(active)
        lower[index[stop]] = low[stop]
        samples[index[stop]] = num
        active[index[stop]] = False
        if not active.any():
            break
    return lower, samples


def rate_is_at_most(failures, runs, alpha):
    """True unless the one-sided binomial test rejects 'failure rate <= alpha' at level 1e-3."""
    return binom.sf(int(failures) - 1, runs, alpha) > 1e-3


SIGMA = 0.25
LOOKS = look_schedule(20000, 500)          # 11 looks
RADII = [0.25, 0.5, 0.75]


# --------------------------------------------------------------------------- the pieces

def test_look_schedule_is_fixed_geometric_and_in_whole_batches():
    looks = look_schedule(100000, 1000)
    assert looks[-1] == 100000 and looks[0] == 1000
    assert all(b > a for a, b in zip(looks, looks[1:]))
    assert all(n % 1000 == 0 for n in looks)
    assert all(b / a <= 2.0 for a, b in zip(looks, looks[1:]))
    assert len(looks) == 13
    assert look_schedule(100000, 1000) == looks
    assert look_schedule(500, 1000) == [500]
    assert look_schedule(2500, 1000, growth=2) == [1000, 2000, 2500]
    with pytest.raises(ValueError):
        look_schedule(1000, 100, growth=1.0)


def test_clopper_pearson_bounds_are_the_textbook_quantiles():
    k = np.array([0, 1, 37, 99, 100])
    n, a = 100, 0.01
    low, high = np.maximum(k, 1), np.minimum(k, n - 1)
    assert np.allclose(cp_lower(k, n, a), np.where(k > 0, beta.ppf(a, low, n - low + 1), 0))
    assert np.allclose(cp_upper(k, n, a), np.where(k < n, beta.ppf(1 - a, high + 1, n - high), 1))
    # exactly statsmodels' Clopper-Pearson bound (proportion_confint, method "beta"), as in Cohen et al.'s code
    for count in (0, 1, 50, 99, 100):
        assert Smooth.lower_confidence_bound(count, n, a) == float(cp_lower(count, n, a)) \
            == proportion_confint(count, n, alpha=2 * a, method="beta")[0]


@pytest.mark.parametrize("sequence", ["spending", "mixture"])
@pytest.mark.parametrize("final_share", [None, 0.5])
def test_alpha_spending_sums_to_alpha(final_share, sequence):
    certifier = SequentialCertifier(SIGMA, 0.01, LOOKS, final_share=final_share, sequence=sequence)
    levels = certifier.union_levels()
    assert sum(levels) == pytest.approx(0.01)
    assert min(levels) > 0
    if final_share:
        assert levels[-1] == pytest.approx(0.01 * final_share)
        assert certifier.look_alpha(len(LOOKS) - 1) == pytest.approx(0.01 * final_share)


def test_mixture_lower_for_all_correct_streams_and_monotone_in_the_count():
    alpha = 5e-4
    for n in (1000, 6000, 100000):
        bound = sequential.mixture_lower(np.array([n]), n, alpha)[0]
        # the point mass at p1 = 1 (weight 1/2) alone rejects every p0 < (alpha / 2)^(1 / n)
        assert (alpha / 2) ** (1 / n) - 1e-9 <= bound < 1
    counts = np.arange(0, 1001, 50)
    bounds = sequential.mixture_lower(counts, 1000, alpha)
    assert np.all(np.diff(bounds) >= 0) and np.all(bounds <= counts / 1000) and bounds[0] == 0
    # wider than the fixed-n Clopper-Pearson bound at the same level: it pays for holding at every n
    assert np.all(bounds <= cp_lower(counts, 1000, alpha) + 1e-12)


@pytest.mark.parametrize("p", [0.7, 0.99, 0.9995])
def test_mixture_lower_is_a_confidence_sequence_and_peeking_is_not(p):
    """Checked after every 250 samples up to 20,000: the bound stays <= p at every look on >= 1 - alpha of streams."""
    alpha, runs, step, looks = 0.1, 1000, 250, 80
    rng = np.random.default_rng(11)
    counts = np.cumsum(rng.binomial(step, p, size=(looks, runs)), axis=0)
    ever = np.zeros(runs, dtype=bool)
    peek = np.zeros(runs, dtype=bool)
    for k in range(looks):
        ever |= sequential.mixture_lower(counts[k], step * (k + 1), alpha) > p
        peek |= cp_lower(counts[k], step * (k + 1), alpha) > p
    assert rate_is_at_most(ever.sum(), runs, alpha), ever.mean()
    assert not rate_is_at_most(peek.sum(), runs, alpha), peek.mean()


def test_a_sure_image_stops_where_the_mixture_reaches_the_top_level_whatever_its_pilot():
    """pA = 1: the bound reaches Phi(3) (radius 0.75) at the sample size the rule computed in advance.

    The mixture's point mass at p1 = 1 alone rejects every p0 below Phi(3) once
    w (1 / Phi(3))^n >= 1 / (alpha * share): after 5,357 samples with a unanimous pilot (share 0.8,
    w 0.9; 5,329 with the whole mixture), 7,332 otherwise (share 0.1, w 0.5; 7,120). A single
    Clopper-Pearson test at the whole of alpha needs 5,114. Radius 1.0 (Phi(4)) is out of reach for
    every stream of N_max = 10^5 samples, so it is not waited for. (test_soundness.py recomputes 5,329 and
    7,120 from the mixture martingale in plain Python.)
    """
    assert [cp_lower(n, n, 0.001) >= norm.cdf(3.0) for n in (5113, 5114)] == [False, True]
    for unanimous, shares, needed, stops in ((True, sequential.RADII_SHARES_UNANIMOUS, 5357, 5329),
                                             (False, sequential.RADII_SHARES_SPLIT, 7332, 7120)):
        weight = shares.mixture * shares.point_weight
        assert math.ceil(math.log(1 / (0.001 * weight)) / -math.log(norm.cdf(3.0))) == needed
        reached = [sequential.mixture_lower(np.array([n]), n, 0.001 * shares.mixture,
                                            point_weight=shares.point_weight)[0] >= norm.cdf(3.0)
                   for n in (stops - 1, stops)]
        assert reached == [False, True]
        certifier = sequential.sequential_certifier(SIGMA, 0.001, 100000, 1000, radii=[0.25, 0.5, 0.75, 1.0],
                                                    pilot_unanimous=unanimous)
        assert stops in certifier.looks and certifier.few_failures_looks()[0] == stops
        lower, samples = simulate(certifier, 1.0, 5, np.random.default_rng(0))
        assert np.all(samples == stops)
        assert np.all((certifier.radius(lower) >= 0.75) & (certifier.radius(lower) < 1.0))
    assert sequential.batch_looks(3500, 1000) == [1000, 2000, 3000, 3500]


def test_a_stream_with_few_failures_stops_at_its_precomputed_look():
    """The looks added for 1 to 3 samples not cA are where such a stream's bound reaches the top level."""
    certifier = sequential.sequential_certifier(SIGMA, 0.001, 100000, 1000, radii=[0.25, 0.5, 0.75, 1.0],
                                                pilot_unanimous=True)
    looks = certifier.few_failures_looks()
    assert len(looks) == sequential.FEW_FAILURES + 1 and looks == sorted(looks)
    for missed, n in enumerate(looks):
        before, at = (sequential.mixture_lower(np.array([m - missed]), m, certifier.sequence_alpha,
                                               point_weight=certifier.point_weight)[0] for m in (n - 1, n))
        assert before < norm.cdf(3.0) <= at and n in certifier.looks
    # end to end: an image whose every noisy copy is class 1 has a unanimous pilot and stops at looks[0]
    unit = (W / W.norm()).view(1, 1, 4)
    far = (50.0 * unit - B * unit / float(W.norm()))[None]   # distance 50 sigma from the hyperplane, class 1
    rows = sequential.certify_sequential(Smooth(Linear(), 2, SIGMA), far, 100, 100000, 0.001, 1000,
                                         [noise_generator(0, 0, "cpu")], radii=[0.25, 0.5, 0.75, 1.0])
    assert rows[0][0] == 1 and 0.75 <= rows[0][1] < 1.0 and rows[0][2] == 100 + looks[0]


def test_a_single_look_spends_the_whole_alpha_as_fixed_n_certify_does():
    """N-max at most one batch: one look, at which both modes report Clopper-Pearson at the whole of alpha."""
    alpha = 0.001
    for mode in ({"radii": [0.25, 0.5, 0.75]}, {"radius_tol": 0.1 * SIGMA}):
        certifier = sequential.sequential_certifier(SIGMA, alpha, 500, 1000, **mode)
        assert certifier.looks == [500]
        assert sum(certifier.union_levels()) == pytest.approx(alpha) and len(certifier.union_levels()) == 1
        counts = np.array([500, 490, 400, 200])
        stop, lower = certifier.step(0, counts)
        assert np.all(stop)
        assert np.allclose(lower, cp_lower(counts, 500, alpha), rtol=1e-12, atol=0)
        assert round(float(lower[0]), 4) == 0.9863   # alpha^(1 / 500)
    # end to end: the same row as fixed-N CERTIFY at N = N-max from the same stream
    data, _ = points(repeats=1, seed=7)
    xs = torch.stack([x for x, _ in data])
    smooth = Smooth(Linear(), 2, SIGMA)
    for mode in ({"radii": [0.1, 0.2]}, {}):
        rows = sequential.certify_sequential(smooth, xs, 50, 500, alpha, 1000,
                                             [noise_generator(2, i, "cpu") for i in range(len(data))], **mode)
        fixed = smooth.certify_many(xs, 50, 500, alpha, 1000, [noise_generator(2, i, "cpu") for i in range(len(data))])
        assert [(c, pytest.approx(r, abs=1e-12), 550) for c, r in fixed] == rows


def test_the_recorded_scheme_names_a_single_look_and_the_multi_look_scheme_in_full():
    """The recorded text names every share, so that a file of another scheme is never continued."""
    assert sequential.SEQUENTIAL_SCHEME == (
        "radii: if all N0 pilot samples are the selected class, mixture 0.8 (weight 0.9 at p1 = 1) at every batch "
        "and where streams with 0 to 3 samples not cA reach the top level + Clopper-Pearson 0.1 at geometric looks "
        "+ 0.1 at the last look; else mixture 0.1 (weight 0.5 at p1 = 1) at every batch and where streams with 0 "
        "to 3 samples not cA reach the top level + Clopper-Pearson 0.4 at geometric looks + 0.5 at the last look; "
        "stop also once the predictive probability of the next level at the last look is below 0.1, from 0.1 "
        "N-max samples on; ACR: Clopper-Pearson 1/2 over geometric looks + 1/2 at the last look, stop once the "
        "radius is within the tolerance of the radius N-max samples would give if pA were its 0.95 upper bound")
    assert sequential.sequential_scheme(100000, 1000) == sequential.sequential_scheme(1001, 1000) \
        == sequential.SEQUENTIAL_SCHEME
    assert sequential.sequential_scheme(1000, 1000) == sequential.sequential_scheme(500, 1000) \
        == sequential.SEQUENTIAL_SINGLE_LOOK_SCHEME != sequential.SEQUENTIAL_SCHEME


# --------------------------------------------------------------------------- soundness on simulated counts

@pytest.mark.parametrize("sequence", ["spending", "mixture"])
@pytest.mark.parametrize("final_share", [None, SEQUENTIAL_FINAL_SHARE])
@pytest.mark.parametrize("p", [0.6, 0.95, 0.995])
def test_bounds_hold_under_the_worst_stopping_rule_and_peeking_does_not(final_share, p, sequence):
    """Stop at the first look whose lower bound exceeds pA: still at most alpha false certificates."""
    alpha, runs = 0.1, 3000
    adversary = lambda lower: lower > p   # noqa: E731
    real = SequentialCertifier(SIGMA, alpha, LOOKS, radius_tol=0.0, final_share=final_share, sequence=sequence)
    lower, _ = simulate(real, p, runs, np.random.default_rng(1), stop_rule=adversary)
    assert rate_is_at_most((lower > p).sum(), runs, alpha), (lower > p).mean()
    peeking = Peeking(SIGMA, alpha, LOOKS, radius_tol=0.0, final_share=final_share)
    lower, _ = simulate(peeking, p, runs, np.random.default_rng(1), stop_rule=adversary)
    assert not rate_is_at_most((lower > p).sum(), runs, alpha), (lower > p).mean()
    assert (lower > p).mean() > 2 * alpha


@pytest.mark.parametrize("sequence", ["spending", "mixture"])
@pytest.mark.parametrize("stop_alpha", [None, sequential.STOP_ALPHA])
@pytest.mark.parametrize("below", [1e-4, 1e-3])
def test_radii_mode_false_certificates_at_most_alpha_and_peeking_exceeds_it(below, stop_alpha, sequence):
    """pA just below the threshold of radius 0.5: certifying 0.5 is a false certificate."""
    alpha, runs = 0.1, 3000
    p = norm.cdf(0.5 / SIGMA) - below
    real = SequentialCertifier(SIGMA, alpha, LOOKS, radii=RADII, final_share=SEQUENTIAL_FINAL_SHARE,
                               stop_alpha=stop_alpha, sequence=sequence)
    lower, samples = simulate(real, p, runs, np.random.default_rng(2))
    false = real.radius(lower) >= 0.5
    assert np.all(lower[false] > p)   # a false certificate is a lower bound above pA
    assert rate_is_at_most(false.sum(), runs, alpha), false.mean()
    assert np.all(real.radius(lower) >= 0.25)   # the level below is certified, as it should be
    peeking = Peeking(SIGMA, alpha, LOOKS, radii=RADII, final_share=SEQUENTIAL_FINAL_SHARE, stop_alpha=stop_alpha)
    lower, _ = simulate(peeking, p, runs, np.random.default_rng(2))
    false = peeking.radius(lower) >= 0.5
    assert not rate_is_at_most(false.sum(), runs, alpha), false.mean()


@pytest.mark.parametrize("p", [0.3, 0.52, 0.9, 0.99, 0.999, 0.9995])   # (at p = 1 no bound can exceed p)
@pytest.mark.parametrize("tol", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("sequence", ["spending", "mixture"])
def test_acr_mode_false_certificates_at_most_alpha(p, tol, sequence):
    alpha, runs = 0.05, 2000
    looks = LOOKS
    real = SequentialCertifier(SIGMA, alpha, looks, radius_tol=tol * SIGMA, final_share=SEQUENTIAL_FINAL_SHARE,
                               sequence=sequence, checkpoints=LOOKS)
    lower, samples = simulate(real, p, runs, np.random.default_rng(3))
    assert rate_is_at_most((lower > p).sum(), runs, alpha), (lower > p).mean()
    if p < 0.5:
        assert np.all(lower < 0.5) and np.all(samples == LOOKS[0])   # abstain, decided at once


def test_radii_mode_stops_early_when_decided_and_reports_the_decided_level():
    alpha, runs = 0.001, 500
    certifier = SequentialCertifier(SIGMA, alpha, look_schedule(100000, 1000), radii=[0.25, 0.5, 0.75, 1.0],
                                    final_share=SEQUENTIAL_FINAL_SHARE, stop_alpha=sequential.STOP_ALPHA)
    rng = np.random.default_rng(4)
    # pA = 1: 0.75 is certified after a few thousand samples; 1.0 needs more than 10^5 samples
    lower, samples = simulate(certifier, 1.0, runs, rng)
    assert np.all((certifier.radius(lower) >= 0.75) & (certifier.radius(lower) < 1.0))
    assert np.all(samples <= 8000)
    # far from every threshold: decided early; the radius lies between the decided level and the next
    p = norm.cdf(0.37 / SIGMA)
    lower, samples = simulate(certifier, p, runs, rng)
    radius = certifier.radius(lower)
    assert np.mean((radius >= 0.25) & (radius < 0.5)) > 0.99
    assert np.median(samples) <= 4000
    # abstain: decided at the first look
    lower, samples = simulate(certifier, 0.3, runs, rng)
    assert np.all(lower < 0.5) and np.all(samples == 1000)


def test_needed_counts_are_the_least_counts_whose_last_look_reaches_each_level():
    for unanimous in (False, True):
        certifier = sequential.sequential_certifier(SIGMA, 0.001, 20000, 500, radii=[0.25, 0.5, 0.75, 1.0],
                                                    pilot_unanimous=unanimous)
        final = lambda k: float(certifier.final_lower(np.array([k]))[0])   # noqa: E731
        needed = certifier.needed_counts()
        # radius 1.0 (4 sigma) is out of reach of n_max samples
        assert needed[-1] == certifier.n_max + 1 and final(certifier.n_max) < certifier.thresholds()[-1]
        for count, threshold in zip(needed[:-1], certifier.thresholds()[:-1]):
            assert final(count) >= threshold > final(count - 1)


def test_reach_probability_is_the_beta_binomial_predictive_of_the_jeffreys_posterior():
    """P[count at n_max >= needed | count at n] = integral of Beta(count + 1/2, n - count + 1/2) x binomial tail."""
    from scipy.integrate import quad
    certifier = SequentialCertifier(SIGMA, 0.05, [100, 200, 1000], radii=[0.25], final_share=0.5, futility=0.1)
    needed = int(certifier.needed_counts()[1])
    assert 800 < needed < 1000
    for count in (80, 88, 95, 100):
        def integrand(p):
            return beta.pdf(p, count + 0.5, 100 - count + 0.5) * binom.sf(needed - count - 1, 900, p)
        expected = quad(integrand, 0, 1, points=[count / 100], limit=200, epsabs=1e-13)[0]
        assert float(certifier.reach_probability(0, count, 1)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_futility_gives_up_where_fixed_n_rarely_certifies_the_next_level_and_keeps_where_it_does():
    """The radii mode's futility stop (``RADII_FUTILITY``) saves samples without losing what fixed-N certifies."""
    alpha, runs, n_max = 0.001, 300, 100000
    certifier = sequential.sequential_certifier(SIGMA, alpha, n_max, 1000, radii=[0.25, 0.5, 0.75])
    threshold = certifier.thresholds()[2]   # radius 0.5
    # the least count at which fixed-N CERTIFY (a single look at the whole of alpha) certifies 0.5, and one
    # standard deviation of the count there
    low = int(SequentialCertifier(SIGMA, alpha, [n_max], radii=[0.25, 0.5, 0.75]).needed_counts()[2])
    assert cp_lower(low, n_max, alpha) >= threshold > cp_lower(low - 1, n_max, alpha)
    spread = math.sqrt(threshold * (1 - threshold) * n_max)
    # the same rule without the predictive stop, on the same streams
    patient = bench_sequential_module().without_futility(certifier)
    # fixed-N certifies 0.5 with probability 0.02: given up long before N-max
    lower, samples = simulate(certifier, (low - 2 * spread) / n_max, runs, np.random.default_rng(11))
    _, patient_samples = simulate(patient, (low - 2 * spread) / n_max, runs, np.random.default_rng(11))
    assert np.median(samples) <= n_max / 4 < np.median(patient_samples)
    assert np.mean(certifier.radius(lower) >= 0.5) <= 0.05
    # fixed-N certifies 0.5 with probability 0.98: certified nearly as often as without the predictive stop (its
    # price: a stream that dips early is given up, about 5 points here, 300 streams)
    lower, samples = simulate(certifier, (low + 2 * spread) / n_max, runs, np.random.default_rng(12))
    patient_lower, _ = simulate(patient, (low + 2 * spread) / n_max, runs, np.random.default_rng(12))
    certified, patient_certified = (np.mean(rule.radius(bound) >= 0.5)
                                    for rule, bound in ((certifier, lower), (patient, patient_lower)))
    assert patient_certified >= 0.9 and certified >= patient_certified - 0.1, (certified, patient_certified)


def test_acr_mode_radius_is_within_the_tolerance_of_fixed_n():
    """Stopped early, the radius is rarely much below CERTIFY's at N = N_max on the same stream.

    The rule of ``certify.py --sequential`` without ``--radii``, which steers by the (1 - STOP_ALPHA) upper bound.
    """
    alpha, runs, tol = 0.001, 400, 0.1 * SIGMA
    certifier = sequential.sequential_certifier(SIGMA, alpha, 100000, 1000, radius_tol=tol)
    assert certifier.stop_alpha == sequential.STOP_ALPHA
    for p in (0.8, 0.99):
        seed = int(p * 1000)
        lower, samples = simulate(certifier, p, runs, np.random.default_rng(seed))
        fixed = certifier.radius(cp_lower(np.random.default_rng(seed + 1).binomial(100000, p, runs), 100000, alpha))
        assert np.all(samples < 100000)   # stopped before N_max...
        assert np.mean(certifier.radius(lower)) >= np.mean(fixed) - tol   # ...within the tolerance


def test_sequential_predictor_errs_at_most_alpha_and_peeking_would_not():
    """On a tie (pA = pB) predicting is an error; with early stopping its rate stays <= alpha."""
    alpha, runs = 0.1, 3000
    looks = look_schedule(20000, 500)

    def errors(predictor):
        rng = np.random.default_rng(5)
        a = np.zeros(runs, dtype=int)
        active = np.ones(runs, dtype=bool)
        predicted = np.zeros(runs, dtype=bool)
        drawn = 0
        for look, num in enumerate(looks):
            a[active] += rng.binomial(num - drawn, 0.5, size=int(active.sum()))
            drawn = num
            top, second = np.maximum(a[active], num - a[active]), np.minimum(a[active], num - a[active])
            stop, decided = predictor.step(look, top, second)
            index = np.flatnonzero(active)
            predicted[index[stop & decided]] = True
            active[index[stop]] = False
        assert not active.any()
        return int(predicted.sum())

    assert rate_is_at_most(errors(SequentialPredictor(alpha, looks)), runs, alpha)

    class PeekingPredictor(SequentialPredictor):
        def look_alpha(self, look):
            return self.alpha
    assert not rate_is_at_most(errors(PeekingPredictor(alpha, looks)), runs, alpha)


def test_sequential_predictor_uses_the_published_binomial_test():
    from scipy.stats import binomtest
    top = np.array([5, 30, 60, 61, 100, 517, 9000])
    second = np.array([5, 10, 40, 39, 0, 480, 8800])
    expected = [binomtest(int(a), int(a + b), p=0.5).pvalue for a, b in zip(top, second)]
    assert np.allclose(sequential.two_sided_binomial_pvalue(top, top + second), expected, rtol=1e-9, atol=1e-15)


def test_sequential_predictor_predicts_a_clear_winner_at_the_first_look():
    looks = look_schedule(100000, 1000)
    assert SequentialPredictor(0.001, looks).step(0, 900, 50) == (True, True)
    assert SequentialPredictor(0.001, looks).step(len(looks) - 1, 50001, 49999) == (True, False)
    assert SequentialPredictor(0.001, looks).step(0, 560, 440) == (False, False)  # undecided yet


def predictor_step_by_hand(looks, alpha, look, a, b):
    """(stop, decided) of sequential PREDICT from scipy's binomial test and beta quantile, at alpha / K."""
    from scipy.stats import binomtest
    a_k = alpha / len(looks)
    decided = a + b > 0 and binomtest(a, a + b).pvalue <= a_k
    if look == len(looks) - 1:
        return True, decided
    upper = beta.ppf(1 - a_k, a + 1, a + b - a) if a < a + b else 1.0
    final_total = round((a + b) * looks[-1] / looks[look])
    final_a = math.floor(upper * final_total)
    hopeless = final_total == 0 or binomtest(final_a, final_total).pvalue > a_k
    return decided or hopeless, decided


def test_sequential_predictor_step_by_hand():
    """Each decision of ``step`` against ``predictor_step_by_hand``."""
    expected = predictor_step_by_hand
    cases = [((10, 20), 0.01, 0, 10, 0), ((10, 20), 0.01, 0, 9, 1), ((10, 20), 0.01, 1, 15, 5),
             ((10, 11), 0.01, 0, 5, 5), ((10, 11), 0.01, 0, 8, 2), ((10, 11), 0.01, 1, 11, 0),
             ((10, 40), 0.01, 0, 7, 3), ((10, 40), 0.01, 0, 6, 4), ((10, 20, 40), 0.03, 1, 12, 8),
             ((10, 20, 40), 0.03, 1, 15, 5), ((10, 20, 40), 0.03, 0, 0, 0), ((10, 20, 40), 0.03, 2, 0, 0),
             ((10, 100), 0.01, 0, 1, 0)]   # one top-two sample: its upper bound is 1, so 10 of 10 at the end
    for looks, alpha, look, a, b in cases:
        assert SequentialPredictor(alpha, looks).step(look, a, b) == expected(looks, alpha, look, a, b), \
            (looks, alpha, look, a, b)
    # at the threshold: 10 of 10 has p-value 2^-9 = alpha_k, which decides (the test rejects at p <= alpha_k)
    assert SequentialPredictor(2.0 ** -8, [10, 20]).step(0, 10, 0) == (True, True)
    assert SequentialPredictor(2.0 ** -8, [10, 20]).step(1, 10, 0) == (True, True)
    assert SequentialPredictor(2.0 ** -9, [10, 20]).step(1, 10, 0) == (True, False)
    # 5 of 5, at best 10 of 10 at the end: p-value 2^-9 = alpha_k there, not hopeless (it could still decide)
    assert SequentialPredictor(2.0 ** -8, [5, 10]).step(0, 5, 0) == (False, False)
    # numbers give bools, arrays give arrays
    assert all(type(value) is bool for value in SequentialPredictor(0.01, [10, 20]).step(0, 10, 0))
    for look, stops, decisions in ((0, [True, False], [True, False]), (1, [True, True], [True, False])):
        stop, decided = SequentialPredictor(0.01, [10, 20]).step(look, np.array([10, 9]), np.array([0, 1]))
        assert stop.tolist() == stops and decided.tolist() == decisions


def test_predict_sequential_returns_a_sure_class_at_the_first_look():
    """Every sample class 0 (a margin of 10 against noise of sigma 0.01): 100 of 100 at the first look
    has p-value 2^-99, far below alpha / K, so PREDICT stops there with class 0."""
    smooth = Smooth(_FirstValues(), 2, 0.01)
    xs = torch.tensor([[[10.0, 0.0]], [[0.0, 10.0]]])   # G x C x W: one channel for two images
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    assert sequential.predict_sequential(smooth, xs, 1000, 0.001, 100, generators) == [(0, 100), (1, 100)]


def test_predict_sequential_counts_every_sample_to_each_look():
    """Two images with P(class 0) = 0.62 and 0.5: at each look the first n samples of the image's stream
    (fixed-N counts from the same seed) are judged by hand; the run ends at the first look that stops."""
    smooth, looks = Smooth(_FirstValues(), 3, 1.0), [100, 200, 300, 400, 600, 800, 1000]
    xs = torch.tensor([[0.43, 0.0, -9.0], [0.0, 0.0, -9.0]])   # Phi(0.43 / sqrt 2) = 0.62
    expected = []
    for i in range(2):
        for look, n in enumerate(looks):
            counts = np.sort(smooth.sample_counts(xs[i], n, 100, torch.Generator().manual_seed(i)))[::-1]
            stop, decided = predictor_step_by_hand(looks, 0.001, look, int(counts[0]), int(counts[1]))
            if stop:
                expected.append((0 if decided else Smooth.ABSTAIN, n))
                break
    # neither stops at the first look (so the counts must add up over looks); one predicts, one abstains
    assert [result[0] for result in expected] == [0, Smooth.ABSTAIN] and min(n for _, n in expected) > 100, expected
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    assert sequential.predict_sequential(smooth, xs, 1000, 0.001, 100, generators) == expected


class _FirstValues(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_alpha_shares_by_hand():
    """``spending``: the last look gets alpha * final_share, the others the rest in equal parts; a final
    share of 0 or 1 is refused. ``mixture`` without a checkpoint share: only the two parts' levels."""
    two = SequentialCertifier(SIGMA, 0.01, [100, 200], final_share=0.9, sequence="spending")
    assert [two.look_alpha(k) for k in (0, 1)] == pytest.approx([0.001, 0.009])
    assert SequentialCertifier(SIGMA, 0.01, [100], final_share=0.9, sequence="spending").look_alpha(0) == 0.01
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            SequentialCertifier(SIGMA, 0.01, [100, 200, 300], final_share=share, sequence="spending")
    mixture = SequentialCertifier(SIGMA, 0.01, [100, 200, 300], final_share=0.5, mixture_share=0.5)
    assert mixture.union_levels() == pytest.approx([0.005, 0.005])


def test_certify_sequential_draws_at_every_look_of_both_rules(monkeypatch):
    """The looks handed to ``draw_in_rounds`` by CERTIFY and PREDICT: the geometric ones of growth 1.5 (by
    default) or of the growth given; with radii, those of the rule of a unanimous pilot and of the other rule together."""
    seen = []
    monkeypatch.setattr(sequential, "draw_in_rounds", lambda smooth, xs, looks, *rest: seen.append(looks) or [])
    smooth = Smooth(_FirstValues(), 2, 0.25)
    xs = torch.tensor([[10.0, 0.0]])
    sequential.certify_sequential(smooth, xs, 10, 1000, 0.001, 100, [None])
    sequential.certify_sequential(smooth, xs, 10, 1000, 0.001, 100, [None], growth=2.0)
    # 1, 1.5, 2.25, 3.375, 5.06, 7.59 batches, rounded up; 1, 2, 4, 8 batches; n_max last
    sequential.predict_sequential(smooth, xs, 1000, 0.001, 100, [None])
    sequential.predict_sequential(smooth, xs, 1000, 0.001, 100, [None], growth=2.0)
    assert seen == [[100, 200, 300, 400, 600, 800, 1000], [100, 200, 400, 800, 1000]] * 2
    seen.clear()
    sequential.certify_sequential(smooth, xs, 10, 1000, 0.001, 100, [None], radii=[0.25, 0.5])
    rules = [sequential.sequential_certifier(0.25, 0.001, 1000, 100, [0.25, 0.5], pilot_unanimous=flag).looks
             for flag in (False, True)]
    assert set(rules[0]) != set(rules[1]) and seen[0] == sorted(set(rules[0]) | set(rules[1]))


# --------------------------------------------------------------------------- exact false-certificate rates

def bench_sequential_module():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_sequential
    return bench_sequential


def test_exact_law_of_a_run_matches_enumerating_every_count_path():
    """The dynamic programme of bench_sequential --exact-worst-case against all count paths of three looks."""
    exact = bench_sequential_module().exact_false_certificates
    looks, p, alpha = [8, 16, 24], 0.8, 0.2
    paths = np.array(np.meshgrid(*[np.arange(9)] * 3, indexing="ij")).reshape(3, -1)   # increments per look
    weight = np.prod(binom.pmf(paths, 8, p), axis=0)
    for certifier in (SequentialCertifier(SIGMA, alpha, looks, radius_tol=0.0, final_share=0.5, sequence="spending"),
                      Peeking(SIGMA, alpha, looks, radius_tol=0.0)):
        for adversary in (None, lambda lower: lower > p):
            running, false, last = np.ones(weight.size, dtype=bool), 0.0, 0.0
            for look in range(3):
                stop, lower = certifier.step(look, paths[:look + 1].sum(axis=0))
                if adversary is not None:
                    stop = stop | adversary(lower)
                if look == 2:
                    last = weight[running].sum()
                false += weight[running & stop & (lower > p)].sum()
                running &= ~stop
            law = exact(certifier, p, stop_rule=adversary, tail=0.0)
            assert law["false"] == pytest.approx(false, rel=1e-9, abs=1e-15) and law["lost"] < 1e-12
            assert law["last"] == pytest.approx(last, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_exact_worst_case_false_certificate_rate_is_at_most_alpha_and_peeking_exceeds_it(alpha):
    """Computed exactly (no sampling): the worst pA of each mode, and the same rule peeking uncorrected.

    Radii mode (a look after every batch): pA just below Phi(3), the threshold of the largest listed
    radius that N-max samples can certify, where a certificate of it is false. ACR mode: a few pA,
    under its own stopping rule and under the worst one (stop once the bound exceeds pA; with radius
    tolerance 0, so that the mode's own rule rarely stops the run first).
    """
    exact = bench_sequential_module().exact_false_certificates
    n_max, batch = 20000, 500
    radii = [0.25, 0.5, 0.75, 1.0]
    p = norm.cdf(0.75 / SIGMA) - 1e-9
    for unanimous in (False, True):   # each rule is valid given the pilot that chose it
        certifier = sequential.sequential_certifier(SIGMA, alpha, n_max, batch, radii=radii, pilot_unanimous=unanimous)
        assert certifier.thresholds()[-2] <= certifier._ceiling() < certifier.thresholds()[-1]   # 0.75: the largest
        law = exact(certifier, p)
        assert law["lost"] < 1e-12
        assert 0.1 * alpha < law["false"] + law["lost"] <= alpha, (unanimous, law)
    peeking = Peeking(SIGMA, alpha, certifier.looks, radii=radii, final_share=SEQUENTIAL_FINAL_SHARE,
                      stop_alpha=sequential.STOP_ALPHA, checkpoints=look_schedule(n_max, batch))
    assert exact(peeking, p)["false"] > 2 * alpha
    own = sequential.sequential_certifier(SIGMA, alpha, n_max, batch, radius_tol=0.1 * SIGMA)
    patient = sequential.sequential_certifier(SIGMA, alpha, n_max, batch, radius_tol=0.0)
    peeking = Peeking(SIGMA, alpha, patient.looks, radius_tol=0.0, final_share=SEQUENTIAL_FINAL_SHARE)
    for p in (0.7, 0.99, 0.999):
        adversary = lambda lower: lower > p   # noqa: E731
        for certifier, rule in ((own, None), (patient, adversary)):
            law = exact(certifier, p, stop_rule=rule)
            assert law["lost"] < 1e-12 and law["false"] + law["lost"] <= alpha, (p, rule, law)
        if p < 0.999:   # (at 0.999 the early looks have too few samples for any bound to exceed pA)
            assert exact(peeking, p, stop_rule=adversary)["false"] > 2 * alpha


# --------------------------------------------------------------------------- the sampling engine

def test_rounds_continue_the_images_stream_like_fixed_n(monkeypatch):
    """The count at each look is the count of CERTIFY's first n estimation samples (same generator)."""
    seen = []
    step = SequentialCertifier.step

    def recording(self, look, count):
        seen.append((self.looks[look], np.array(count).copy()))
        return step(self, look, count)

    monkeypatch.setattr(SequentialCertifier, "step", recording)
    data, distances = points(repeats=1, seed=4)
    xs = torch.stack([x for x, _ in data])
    smooth = Smooth(Linear(), 2, 0.5, images_per_batch=3)
    n0, batch = 30, 200
    results = sequential.certify_sequential(smooth, xs, n0, 3000, 0.01, batch,
                                            [noise_generator(11, i, "cpu") for i in range(len(data))])
    assert len(seen) >= 2
    # which images were still running at each look: the first look has all of them
    active = list(range(len(data)))
    for num, counts in seen:
        assert len(counts) == len(active)
        for i, count in zip(active, counts):
            generator = noise_generator(11, i, "cpu")
            selection = smooth.sample_counts(xs[i], n0, batch, generator)
            estimation = smooth.sample_counts(xs[i], num, batch, generator)
            assert count == estimation[selection.argmax()]
        active = [i for i in active if results[i][2] > n0 + num]
    assert all(n0 < samples <= n0 + 3000 for _, _, samples in results)


def test_sequential_results_do_not_depend_on_grouping():
    data, _ = points(repeats=1, seed=5)
    xs = torch.stack([x for x, _ in data])
    run = lambda group: sequential.certify_sequential(  # noqa: E731
        Smooth(Linear(), 2, 0.25, images_per_batch=group), xs, 50, 5000, 0.01, 250,
        [noise_generator(3, i, "cpu") for i in range(len(data))], radii=[0.1, 0.2])
    assert run(1) == run(4)


# --------------------------------------------------------------------------- the scripts

@pytest.fixture
def linear_script(monkeypatch, tmp_path):
    """The scripts evaluate ``Linear`` on the points; the checkpoint named "linear" is a file in the working
    folder (its content goes into the output's settings record)."""
    data, distances = points(repeats=30, seed=6)
    monkeypatch.setattr(eval_utils, "get_dataset", lambda dataset, split, *a, **k: data)
    monkeypatch.setattr(eval_utils, "load_base_classifier", lambda path, dataset, device, **_: Linear().to(device))
    torch.save({"arch": "linear", "state_dict": Linear().state_dict()}, tmp_path / "linear")
    monkeypatch.chdir(tmp_path)
    return data, distances


def read_rows(path):
    with open(path) as handle:
        return handle.read().split("\n")


@pytest.mark.parametrize("mode", [["--radii", "0.1", "0.2", "0.4"], ["--radius-tol", "0.05"], []])
def test_certify_script_sequential_is_sound_on_a_linear_classifier(linear_script, tmp_path, mode):
    data, distances = linear_script
    sigma, n0, n_max, alpha = 0.25, 100, 4000, 0.05
    out = tmp_path / "seq.tsv"
    certify.main(["fmnist", "linear", str(sigma), str(out), f"--N0={n0}", f"--N-max={n_max}", f"--alpha={alpha}",
                  "--batch=500", "--seed=8", "--batch-images=4", "--sequential"] + mode)
    assert read_rows(out)[0] == eval_utils.CERTIFY_HEADER + "\tsamples"
    idx, predictions, radii, samples = read_columns(out, "idx", "predict", "radius", "samples")
    assert list(idx) == list(range(len(data)))
    predictions = predictions.astype(int)
    wrong = wrong_certificates(predictions, radii, distances, 1e-9)
    assert rate_is_at_most(wrong.sum(), len(wrong), alpha), wrong.sum()
    assert np.all((samples > n0) & (samples <= n0 + n_max))
    assert np.mean(predictions[distances == 0] == -1) >= 0.8
    far = np.abs(distances) >= 0.6
    assert np.all(predictions[far] == (distances[far] > 0))
    if mode and mode[0] == "--radii":
        # pA = Phi(0.6 / 0.25) is far above the threshold of 0.4: decided well before N-max
        assert np.all(radii[far] >= 0.4) and np.all(samples[far] < n0 + n_max)


def test_default_certify_output_is_fixed_n_certify_through_the_same_generator(linear_script, tmp_path):
    """Without --sequential certify.py writes CERTIFY's rows: Smooth.certify with noise_generator(seed, idx)."""
    data, _ = linear_script
    sigma, n0, n, alpha, seed = 0.25, 50, 700, 0.01, 12
    out = tmp_path / "fixed.tsv"
    certify.main(["fmnist", "linear", str(sigma), str(out), f"--N0={n0}", f"--N={n}", f"--alpha={alpha}",
                  "--batch=300", f"--seed={seed}", "--max=12"])
    lines = read_rows(out)
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and lines[-1] == ""
    smooth = Smooth(Linear(), 2, sigma)
    for idx, line in enumerate(lines[1:-1]):
        x, label = data[idx]
        prediction, radius = smooth.certify(x, n0, n, alpha, 300, noise_generator(seed, idx, "cpu"))
        fields = line.split("\t")
        assert fields[:5] == [str(idx), str(label), str(prediction), "{:.3}".format(radius),
                              str(int(prediction == label))]
        assert len(fields) == 6


def test_predict_script_sequential(linear_script, tmp_path):
    data, distances = linear_script
    out = tmp_path / "predict.tsv"
    alpha, n_max = 0.05, 4000
    predict.main(["fmnist", "linear", "0.25", str(out), f"--N-max={n_max}", f"--alpha={alpha}", "--seed=9",
                  "--batch=400", "--sequential"])
    assert read_rows(out)[0] == eval_utils.PREDICT_HEADER + "\tsamples"
    predictions, samples = read_columns(out, "predict", "samples")
    on_plane = distances == 0
    assert rate_is_at_most(np.sum(predictions[on_plane] != -1), on_plane.sum(), alpha)
    far = np.abs(distances) >= 0.3
    assert np.mean(predictions[far] == (distances[far] > 0)) >= 0.95
    assert np.all(samples[far] < n_max) and np.all((samples > 0) & (samples <= n_max))


@pytest.mark.parametrize("argv, message", [
    (["--radii", "0.5"], "--sequential"),
    (["--N-max", "1000"], "--sequential"),
    (["--radius-tol", "0.1"], "--sequential"),
    (["--sequential", "--radii", "0.5", "--radius-tol", "0.1"], "one of them"),
    (["--sequential", "--radii", "-1"], "non-negative"),
])
def test_bad_sequential_options_stop_before_any_work(linear_script, tmp_path, capsys, argv, message):
    out = tmp_path / "x.tsv"
    with pytest.raises(SystemExit) as exc:
        certify.main(["fmnist", "linear", "0.25", str(out)] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()


def test_sequential_rows_are_refused_by_a_fixed_n_run_and_resumed_by_a_sequential_one(linear_script, tmp_path,
                                                                                     capsys):
    out = tmp_path / "seq.tsv"
    argv = ["fmnist", "linear", "0.25", str(out), "--N0=20", "--N=1000", "--batch=250", "--seed=1", "--max=4"]
    certify.main(argv + ["--sequential"])
    first = read_rows(out)
    with pytest.raises(SystemExit):
        certify.main(argv)   # a fixed-N run must not append to a sequential file
    assert "not a result file" in capsys.readouterr().err
    certify.main(argv + ["--sequential", "--max=6"])
    rows = read_rows(out)
    assert rows[:len(first) - 1] == first[:-1] and len(rows) == len(first) + 2


@pytest.mark.parametrize("n_max, scheme", [(500, sequential.SEQUENTIAL_SINGLE_LOOK_SCHEME),
                                           (2000, sequential.SEQUENTIAL_SCHEME)])
def test_certify_records_the_scheme_of_its_looks(linear_script, tmp_path, n_max, scheme):
    import json
    out = tmp_path / "seq.tsv"
    certify.main(["fmnist", "linear", "0.25", str(out), "--N0=20", f"--N-max={n_max}", "--batch=1000", "--seed=1",
                  "--max=2", "--sequential", "--radii", "0.1"])
    assert json.loads((tmp_path / "seq.tsv.meta.json").read_text())["settings"]["sequential_scheme"] == scheme


def test_floor_3_digits_never_rounds_up():
    for value in np.concatenate([np.random.default_rng(0).uniform(0, 3, 2000), [0.25, 0.5, 1.0, 0.2496]]):
        printed = float("{:.3}".format(certify_rows.floor_3_digits(value)))
        assert printed <= value + 1e-12 and value - printed < 0.01 * max(value, 1e-3) + 1e-12
    assert certify_rows.floor_3_digits(0.2496) == pytest.approx(0.249)
    assert certify_rows.floor_3_digits(0.0) == 0.0


# --------------------------------------------------------------------------- analysis

def test_analyze_reports_mean_samples_when_the_column_is_present(tmp_path, capsys):
    header = eval_utils.CERTIFY_HEADER + "\tsamples"
    seq = tmp_path / "seq.tsv"
    seq.write_text(header + "\n0\t1\t1\t0.5\t1\t0:00:01\t1100\n1\t2\t2\t0.3\t1\t0:00:01\t4100\n"
                   "2\t3\t-1\t0.0\t0\t0:00:01\t300\n")
    fixed = tmp_path / "fixed.tsv"
    fixed.write_text(eval_utils.CERTIFY_HEADER + "\n0\t1\t1\t0.5\t1\t0:00:01\n")
    assert analyze.ApproximateAccuracy(seq).mean_samples() == pytest.approx(5500 / 3)
    assert np.isnan(analyze.ApproximateAccuracy(fixed).mean_samples())
    assert analyze.main([str(seq), str(fixed), "--radii", "0", "0.5", "--labels", "S", "F"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("|")[-2].strip() == "samples/image"
    assert table[2].startswith("| S |") and table[2].split("|")[-2].strip() == "1,833"
    assert table[3].startswith("| F |") and table[3].split("|")[-2].strip() == "n/a"
    # a file without the column: the table is the one it always was
    assert analyze.main([str(fixed), "--radii", "0", "0.5"]) == 0
    assert "samples" not in capsys.readouterr().out


def test_certify_c_sequential_writes_the_samples_column(tmp_path):
    import certify_c
    from test_eval_scripts import make_mnist_c, save_lenet
    checkpoint = save_lenet(tmp_path / "checkpoint.pth.tar")
    base = tmp_path / "mnist_c"
    labels = make_mnist_c(base, ["identity", "fog"])
    prefix = str(tmp_path / "out") + "/"
    certify_c.main([checkpoint, prefix, "--base_c_path", str(base), "--corruptions", "identity,fog", "--N0=20",
                    "--N-max=400", "--batch=100", "--seed=0", "--sequential", "--radii", "0.25"])
    for name in ("identity", "fog"):
        lines = read_rows(f"{prefix}{name}.tsv")
        assert lines[0] == eval_utils.CERTIFY_HEADER + "\tsamples"
        body = [line.split("\t") for line in lines[1:-1]]
        assert [int(row[0]) for row in body] == list(range(len(labels)))
        assert all(20 < int(row[6]) <= 420 for row in body)
        with open(f"{prefix}{name}.tsv.meta.json") as handle:
            assert json.load(handle)["settings"]["sequential_scheme"] == sequential.sequential_scheme(400, 100)


# --------------------------------------------------------------------------- the clairvoyant bound of the benchmark

def test_clairvoyant_bound_is_the_single_look_clopper_pearson_sample_size(tmp_path, capsys):
    """An all-correct image certified at 3 sigma needs ln(1 / alpha) / -ln Phi(3) samples (+ N0); an abstention N0."""
    bench_sequential = bench_sequential_module()
    fixed = tmp_path / "fixed.tsv"
    # radius 0.953 at sigma 0.25: the bound of 100,000 correct samples out of 100,000
    fixed.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.953\t1\t0:00:01\n"
                     "1\t2\t-1\t0.0\t0\t0:00:01\n")
    needed = math.ceil(math.log(1000) / -math.log(norm.cdf(3.0)))
    assert bench_sequential.clairvoyant_samples(0.953, 0.25, [0.0, 0.25, 0.5, 0.75, 1.0], 0.001, 100000, 100) \
        == 100 + needed
    bench_sequential.main([str(fixed), "--oracle", "--sigma", "0.25", "--radii", "0.25", "0.5", "0.75", "1.0",
                           "--acr-tol", "0.02"])
    out = capsys.readouterr().out
    assert f"clairvoyant lower bound {(200 + needed) / 2:,.0f} samples per image" in out
    acr_line = next(line for line in out.splitlines() if "ACR within" in line)
    bound = float(acr_line.split("at least ")[1].split(" samples")[0].replace(",", ""))
    # a lower bound on what the clairvoyant certifier achieves: the least multiple of 100 samples at which the
    # all-correct image's radius sigma PhiInv(alpha^(1/n)) comes within the budget 2 * 0.02 of 0.953 (the
    # abstention takes N0); on this single-image knapsack the dual is within a size step of it
    reach = math.log(1000) / -math.log(norm.cdf((0.953 - 2 * 0.02) / 0.25))
    achievable = (100 + 100 + math.ceil(reach / 100) * 100) / 2
    assert achievable - 50 <= bound <= achievable


def test_wald_bound_of_an_all_correct_image_is_its_sequential_probability_ratio_test(tmp_path):
    """With p = 1 and no miss allowed, Wald's bound is kl(1 || alpha) / KL(1 || t) = ln(1 / alpha) / -ln t (+ N0).

    Allowing misses lowers it, and an abstention costs N0.
    """
    bench_sequential = bench_sequential_module()
    fixed = tmp_path / "fixed.tsv"
    fixed.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.953\t1\t0:00:01\n"
                     "1\t2\t-1\t0.0\t0\t0:00:01\n")
    table = bench_sequential.load_results(str(fixed))
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]

    def bound(loss_tol):
        args = argparse.Namespace(sigma=0.25, alpha=0.001, N=100000, N0=100, loss_tol=loss_tol)
        return bench_sequential.wald_samples(table, radii, args)
    assert bench_sequential.fixed_share(0.953, 0.25, 0.001, 100000) == 1.0
    exact = (100 + math.log(1000) / -math.log(norm.cdf(3.0)) + 100) / 2
    assert bound(0.0) == pytest.approx(exact, rel=1e-9)
    # half an image may be missed at each radius (25 points of 2 images): at the miss rate 1/2 the evidence needed
    # falls from kl(1 || alpha) = 6.9 nats to kl(1/2 || alpha) = 2.8
    assert bound(25.0) < exact - 1000
    assert float(bench_sequential.binary_kl(0.3, 0.3)) == 0.0
    assert float(bench_sequential.binary_kl(1.0, 0.5)) == pytest.approx(math.log(2))


def test_wald_image_bound_on_hand_computed_cases():
    """p = 0.9 against t = 0.5 at alpha = 0.001: KL = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.368064 nats; certified always,
    kl(1 || alpha) = ln 1000 = 6.907755, so at least 18.768 draws; certified 9 times in 10, kl(0.9 || alpha) =
    0.9 ln 900 + 0.1 ln(0.1 / 0.999) = 5.891997, so 16.008. The largest threshold bound counts, a threshold at
    or above p and one certified at most alpha of the time add nothing, and N-max caps it."""
    bound = bench_sequential_module().wald_image_bound
    assert float(bound([0.9], [0.5], [[1.0]], 0.001, 10 ** 5)[0]) == pytest.approx(18.768, abs=1e-3)
    assert float(bound([0.9], [0.5], [[0.9]], 0.001, 10 ** 5)[0]) == pytest.approx(16.008, abs=1e-3)
    # a second threshold 0.8 < 0.9 certified half the time: kl(0.5 || alpha) / KL(0.9 || 0.8)
    kl_half = 0.5 * math.log(500) + 0.5 * math.log(0.5 / 0.999)
    near = 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2)
    assert float(bound([0.9], [0.5, 0.8], [[1.0, 0.5]], 0.001, 10 ** 5)[0]) == pytest.approx(kl_half / near)
    assert float(bound([0.9], [0.5, 0.95], [[1.0, 0.3]], 0.001, 10 ** 5)[0]) == pytest.approx(18.768, abs=1e-3)
    assert float(bound([0.9], [0.5], [[0.001]], 0.001, 10 ** 5)[0]) == 0.0
    assert float(bound([0.5], [0.5], [[1.0]], 0.001, 10 ** 5)[0]) == 0.0
    assert float(bound([0.9], [0.5], [[1.0]], 0.001, 10)[0]) == 10
    # p = 1 (every draw the top class): ln(1 / alpha) / -ln t
    assert float(bound([1.0], [0.99865], [[1.0]], 0.001, 10 ** 5)[0]) == pytest.approx(math.log(1000) / -math.log(0.99865))


def test_crossfit_wald_bound_stays_below_the_bound_at_the_true_rates():
    """The plug-in errs upwards (kl is convex); the cross-fitted tangent estimate does not, on average."""
    bench_sequential = bench_sequential_module()
    # always certified: the tangent of kl(. || alpha) at 5.5 / 6 taken at 1, a little below ln(1000) / KL
    point, alpha = 5.5 / 6, 0.001
    tangent = float(bench_sequential.binary_kl(point, alpha)) + (1 - point) * (
        math.log(point / alpha) - math.log((1 - point) / (1 - alpha)))
    always = np.ones((1, 10, 1), dtype=bool)
    kl_09_05 = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    assert float(bench_sequential.crossfit_wald_bound([0.9], [0.5], always, alpha, 10 ** 5)[0]) \
        == pytest.approx(tangent / kl_09_05)
    assert 0.98 * 18.768 < tangent / kl_09_05 < 18.768
    rng = np.random.default_rng(0)
    for rate in (0.1, 0.6):
        runs = rng.random((4000, 10, 2)) < np.array([1.0, rate])
        estimate = bench_sequential.crossfit_wald_bound(np.full(4000, 0.9), [0.5, 0.8], runs, alpha, 10 ** 9)
        true = float(bench_sequential.wald_image_bound([0.9], [0.5, 0.8], [[1.0, rate]], alpha, 10 ** 9)[0])
        plug_in = bench_sequential.wald_image_bound(np.full(4000, 0.9), [0.5, 0.8], runs.mean(axis=1), alpha, 10 ** 9)
        assert estimate.mean() + 3 * estimate.std() / math.sqrt(4000) < true < plug_in.mean()


def test_acr_simulation_steers_by_the_stop_alpha_bound_and_stops_no_later_than_before(tmp_path, capsys):
    """On the same streams the (1 - STOP_ALPHA) upper bound stops every run at or before each look's own level."""
    bench_sequential = bench_sequential_module()
    fixed = tmp_path / "fixed.tsv"
    # an image near 1, one inside (1/2, 1) and an abstention
    fixed.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.953\t1\t0:00:01\n"
                     "1\t2\t2\t0.3\t1\t0:00:01\n2\t3\t-1\t0.0\t0\t0:00:01\n")
    bench_sequential.main([str(fixed), "--simulate", "--acr", "--sigma", "0.25", "--reps", "5"])
    rows = {line.split("|")[1].strip(): line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| current") or line.startswith("| previous")}
    samples = {name: float(row[2].replace(",", "")) for name, row in rows.items()}
    assert 100 < samples["current"] < samples["previous"] <= 100100
    for row in rows.values():   # the ACR stays within the tolerance of fixed-N's on the same streams
        assert abs(float(row[5].split("(")[1].rstrip(") "))) <= 0.1 * 0.25


def test_real_run_against_simulated_uses_the_images_of_both_and_the_sd_of_one_run(tmp_path, capsys):
    """Two images, simulated 100/300 and 1,000/3,000: mean 1,100, sd sqrt((20,000 + 2,000,000) 1.5) / 2."""
    bench_sequential = bench_sequential_module()
    real = tmp_path / "seq.tsv"
    real.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\n0\t1\t1\t0.5\t1\t0:00:01\t400\n"
                    "7\t1\t1\t0.5\t1\t0:00:01\t9\n100\t2\t2\t0.5\t1\t0:00:01\t2600\n")
    fixed = bench_sequential.load_results(str(real)).iloc[[0, 2]].reset_index(drop=True)
    bench_sequential.real_against_simulated(fixed, str(real), np.array([[100.0, 300.0], [1000.0, 3000.0]]))
    sd = math.sqrt((20000 + 2000000) * 1.5) / 2
    out = capsys.readouterr().out
    assert "2 images, real run 1,500 samples per image, simulated 1,100" in out
    assert f"sd of a real run's mean {sd:,.0f}; difference {400 / sd:+.1f} sd" in out


def test_betabinom_sf_is_scipys_summed_over_the_far_side():
    """The predictive stop's beta-binomial tail against scipy's, on both sides of the mean and at the ends."""
    from scipy.stats import betabinom
    cases = [(k, n, c + 0.5, m - c + 0.5) for m, n in ((100, 900), (10000, 90000)) for c in (m // 2, m - 30, m)
             for k in (-1, 0, n // 2, round(c / m * n) - 40, round(c / m * n) + 10, n - 3, n - 1, n)]
    cases += [(3, 10, 1.5, 2.5), (9, 10, 0.5, 1.5)]
    k, n, a, b = map(np.array, zip(*cases))
    assert sequential.betabinom_sf(k, n, a, b) == pytest.approx(betabinom.sf(k, n, a, b), rel=1e-8, abs=1e-12)
    # by hand: n = 2, a = b = 1 is uniform on {0, 1, 2}
    assert sequential.betabinom_sf(np.array([-1, 0, 1, 2]), 2, 1.0, 1.0) == pytest.approx([1, 2 / 3, 1 / 3, 0])


def test_betabinom_sf_sums_a_heavy_tail_over_several_chunks():
    """A first look of 0 (or all) of 100 samples cA: the posterior's tail reaches far beyond 6 sd of the
    predictive law, so the sum goes on chunk after chunk (upwards, or downwards for the mirror image)."""
    from scipy.stats import betabinom
    k = np.array([1000, 3000, 88999, 86999])
    a, b = np.array([0.5, 0.5, 100.5, 100.5]), np.array([100.5, 100.5, 0.5, 0.5])
    assert sequential.betabinom_sf(k, 90000, a, b) == pytest.approx(betabinom.sf(k, 90000, a, b), rel=1e-7, abs=0)


def test_a_scheme_change_of_one_mode_leaves_the_other_modes_rule():
    from sequential_rules import SEQUENTIAL_SCHEME, SEQUENTIAL_SINGLE_LOOK_SCHEME, scheme_of_mode
    radii_rule, acr_rule = scheme_of_mode(SEQUENTIAL_SCHEME, True), scheme_of_mode(SEQUENTIAL_SCHEME, False)
    assert SEQUENTIAL_SCHEME == f"radii: {radii_rule}; ACR: {acr_rule}" and "predictive" in radii_rule
    older_acr = f"radii: {radii_rule}; ACR: Clopper-Pearson 1/2 over geometric looks + 1/2 at the last look"
    assert scheme_of_mode(older_acr, True) == radii_rule and scheme_of_mode(older_acr, False) != acr_rule
    older_radii = f"radii: mixture 0.35 at every batch; ACR: {acr_rule}"
    assert scheme_of_mode(older_radii, True) != radii_rule and scheme_of_mode(older_radii, False) == acr_rule
    assert scheme_of_mode(SEQUENTIAL_SINGLE_LOOK_SCHEME, True) == SEQUENTIAL_SINGLE_LOOK_SCHEME
    assert scheme_of_mode("radii: a rule of no other mode", False) == "radii: a rule of no other mode"


# --------------------------------------------------------------------------- the certifier's decisions, exactly
# Each rule restated from docs/SEQUENTIAL.md in plain numpy and scipy, and compared with ``step`` at every count of
# a few looks: the upper-bound and predictive stops, the top level, the ACR mode's radius tolerance.

def _scipy_cp_lower(count, num, alpha):
    count = np.asarray(count, dtype=float)
    return np.where(count > 0, beta.ppf(alpha, np.maximum(count, 1), num - count + 1), 0.0)


def _scipy_cp_upper(count, num, alpha):
    count = np.asarray(count, dtype=float)
    return np.where(count < num, beta.isf(alpha, count + 1, np.maximum(num - count, 1)), 1.0)


def _radius(sigma, lower):
    return np.where(lower >= 0.5, sigma * norm.ppf(np.maximum(lower, 0.5)), 0.0)


def _mixture(count, num, rule):
    return sequential.mixture_lower(np.asarray(count, dtype=float), num, rule.sequence_alpha,
                                    point_weight=rule.point_weight)


def _expected_radii_stops(rule, look, counts):
    """The radii mode's stop at look k for each count: the top reachable level reached; or, at a checkpoint,
    the next level out of reach of N-max samples even if pA were its 0.95 upper bound; or, from
    ``futility_from`` samples on, the predictive probability of the next level at N-max below ``futility``."""
    n, n_max = rule.looks[look], rule.n_max
    thresholds = np.array([0.5] + [norm.cdf(r / rule.sigma) for r in rule.radii if r > 0])
    lower = rule.anytime_lower(look, counts)

    def last_look(count):   # what the last look reports for this count: the mixture and Clopper-Pearson
        return np.maximum(_mixture(count, n_max, rule), _scipy_cp_lower(count, n_max, rule.final_alpha))
    ceiling = float(last_look([n_max])[0])
    reached = (lower[:, None] >= thresholds[None, :]).sum(axis=1)
    top = reached >= max(int((thresholds <= ceiling).sum()), 1)
    following = thresholds[np.minimum(reached, len(thresholds) - 1)]
    stop = top.copy()
    if n in rule.checkpoints:
        stop |= last_look(np.floor(_scipy_cp_upper(counts, n, 0.05) * n_max)) < following
    if rule.futility is not None and n >= rule.futility_from:
        every = last_look(np.arange(n_max + 1))
        needed = np.array([np.argmax(every >= t) if every[-1] >= t else n_max + 1 for t in following])
        more = needed - counts
        chance = np.where(more <= 0, 1.0, betabinom.sf(more - 1, n_max - n, counts + 0.5, n - counts + 0.5))
        stop |= chance < rule.futility
    return stop


@pytest.mark.parametrize("unanimous,radii", [(False, [0.25, 0.5, 0.75]), (True, [0.25, 0.5, 0.75]), (False, [0.25, 0.5]),
                                             (True, [0.25, 0.5, 0.628])])
def test_radii_stops_by_hand_at_every_count(unanimous, radii):
    """Radius 0.75 (3 sigma) is out of reach of 1,000 samples: the top is radius 0.5, as it is when 0.5 is
    the last level listed (then the level after the one reached is never out of the list). Radius 0.628
    (Phi = 0.994) is reached at N-max by the mixture alone (0.9951, Clopper-Pearson at 0.1 alpha: 0.9931), so
    whether it is out of reach depends on the mixture part of the best bound."""
    shares = sequential.RADII_SHARES_UNANIMOUS if unanimous else sequential.RADII_SHARES_SPLIT
    looks = list(range(100, 1001, 100))
    rule = SequentialCertifier(SIGMA, 0.01, looks, radii=radii, final_share=shares.final,
                               stop_alpha=0.05, futility=0.1, futility_from=500, sequence="mixture",
                               checkpoints=[200, 400, 800], mixture_share=shares.mixture,
                               point_weight=shares.point_weight)
    assert norm.cdf(2) <= float(rule.final_lower([1000])[0]) < norm.cdf(3)
    for look in (0, 1, 4, 7):   # 100 (no rule but the top), 200 (checkpoint), 500 (predictive), 800 (both)
        counts = np.arange(looks[look] + 1)
        stop, lower = rule.step(look, counts)
        assert np.array_equal(lower, rule.anytime_lower(look, counts))
        expected = _expected_radii_stops(rule, look, counts)
        assert np.array_equal(stop, expected), (look, np.flatnonzero(stop != expected))
        assert look == 0 or 0 < expected.sum() < len(counts)   # both decisions occur (at 100, none stops)
    stop, lower = rule.step(len(looks) - 1, np.array([990, 1000]))
    assert stop.tolist() == [True, True] and np.array_equal(lower, rule.final_lower(np.array([990, 1000])))


def test_a_rule_whose_n_max_reaches_only_one_half_stops_once_it_is_reached():
    """With 20 samples at alpha = 0.01 the last look reaches 1/2 but not Phi(1): the top is radius 0."""
    rule = SequentialCertifier(SIGMA, 0.01, [5, 10, 15, 20], radii=[0.25], final_share=0.5, stop_alpha=0.05,
                               sequence="mixture", mixture_share=0.1, point_weight=0.5, checkpoints=[5])
    assert 0.5 <= float(rule.final_lower([20])[0]) < norm.cdf(1)
    for look in range(3):
        counts = np.arange(rule.looks[look] + 1)
        assert np.array_equal(rule.step(look, counts)[0], _expected_radii_stops(rule, look, counts))


def test_acr_stops_by_hand_at_every_count():
    """The ACR mode stops once the radius is within ``radius_tol`` of the radius N-max samples would give
    if pA were its 0.95 upper bound (which also stops an image whose best bound is below 1/2)."""
    sigma, alpha, looks = 0.5, 0.01, [100, 200, 400, 800, 1000]
    rule = SequentialCertifier(sigma, alpha, looks, radius_tol=0.1, final_share=0.5, stop_alpha=0.05,
                               sequence="spending")
    for look in range(4):
        n = looks[look]
        counts = np.arange(n + 1)
        lower = _scipy_cp_lower(counts, n, alpha * 0.5 / 4)
        best = _scipy_cp_lower(np.floor(_scipy_cp_upper(counts, n, 0.05) * 1000), 1000, alpha * 0.5)
        expected = _radius(sigma, lower) >= _radius(sigma, best) - 0.1
        stop, got = rule.step(look, counts)
        assert np.allclose(got, lower, rtol=1e-12, atol=0)
        assert np.array_equal(stop, expected), (look, np.flatnonzero(stop != expected))
        assert 0 < expected.sum() < len(counts)
    assert np.any(expected & (_radius(sigma, lower) > 0))   # at 800 samples, radii settled within the tolerance


def test_radius_is_zero_where_the_bound_abstains():
    rule = SequentialCertifier(SIGMA, 0.01, [100, 200], radii=[0.25], final_share=0.5)
    assert rule.radius(np.array([0.0, 0.3, 0.4999])).tolist() == [0.0, 0.0, 0.0]
    assert rule.radius(norm.cdf(2.0)) == pytest.approx(2 * SIGMA)


def test_needed_counts_equal_a_scan_of_every_count():
    """Bisection against a scan, with one level whose least count is exactly N-max."""
    base = SequentialCertifier(SIGMA, 0.01, [500, 1000, 2000], radii=[0.25], final_share=0.5, mixture_share=0.1)
    every = base.final_lower(np.arange(2001))
    edge = (every[-2] + every[-1]) / 2   # reached by N-max cA of N-max only
    radii = [0.25, 0.5, 0.6, SIGMA * norm.ppf(edge), 1.0]
    rule = SequentialCertifier(SIGMA, 0.01, [500, 1000, 2000], radii=radii, final_share=0.5, mixture_share=0.1)
    needed = rule.needed_counts()
    assert needed.dtype.kind == "i"
    expected = [int(np.argmax(every >= t)) if every[-1] >= t else 2001 for t in rule.thresholds()]
    assert needed.tolist() == expected and 2000 in expected and expected[-1] == 2001


def test_reach_probability_is_one_where_the_count_already_suffices_and_at_one_more():
    """A count that already reaches the level's least count at N-max has probability 1; one short needs at least
    one more cA among the remaining draws (the beta-binomial tail at 0)."""
    rule = SequentialCertifier(SIGMA, 0.05, [100, 110], radii=[0.25], final_share=0.5, futility=0.1)
    short = int(rule.needed_counts()[0])   # level 0: a bound of 1/2 at 110 samples
    assert 50 < short <= 100
    assert rule.reach_probability(0, np.array([short, short + 5]), 0).tolist() == [1.0, 1.0]
    one_more = float(rule.reach_probability(0, short - 1, 0))
    assert one_more == pytest.approx(betabinom.sf(0, 10, short - 1 + 0.5, 100 - short + 1 + 0.5), rel=1e-9)
    assert one_more < 1


def test_few_failures_looks_are_the_least_sizes_where_such_streams_reach_the_top():
    """For f = 0..3 samples not cA, the least n at which n - f cA out of n reach the top (the bound grows with
    n); fewer looks when a stream with f failures never reaches it by N-max, and the top is radius 0 where
    N-max reaches nothing higher."""
    for n_max, radii, size in ((3000, [0.25, 0.5, 0.75], 4), (300, [0.25, 0.5, 0.75], 1), (20, [0.25], 2)):
        rule = SequentialCertifier(SIGMA, 0.01, list(range(n_max // 10, n_max + 1, n_max // 10)), radii=radii,
                                   final_share=0.1, sequence="mixture", mixture_share=0.8, point_weight=0.9)
        thresholds = rule.thresholds()
        ceiling = max(float(_scipy_cp_lower([n_max], n_max, rule.final_alpha)[0]),
                      float(_mixture([n_max], n_max, rule)[0]))
        top = thresholds[max(int((thresholds <= ceiling).sum()) - 1, 0)]
        assert top == (0.5 if n_max == 20 else norm.cdf(2))
        looks = rule.few_failures_looks()
        assert len(looks) == size, (n_max, looks)

        def bound(n, missed):
            return float(_mixture([n - missed], n, rule)[0])
        for missed, n in enumerate(looks):
            assert bound(n, missed) >= top > bound(n - 1, missed)
        if size < 4:
            assert bound(n_max, size) < top


def test_refused_levels_and_shares_say_which():
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            SequentialPredictor(alpha, [100, 200])
    with pytest.raises(ValueError, match="final_share"):
        SequentialCertifier(SIGMA, 0.01, [100, 200, 300], final_share=1.0, sequence="spending")


def test_rules_refuse_bad_arguments_and_name_them():
    cases = [
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], sequence="other"), "sequence"),
        (lambda: SequentialCertifier(SIGMA, 0.0, [100, 200]), "alpha"),
        (lambda: SequentialCertifier(SIGMA, 1.0, [100, 200]), "alpha"),
        (lambda: SequentialCertifier(SIGMA, 1.5, [100, 200]), "alpha"),
        (lambda: SequentialCertifier(SIGMA, 0.01, []), "looks"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [200, 100]), "looks"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 100]), "looks"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200, 150]), "looks"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [0, 100]), "looks"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], radii=[0.25, -0.1]), "radii"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], radius_tol=-0.1, sequence="spending"), "radius_tol"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], futility=0.1), "futility"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], radii=[0.25], futility=0.0), "futility"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], radii=[0.25], futility=1.0), "futility"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], radii=[0.25], futility=1.5), "futility"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], final_share=1.0), "final_share"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], final_share=1.5, mixture_share=0.1), "final_share"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], final_share=0.5, mixture_share=0.0), "mixture_share"),
        (lambda: SequentialCertifier(SIGMA, 0.01, [100, 200], final_share=0.5, mixture_share=0.6), "mixture_share"),
        (lambda: look_schedule(0, 100), "n_max"),
        (lambda: look_schedule(1000, 0), "batch_size"),
        (lambda: look_schedule(1000, 100, growth=1.0), "growth"),
        (lambda: sequential.batch_looks(0, 100), "n_max"),
        (lambda: sequential.batch_looks(1000, 0), "batch_size"),
        (lambda: sequential.mixture_weights(1.0), "point_weight"),
        (lambda: sequential.mixture_weights(1.5), "point_weight"),
    ]
    for build, name in cases:
        with pytest.raises(ValueError, match=name):
            build()
    # the edges that are allowed
    assert SequentialCertifier(SIGMA, 0.01, [1, 2], radii=[0.0, 0.25], final_share=0.5).radii == [0.0, 0.25]
    assert look_schedule(1, 1) == [1] and sequential.batch_looks(1, 1) == [1]
    assert sequential.mixture_weights(0.0)[0] == 0.0 and sequential.mixture_weights(0.0).sum() == pytest.approx(1)
    assert SequentialCertifier(SIGMA, 0.01, [100, 200], final_share=0.5, mixture_share=0.5).checkpoint_alpha == 0


def test_defaults_of_the_rules():
    rule = SequentialCertifier(SIGMA, 0.01, [100, 200, 300], sequence="spending")
    assert (rule.radius_tol, rule.futility_from, rule.futility) == (0.0, 0, None)
    acr = sequential.sequential_certifier(SIGMA, 0.01, 1000, 100)
    assert acr.radius_tol == 0.0 and acr.looks == look_schedule(1000, 100, 1.5) == [100, 200, 300, 400, 600, 800, 1000]
    radii = sequential.sequential_certifier(SIGMA, 0.01, 1000, 100, radii=[0.25])
    assert radii.final_alpha == pytest.approx(0.01 * sequential.RADII_SHARES_SPLIT.final)   # not the unanimous rule


def test_look_schedules_by_hand():
    # 1, 1.5, 2.25, 3.375, 5.06, 7.59 batches of one, rounded up, then N-max
    assert look_schedule(10, 1) == [1, 2, 3, 4, 6, 8, 10]
    # growth 1.1 rounds up to the same batch count several times: each size once
    assert look_schedule(500, 100, growth=1.1) == [100, 200, 300, 400, 500]


def test_checkpoint_bounds_by_hand():
    """At a checkpoint the anytime part is the larger of the mixture and Clopper-Pearson at the checkpoints'
    level, alpha (1 - final - mixture) / (number of checkpoints); elsewhere the mixture alone."""
    rule = SequentialCertifier(SIGMA, 0.01, list(range(100, 1001, 100)), radii=[0.25], final_share=0.5,
                               mixture_share=0.1, point_weight=0.5, checkpoints=[200, 400, 800])
    assert rule.checkpoints == [200, 400, 800] and rule.checkpoint_alpha == pytest.approx(0.01 * 0.4 / 3)
    for look, n in enumerate(rule.looks[:-1]):
        counts = np.arange(n + 1)
        expected = _mixture(counts, n, rule)
        if n in (200, 400, 800):
            expected = np.maximum(expected, _scipy_cp_lower(counts, n, 0.01 * 0.4 / 3))
            assert np.any(_scipy_cp_lower(counts, n, 0.01 * 0.4 / 3) > _mixture(counts, n, rule))
        assert np.allclose(rule.anytime_lower(look, counts), expected, rtol=1e-12, atol=0), n
    # the last look is never a checkpoint, even when named
    assert SequentialCertifier(SIGMA, 0.01, [100, 200], radii=[0.25], final_share=0.5,
                               checkpoints=[100, 200]).checkpoints == [100]


def test_mixture_martingale_in_plain_python():
    """M_n(p0) = sum over p1_j > p0 of w_j (p1_j / p0)^k ((1 - p1_j) / (1 - p0))^(n - k), term by term."""
    alternatives = sequential.MIXTURE_ALTERNATIVES.tolist()
    for count, num, p0, weight in ((7, 10, 0.3, 0.9), (10, 10, 0.8, 0.5), (55, 100, 0.52, 0.9), (0, 3, 0.2, 0.0)):
        weights = [weight] + [(1 - weight) / (len(alternatives) - 1)] * (len(alternatives) - 1)
        total = sum(w * (p1 / p0) ** count * ((1 - p1) / (1 - p0)) ** (num - count)
                    for p1, w in zip(alternatives, weights) if p1 > p0 and w > 0)
        got = sequential.mixture_log_martingale(count, num, p0, point_weight=weight)   # a single count
        assert np.ndim(got) == 0 and float(got) == pytest.approx(math.log(total), rel=1e-12)
    # one sample, cA: the point mass alone decides (the others cannot reach 1 / alpha), so the bound is
    # the p0 with 0.9 / p0 + sum of the others = 1 / alpha, found by bisection to within 1e-9
    for alpha in (0.05, 0.9):
        bound = float(sequential.mixture_lower(np.array([1]), 1, alpha, point_weight=0.9)[0])
        others = lambda p0: sum(0.1 / 40 * p1 / p0 for p1 in alternatives[1:] if p1 > p0)   # noqa: E731
        assert 0.9 / bound + others(bound) == pytest.approx(1 / alpha, rel=1e-6)
