"""Sequential CERTIFY and PREDICT: the guarantee of Cohen et al.'s algorithms with fewer samples.

``certify_sequential`` / ``predict_sequential`` run on a ``Smooth`` (the
sequential counterparts of ``Smooth.certify_many`` and ``predict_many``):
samples are drawn in rounds and, after each round (a *look*), the rule of
``sequential_rules`` says whether to stop; the looks and the mixture
confidence sequence are ``confidence_sequence``'s. With probability at least
1 - alpha over the whole procedure, a returned class equals g(x) and g is
robust within the returned radius, whatever look the run stops at. The
scheme, why it is valid and its caveats: docs/SEQUENTIAL.md.

Related work: Chen et al., "Input-Specific Robustness Certification for
Randomized Smoothing" (AAAI 2022); Voracek, "Treatment of Statistical
Estimation Problems in Randomized Smoothing for Adversarial Robustness"
(NeurIPS 2024); Cullen, Montague and Rubinstein, "Halt Fast! Early Stopping
for Certified Robustness" (2026).
"""
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

# the statistics, re-exported: the scripts, benchmarks and tests use them as sequential.NAME
from binomial import betabinom_sf, cp_lower, cp_upper, two_sided_binomial_pvalue  # noqa: F401
from confidence_sequence import (MIXTURE_ALTERNATIVES, MIXTURE_POINT_WEIGHT, batch_looks,  # noqa: F401
                                 look_schedule, mixture_log_martingale, mixture_lower, mixture_weights)
from core import Generators, Smooth
from sequential_rules import (FEW_FAILURES, RADII_FUTILITY, RADII_FUTILITY_FROM,  # noqa: F401
                              RADII_SHARES_SPLIT, RADII_SHARES_UNANIMOUS, SEQUENTIAL_FINAL_SHARE,
                              SEQUENTIAL_SCHEME, SEQUENTIAL_SINGLE_LOOK_SCHEME, STOP_ALPHA, RadiiShares,
                              SequentialCertifier, SequentialPredictor, sequential_certifier, sequential_scheme)

# --------------------------------------------------------------------------- runs on a smoothed classifier

def certify_sequential(smooth: Smooth, xs: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int,
                       generators: Generators, radii: Optional[Sequence[float]] = None, radius_tol: float = 0.0,
                       growth: float = 1.5) -> List[Tuple[int, float, int]]:
    """Sequential CERTIFY of each image of ``xs`` [G x C x H x W]: (class or ABSTAIN, radius, samples drawn).

    Selection draws ``n0`` samples first, as CERTIFY does; then the estimation samples of each image
    come from its own stream up to each look of ``sequential_certifier``'s rule in turn, so its first
    n estimation samples are those of fixed-N CERTIFY with N >= n. ``samples`` counts the selection
    samples too (at most n0 + n_max). In the radii mode the selection samples are also the pilot that
    picks the image's rule (``pilot_unanimous``: all of them the selected class); they are independent
    of the estimation samples, so each rule keeps its guarantee given the pilot, hence overall.
    """
    pilot = smooth.sample_counts_many(xs, n0, batch_size, generators)
    selected = pilot.argmax(axis=1)
    # the rule of each image, by its pilot (the radii mode's split of alpha depends on it; the ACR mode's not)
    unanimous = pilot[np.arange(len(selected)), selected] == n0
    rules = {flag: sequential_certifier(smooth.sigma, alpha, n_max, batch_size, radii, radius_tol, growth,
                                        pilot_unanimous=flag) for flag in (False, True)}
    # the draws stop at every look of either rule; each rule decides at its own looks only (both end at n_max)
    looks = sorted(set(rules[False].looks) | set(rules[True].looks))
    certifier = rules[False]
    counts = np.zeros(xs.shape[0], dtype=np.int64)

    def decide(look, num, active, more):
        for i, row in zip(active, more):
            counts[i] += int(row[selected[i]])
        active = np.asarray(active)
        stops, lowers = np.zeros(len(active), dtype=bool), np.zeros(len(active))
        for flag, rule in rules.items():
            mine = unanimous[active] == flag
            if mine.any() and num in rule.looks:
                stops[mine], lowers[mine] = rule.step(rule.looks.index(num), counts[active[mine]])
        return [None if not stop else
                (int(selected[i]), float(certifier.radius(lower)), n0 + num) if lower >= 0.5 else
                (Smooth.ABSTAIN, 0.0, n0 + num)
                for i, stop, lower in zip(active, stops, lowers)]

    return draw_in_rounds(smooth, xs, looks, batch_size, generators, decide)


def predict_sequential(smooth: Smooth, xs: torch.Tensor, n_max: int, alpha: float, batch_size: int,
                       generators: Generators, growth: float = 1.5) -> List[Tuple[int, int]]:
    """Sequential PREDICT of each image of ``xs`` [G x C x H x W]: (class or ABSTAIN, samples drawn).

    At most ``n_max`` samples per image, drawn up to each look of ``look_schedule(n_max, batch_size,
    growth)`` in turn and judged by ``SequentialPredictor``.
    """
    looks = look_schedule(n_max, batch_size, growth)
    predictor = SequentialPredictor(alpha, looks)
    counts = np.zeros((xs.shape[0], smooth.num_classes), dtype=np.int64)

    def decide(look, num, active, more):
        results = []
        for i, row in zip(active, more):
            counts[i] += row
            top2 = counts[i].argsort()[::-1][:2]
            stop, decided = predictor.step(look, int(counts[i][top2[0]]), int(counts[i][top2[1]]))
            results.append((int(top2[0]) if decided else Smooth.ABSTAIN, num) if stop else None)
        return results

    return draw_in_rounds(smooth, xs, looks, batch_size, generators, decide)


def draw_in_rounds(smooth: Smooth, xs: torch.Tensor, looks: Sequence[int], batch_size: int,
                   generators: Generators, decide: Callable) -> list:
    """Draw each undecided image's samples up to each look in turn, from its own stream; the results.

    ``decide(look, num, active, more)`` gets the indices of the images still drawing and the class
    counts [len(active) x num_classes] of their new samples, and returns per image its result, or
    None to go on. Decided images leave the group.
    """
    results: list = [None] * xs.shape[0]
    active = list(range(xs.shape[0]))
    drawn = 0
    for look, num in enumerate(looks):
        index = torch.tensor(active, dtype=torch.long, device=xs.device)
        more = smooth.sample_counts_many(xs.index_select(0, index), num - drawn, batch_size,
                                         [generators[i] for i in active])
        drawn = num
        decided = decide(look, num, active, more)
        for i, result in zip(active, decided):
            results[i] = result
        active = [i for i, result in zip(active, decided) if result is None]
        if not active:
            break
    return results
