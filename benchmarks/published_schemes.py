"""Published sequential certifiers, as baselines for ``bench_sequential.py --simulate``.

Written from the papers' descriptions; each keeps fixed-N CERTIFY's guarantee
(a reported lower bound exceeds pA with probability at most alpha):

* ``kt_bounds``, ``KTSequence``: the betting confidence sequence with
  Krichevsky-Trofimov (KT) bets that Voracek and Hein ("Treatment of
  Statistical Estimation Problems in Randomized Smoothing for Adversarial
  Robustness", NeurIPS 2024) use to decide "robust at radius r or not". The
  bettor's wealth against a candidate m is
  K_n(m) = prod_i (1 + lam_i (X_i - m)), lam_i = (q_i - m) / (m (1 - m)),
  q_i = (S_{i-1} + 1/2) / i, which equals the Beta(1/2, 1/2) mixture of
  likelihood ratios B(S_n + 1/2, n - S_n + 1/2) / B(1/2, 1/2) /
  (m^S_n (1 - m)^(n - S_n)). Under pA = m it is a nonnegative martingale
  started at 1, so P[exists n: K_n(pA) >= 1 / alpha] <= alpha (Ville); the
  sequence is {m: K_n(m) < 1 / alpha}, and its lower and upper ends hold at
  every n together.
* ``CPUnionSequence``: their union-bound Clopper-Pearson sequence: the
  two-sided Clopper-Pearson interval at fixed looks (here doubling from
  100), alpha shared equally among them.
* ``HorvathStages``: the staged test of Horvath et al. ("Boosting
  Randomized Smoothing with Variance Reduced Classifiers", ICLR 2022):
  stages of fresh samples (1,000, then 10,000, then the rest of N-max), a
  Clopper-Pearson test at alpha / 3 on each stage's own samples; stop once
  the stage decides.
* ``iss_runs``: input-specific sampling (Chen et al., "Input-Specific
  Robustness Certification for Randomized Smoothing", AAAI 2022) for the
  ACR mode: a pilot estimates pA, the sample size is the least one whose
  radius, at that estimate, is within ``kappa`` of N-max's, and the final
  Clopper-Pearson bound reuses the pilot's samples (so its level is only
  approximately alpha).

``run_published`` decides the radii mode for any of the first three from the
same count streams as the project's rules: the level is the largest listed
threshold below the running lower bound, and a run stops once the top level
reachable with N-max samples is reached, once its own upper bound is below
the next threshold, or at N-max. ``StoppingAids`` adds the project's stopping
aids (the predictive stop and the 0.95 upper-bound stop; ``sequential.py``),
which steer only and leave validity alone.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from scipy.special import betaln
from scipy.stats import norm

from binomial import betabinom_sf
from sequential import cp_lower, cp_upper

# --------------------------------------------------------------------------- the KT betting sequence


def kt_log_wealth(count, num, m):
    """log K_n(m) of the KT bettor after ``count`` successes in ``num`` draws (closed form; arrays broadcast)."""
    count, m = np.asarray(count, dtype=float), np.asarray(m, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ones = np.where(count > 0, count * np.log(m), 0.0)
        zeros = np.where(num - count > 0, (num - count) * np.log1p(-m), 0.0)
    return betaln(count + 0.5, num - count + 0.5) - betaln(0.5, 0.5) - ones - zeros


def kt_bounds(count, num: int, alpha: float, iterations: int = 50):
    """Lower and upper ends of the KT confidence sequence at n = ``num`` (arrays of counts).

    log K_n(m) falls on (0, S/n] and rises on [S/n, 1), and K_n(S/n) <= 1 < 1 / alpha, so each end
    is found by bisection, rounded outwards (the lower end down, the upper end up).
    """
    count = np.asarray(count, dtype=float)
    threshold = math.log(1.0 / alpha)
    share = count / num
    low, high = np.zeros_like(share), share.copy()   # low: rejected (or 0), high: not rejected
    for _ in range(iterations):
        middle = (low + high) / 2
        rejected = kt_log_wealth(count, num, np.maximum(middle, 1e-300)) >= threshold
        low, high = np.where(rejected, middle, low), np.where(rejected, high, middle)
    lower = low
    low, high = share.copy(), np.ones_like(share)   # low: not rejected, high: rejected (or 1)
    for _ in range(iterations):
        middle = (low + high) / 2
        rejected = kt_log_wealth(count, num, np.minimum(middle, 1 - 1e-16)) >= threshold
        low, high = np.where(rejected, low, middle), np.where(rejected, middle, high)
    return lower, high


# --------------------------------------------------------------------------- the radii-mode baselines

class KTSequence:
    """Voracek and Hein's KT betting confidence sequence at alpha, looked at every ``every`` samples."""

    name = "KT betting sequence (Voracek and Hein)"

    def __init__(self, alpha: float, n_max: int, every: int = 100):
        self.alpha, self.n_max = float(alpha), int(n_max)
        self.looks = list(range(every, n_max, every)) + [n_max]

    def bounds(self, look: int, count, previous):
        return kt_bounds(count, self.looks[look], self.alpha)

    def final_lower(self, count):
        return kt_bounds(count, self.n_max, self.alpha)[0]


class CPUnionSequence:
    """The union-bound Clopper-Pearson sequence: two-sided CP at looks doubling from ``first``, alpha / K each."""

    name = "union-bound Clopper-Pearson (Voracek and Hein)"

    def __init__(self, alpha: float, n_max: int, first: int = 100):
        self.n_max = int(n_max)
        self.looks = [first * 2 ** k for k in range(64) if first * 2 ** k < n_max] + [self.n_max]
        self.level = alpha / len(self.looks)   # one event per end and look, alpha / (2K) each

    def bounds(self, look: int, count, previous):
        num = self.looks[look]
        return cp_lower(count, num, self.level / 2), cp_upper(count, num, self.level / 2)

    def final_lower(self, count):
        return cp_lower(count, self.n_max, self.level / 2)


class HorvathStages:
    """Horvath et al.'s staged test: fresh samples per stage, two-sided CP at alpha / stages on each stage."""

    name = "staged test (Horvath et al.)"

    def __init__(self, alpha: float, n_max: int, stages: Sequence[int] = (1000, 10000)):
        self.looks = [int(s) for s in np.cumsum(stages) if s < n_max] + [int(n_max)]
        self.n_max = int(n_max)
        self.level = alpha / len(self.looks)

    def bounds(self, look: int, count, previous):
        fresh = self.looks[look] - (self.looks[look - 1] if look else 0)
        count = np.asarray(count) - np.asarray(previous)
        return cp_lower(count, fresh, self.level / 2), cp_upper(count, fresh, self.level / 2)

    def final_lower(self, count):   # the last stage's own samples: the count there scaled to its size
        fresh = self.n_max - (self.looks[-2] if len(self.looks) > 1 else 0)
        return cp_lower(np.floor(np.asarray(count) * fresh / self.n_max), fresh, self.level / 2)


@dataclass(frozen=True)
class StoppingAids:
    """The project's stopping aids (``sequential.SequentialCertifier``), for a published sequence.

    ``futility``: stop at a look of at least ``futility_from`` samples once the beta-binomial predictive
    probability (Jeffreys posterior) that the count at N-max reaches the next level is below it.
    ``checkpoints``: looks where a run also stops once the next level is out of reach even if pA were its
    (1 - ``stop_alpha``) Clopper-Pearson upper bound.
    """
    futility: float
    futility_from: int
    checkpoints: Sequence[int]
    stop_alpha: float


def needed_counts(final_lower, thresholds, n_max: int) -> np.ndarray:
    """For each threshold, the least count at N-max whose ``final_lower`` reaches it (n_max + 1: none does)."""
    needed = []
    for threshold in thresholds:
        low, high = 0, n_max + 1
        while low < high:
            middle = (low + high) // 2
            if middle <= n_max and float(np.asarray(final_lower(np.array([middle])))[0]) >= threshold:
                high = middle
            else:
                low = middle + 1
        needed.append(low)
    return np.array(needed)


def run_published(rule, counts, thresholds, aids: Optional[StoppingAids] = None):
    """Decide the radii mode with a published sequence on count streams: (samples, lower bound) per stream.

    ``counts``: [streams x len(rule.looks)], the count at each of the rule's looks. ``thresholds``: pA
    needed for each level, increasing. The bounds are intersected over the looks (a confidence
    sequence holds at all of them at once). Samples exclude N0.
    """
    counts = np.asarray(counts)
    streams, num_looks = counts.shape
    needed = needed_counts(rule.final_lower, thresholds, rule.n_max)
    reachable = max(int(np.sum(needed <= rule.n_max)), 1)   # levels N-max samples can certify
    lower, upper = np.zeros(streams), np.ones(streams)
    samples = np.zeros(streams, dtype=np.int64)
    running = np.ones(streams, dtype=bool)
    checkpoints = set(aids.checkpoints) if aids else set()
    for look, num in enumerate(rule.looks):
        active = np.flatnonzero(running)
        previous = counts[active, look - 1] if look else np.zeros(len(active))
        low, high = rule.bounds(look, counts[active, look], previous)
        lower[active] = np.maximum(lower[active], low)
        upper[active] = np.minimum(upper[active], high)
        reached = np.searchsorted(thresholds, lower[active], side="right")
        following = np.minimum(reached, len(thresholds) - 1)
        stop = (reached >= reachable) | (upper[active] < thresholds[following]) | (look == num_looks - 1)
        if aids is not None:
            count = counts[active, look]
            more = needed[following] - count
            if num >= aids.futility_from and num < rule.n_max:
                reach = np.where(more <= 0, 1.0, betabinom_sf(more - 1, rule.n_max - num, count + 0.5,
                                                                num - count + 0.5))
                stop |= reach < aids.futility
            if num in checkpoints:
                best = np.floor(cp_upper(count, num, aids.stop_alpha) * rule.n_max)
                stop |= best < needed[following]
        done = active[stop]
        samples[done] = num
        running[done] = False
        if not running.any():
            break
    return samples, lower


# --------------------------------------------------------------------------- ISS for the ACR mode

def iss_sizes(pilot_share, grid: Sequence[int], sigma: float, alpha: float, kappa: float) -> np.ndarray:
    """ISS's sample size per stream: the least n of ``grid`` whose radius at the pilot's share is within kappa.

    The radius at n for share p is sigma PhiInv of the Clopper-Pearson bound of floor(p n) of n (0 below
    1/2); the reference is the radius at the largest n of the grid (N-max).
    """
    grid = np.asarray(grid)
    share = np.asarray(pilot_share, dtype=float)[:, None]
    bound = cp_lower(np.floor(share * grid[None, :]), grid[None, :], alpha)
    radius = np.where(bound >= 0.5, sigma * norm.ppf(np.clip(bound, 0.5, 1.0)), 0.0)
    within = radius >= radius[:, -1:] - kappa
    return grid[np.argmax(within, axis=1)]


def iss_runs(counts, grid: List[int], pilot: int, sigma: float, alpha: float, kappa: float):
    """ISS on count streams: (estimation samples, radius) per stream.

    ``counts``: [streams x len(grid)], the count at each sample size of ``grid`` (which holds ``pilot``
    and ends at N-max). The pilot is the first ``pilot`` estimation samples, reused in the final bound.
    """
    counts = np.asarray(counts)
    grid = list(grid)
    share = counts[:, grid.index(pilot)] / pilot
    candidates = [n for n in grid if n >= pilot]
    sizes = iss_sizes(share, candidates, sigma, alpha, kappa)
    index = np.searchsorted(grid, sizes)
    count = counts[np.arange(len(sizes)), index]
    bound = cp_lower(count, sizes, alpha)
    return sizes, np.where(bound >= 0.5, sigma * norm.ppf(np.clip(bound, 0.5, 1.0)), 0.0)
