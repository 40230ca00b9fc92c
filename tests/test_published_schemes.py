"""The published sequential certifiers of benchmarks/published_schemes.py, on cases computed by hand.

They are the baselines that ``bench_sequential.py --simulate`` runs beside the
project's rules, so each is checked against its paper's definition written out
independently here: the KT bettor's wealth bet by bet, Clopper-Pearson bounds of
unanimous counts (alpha^(1/n)), fresh samples per stage, and ISS's sample size.
"""
import math
import os
import sys

import numpy as np
import pytest
from scipy.stats import norm

from conftest import REPO
from core import cp_lower, cp_upper

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import published_schemes as published  # noqa: E402


def kt_wealth_by_bets(stream, m):
    """The KT bettor's wealth against m after each draw: bet lam_i = (q_i - m) / (m (1 - m)), q_i = (S + 1/2) / i."""
    wealth, successes, path = 1.0, 0, []
    for i, x in enumerate(stream, start=1):
        q = (successes + 0.5) / i
        wealth *= 1 + (q - m) / (m * (1 - m)) * (x - m)
        successes += x
        path.append(wealth)
    return np.array(path)


def test_kt_wealth_in_closed_form_is_the_product_of_its_bets():
    stream = np.random.default_rng(0).binomial(1, 0.8, 300)
    for m in (0.3, 0.7, 0.9):
        path = kt_wealth_by_bets(stream, m)
        closed = published.kt_log_wealth(np.cumsum(stream), np.arange(1, 301), m)
        assert np.allclose(closed, np.log(path), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("threshold, alpha", [(0.9, 0.05), (0.75, 0.001)])
def test_kt_crossing_time_of_an_all_correct_stream_equals_a_brute_force_scan(threshold, alpha):
    """Looked at after every sample, the run certifies the threshold at the first n whose wealth reaches 1 / alpha."""
    n_max = 400
    expected = 1 + int(np.argmax(kt_wealth_by_bets(np.ones(n_max, dtype=int), threshold) >= 1 / alpha))
    rule = published.KTSequence(alpha, n_max, every=1)
    samples, lower = published.run_published(rule, np.arange(1, n_max + 1)[None, :], np.array([0.5, threshold]))
    assert samples[0] == expected and lower[0] >= threshold
    # the lower end there is where the wealth is 1 / alpha exactly
    assert published.kt_log_wealth(expected, expected, lower[0]) == pytest.approx(math.log(1 / alpha), abs=1e-6)


def test_kt_bounds_bracket_the_share_and_their_ends_have_wealth_one_over_alpha():
    count, num, alpha = np.array([0, 30, 70, 100]), 100, 0.01
    lower, upper = published.kt_bounds(count, num, alpha)
    assert lower[0] == 0 and upper[-1] == 1
    assert np.all(lower <= count / num) and np.all(count / num <= upper)
    inside = slice(1, 3)
    for end in (lower[inside], upper[inside]):
        assert np.allclose(published.kt_log_wealth(count[inside], num, end), math.log(1 / alpha), atol=1e-6)
    # wider than a single Clopper-Pearson interval at the same level: it holds at every n at once
    assert np.all(lower[1:] < cp_lower(count[1:], num, alpha / 2))


def test_union_bound_clopper_pearson_shares_alpha_over_doubling_looks():
    rule = published.CPUnionSequence(0.01, 1000)
    assert rule.looks == [100, 200, 400, 800, 1000] and rule.level == pytest.approx(0.002)
    lower, upper = rule.bounds(1, np.array([200, 0]), None)
    # a unanimous count of n gives lower bound (level / 2)^(1 / n); none gives upper bound 1 - that
    assert lower[0] == pytest.approx(0.001 ** (1 / 200)) and upper[1] == pytest.approx(1 - 0.001 ** (1 / 200))


def test_horvath_stages_use_only_each_stages_fresh_samples():
    rule = published.HorvathStages(0.003, 20000)
    assert rule.looks == [1000, 11000, 20000]
    # 1,000 of 1,000 in the first stage, then 9,000 of the 10,000 fresh samples of the second
    lower, _ = rule.bounds(1, np.array([10000]), np.array([1000]))
    assert lower[0] == pytest.approx(float(cp_lower(9000, 10000, 0.0005)))
    lower, upper = rule.bounds(0, np.array([1000]), np.array([0]))
    assert lower[0] == pytest.approx(0.0005 ** (1 / 1000)) and upper[0] == 1.0
    # stops at the first stage that decides: all 1,000 correct certifies 0.99 (0.0005^(1/1000) = 0.9924)
    counts = np.array([[1000, 11000, 20000], [900, 9900, 18000]])
    samples, lower = published.run_published(rule, counts, np.array([0.5, 0.99]))
    assert list(samples) == [1000, 1000] and lower[0] >= 0.99
    # the second stream: 0.9 is inside (1/2, 0.99) with its upper bound below 0.99, so decided at once
    assert 0.5 <= lower[1] < 0.99 and cp_upper(900, 1000, 0.0005) < 0.99


def test_stopping_aids_stop_a_hopeless_run_at_the_first_look_they_judge():
    """985 of 1,000: the sequence's own upper bound still allows 0.99, the predictive stop does not."""
    rule = published.CPUnionSequence(0.001, 10000, first=1000)
    counts = np.array([[985, 1970, 3940, 7880, 9850]])
    thresholds = np.array([0.5, 0.99])
    assert cp_upper(985, 1000, rule.level / 2) > 0.99   # so without the aids the run goes on
    aids = published.StoppingAids(futility=0.1, futility_from=1000, checkpoints=[], stop_alpha=0.05)
    assert published.run_published(rule, counts, thresholds)[0][0] > 1000
    assert published.run_published(rule, counts, thresholds, aids)[0][0] == 1000
    # the upper-bound aid alone, at a checkpoint: the 0.95 upper bound of 985 / 1000 is below 0.99
    aids = published.StoppingAids(futility=1e-9, futility_from=1000, checkpoints=[1000], stop_alpha=0.05)
    assert cp_upper(985, 1000, 0.05) * 10000 < published.needed_counts(rule.final_lower, thresholds, 10000)[1]
    assert published.run_published(rule, counts, thresholds, aids)[0][0] == 1000


def test_iss_picks_the_least_size_within_kappa_and_reuses_its_pilot():
    """A unanimous pilot: the radius at n is sigma PhiInv(alpha^(1/n)); ISS takes the least n within kappa of N-max's."""
    sigma, alpha, kappa = 0.5, 0.001, 0.1
    grid = [1000, 2000, 4000, 8000, 16000]
    radius = [sigma * norm.ppf(alpha ** (1 / n)) for n in grid]
    expected = next(n for n, r in zip(grid, radius) if r >= radius[-1] - kappa)
    assert 1000 < expected < 16000
    counts = np.array([[1000, 2000, 4000, 8000, 16000], [1000, 1999, 3990, 7990, 15990]])
    sizes, radii = published.iss_runs(counts, grid, 1000, sigma, alpha, kappa)
    assert list(sizes) == [expected, expected]
    assert radii[0] == pytest.approx(radius[grid.index(expected)])
    # the second stream's bound counts its pilot's samples too: the count at the chosen size
    assert radii[1] == pytest.approx(sigma * norm.ppf(float(cp_lower(counts[1, grid.index(expected)], expected,
                                                                        alpha))))


def test_lead_ceiling_by_hand():
    """Two runs in the top group (published 9 and 9, project 5 and 5), two elsewhere (published 2 and 4)."""
    from bench_sequential import lead_ceiling
    published, project = [9, 9, 2, 4], [5, 5, 3, 7]
    top = [True, True, False, False]
    tied, needed = lead_ceiling(published, project, top, 1.4)
    assert tied == pytest.approx(24 / 16)            # 9 + 9 + 2 + 4 over 5 + 5 + 2 + 4
    assert needed == pytest.approx((24 / 1.4 - 10) / 6)
    tied, needed = lead_ceiling(published, project, top, 24 / 16)
    assert needed == pytest.approx(1.0)              # the tie itself reaches the tied ratio
