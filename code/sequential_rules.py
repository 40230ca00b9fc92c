"""The decision rules of sequential CERTIFY and PREDICT, and the scheme ``certify.py --sequential`` runs.

After each look a rule, a pure function of the image's counts so far, says
whether to stop. Every rule here keeps the guarantee of fixed-N CERTIFY (or
PREDICT) whatever look it stops at.

* ``SequentialCertifier`` (built by ``sequential_certifier``) and
  ``SequentialPredictor``: the decision rules.
* ``SEQUENTIAL_SCHEME`` / ``sequential_scheme``: the scheme recorded in the
  settings of a result file, so that a file of another scheme is not resumed.

The validity argument, the choice of the shares and the caveats: docs/SEQUENTIAL.md.
"""
import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence

import numpy as np
from scipy.stats import norm

from binomial import betabinom_sf, cp_lower, cp_upper, two_sided_binomial_pvalue
from confidence_sequence import batch_looks, look_schedule, mixture_lower

# --------------------------------------------------------------------------- the scheme of certify.py --sequential

# the radii mode also looks where a stream with 0, 1, ..., FEW_FAILURES samples not cA reaches its top level
FEW_FAILURES = 3


@dataclass(frozen=True)
class RadiiShares:
    """How the radii mode splits alpha: the mixture sequence, the last look, the geometric looks (the rest)."""
    mixture: float        # mixture_lower at every look, at alpha * mixture
    final: float          # Clopper-Pearson at N-max, at alpha * final
    point_weight: float   # the mixture's prior weight on p1 = 1

    @property
    def checkpoints(self) -> float:
        """Clopper-Pearson at the geometric looks before N-max, sharing alpha * checkpoints equally."""
        return round(1 - self.mixture - self.final, 10)

    def describe(self) -> str:
        return (f"mixture {self.mixture:g} (weight {self.point_weight:g} at p1 = 1) at every batch and where "
                f"streams with 0 to {FEW_FAILURES} samples not cA reach the top level + Clopper-Pearson "
                f"{self.checkpoints:g} at geometric looks + {self.final:g} at the last look")


# The radii mode's split of alpha, chosen per image by its pilot (the N0 selection samples, drawn before
# and independently of the estimation samples, so each choice is valid at alpha; docs/SEQUENTIAL.md): when
# every pilot sample is the selected class, pA is most likely near 1 and the stream all or nearly all
# cA, which the mixture's point at p1 = 1 certifies soonest; otherwise pA is likely inside (1/2, 1),
# where Clopper-Pearson at fixed looks is sharper than the mixture.
RADII_SHARES_UNANIMOUS = RadiiShares(mixture=0.8, final=0.1, point_weight=0.9)
RADII_SHARES_SPLIT = RadiiShares(mixture=0.1, final=0.5, point_weight=0.5)
# the share of alpha that the ACR mode spends on its last look (the earlier geometric looks share the rest)
SEQUENTIAL_FINAL_SHARE = 0.5
# the level of the upper bound that steers stopping in both modes: the radii mode stops at a checkpoint when
# the next radius is out of reach even if pA were this (1 - STOP_ALPHA) upper bound, the ACR mode when its
# radius is within --radius-tol of the radius N-max samples would give if pA were it (docs/SEQUENTIAL.md)
STOP_ALPHA = 0.05
# the radii mode stops once the predictive probability that N-max samples reach the next level falls
# below RADII_FUTILITY, judged from RADII_FUTILITY_FROM * N-max samples on (``SequentialCertifier``'s
# ``futility`` and ``futility_from``; docs/SEQUENTIAL.md)
RADII_FUTILITY = 0.1
RADII_FUTILITY_FROM = 0.1
# what ``certify_sequential`` computes, recorded with its results (a change of scheme must not continue a
# file of another one); written from the constants above, so that changing one changes it
_ACR_PART = "; ACR: "
SEQUENTIAL_SCHEME = (
    f"radii: if all N0 pilot samples are the selected class, {RADII_SHARES_UNANIMOUS.describe()}; else "
    f"{RADII_SHARES_SPLIT.describe()}; stop also once the predictive probability of the next level at the last "
    f"look is below {RADII_FUTILITY:g}, from {RADII_FUTILITY_FROM:g} N-max samples on{_ACR_PART}Clopper-Pearson "
    f"{Fraction(1 - SEQUENTIAL_FINAL_SHARE)} over geometric looks + {Fraction(SEQUENTIAL_FINAL_SHARE)} "
    f"at the last look, stop once the radius is within the tolerance of the radius N-max samples would give "
    f"if pA were its {1 - STOP_ALPHA:g} upper bound")
# what it computes when N-max is at most one batch: a single look, where both modes report CERTIFY's
# Clopper-Pearson bound at the whole of alpha (recorded instead of SEQUENTIAL_SCHEME)
SEQUENTIAL_SINGLE_LOOK_SCHEME = "single look: Clopper-Pearson at alpha"


def scheme_of_mode(scheme: str, radii: bool) -> str:
    """The part of a recorded scheme that a run of one mode computes (the radii mode's or the ACR mode's rule):
    two files whose parts are equal were made by the same rule, even if the other mode's has changed since."""
    if not scheme.startswith("radii: ") or _ACR_PART not in scheme:
        return scheme
    radii_part, acr_part = scheme[len("radii: "):].split(_ACR_PART, 1)
    return radii_part if radii else acr_part


def sequential_scheme(n_max: int, batch_size: int) -> str:
    """The scheme ``certify_sequential`` runs with these N-max and batch size (for the settings record)."""
    # the radii mode's looks (batch_looks) and the ACR mode's (look_schedule) are one look for the same runs
    return SEQUENTIAL_SINGLE_LOOK_SCHEME if len(batch_looks(n_max, batch_size)) == 1 else SEQUENTIAL_SCHEME


def sequential_certifier(sigma: float, alpha: float, n_max: int, batch_size: int,
                         radii: Optional[Sequence[float]] = None, radius_tol: float = 0.0,
                         growth: float = 1.5, pilot_unanimous: bool = False) -> "SequentialCertifier":
    """The decision rule of ``certify_sequential`` with these settings (its looks: ``.looks``).

    With ``radii``: a look after every batch and the ``"mixture"`` scheme, the geometric looks as
    checkpoints, alpha split by ``RADII_SHARES_UNANIMOUS`` when every pilot sample was the selected
    class (``pilot_unanimous``), else by ``RADII_SHARES_SPLIT``; without: the ``"spending"`` scheme on
    the geometric looks. Both steer stopping by the (1 - ``STOP_ALPHA``) upper bound. A rule depends on
    its arguments only, so it is built once per process and shared (building a radii rule takes about
    0.1 s, a group of images far less).
    """
    return _certifier(float(sigma), float(alpha), int(n_max), int(batch_size),
                      None if radii is None else tuple(float(r) for r in radii), float(radius_tol), float(growth),
                      bool(pilot_unanimous))


@functools.lru_cache(maxsize=64)
def _certifier(sigma, alpha, n_max, batch_size, radii, radius_tol, growth, pilot_unanimous):
    if radii is not None:
        shares = RADII_SHARES_UNANIMOUS if pilot_unanimous else RADII_SHARES_SPLIT

        def rule(looks):
            return SequentialCertifier(sigma, alpha, looks, radii=radii, final_share=shares.final,
                                       stop_alpha=STOP_ALPHA, futility=RADII_FUTILITY,
                                       futility_from=int(math.ceil(RADII_FUTILITY_FROM * n_max)), sequence="mixture",
                                       checkpoints=look_schedule(n_max, batch_size, growth),
                                       mixture_share=shares.mixture, point_weight=shares.point_weight)
        looks = batch_looks(n_max, batch_size)   # (a single look has no mixture, hence no added looks)
        return rule(sorted(set(looks) | set(rule(looks).few_failures_looks())))
    return SequentialCertifier(sigma, alpha, look_schedule(n_max, batch_size, growth), radius_tol=radius_tol,
                               final_share=SEQUENTIAL_FINAL_SHARE, stop_alpha=STOP_ALPHA, sequence="spending")


# --------------------------------------------------------------------------- decision rules

class SequentialCertifier:
    """The decision rule of sequential CERTIFY for one image: a pure function of its count stream.

    After selection has fixed cA (from N0 samples of its own, as in CERTIFY),
    estimation samples are drawn in rounds; after look k the image has
    ``looks[k]`` estimation samples, ``count`` of them classified cA, and
    ``step(k, count)`` returns whether to stop and the lower bound pA_lower
    of pA = P[f(x + e) = cA] at that look.

    Guarantee (Cohen et al.'s for CERTIFY): with probability at least
    1 - alpha over the sampling, if pA_lower >= 1/2 where the run stops, cA
    equals g(x) and g is robust within the radius sigma * PhiInv(pA_lower)
    (``radius``), whatever look the run stops at: the reported bound exceeds
    pA only if a bound of a fixed family exceeds pA at some look, and the
    family's levels (``union_levels``) sum to alpha. The probability is over
    the whole procedure, not conditional on the number of samples a run drew:
    runs that go on to n_max are near a decision, and their bound exceeds pA
    more often than alpha (docs/SEQUENTIAL.md).

    ``sequence`` (the lower bound at each look; the largest of the parts
    defined there):

    * ``"mixture"``: ``mixture_lower`` at alpha * ``mixture_share`` at every
      look; the Clopper-Pearson bound at the ``checkpoints`` (None: every
      look but the last) at an equal share of alpha * (1 - ``final_share`` -
      ``mixture_share``); the Clopper-Pearson bound at the last look at
      alpha * ``final_share``.
    * ``"spending"``: the Clopper-Pearson bound at alpha_k at look k, the
      last look getting alpha * ``final_share`` (None: all looks alike) and
      the others sharing the rest equally.

    A single look gets the Clopper-Pearson bound at the whole of alpha in
    both schemes, i.e. fixed-N CERTIFY's bound.

    Stopping (no rule affects validity):

    * ``radii`` given (certified accuracy at these radii): the levels are 0
      (pA_lower >= 1/2) and each listed r > 0 (pA_lower >= Phi(r / sigma)).
      Stop once the highest level that ``n_max`` samples can certify is
      reached, or once the next level is out of reach: at a checkpoint, the
      lower bound at n_max of a count pA_upper * n_max stays below it, with
      pA_upper the (1 - ``stop_alpha``) Clopper-Pearson upper bound (None:
      at ``look_alpha``); with ``futility`` (a probability), also at every
      look of ``futility_from`` samples or more where the predictive
      probability that the count at n_max reaches ``needed_counts`` for the
      next level is below ``futility`` (pA drawn from its Jeffreys posterior
      Beta(count + 1/2, n - count + 1/2), the remaining draws binomial: a
      beta-binomial tail). The radius reported lies between the largest
      level reached and the next one.
    * ``radii`` None (for ACR): stop once the radius is within
      ``radius_tol`` of the best radius that ``n_max`` samples could give if
      pA were its upper bound at ``look_alpha``, or, at a checkpoint, when
      that best radius is 0.
    """

    def __init__(self, sigma: float, alpha: float, looks: Sequence[int], radii: Optional[Sequence[float]] = None,
                 radius_tol: float = 0.0, final_share: Optional[float] = None,
                 stop_alpha: Optional[float] = None, sequence: str = "mixture",
                 checkpoints: Optional[Sequence[int]] = None, mixture_share: float = RADII_SHARES_SPLIT.mixture,
                 point_weight: float = RADII_SHARES_SPLIT.point_weight, futility: Optional[float] = None,
                 futility_from: int = 0):
        _check_certifier_arguments(alpha, looks, radii, radius_tol, sequence)
        if futility is not None and (radii is None or not 0 < futility < 1):
            raise ValueError(f"futility must be in (0, 1) and needs radii, got {futility} with radii {radii}")
        self.futility, self.futility_from = futility, int(futility_from)
        self.sigma, self.alpha, self.looks = float(sigma), float(alpha), [int(n) for n in looks]
        self.n_max = self.looks[-1]
        self.radii = None if radii is None else sorted(set([0.0] + [float(r) for r in radii]))
        self.radius_tol = float(radius_tol)
        self.stop_alpha = stop_alpha
        self.sequence = sequence
        self.point_weight = float(point_weight)
        # the looks where "out of reach" is judged and, in the mixture scheme, where the spending part
        # reports a Clopper-Pearson bound (all looks when None)
        self.checkpoints = sorted(set(int(n) for n in (checkpoints or self.looks)) & set(self.looks[:-1]))
        if sequence == "mixture":
            self._share_mixture(final_share, mixture_share)
        else:
            self._share_spending(final_share)

    def _share_mixture(self, final_share: Optional[float], mixture_share: float):
        share = 0.0 if final_share is None else float(final_share)
        if not 0 <= share < 1 or not 0 < mixture_share <= 1 - share:
            raise ValueError(f"need 0 <= final_share < 1 and 0 < mixture_share <= 1 - final_share, "
                             f"got {final_share}, {mixture_share}")
        num = len(self.looks)
        if num == 1:
            # nothing to be anytime-valid over: the one look gets CERTIFY's bound at the whole of alpha
            share, mixture_share = 1.0, 0.0
        self.sequence_alpha = self.alpha * mixture_share   # 0: no mixture sequence (a single look)
        self.final_alpha = self.alpha * share   # 0: no Clopper-Pearson bound at the last look
        spent = self.alpha * (1 - share - mixture_share)
        self.checkpoint_alpha = spent / len(self.checkpoints) if self.checkpoints and spent > 0 else 0.0
        self._alphas = [self.sequence_alpha] * (num - 1) + [self.alpha * share or self.sequence_alpha]

    def _share_spending(self, final_share: Optional[float]):
        num = len(self.looks)
        if final_share is None or num == 1:
            self._alphas = [self.alpha / num] * num
            return
        if not 0 < final_share < 1:
            raise ValueError(f"final_share must be in (0, 1), got {final_share}")
        self._alphas = [self.alpha * (1 - final_share) / (num - 1)] * (num - 1) + [self.alpha * final_share]

    def look_alpha(self, look: int) -> float:
        """The level of look k's Clopper-Pearson bound.

        ``spending``: alpha_k, and the alpha_k sum to alpha. ``mixture``: the last look's share of alpha
        at the last look; at the others the sequence's share (the level of the upper bounds that steer
        the ACR mode; no Clopper-Pearson lower bound is used there).
        """
        return self._alphas[look]

    def union_levels(self) -> List[float]:
        """The levels of the events whose union is "some reported lower bound exceeds pA"; they sum to alpha."""
        if self.sequence == "spending":
            return list(self._alphas)
        final = [self.final_alpha] if self.final_alpha > 0 else []
        spending = [self.checkpoint_alpha] * len(self.checkpoints) if self.checkpoint_alpha > 0 else []
        return ([self.sequence_alpha] if self.sequence_alpha > 0 else []) + spending + final

    def anytime_lower(self, look: int, count):
        """The lower bound of the anytime part at look k: P[it exceeds pA at some look] <= its share of alpha.

        ``spending``: Clopper-Pearson at alpha_k. ``mixture``: ``mixture_lower`` at alpha * mixture_share, and
        at a checkpoint the larger of it and Clopper-Pearson at the checkpoints' level.
        """
        if self.sequence == "spending":
            return cp_lower(count, self.looks[look], self.look_alpha(look))
        lower = mixture_lower(count, self.looks[look], self.sequence_alpha, point_weight=self.point_weight) \
            if self.sequence_alpha > 0 \
            else np.zeros(np.shape(count))
        if self.checkpoint_alpha > 0 and self.looks[look] in self.checkpoints:
            lower = np.maximum(lower, cp_lower(count, self.looks[look], self.checkpoint_alpha))
        return lower

    def few_failures_looks(self, failures: int = FEW_FAILURES) -> List[int]:
        """For f = 0..``failures``, the sample size at which a stream with f samples not cA reaches the top.

        The top is the highest level below the ceiling. ``sequential_certifier`` adds these to the looks
        after every batch (they depend on the rule alone, not on any sample), so that the commonest
        images, all or nearly all cA, stop where their bound reaches the top rather than at the end of
        that batch. Empty without a mixture sequence.
        """
        if self.sequence != "mixture" or self.sequence_alpha <= 0:
            return []
        thresholds = self.thresholds()
        top = thresholds[max(int(np.searchsorted(thresholds, self._ceiling(), side="right")) - 1, 0)]
        looks = []
        for missed in range(failures + 1):
            def reached(n):
                return mixture_lower(np.array([n - missed]), n, self.sequence_alpha,
                                     point_weight=self.point_weight)[0] >= top
            if not reached(self.n_max):
                break
            low, high = missed + 1, self.n_max   # the bound of n - f cA out of n grows with n
            while low < high:
                middle = (low + high) // 2
                low, high = (low, middle) if reached(middle) else (middle + 1, high)
            looks.append(low)
        return looks

    def thresholds(self) -> np.ndarray:
        """pA_lower needed for each level of ``radii`` (1/2 for radius 0), increasing."""
        return np.array([0.5 if r == 0 else float(norm.cdf(r / self.sigma)) for r in self.radii])

    def radius(self, p_lower):
        """The radius of a lower bound (array or number); 0 where it abstains (p_lower < 1/2)."""
        p_lower = np.asarray(p_lower, dtype=float)
        return np.where(p_lower >= 0.5, self.sigma * norm.ppf(np.maximum(p_lower, 0.5)), 0.0)

    def _best_final_lower(self, p_upper):
        """The lower bound at the last look if the count there were p_upper * n_max."""
        last = len(self.looks) - 1
        return cp_lower(np.floor(np.asarray(p_upper) * self.n_max), self.n_max, self.look_alpha(last))

    def _ceiling(self) -> float:
        """The largest lower bound that the last look can report (all n_max samples cA)."""
        if not hasattr(self, "_ceiling_value"):
            best = float(self._best_final_lower(1.0))
            if self.sequence == "mixture" and self.sequence_alpha > 0:
                best = max(best, float(mixture_lower(np.array([self.n_max]), self.n_max, self.sequence_alpha,
                                                     point_weight=self.point_weight)[0]))
            self._ceiling_value = best
        return self._ceiling_value

    def final_lower(self, count):
        """The lower bound the last look reports for ``count`` cA samples out of n_max."""
        count = np.asarray(count, dtype=float)
        lower = self.anytime_lower(len(self.looks) - 1, count)
        if self.sequence == "mixture" and self.final_alpha > 0:
            lower = np.maximum(lower, cp_lower(count, self.n_max, self.final_alpha))
        return np.asarray(lower, dtype=float)

    def needed_counts(self) -> np.ndarray:
        """For each level (``thresholds``), the least count at n_max whose ``final_lower`` reaches it.

        n_max + 1 for a level that n_max samples cannot reach. The bound grows with the count, so bisection finds it.
        """
        if not hasattr(self, "_needed"):
            needed = []
            for threshold in self.thresholds():
                low, high = 0, self.n_max + 1
                while low < high:
                    middle = (low + high) // 2
                    reached = middle <= self.n_max and float(self.final_lower(np.array([middle]))[0]) >= threshold
                    low, high = (low, middle) if reached else (middle + 1, high)
                needed.append(low)
            self._needed = np.array(needed)
        return self._needed

    def reach_probability(self, look: int, count, level):
        """The predictive probability that the count at n_max reaches ``needed_counts()[level]``.

        Given ``count`` cA among ``looks[look]`` samples, with pA from its Jeffreys posterior
        Beta(count + 1/2, n - count + 1/2) and the remaining n_max - n draws binomial (a beta-binomial tail).
        """
        num, count = self.looks[look], np.asarray(count)
        more = self.needed_counts()[level] - count   # cA samples still to come
        return np.where(more <= 0, 1.0, betabinom_sf(more - 1, self.n_max - num, count + 0.5, num - count + 0.5))

    def _best_lower(self, look: int, count):
        """The best lower bound n_max samples could give if pA were its upper bound at this look."""
        alpha_k = self.look_alpha(look)
        p_upper = cp_upper(count, self.looks[look], alpha_k if self.stop_alpha is None else self.stop_alpha)
        best = self._best_final_lower(p_upper)
        if self.sequence == "mixture":
            # what n_max samples could give includes the sequence's own bound there
            best = np.maximum(best, mixture_lower(np.floor(p_upper * self.n_max), self.n_max, self.sequence_alpha,
                                                  point_weight=self.point_weight))
        return best

    def step(self, look: int, count):
        """After look k (``looks[k]`` samples, ``count`` of them cA): (stop, pA_lower at this look).

        ``count`` may be an array (one entry per image); then both results are arrays.
        """
        count = np.asarray(count)
        if look == len(self.looks) - 1:
            # with a Clopper-Pearson bound at the last look: the union of two events of probability
            # <= alpha (1 - share) and <= alpha share
            lower = self.final_lower(count)
            return np.ones_like(lower, dtype=bool), lower
        lower = np.asarray(self.anytime_lower(look, count), dtype=float)
        futile = self.looks[look] in self.checkpoints
        if self.radii is not None:
            thresholds = self.thresholds()
            reached = np.searchsorted(thresholds, lower, side="right")   # levels with lower >= threshold
            # levels that n_max samples cannot certify even if every one of them is cA are out of reach
            # whatever the data: stop at every look once the highest of the others is reached
            reachable = int(np.searchsorted(thresholds, self._ceiling(), side="right"))
            top = reached >= max(reachable, 1)
            following = np.minimum(reached, len(thresholds) - 1)
            # (the upper-bound rule is judged at checkpoints only, so its bound is computed there only)
            out_of_reach = (self._best_lower(look, count) < thresholds[following]) if futile \
                else np.zeros(np.shape(lower), dtype=bool)
            if self.futility is not None and self.looks[look] >= self.futility_from:
                out_of_reach = out_of_reach | (self.reach_probability(look, count, following) < self.futility)
            return top | out_of_reach, lower
        best = self._best_lower(look, count)
        stop = (futile & (best < 0.5)) | (self.radius(lower) >= self.radius(best) - self.radius_tol)
        return stop, lower


def _check_certifier_arguments(alpha, looks, radii, radius_tol, sequence):
    if sequence not in ("mixture", "spending"):
        raise ValueError(f"sequence must be 'mixture' or 'spending', got {sequence!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if len(looks) == 0 or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] <= 0:
        raise ValueError(f"looks must be increasing positive sample sizes, got {list(looks)}")
    if radii is not None and any(r < 0 for r in radii):
        raise ValueError(f"radii must not be negative, got {list(radii)}")
    if radius_tol < 0:
        raise ValueError(f"radius_tol must not be negative, got {radius_tol}")


class SequentialPredictor:
    """The decision rule of sequential PREDICT for one image: a pure function of its count stream.

    After look k (``looks[k]`` samples) the top two classes have counts
    nA >= nB. PREDICT's test (Hung et al., "Rank verification for
    exponential families", Annals of Statistics 2019: the two-sided binomial
    test of nA successes in nA + nB trials at p = 1/2) is run at level
    alpha_k = alpha / K; the run stops with the top class at the first look
    whose test rejects, and abstains once the test cannot reject at
    ``looks[-1]`` samples even if the share of nA among nA + nB were its
    (1 - alpha_k) upper bound. Guarantee (Cohen et al.'s for PREDICT): with
    probability at least 1 - alpha the returned class is g(x) or ABSTAIN,
    whatever look the run stops at (a union bound over the K looks).
    """

    def __init__(self, alpha: float, looks: Sequence[int]):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha, self.looks = float(alpha), [int(n) for n in looks]

    def look_alpha(self, look: int) -> float:
        return self.alpha / len(self.looks)

    def step(self, look: int, count_a, count_b):
        """(stop, predict the top class) after look k with top-two counts nA >= nB (numbers or arrays)."""
        count_a, count_b = np.asarray(count_a), np.asarray(count_b)
        alpha_k = self.look_alpha(look)
        total = count_a + count_b
        decided = (total > 0) & (two_sided_binomial_pvalue(count_a, total) <= alpha_k)
        if look == len(self.looks) - 1:
            stop = np.ones_like(decided)
        else:
            # futility: the most optimistic share of nA, over the most top-two samples the last look can have
            share = cp_upper(count_a, np.maximum(total, 1), alpha_k)
            final_total = np.round(total * self.looks[-1] / self.looks[look])
            final_a = np.floor(share * final_total)
            hopeless = two_sided_binomial_pvalue(final_a, final_total) > self.look_alpha(len(self.looks) - 1)
            stop = decided | hopeless
        if stop.ndim == 0:
            return bool(stop), bool(decided)
        return stop, decided
