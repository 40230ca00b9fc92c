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
knowing n in advance, so it needs more. With ``--acr-tol T`` it also
prints the least mean sample count at which such a clairvoyant certifier
(each image's radius at n samples: sigma PhiInv of that Clopper-Pearson
bound, n a multiple of 100) keeps the ACR within T of fixed-N's: a
Lagrangian (dual) lower bound on that knapsack problem.
"""
import argparse
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
    if args.acr_tol is not None:
        acr_samples = clairvoyant_acr_samples(fixed, args)
        print(f"  ACR within {args.acr_tol:g} of fixed-N's: at least {acr_samples:,.0f} "
              f"samples per image, at most {(args.N0 + args.N) / acr_samples:.1f}x fewer")


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


def timing(args):
    import time

    import torch

    from common import load_base_classifier
    from core import Smooth, noise_generator
    from datasets import get_dataset

    torch.set_num_threads(args.threads)
    model = load_base_classifier(args.timing, "fmnist", "cpu")
    smooth = Smooth(model, 10, args.sigma)
    data = get_dataset("fmnist", "test", augment=False)
    radii = [r for r in args.radii if r > 0]
    methods = {
        "fixed-N CERTIFY": lambda x, g: smooth.certify(x, 100, 100000, 0.001, 1000, g) + (100100,),
        "sequential, radii": lambda x, g: smooth.certify_sequential_many(x[None], 100, 100000, 0.001, 1000, [g],
                                                                         radii=radii)[0],
        "sequential, ACR": lambda x, g: smooth.certify_sequential_many(x[None], 100, 100000, 0.001, 1000, [g],
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
    args = parser.parse_args(argv)
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
