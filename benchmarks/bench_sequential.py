"""Sequential certification against fixed-N CERTIFY on the same images: samples, time, accuracy.

    python benchmarks/bench_sequential.py FIXED.tsv SEQUENTIAL.tsv [SEQUENTIAL.tsv ...] --radii 0 0.25 0.5 ...

FIXED.tsv: a ``certify.py`` run (N0 + N samples per image); each SEQUENTIAL.tsv
a ``certify.py --sequential`` run of the same model, sigma and ``--seed`` on
the same images (only the images in both files are compared, and their count
is printed). Prints a markdown table: mean samples per image and the ratio
to fixed-N's N0 + N, wall-clock seconds per image (the ``time`` column) and
the speed-up, ACR, and certified accuracy (percent) at each radius with the
difference to fixed-N. The two runs should be made under the same load for
the time columns to compare.
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fixed")
    parser.add_argument("sequential", nargs="+")
    parser.add_argument("--radii", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--fixed-samples", type=int, default=100100, help="N0 + N of the fixed-N run")
    args = parser.parse_args(argv)
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
