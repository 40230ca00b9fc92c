"""Sequential certification against fixed-N CERTIFY on the same images: samples, time, accuracy.

    python benchmarks/bench_sequential.py FIXED.tsv SEQUENTIAL.tsv [SEQUENTIAL.tsv ...] --radii 0 0.25 0.5 ...

FIXED.tsv: a ``certify.py`` run (N0 + N samples per image); each SEQUENTIAL.tsv
a ``certify.py --sequential`` run of the same model, sigma and ``--seed`` on
the same images (only the images in both files are compared, and their count
is printed). Prints a markdown table: mean samples per image and the ratio
to fixed-N's N0 + N, wall-clock seconds per image (the ``time`` column) and
the speed-up, ACR, and certified accuracy (percent) at each radius with the
difference to fixed-N. The time columns compare only when both runs had the
same load; on a shared machine use the timing mode instead:

    python benchmarks/bench_sequential.py --timing CHECKPOINT --sigma S [--images 3 --radii ...]

certifies the first ``--images`` Fashion-MNIST test images (every 100th) in
turns with fixed-N CERTIFY (N = 100,000), the radii mode and the ACR mode,
one image at a time in the same process, and prints each method's mean
samples and seconds per image, the speed-up in total time and the median of
the per-image speed-ups.

    python benchmarks/bench_sequential.py FIXED.tsv --oracle --sigma S --radii 0 0.25 0.5 ...

prints a lower bound on the mean samples per image of any certifier in radii
mode that gives every image of FIXED.tsv the answer fixed-N gave it (the
largest listed radius it certified, or abstain): a clairvoyant one that
knows each image's p_A (the share of the top class whose Clopper-Pearson
bound at N is the image's certified bound), sees exactly that share in
every prefix of its draws, tests once, at the whole of alpha, at the
smallest n whose Clopper-Pearson lower bound reaches Phi(r / sigma) (or 1/2
for r = 0), and stops there; N0 selection samples are added, and an image
fixed-N abstained on costs N0. A real certifier must also pay for not
knowing n in advance, so it needs more. It also prints Wald's lower bound
for any valid certifier, even one that knows each pA and draws i.i.d.
samples, that loses at most ``--loss-tol`` points (0.5) of certified
accuracy at each radius (``wald_samples``). With ``--acr-tol T`` it also
prints the least mean sample count at which such a clairvoyant certifier
(each image's radius at n samples: sigma PhiInv of that Clopper-Pearson
bound, n a multiple of 100) keeps the ACR within T of fixed-N's: a
Lagrangian (dual) lower bound on that knapsack problem.

    python benchmarks/bench_sequential.py FIXED.tsv [SEQUENTIAL.tsv] --simulate --sigma S --radii 0 0.25 0.5 ... [--reps 40 --held-out]

simulates the radii mode (the rule ``certify.py --sequential --radii``
runs, decision by decision through ``SequentialCertifier.step``) on the
images of FIXED.tsv without the model: the estimation samples of an image
are i.i.d. Bernoulli(pA) given its selected class, so ``--reps`` streams of
counts drawn with each image's pA (the share of the oracle above; 1/2 for
an image fixed-N abstained on) have the law of real runs. The pilot (N0
selection samples) is drawn too, since it picks the rule. Each stream is
drawn once and every scheme runs on it: this project's rule (with and
without the predictive stop, ``RADII_FUTILITY``) and the published ones of
``published_schemes.py`` (Voracek and Hein's KT betting sequence and
union-bound Clopper-Pearson sequence, alone and given this project's
stopping aids; Horvath et al.'s staged test). Prints mean samples per
image, the clairvoyant bound, how often the certified listed radius equals
fixed-N's, the certified accuracy at each listed radius minus fixed-N's
(points; an image counts where fixed-N's prediction is correct), the same
by pA group, and the best published scheme's samples over this project's;
last, per pA group, Wald's lower bound on the mean samples of any valid
certifier that certifies each listed radius of each image as often as KT +
aids does, as this project does, or as fixed-N does on the same streams
(``wald_table``), and each scheme's samples over it.
``--held-out`` keeps the images no scheme was chosen on (idx a multiple of
97 and not of 100). With SEQUENTIAL.tsv (a real ``certify.py --sequential
--radii`` run of the same model) it also prints that run's samples per
image against the simulated ones on the same images, in standard
deviations of a real run's mean.

    python benchmarks/bench_sequential.py FIXED.tsv --simulate --acr --sigma S [--reps 10 --acr-tol 0.02]

simulates the ACR mode instead (the rule ``certify.py --sequential`` runs
without ``--radii``, ``--radius-tol`` 0.1 sigma): each stream's counts at
every batch are drawn once, and on the same streams it runs the current
rule, which steers by the (1 - ``STOP_ALPHA``) upper bound, the previous
one, which steered by the upper bound at each look's own level, fixed-N
CERTIFY (the count at N), and Chen et al.'s ISS (pilot: the first batch)
over a range of its tolerance kappa. Prints mean samples per image, the
ratio to fixed-N, the clairvoyant ACR bound at ``--acr-tol`` (default
0.02) over the samples, the ACR (images fixed-N predicted correctly) with
its difference to fixed-N's on the same streams, and ISS's samples at the
current rule's ACR loss.

    python benchmarks/bench_sequential.py --exact-worst-case [--sigma S --radii ... --N 100000 --batch 1000]

prints, for alpha = 0.001 and 0.05, the exact probability that
``certify.py --sequential`` (the decision rule ``sequential.sequential_certifier``
builds, every decision through ``SequentialCertifier.step``) reports
pA_lower above the true pA, i.e. certifies a radius larger than the true
one: dynamic programming over the distribution of the count at each look of
a Bernoulli(pA) stream, no sampling. Radii mode: pA just below
Phi(r / sigma) for the largest listed radius r that N samples can certify
(a certificate of r is then false), and pA one standard deviation of the
share at N below it. ACR mode (``--radius-tol`` 0.1 sigma):
a grid of pA values, and the largest rate. Both also give the rate among
the runs that went on to the last look (the guarantee is over the whole
procedure, not conditional on the samples drawn). Counts whose probability
at a look is below 1e-18 are dropped; the dropped mass is printed, and the
exact rate lies between the rate and the rate plus it.
"""
import argparse
import copy
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "code"))
from analyze import load_results  # noqa: E402


def seconds(text: str) -> float:
    """A ``datetime.timedelta`` string (H:MM:SS[.ffffff], maybe 'N days, ...') in seconds."""
    days = 0
    if "day" in text:
        head, text = text.split(",", 1)
        days = int(head.split()[0])
    hours, minutes, secs = text.strip().split(":")
    return days * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(secs)


def summary(df, radii):
    correct = df["correct"].to_numpy() == 1
    radius = df["radius"].to_numpy()
    return {
        "acr": float((correct * radius).mean()),
        "accuracy": [100.0 * float(np.mean(correct & (radius >= r))) for r in radii],
        "seconds": float(np.mean([seconds(t) for t in df["time"]])),
    }


def fixed_share(radius: float, sigma: float, alpha: float, n: int) -> float:
    """The share k / N whose Clopper-Pearson bound at N is fixed-N's certified bound Phi(radius / sigma)."""
    from scipy.stats import norm

    from core import cp_lower
    bound = float(norm.cdf(radius / sigma))
    # the largest k with cp_lower(k, N) <= bound
    low, high = 0, n
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cp_lower(mid, n, alpha) <= bound else (low, mid - 1)
    return low / n


def clairvoyant_samples(radius: float, sigma: float, radii, alpha: float, n: int, n0: int) -> int:
    """Samples the clairvoyant certifier of ``--oracle`` draws for an image with fixed-N radius ``radius``."""
    from scipy.stats import norm

    from core import cp_lower
    target = max(r for r in radii if r <= radius)
    threshold = max(float(norm.cdf(target / sigma)), 0.5 + 1e-12)
    share = fixed_share(radius, sigma, alpha, n)
    # the smallest m with cp_lower(round(share * m), m) >= threshold (it exists: m = N qualifies or nearly)
    low, high = 1, n
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if cp_lower(round(share * mid), mid, alpha) >= threshold else (mid + 1, high)
    return n0 + low


def oracle(args):
    fixed = load_results(args.fixed)
    radii = sorted(set(args.radii) | {0.0})
    samples = [args.N0 if predict == -1 else
               clairvoyant_samples(radius, args.sigma, radii, args.alpha, args.N, args.N0)
               for predict, radius in zip(fixed["predict"], fixed["radius"])]
    mean = float(np.mean(samples))
    print(f"{os.path.basename(args.fixed)}: sigma {args.sigma}, {len(samples)} images, radii "
          f"{' '.join(f'{r:g}' for r in radii)}: clairvoyant lower bound {mean:,.0f} samples per image, "
          f"{(args.N0 + args.N) / mean:.1f}x fewer than {args.N0 + args.N:,} (per image: median "
          f"{np.median(samples):,.0f}, max {max(samples):,})")
    wald = wald_samples(fixed, radii, args)
    print(f"  any valid certifier that knows each pA and loses at most {args.loss_tol:g} points of certified accuracy "
          f"per radius: at least {wald:,.0f} samples per image (Wald); clairvoyant bound / this = {mean / wald:.2f}")
    if args.acr_tol is not None:
        acr_samples = clairvoyant_acr_samples(fixed, args)
        print(f"  ACR within {args.acr_tol:g} of fixed-N's: at least {acr_samples:,.0f} "
              f"samples per image, at most {(args.N0 + args.N) / acr_samples:.1f}x fewer")


def binary_kl(p, q):
    """KL(Bernoulli(p) || Bernoulli(q)) in nats, 0 log 0 = 0 (arrays broadcast)."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ones = np.where(p > 0, p * np.log(p / q), 0.0)
        zeros = np.where(p < 1, (1 - p) * np.log((1 - p) / (1 - q)), 0.0)
    return ones + zeros


def wald_image_bound(p, thresholds, certified, alpha: float, n_max: int) -> np.ndarray:
    """Per image: the least mean number of draws of any valid certifier that certifies as often (N0 excluded).

    ``p``: each image's pA (the draws are i.i.d. Bernoulli(p)); ``thresholds``: the pA each level needs,
    increasing; ``certified[i, j]``: how often the certifier in question certifies threshold j of image i.
    A certifier is valid when, for every q <= t, it certifies t with probability at most alpha. Its
    stopping time N, at most ``n_max``, ends a test of q = t against q = p, so by Wald's change of measure
    (Wald 1945; the data-processing form, Kaufmann, Cappe and Garivier, JMLR 2016, lemma 1)
    E_p[N] KL(p || t) >= kl(P_p[certify t] || P_t[certify t]) >= kl(c || alpha) for c = certified >= alpha,
    i.e. E_p[N] >= (c log(c / alpha) + (1 - c) log((1 - c) / (1 - alpha))) / KL(p || t). Every threshold
    t < p gives such a bound; the largest, capped at ``n_max``, is returned. Declining a threshold (giving
    up, a predictive stop, N-max) is free: the bound prices only the certificates a run reaches.
    """
    p = np.asarray(p, dtype=float)[:, None]
    thresholds = np.asarray(thresholds, dtype=float)[None, :]
    certified = np.clip(np.asarray(certified, dtype=float), 0.0, 1.0)
    draws = _draws_per_threshold(p, thresholds, certified, alpha, binary_kl(p, thresholds))
    return np.minimum(np.maximum(draws.max(axis=1), 0.0), n_max)


def _draws_per_threshold(p, thresholds, certified, alpha: float, divergence) -> np.ndarray:
    """kl(c || alpha) / KL(p || t) per image and threshold where t < p and c > alpha (Wald's bound of that
    threshold, ``wald_image_bound``); -1 where the threshold gives no bound."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((p > thresholds) & (certified > alpha), binary_kl(certified, alpha) / divergence, -1.0)


def crossfit_wald_bound(p, thresholds, certified, alpha: float, n_max: int) -> np.ndarray:
    """Per image, from simulated runs: an unbiased estimate of a number below ``wald_image_bound`` at the true rates.

    ``certified[i, k, j]``: whether run k of image i certified threshold j. The plug-in bound (the runs'
    shares in ``wald_image_bound``) errs upwards, kl(. || alpha) being convex; so the runs are split in two
    halves A and B: A picks the threshold j and a point c0 = (certified in A + 1/2) / (|A| + 1), and B's
    share c enters the tangent of kl(. || alpha) at c0, which lies below kl(. || alpha) (and below 0 for
    c < alpha). Its mean over B's draws is the tangent at the true rate, at most the bound of threshold j,
    hence at most ``wald_image_bound``. The two halves swap, and the mean of both estimates is returned.
    """
    certified = np.asarray(certified, dtype=bool)
    images, reps, _ = certified.shape
    half = reps // 2
    if half < 1:
        raise ValueError("the cross-fitted bound needs at least 2 runs per image")
    rows = np.arange(images)
    p = np.asarray(p, dtype=float)[:, None]
    thresholds = np.asarray(thresholds, dtype=float)[None, :]
    divergence = binary_kl(p, thresholds)
    halves = (certified[:, :half], certified[:, half:2 * half])
    estimates = []
    for choose, judge in (halves, halves[::-1]):
        score = _draws_per_threshold(p, thresholds, choose.mean(axis=1), alpha, divergence)
        level = np.argmax(score, axis=1)
        point = (choose[rows, :, level].sum(axis=1) + 0.5) / (half + 1)
        slope = np.log(point / alpha) - np.log((1 - point) / (1 - alpha))
        tangent = binary_kl(point, alpha) + slope * (judge[rows, :, level].mean(axis=1) - point)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.minimum(tangent / divergence[rows, level], n_max)
        estimates.append(np.where(score.max(axis=1) > 0, value, 0.0))
    return (estimates[0] + estimates[1]) / 2


def level_thresholds(radii, sigma: float) -> np.ndarray:
    """pA needed for each level of ``radii`` (which starts at 0): 1/2 for radius 0, Phi(r / sigma) for r > 0."""
    from scipy.stats import norm
    return np.array([0.5] + [float(norm.cdf(r / sigma)) for r in radii if r > 0])


def fixed_levels(fixed, radii) -> np.ndarray:
    """How many levels of ``radii`` (which starts at 0) fixed-N certified per image: 0 where it abstained."""
    return np.array([0 if predict == -1 else int(np.searchsorted(radii, radius, side="right"))
                     for predict, radius in zip(fixed["predict"], fixed["radius"])])


def wald_samples(fixed, radii, args) -> float:
    """A lower bound on the mean samples per image of any valid radii-mode certifier, even one knowing each pA.

    An image's pA is the ``--oracle`` share p, and fixed-N certified it at the level of threshold t < p. A
    certifier whose false-certificate rate is at most alpha at every pA below t (at t, by continuity) and
    that certifies t with probability 1 - b at p draws, by the change of measure between p and t, at least
    kl(1 - b || alpha) / KL(p || t) samples on average (Wald; Kaufmann, Cappe and Garivier, JMLR 2016,
    lemma 1), plus N0. Missing an image that fixed-N certified correctly costs certified accuracy at its
    radius, and at most ``--loss-tol`` points per radius may be lost; the least sum of the bounds under
    that constraint is at least its Lagrangian dual, computed per radius over the miss rates b.
    """
    misses = np.linspace(0.0, 1.0, 1001)
    evidence = binary_kl(1 - misses, args.alpha)   # kl(1 - b || alpha); 0 at b = 1 - alpha and beyond
    thresholds = level_thresholds(radii, args.sigma)
    top = fixed_levels(fixed, radii) - 1   # the threshold each image was certified at; -1: abstained
    groups = {}
    for level, radius, correct in zip(top, fixed["radius"], fixed["correct"]):
        if level >= 0:
            share = fixed_share(radius, args.sigma, args.alpha, args.N)
            groups.setdefault(level, []).append((float(binary_kl(share, thresholds[level])), correct == 1))
    budget = args.loss_tol / 100 * len(fixed)   # images that may be missed at each radius
    total = args.N0 * float(np.sum(top < 0))   # fixed-N abstained: N0 samples suffice
    for images in groups.values():
        total += max(sum(float(np.min(args.N0 + evidence / divergence + (lam * misses if correct else 0.0)))
                         for divergence, correct in images) - lam * budget
                     for lam in np.concatenate([[0.0], np.logspace(0, 9, 300)]))
    return total / len(fixed)


def clairvoyant_acr_samples(fixed, args) -> float:
    """A lower bound on the mean samples per image of a clairvoyant certifier whose ACR is within --acr-tol."""
    from scipy.stats import norm

    from core import cp_lower
    sizes = np.arange(100, args.N + 1, 100)
    costs, losses = [], []
    for predict, radius, correct in zip(fixed["predict"], fixed["radius"], fixed["correct"]):
        if predict == -1 or correct != 1 or radius <= 0:   # adds nothing to the ACR: N0 samples suffice
            costs.append(np.array([args.N0]))
            losses.append(np.array([0.0]))
            continue
        lower = cp_lower(np.round(fixed_share(radius, args.sigma, args.alpha, args.N) * sizes), sizes, args.alpha)
        reached = np.where(lower > 0.5, args.sigma * norm.ppf(np.clip(lower, 0.5, 1 - 1e-16)), 0.0)
        costs.append(args.N0 + sizes)
        losses.append(np.maximum(radius - reached, 0.0))
    # min sum(cost) s.t. sum(loss) <= budget is at least sum_i min_n (cost + lam loss) - lam budget, any lam >= 0
    budget = args.acr_tol * len(costs)
    dual = max(sum(float(np.min(c + lam * l)) for c, l in zip(costs, losses)) - lam * budget
               for lam in np.logspace(0, 9, 500))
    return dual / len(costs)


def without_futility(rule):
    """The same decision rule without the predictive stop."""
    rule = copy.copy(rule)
    rule.futility = None
    return rule


def held_out(fixed):
    """The rows of images no scheme was chosen on: idx a multiple of 97 and not of 100."""
    idx = fixed["idx"].to_numpy()
    return fixed[(idx % 97 == 0) & (idx % 100 != 0)].reset_index(drop=True)


def simulation_images(args):
    """The rows of FIXED.tsv that ``--simulate`` runs on (``--held-out``: those of ``held_out``)."""
    fixed = load_results(args.fixed)
    if args.held_out:
        fixed = held_out(fixed)
        if not len(fixed):
            sys.exit(f"error: '{args.fixed}' has no image with idx a multiple of 97 and not of 100; "
                     f"drop --held-out or give a file of more images")
    return fixed


def image_shares(fixed, args) -> list:
    """Each image's pA for the simulations: the ``fixed_share`` of its fixed-N radius, 1/2 where fixed-N abstained."""
    return [0.5 if predict == -1 else fixed_share(radius, args.sigma, args.alpha, args.N)
            for predict, radius in zip(fixed["predict"], fixed["radius"])]


# the pA groups of the per-group table: an abstention of fixed-N, then pA in [lo, hi)
PA_GROUPS = (("abstained", None, None), ("pA < 0.99", 0.0, 0.99), ("0.99 <= pA < 0.9999", 0.99, 0.9999),
             ("pA >= 0.9999", 0.9999, 1.01))


def pa_groups(fixed, shares) -> dict:
    """Per group name of ``PA_GROUPS``, a boolean mask over the images."""
    abstained = np.asarray(fixed["predict"]) == -1
    shares = np.asarray(shares)
    return {name: abstained if lo is None else ~abstained & (shares >= lo) & (shares < hi)
            for name, lo, hi in PA_GROUPS}


def common_streams(shares, looks, args, rng):
    """One stream per image and run, drawn once for every scheme: (unanimous pilot, counts at each of ``looks``).

    The estimation samples of a stream are i.i.d. Bernoulli(pA) given its selected class, so the count at
    each sample size of ``looks`` (sorted) is a cumulative sum of binomial increments; the pilot (N0
    selection samples) is drawn too, since it picks the project's rule.
    """
    p = np.repeat(np.asarray(shares, dtype=float), args.reps)
    unanimous = rng.binomial(args.N0, p) == args.N0
    steps = np.diff([0] + list(looks))
    counts = np.cumsum(rng.binomial(steps[None, :], p[:, None]), axis=1)
    return unanimous, counts


def project_runs(rule_of, unanimous, counts, grid):
    """Samples (N0 excluded) and lower bound per stream of the project's rules, every decision through ``step``."""
    position = {n: i for i, n in enumerate(grid)}
    samples, lower = np.zeros(len(unanimous), dtype=np.int64), np.zeros(len(unanimous))
    for flag in (False, True):
        group = np.flatnonzero(unanimous == flag)
        if not len(group):
            continue
        rule = rule_of(flag)
        running = np.ones(len(group), dtype=bool)
        for look, num in enumerate(rule.looks):
            active = np.flatnonzero(running)
            stop, low = rule.step(look, counts[group[active], position[num]])
            lower[group[active]] = low
            done = active[np.asarray(stop, dtype=bool)]
            samples[group[done]] = num
            running[done] = False
            if not running.any():
                break
    return samples, lower


def simulate(args):
    import published_schemes as published
    from sequential import (RADII_FUTILITY, RADII_FUTILITY_FROM, STOP_ALPHA, sequential_certifier)
    fixed = simulation_images(args)
    radii = sorted(set(args.radii) | {0.0})
    listed = [r for r in radii if r > 0]
    shares = image_shares(fixed, args)
    thresholds = level_thresholds(radii, args.sigma)
    fixed_level = np.repeat(fixed_levels(fixed, radii), args.reps)
    oracle_mean = np.mean([args.N0 if predict == -1 else
                           clairvoyant_samples(radius, args.sigma, radii, args.alpha, args.N, args.N0)
                           for predict, radius in zip(fixed["predict"], fixed["radius"])])

    def project(flag):
        return sequential_certifier(args.sigma, args.alpha, args.N, args.batch, radii=listed, pilot_unanimous=flag)
    aids = published.StoppingAids(futility=RADII_FUTILITY, futility_from=int(math.ceil(RADII_FUTILITY_FROM * args.N)),
                                  checkpoints=project(False).checkpoints, stop_alpha=STOP_ALPHA)
    baselines = [published.KTSequence(args.alpha, args.N), published.CPUnionSequence(args.alpha, args.N),
                 published.HorvathStages(args.alpha, args.N)]
    rules = [project(flag) for flag in (False, True)]
    grid = sorted(set().union(*(rule.looks for rule in rules + baselines)))
    unanimous, counts = common_streams(shares, grid, args, np.random.default_rng(args.seed))
    position = {n: i for i, n in enumerate(grid)}
    runs = {"this project": project_runs(project, unanimous, counts, grid),
            "this project, no predictive stop": project_runs(lambda flag: without_futility(project(flag)),
                                                             unanimous, counts, grid)}
    for rule in baselines:
        columns = [position[n] for n in rule.looks]
        runs[rule.name] = published.run_published(rule, counts[:, columns], thresholds)
        if not isinstance(rule, published.HorvathStages):   # (its stages are too few for the aids to act)
            runs[rule.name + " + the project's stopping aids"] = published.run_published(rule, counts[:, columns],
                                                                                        thresholds, aids)
    print(f"{os.path.basename(args.fixed)}{' (held-out images)' if args.held_out else ''}: sigma {args.sigma}, "
          f"{len(shares)} images x {args.reps} simulated runs (the same streams for every scheme), radii "
          f"{' '.join(f'{r:g}' for r in listed)}, batch {args.batch}; clairvoyant bound {oracle_mean:,.0f}")
    correct = np.repeat(np.asarray(fixed["correct"]) == 1, args.reps)

    def accuracy(levels):   # certified accuracy (%) at each radius: radii[i] is certified at level i + 1 and up
        return np.array([100 * np.mean(correct & (levels >= i + 1)) for i in range(len(radii))])
    print(f"| scheme | samples/image (se) | ratio to fixed-N | bound / samples | same level as fixed-N | "
          f"certified accuracy minus fixed-N's at {', '.join(f'{r:g}' for r in radii)} |")
    print("|---|---:|---:|---:|---:|---|")
    levels = {}
    for name, (samples, lower) in runs.items():
        samples = samples + args.N0
        runs[name] = samples
        levels[name] = np.searchsorted(thresholds, lower, side="right")
        per_image = samples.reshape(len(shares), args.reps).mean(axis=1)
        se = per_image.std(ddof=1) / math.sqrt(len(shares) * args.reps) if len(shares) > 1 else float("nan")
        print(f"| {name} | {samples.mean():,.0f} ({se:,.0f}) | {(args.N0 + args.N) / samples.mean():.1f}x | "
              f"{oracle_mean / samples.mean():.2f} | {np.mean(levels[name] == fixed_level):.4f} | "
              f"{', '.join(f'{d:+.1f}' for d in accuracy(levels[name]) - accuracy(fixed_level))} |")
    groups = {name: np.repeat(mask, args.reps) for name, mask in pa_groups(fixed, shares).items()}
    print("\nBy pA group: samples/image (same level as fixed-N)")
    print("| scheme | " + " | ".join(f"{name} ({int(mask.sum()) // args.reps})" for name, mask in groups.items()) + " |")
    print("|---|" + "---:|" * len(groups))
    for name, samples in runs.items():
        cells = [f"{samples[mask].mean():,.0f} ({np.mean(levels[name][mask] == fixed_level[mask]):.3f})"
                 if mask.any() else "-" for mask in groups.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    best = min((name for name in runs if name.endswith("stopping aids")), key=lambda name: runs[name].mean())
    ratios = [f"{name}: {runs[best][mask].mean() / runs['this project'][mask].mean():.2f}x"
              for name, mask in groups.items() if mask.any()]
    print(f"\nthe best published scheme with the same stopping aids ({best}) over this project: "
          f"{runs[best].mean() / runs['this project'].mean():.2f}x overall; by group {', '.join(ratios)}")
    top = PA_GROUPS[-1][0]
    tied, needed = lead_ceiling(runs[best], runs["this project"], groups[top], LEAD_TARGET)
    print(f"this project drawing what it draws for {top} and the same as the best published scheme elsewhere: "
          f"{tied:.2f}x overall; {LEAD_TARGET:g}x would need the other groups at {needed:.2f} of its samples")
    from sequential import cp_lower
    levels["fixed-N"] = np.searchsorted(thresholds, cp_lower(counts[:, position[args.N]], args.N, args.alpha),
                                        side="right")
    wald_table(runs, levels, groups, shares, thresholds, args)
    for path in args.sequential:
        real_against_simulated(fixed, path, runs["this project"].reshape(len(shares), args.reps))


def wald_table(runs, levels, groups, shares, thresholds, args):
    """Per pA group: KT + aids and this project against Wald's bound at certification rates.

    A scheme's rates are, per image, how often its runs certify each threshold: KT + aids's, this
    project's, and fixed-N CERTIFY's (its Clopper-Pearson bound at N on the same streams,
    ``levels["fixed-N"]``). The bound (``crossfit_wald_bound``, N0 added: every scheme draws the pilot and
    is valid given it, so the bound holds given the pilot and, kl being convex, on average) is below the
    least mean sample count of any valid certifier that certifies every threshold of every image at least
    as often; giving up costs nothing in it.
    """
    kt = next(name for name in runs if name.startswith("KT") and name.endswith("stopping aids"))
    images, reps = len(shares), args.reps

    def bound(name):
        certified = levels[name].reshape(images, reps)[:, :, None] > np.arange(len(thresholds))
        return np.repeat(args.N0 + crossfit_wald_bound(shares, thresholds, certified, args.alpha, args.N), reps)
    bounds = {"KT + aids's": bound(kt), "this project's": bound("this project"), "fixed-N's": bound("fixed-N")}
    columns = {"all": np.ones(images * reps, dtype=bool), **groups}

    def row(label, values, spec):
        print(f"| {label} | " + " | ".join(format(values(mask), spec) if mask.any() else "-"
                                           for mask in columns.values()) + " |")
    print("\nWald's lower bound (samples/image) for any valid certifier that certifies each threshold of each "
          "image as often as the named scheme; last rows: samples / bound")
    print("| | " + " | ".join(f"{name} ({int(mask.sum()) // reps})" for name, mask in columns.items()) + " |")
    print("|---|" + "---:|" * len(columns))
    row("KT + aids", lambda mask: runs[kt][mask].mean(), ",.0f")
    row("this project", lambda mask: runs["this project"][mask].mean(), ",.0f")
    for label, values in bounds.items():
        row(f"bound at {label} rates", lambda mask: values[mask].mean(), ",.0f")
    print("| samples / bound (se over images) |" + " |" * len(columns))
    for label, name, at in (("KT + aids", kt, "KT + aids's"), ("KT + aids", kt, "this project's"),
                            ("KT + aids", kt, "fixed-N's"), ("this project", "this project", "this project's"),
                            ("this project", "this project", "fixed-N's")):
        print(f"| {label} / bound at {at} | " + " | ".join(
            "-" if not mask.any() else "{:.2f} ({:.2f})".format(*ratio_se(runs[name], bounds[at], mask, reps))
            for mask in columns.values()) + " |")


# the lead over the best published scheme (same stopping aids) that the sequential certifier aims at
LEAD_TARGET = 1.4


def lead_ceiling(published, project, top, target: float):
    """How far the lead can go when it comes from the runs in ``top`` alone (per run: samples, N0 included).

    Returns the overall ratio published / project if the project drew ``project`` on ``top`` and exactly
    ``published`` on the other runs, and the fraction of ``published``'s samples on the other runs that
    the project may draw there for the ratio to reach ``target``.
    """
    published, project, top = np.asarray(published, float), np.asarray(project, float), np.asarray(top, bool)
    rest, mine = published[~top].sum(), project[top].sum()
    tied = published.sum() / (rest + mine)
    return tied, (published.sum() / target - mine) / rest


def ratio_se(samples, bound, mask, reps):
    """mean(samples) / mean(bound) over the runs in ``mask``, and its standard error over the images (delta method)."""
    per_image = samples[mask].reshape(-1, reps).mean(axis=1), bound[mask].reshape(-1, reps).mean(axis=1)
    ratio = per_image[0].mean() / per_image[1].mean()
    count = len(per_image[0])
    if count < 2:
        return ratio, float("nan")
    return ratio, float(np.std(per_image[0] - ratio * per_image[1], ddof=1) / per_image[1].mean() / math.sqrt(count))


def real_against_simulated(fixed, path, simulated):
    """A real run's samples per image (SEQUENTIAL.tsv) against the simulated runs of the same images.

    ``simulated``: [images x reps] samples of the project's rule, N0 included. A real run draws one
    stream per image, so its mean over the images lies within a few ``sd`` of the simulated mean,
    sd^2 = (sum over images of the per-image variance of the samples) (1 + 1 / reps) / images^2.
    """
    real = load_results(path).set_index("idx")
    keep = np.isin(fixed["idx"].to_numpy(), real.index.to_numpy())
    if not keep.any():
        sys.exit(f"error: '{path}' has none of the simulated images")
    simulated = simulated[keep]
    count, reps = simulated.shape
    samples = real.loc[fixed["idx"].to_numpy()[keep], "samples"].to_numpy(dtype=float)
    sd = math.sqrt(simulated.var(axis=1, ddof=1).sum() * (1 + 1 / reps)) / count
    print(f"\n{os.path.basename(path)}: {count} images, real run {samples.mean():,.0f} samples per image, "
          f"simulated {simulated.mean():,.0f} (sd of a real run's mean {sd:,.0f}; "
          f"difference {(samples.mean() - simulated.mean()) / sd:+.1f} sd)")


def simulate_acr(args):
    import published_schemes as published
    from eval_utils import DEFAULT_RADIUS_TOL_SIGMAS
    from sequential import batch_looks, cp_lower, sequential_certifier
    fixed = simulation_images(args)
    args.acr_tol = 0.02 if args.acr_tol is None else args.acr_tol
    shares = image_shares(fixed, args)
    current = sequential_certifier(args.sigma, args.alpha, args.N, args.batch,
                                   radius_tol=DEFAULT_RADIUS_TOL_SIGMAS * args.sigma)
    previous = copy.copy(current)
    previous.stop_alpha = None   # the upper bound at each look's own level
    grid = sorted(set(current.looks) | set(batch_looks(args.N, args.batch)))
    _, counts = common_streams(shares, grid, args, np.random.default_rng(args.seed))
    position = {n: i for i, n in enumerate(grid)}
    correct = np.repeat(np.asarray(fixed["correct"]) == 1, args.reps)
    fixed_acr = float(np.mean(correct * current.radius(cp_lower(counts[:, -1], args.N, args.alpha))))
    bound = clairvoyant_acr_samples(fixed, args)
    print(f"{os.path.basename(args.fixed)}{' (held-out images)' if args.held_out else ''}: sigma {args.sigma}, "
          f"{len(shares)} images x {args.reps} simulated runs, ACR mode, radius tolerance "
          f"{DEFAULT_RADIUS_TOL_SIGMAS:g} sigma; clairvoyant bound for ACR within {args.acr_tol:g}: {bound:,.0f}; "
          f"fixed-N ACR on these streams {fixed_acr:.3f}")
    print("| scheme | samples/image | ratio to fixed-N | bound / samples | ACR (diff to fixed-N) |")
    print("|---|---:|---:|---:|---:|")
    losses = {}
    for name, rule in (("current", current), ("previous", previous)):
        samples, radius, running = np.zeros(len(counts)), np.zeros(len(counts)), np.ones(len(counts), dtype=bool)
        for look, num in enumerate(rule.looks):
            active = np.flatnonzero(running)
            stop, lower = rule.step(look, counts[active, position[num]])
            radius[active] = rule.radius(lower)
            done = active[np.asarray(stop, dtype=bool)]
            samples[done] = args.N0 + num
            running[done] = False
            if not running.any():
                break
        acr = float(np.mean(correct * radius))
        losses[name] = (fixed_acr - acr, samples.mean())
        print(f"| {name} | {samples.mean():,.0f} | {(args.N0 + args.N) / samples.mean():.2f}x | "
              f"{bound / samples.mean():.2f} | {acr:.3f} ({acr - fixed_acr:+.4f}) |")
    # ISS (pilot: the first batch, reused) over a range of its tolerance kappa, to match the ACR loss
    iss = []
    for kappa in np.array([0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]) * args.sigma:
        sizes, radius = published.iss_runs(counts, grid, args.batch, args.sigma, args.alpha, kappa)
        acr = float(np.mean(correct * radius))
        iss.append((fixed_acr - acr, args.N0 + sizes.mean()))
        print(f"| ISS (Chen et al.), kappa {kappa / args.sigma:g} sigma | {args.N0 + sizes.mean():,.0f} | "
              f"{(args.N0 + args.N) / (args.N0 + sizes.mean()):.2f}x | {bound / (args.N0 + sizes.mean()):.2f} | "
              f"{acr:.3f} ({acr - fixed_acr:+.4f}) |")
    loss, samples = losses["current"]
    iss.sort()
    at = float(np.interp(loss, [l for l, _ in iss], [s for _, s in iss]))
    print(f"\nISS at the current rule's ACR loss ({loss:.4f}, interpolated over kappa): {at:,.0f} samples per image; "
          f"ISS / current = {at / samples:.2f}")


def count_window(num: int, p: float, tail: float):
    """Counts lo..hi of Binomial(num, p) outside of which each side has probability at most ``tail``."""
    from scipy.stats import binom
    lo = int(binom.ppf(tail, num, p)) if p < 1 else num
    hi = int(binom.isf(tail, num, p)) if p > 0 else 0
    return max(lo, 0), min(max(hi, lo), num)


def exact_false_certificates(certifier, p: float, stop_rule=None, tail: float = 1e-18) -> dict:
    """The exact law of a sequential run on i.i.d. Bernoulli(p) draws: how often its bound exceeds p.

    Dynamic programming over P[still running, count = c] after each look of ``certifier.looks``: the
    count grows by a Binomial(looks[k] - looks[k - 1], p) increment, and ``certifier.step`` on every
    count decides which counts stop and with which lower bound. ``stop_rule(lower)``: an extra stopping
    rule on top of the certifier's (as ``tests/test_sequential.simulate``), e.g. the adversary "stop as
    soon as the bound exceeds p". Returns ``false`` (P[it stops with lower bound > p]), ``lost`` (mass
    of counts dropped for having probability below ``tail`` at a look: the exact rate lies in
    [false, false + lost]), ``last`` (P[it runs to the last look]) and ``false_last`` (P[it runs to the
    last look and its bound there exceeds p]).
    """
    from scipy.stats import binom
    mass, lo = np.ones(1), 0          # P[running, count = lo + i]
    false = lost = last = false_last = 0.0
    drawn = 0
    final = len(certifier.looks) - 1
    for look, num in enumerate(certifier.looks):
        inc_lo, inc_hi = count_window(num - drawn, p, tail)
        increment = binom.pmf(np.arange(inc_lo, inc_hi + 1), num - drawn, p)
        before = float(mass.sum())
        mass, lo = np.convolve(mass, increment), lo + inc_lo
        keep_lo, keep_hi = count_window(num, p, tail)
        start, stop_at = max(keep_lo - lo, 0), max(min(keep_hi - lo + 1, len(mass)), 0)
        mass, lo = mass[start:stop_at], lo + start
        lost += max(before - float(mass.sum()), 0.0)
        drawn = num
        if not len(mass):
            break
        stop, lower = certifier.step(look, np.arange(lo, lo + len(mass)))
        stop, lower = np.asarray(stop, dtype=bool), np.asarray(lower, dtype=float)
        if stop_rule is not None:
            stop = stop | np.asarray(stop_rule(lower), dtype=bool)
        wrong = stop & (lower > p)
        false += float(mass[wrong].sum())
        if look == final:
            last, false_last = float(mass.sum()), float(mass[wrong].sum())
        mass = np.where(stop, 0.0, mass)
        if not mass.any():
            break
    return {"false": false, "lost": lost, "last": last, "false_last": false_last}


def exact_worst_case(args):
    from scipy.stats import norm

    from sequential import sequential_certifier
    radii = [r for r in args.radii if r > 0]
    print(f"exact false-certificate rates: sigma {args.sigma}, N-max {args.N:,}, batch {args.batch}, "
          f"radii {' '.join(f'{r:g}' for r in radii)} (radii mode), radius tolerance 0.1 sigma (ACR mode)")
    print("| mode | alpha | pA | rate | rate / alpha | dropped mass | P[to N-max] | rate given N-max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def row(mode, alpha, p, law):
        # (a conditional rate given an event of negligible probability says nothing)
        given = law["false_last"] / law["last"] if law["last"] > 1e-9 else float("nan")
        print(f"| {mode} | {alpha:g} | {p:.10g} | {law['false']:.3g} | {law['false'] / alpha:.3f} | "
              f"{law['lost']:.1e} | {law['last']:.3g} | {'-' if math.isnan(given) else f'{given:.3g}'} |")

    for alpha, unanimous in ((0.001, False), (0.001, True), (0.05, False), (0.05, True)):
        # each rule is valid given the pilot that chose it, so each is computed on its own
        certifier = sequential_certifier(args.sigma, alpha, args.N, args.batch, radii=radii, pilot_unanimous=unanimous)
        pilot = "unanimous" if unanimous else "split"
        ceiling = certifier._ceiling()
        reachable = [r for r, t in zip(certifier.radii, certifier.thresholds()) if r > 0 and t <= ceiling]
        if not reachable:
            print(f"| radii ({pilot} pilot) | {alpha:g} | no listed radius can be certified with N-max samples | | | | | |")
        else:
            top = max(reachable)
            threshold = float(norm.cdf(top / args.sigma))
            # just below the threshold: certifying ``top`` is then a false certificate
            row(f"radii ({pilot} pilot), pA just below Phi({top / args.sigma:g})", alpha, threshold - 1e-9,
                exact_false_certificates(certifier, threshold - 1e-9))
            # one standard deviation of the share at N-max below it: what the runs to N-max look like
            p = threshold - math.sqrt(threshold * (1 - threshold) / args.N)
            row(f"radii ({pilot} pilot), pA 1 sd below", alpha, p, exact_false_certificates(certifier, p))
        if unanimous:   # the ACR mode does not look at the pilot
            continue
        certifier = sequential_certifier(args.sigma, alpha, args.N, args.batch, radius_tol=0.1 * args.sigma)
        worst = None
        for p in args.acr_p:
            law = exact_false_certificates(certifier, p)
            row("ACR", alpha, p, law)
            worst = max(worst or (law["false"], p), (law["false"], p))
        print(f"| ACR, largest | {alpha:g} | {worst[1]:.10g} | {worst[0]:.3g} | {worst[0] / alpha:.3f} | | | |")


def timing(args):
    import time

    import torch

    from checkpoints import load_base_classifier
    from core import Smooth
    from noise_streams import noise_generator
    from sequential import certify_sequential
    from datasets import get_dataset

    torch.set_num_threads(args.threads)
    model = load_base_classifier(args.timing, "fmnist", "cpu")
    smooth = Smooth(model, 10, args.sigma)
    data = get_dataset("fmnist", "test", augment=False)
    radii = [r for r in args.radii if r > 0]
    methods = {
        "fixed-N CERTIFY": lambda x, g: smooth.certify(x, 100, 100000, 0.001, 1000, g) + (100100,),
        "sequential, radii": lambda x, g: certify_sequential(smooth, x[None], 100, 100000, 0.001, 1000, [g],
                                                             radii=radii)[0],
        "sequential, ACR": lambda x, g: certify_sequential(smooth, x[None], 100, 100000, 0.001, 1000, [g],
                                                           radius_tol=0.1 * args.sigma)[0],
    }
    seconds = {name: [] for name in methods}
    samples = {name: [] for name in methods}
    for image in range(args.images):
        x, _ = data[image * 100]
        names = list(methods)
        names = names[image % 3:] + names[:image % 3]   # the order rotates, so load changes hit all alike
        for name in names:
            started = time.perf_counter()
            result = methods[name](x, noise_generator(0, image * 100, "cpu"))
            seconds[name].append(time.perf_counter() - started)
            samples[name].append(result[-1])
    fixed = np.array(seconds["fixed-N CERTIFY"])
    print(f"sigma {args.sigma}, {args.images} images (idx 0, 100, ...), {args.threads} thread(s)")
    print("| method | samples/image | sample ratio | s/image (mean) | speed-up (total time) | "
          "speed-up (median per image) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in methods:
        times = np.array(seconds[name])
        print(f"| {name} | {np.mean(samples[name]):,.0f} | {100100 / np.mean(samples[name]):.1f}x | "
              f"{times.mean():.2f} | {fixed.sum() / times.sum():.1f}x | {np.median(fixed / times):.1f}x |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fixed", nargs="?")
    parser.add_argument("sequential", nargs="*")
    parser.add_argument("--timing", metavar="CHECKPOINT", help="time the three certifiers on a LeNet checkpoint")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--radii", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--fixed-samples", type=int, default=100100, help="N0 + N of the fixed-N run")
    parser.add_argument("--oracle", action="store_true", help="the clairvoyant lower bound on FIXED.tsv")
    parser.add_argument("--alpha", type=float, default=0.001, help="--oracle: alpha of the fixed-N run")
    parser.add_argument("--N", type=int, default=100000, help="--oracle: N of the fixed-N run")
    parser.add_argument("--N0", type=int, default=100, help="--oracle: N0 of the fixed-N run")
    parser.add_argument("--acr-tol", type=float, default=None, help="--oracle: also the bound for ACR within this")
    parser.add_argument("--loss-tol", type=float, default=0.5,
                        help="--oracle: points of certified accuracy per radius that Wald's bound may lose")
    parser.add_argument("--exact-worst-case", action="store_true",
                        help="exact false-certificate rates of both modes at alpha = 0.001 and 0.05 (N: N-max)")
    parser.add_argument("--batch", type=int, default=1000, help="--exact-worst-case: samples per batch")
    parser.add_argument("--acr-p", type=float, nargs="+",
                        default=[0.55, 0.7, 0.9, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999],
                        help="--exact-worst-case: the pA values of the ACR mode")
    parser.add_argument("--simulate", action="store_true", help="simulated radii-mode runs on the images of FIXED.tsv")
    parser.add_argument("--acr", action="store_true", help="--simulate: the ACR mode instead of the radii mode")
    parser.add_argument("--reps", type=int, default=40, help="--simulate: runs per image")
    parser.add_argument("--seed", type=int, default=0, help="--simulate: seed of the simulated draws")
    parser.add_argument("--held-out", action="store_true",
                        help="--simulate: only the images of FIXED.tsv with idx a multiple of 97 and not of 100")
    args = parser.parse_args(argv)
    if args.simulate:
        if not args.fixed:
            parser.error("--simulate needs FIXED.tsv")
        return simulate_acr(args) if args.acr else simulate(args)
    if args.exact_worst_case:
        return exact_worst_case(args)
    if args.timing:
        return timing(args)
    if args.oracle:
        if not args.fixed:
            parser.error("--oracle needs FIXED.tsv")
        return oracle(args)
    if not args.fixed or not args.sequential:
        parser.error("give FIXED.tsv and at least one SEQUENTIAL.tsv, or --timing CHECKPOINT")
    fixed = load_results(args.fixed).set_index("idx")
    print("| run | images | samples/image | ratio | s/image | speed-up | ACR (diff) | "
          + " | ".join(f"r={r:g} (diff)" for r in args.radii) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(args.radii))
    for path in args.sequential:
        seq = load_results(path).set_index("idx")
        common = sorted(set(fixed.index) & set(seq.index))
        if not common:
            sys.exit(f"error: '{path}' and '{args.fixed}' have no image in common; certify the same images")
        f, s = fixed.loc[common].reset_index(), seq.loc[common].reset_index()
        if not np.array_equal(f["label"].to_numpy(), s["label"].to_numpy()):
            sys.exit(f"error: '{path}' and '{args.fixed}' have different labels: not the same data set")
        base, run = summary(f, args.radii), summary(s, args.radii)
        samples = float(s["samples"].mean())
        cells = [os.path.basename(path), str(len(common)), f"{samples:,.0f}", f"{args.fixed_samples / samples:.1f}x",
                 f"{run['seconds']:.2f} (fixed {base['seconds']:.2f})", f"{base['seconds'] / run['seconds']:.1f}x",
                 f"{run['acr']:.3f} ({run['acr'] - base['acr']:+.3f})"]
        cells += [f"{a:.1f} ({a - b:+.1f})" for a, b in zip(run["accuracy"], base["accuracy"])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
