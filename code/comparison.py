"""Our reproduction of a paper table against the published per-image results, on the same images.

    python code/analyze.py compare data/fmnist PUBLISHED_DIR [--out data/fmnist/README.md]

``data/fmnist`` holds the cells that ``code/reproduce.py`` kept
(``noise_{sigma}/{method}/`` with ``certify.tsv.gz``, fixed-N CERTIFY on every
100th test image; ``certify_sequential.tsv.gz``, the sequential radii mode on
every 10th; ``log.txt``; ``cell.json``). ``PUBLISHED_DIR`` holds the published
results in the same layout (``noise_{sigma}/{method}/*.tsv.gz``, certify on
every test image, and ``log.txt.gz``; CAT-RS in ``cat-rs/``).

For every cell: the ACR (mean of correct * radius) of ours and of the
published run on our fixed-N images, their paired difference with a 95%
t-interval; the certified accuracy at each listed radius of our sequential
file and of the published run on the same images (a sequential radius is
only decided at the listed radii, so nothing between them is compared); the
noisy test accuracy of the last epoch of both logs. A cell without
``cell.json`` is "not run". Writes a markdown report and one plot per sigma.
"""
import argparse
import datetime
import glob
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import pandas as pd

from common import ArgumentParser, UserError, cli_status
from provenance import parse_overrides_line
from reporting import pyplot
from results import ResultsFileError, load_results
from sequential_rules import scheme_of_mode

METHODS = ["cohen", "stab", "salman", "macer", "consistency", "smoothmix", "catrs"]
NAMES = {"cohen": "Gaussian", "stab": "Stability", "salman": "SmoothAdv", "macer": "MACER",
         "consistency": "Consistency", "smoothmix": "SmoothMix", "catrs": "CAT-RS"}
PUBLISHED_NAMES = {"catrs": "cat-rs"}
DATASET_TITLES = {"fmnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                  "imagenet": "ImageNet"}
RADII = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
# What "reproduced" means for a cell: the ACR on the same images (paired), the certified accuracy at
# every listed radius (points), the final noisy test accuracy (points).
ACR_TOLERANCE, ACCURACY_TOLERANCE, TEST_ACCURACY_TOLERANCE = 0.03, 3.0, 1.5


class ComparisonError(UserError):
    """A missing or malformed input; the message names the file."""


def read_results(path: str) -> pd.DataFrame:
    """A certify TSV (plain or gzipped), read and checked by ``results.load_results``, indexed by ``idx``."""
    try:
        frame = load_results(path)
    except ResultsFileError as exc:
        raise ComparisonError(f"cannot read '{path}': {exc.problem}") from None
    if "idx" not in frame.columns or frame["idx"].duplicated().any():
        raise ComparisonError(f"'{path}' is not a certification result (column idx missing or an image twice)")
    return frame.set_index("idx")


def last_test_accuracy(path: str) -> float:
    """The ``test acc`` of the last row of a training log (plain or gzipped)."""
    try:
        log = pd.read_csv(path, sep="\t")
        return float(log["test acc"].iloc[-1])
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ComparisonError(f"cannot read the last test accuracy of '{path}': {exc}") from None


def published_files(published_dir: str, sigma: str, method: str):
    """The published certify TSV and log of a cell (either may be None)."""
    folder = os.path.join(published_dir, f"noise_{sigma}", PUBLISHED_NAMES.get(method, method))
    tsvs = sorted(glob.glob(os.path.join(folder, "*.tsv*")))
    logs = sorted(glob.glob(os.path.join(folder, "log.txt*")))
    return (tsvs[0] if tsvs else None), (logs[0] if logs else None)


def certified_accuracy(frame: pd.DataFrame, radii) -> np.ndarray:
    """Percent of rows correct with radius >= r, for each r."""
    correct = frame["correct"].to_numpy() == 1
    radius = frame["radius"].to_numpy()
    return np.array([100.0 * np.mean(correct & (radius >= r)) for r in radii])


def paired_difference(ours: pd.DataFrame, published: pd.DataFrame):
    """Mean of (ours - published) per-image certified radius (correct * radius) and its 95% t-interval."""
    from scipy.stats import t
    a = (ours["correct"] * ours["radius"]).to_numpy()
    b = (published.loc[ours.index, "correct"] * published.loc[ours.index, "radius"]).to_numpy()
    d = a - b
    n = len(d)
    half = t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n) if n > 1 else float("inf")
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


@dataclass
class CellComparison:
    method: str
    sigma: str
    ran: bool
    acr: tuple = ()            # (ours, published, diff, low, high, images)
    accuracy: tuple = ()       # (ours array, published array, images)
    test_accuracy: tuple = ()  # (ours, published or None)
    curves: tuple = ()         # (our sequential rows, published rows on the same images)

    def checks(self) -> List[str]:
        """The criteria this cell misses (empty: reproduced)."""
        missed = []
        if abs(self.acr[2]) > ACR_TOLERANCE:
            missed.append(f"ACR off by {self.acr[2]:+.3f}")
        gaps = self.accuracy[0] - self.accuracy[1]
        worst = int(np.argmax(np.abs(gaps)))
        if abs(gaps[worst]) > ACCURACY_TOLERANCE:
            missed.append(f"accuracy at {RADII[worst]:g} off by {gaps[worst]:+.1f}")
        if self.test_accuracy[1] is not None and abs(self.test_accuracy[0] - self.test_accuracy[1]) > TEST_ACCURACY_TOLERANCE:
            missed.append(f"test accuracy off by {self.test_accuracy[0] - self.test_accuracy[1]:+.1f}")
        return missed


def compare_cell(data_dir: str, published_dir: str, sigma: str, method: str) -> CellComparison:
    folder = os.path.join(data_dir, f"noise_{sigma}", method)
    if not os.path.exists(os.path.join(folder, "cell.json")):
        return CellComparison(method, sigma, ran=False)
    published_tsv, published_log = published_files(published_dir, sigma, method)
    if published_tsv is None:
        raise ComparisonError(f"no published result for {method} at sigma {sigma} under '{published_dir}'")
    published = read_results(published_tsv)
    fixed = read_results(os.path.join(folder, "certify.tsv.gz"))
    sequential = read_results(os.path.join(folder, "certify_sequential.tsv.gz"))
    for ours, name in ((fixed, "certify.tsv.gz"), (sequential, "certify_sequential.tsv.gz")):
        absent = ours.index.difference(published.index)
        if len(absent):
            raise ComparisonError(f"image {absent[0]} of {os.path.join(folder, name)} is not in '{published_tsv}'")
    ours_acr = float((fixed["correct"] * fixed["radius"]).mean())
    published_acr = float((published.loc[fixed.index, "correct"] * published.loc[fixed.index, "radius"]).mean())
    same = published.loc[sequential.index]
    ours_test = last_test_accuracy(os.path.join(folder, "log.txt"))
    published_test = last_test_accuracy(published_log) if published_log else None
    return CellComparison(method, sigma, True,
                          acr=(ours_acr, published_acr, *paired_difference(fixed, published), len(fixed)),
                          accuracy=(certified_accuracy(sequential, RADII), certified_accuracy(same, RADII),
                                    len(sequential)),
                          test_accuracy=(ours_test, published_test), curves=(sequential, same))


# --------------------------------------------------------------------------- the report

def _sigmas(published_dir: str) -> List[str]:
    found = [os.path.basename(p)[len("noise_"):] for p in glob.glob(os.path.join(published_dir, "noise_*"))]
    if not found:
        raise ComparisonError(f"'{published_dir}' holds no noise_SIGMA folders of published results")
    return sorted(found, key=float)


def cell_row(cell: CellComparison) -> str:
    name = NAMES[cell.method]
    if not cell.ran:
        return f"| {name} | not run |" + " |" * (3 + len(RADII))
    ours, published, diff, low, high, _ = cell.acr
    accuracy = " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(cell.accuracy[0], cell.accuracy[1]))
    test = cell.test_accuracy
    test_text = f"{test[0]:.1f} / {test[1]:.1f}" if test[1] is not None else f"{test[0]:.1f} / -"
    missed = cell.checks()
    verdict = "yes" if not missed else "no: " + "; ".join(missed)
    return (f"| {name} | {ours:.3f} / {published:.3f} | {diff:+.3f} [{low:+.3f}, {high:+.3f}] | {accuracy} "
            f"| {test_text} | {verdict} |")


def sigma_section(sigma: str, cells: List[CellComparison], plot_name: Optional[str]) -> List[str]:
    radii = " | ".join(f"{r:g}" for r in RADII)
    lines = [f"## sigma = {sigma}", "",
             f"| method | ACR ours / paper | difference [95% CI] | {radii} | test acc ours / paper | reproduced |",
             "|---|---|---|" + "---|" * len(RADII) + "---|---|"]
    lines += [cell_row(cell) for cell in cells]
    if plot_name:
        lines += ["", f"![certified accuracy at sigma = {sigma}]({plot_name})"]
    return lines + [""]


def pretrain_section(data_dir: str) -> List[str]:
    """The Gaussian model whose smoothed prediction CAT-RS reads (no published counterpart to compare with)."""
    folder = os.path.join(data_dir, "pretrain")
    if not os.path.exists(os.path.join(folder, "cell.json")):
        return ["## CAT-RS pretrain", "", "not run", ""]
    log = pd.read_csv(os.path.join(folder, "log.txt"), sep="\t")
    rows = len(pd.read_csv(os.path.join(folder, "smooth_prediction_train.tsv.gz"), sep="\t"))
    return ["## CAT-RS pretrain", "",
            f"Gaussian, sigma = 0.25, {len(log)} epochs: noisy test accuracy {log['test acc'].iloc[-1]:.1f}% "
            f"after the last epoch; smoothed prediction of {rows} training images.", ""]


def schemes_section(data_dir: str, cells: List[CellComparison]) -> List[str]:
    """Which sequential scheme each kept cell's radii-mode file was certified with (from its settings record).

    Every scheme gives the guarantee of fixed-N CERTIFY at the listed radii, so their certified accuracies
    compare; they differ in the samples drawn. Said, so that a table over several schemes is not read as one.
    """
    by_scheme: dict = {}
    for cell in cells:
        record = os.path.join(data_dir, f"noise_{cell.sigma}", cell.method, "certify_sequential.tsv.meta.json")
        if cell.ran and os.path.exists(record):
            with open(record) as handle:
                scheme = json.load(handle).get("settings", {}).get("sequential_scheme")
            # the radii mode's rule only: a later change of the ACR mode's rule does not change these files
            scheme = "not recorded" if scheme is None else "radii mode: " + scheme_of_mode(scheme, radii=True)
            by_scheme.setdefault(scheme, []).append(f"{NAMES[cell.method]} {cell.sigma}")
    if not by_scheme:
        return []
    lines = ["## Sequential scheme of the certified accuracies", ""]
    lines += [f"- {', '.join(names)}: {scheme}" for scheme, names in by_scheme.items()]
    return lines + [""]


def overrides_section(data_dir: str, cells: List[CellComparison]) -> List[str]:
    """The kept cells whose training was resumed with changed arguments (``cell.json``'s ``resume_overrides``).

    Their weights come from no single command, so the report says after which epoch which argument changed.
    """
    lines = []
    for cell in (c for c in cells if c.ran):
        with open(os.path.join(data_dir, f"noise_{cell.sigma}", cell.method, "cell.json")) as handle:
            overrides = json.load(handle).get("resume_overrides", [])
        for record in map(parse_overrides_line, overrides):
            lines.append(f"- {NAMES[cell.method]} {cell.sigma}: {record['when']}, {record['changes']} "
                         f"(`--resume-changed-args`, {record['stamp']})")
    if not lines:
        return []
    return ["## Trainings resumed with changed arguments", "",
            "These trainings were resumed with other arguments than they started with, so their weights come from "
            "no single command: up to the epoch named they trained with the first value, after it with the second "
            "(`resume_overrides.txt` in the cell's folder):", ""] + lines + [""]


def report(title: str, sections: List[List[str]], command: str) -> str:
    header = [f"# {title}: our runs against the published results", "",
              f"Written by `{command}` on {datetime.date.today().isoformat()}; regenerate it rather than edit it.",
              "",
              "Each cell is one method at one sigma, trained by `code/reproduce.py` with the published settings "
              "(`scripts/published_settings.tsv`) and `--seed 0`. Columns:", "",
              "- **ACR ours / paper**: average certified radius of fixed-N CERTIFY (N0 = 100, N = 100,000, "
              "alpha = 0.001) on every 100th test image, ours and the published run's on the same images; "
              "**difference**: their paired difference per image, with its 95% t-interval.",
              "- **0.25 ... 2.0**: certified accuracy (%) at that radius on every 10th test image, ours "
              "(sequential radii mode, at most 100,000 samples) / the published run's (fixed N = 100,000) on the "
              "same images.",
              "- **test acc**: noisy test accuracy (%) of the last training epoch, our `log.txt` / the published log.",
              f"- **reproduced**: ACR within {ACR_TOLERANCE} of the paper's on the same images, every certified "
              f"accuracy within {ACCURACY_TOLERANCE:g} points and the test accuracy within "
              f"{TEST_ACCURACY_TOLERANCE:g} points; otherwise what is off.", ""]
    return "\n".join(header + [line for section in sections for line in section])


def plot_sigma(path: str, title: str, cells: List[CellComparison]):
    """Our certified accuracy at the listed radii (markers) beside the published curves on the same images."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    grid = np.linspace(0, max(RADII), 201)
    for k, cell in enumerate(c for c in cells if c.ran):
        color = f"C{k}"
        ax.plot(grid, certified_accuracy(cell.curves[1], grid) / 100, color=color, lw=1,
                label=f"{NAMES[cell.method]} (paper)")
        ax.plot(RADII, cell.accuracy[0] / 100, "o--", color=color, ms=4, lw=0.8,
                label=f"{NAMES[cell.method]} (ours)")
    ax.set_xlim(0, max(RADII))
    ax.set_ylim(0, 1)
    ax.set_xlabel("radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def compare(data_dir: str, published_dir: str, out: Optional[str], command: str) -> str:
    """Write the report (and the plots next to it); returns its path. Reads everything before writing."""
    if not os.path.isdir(data_dir):
        raise ComparisonError(f"no data folder '{data_dir}'; run scripts/reproduce.sh first")
    dataset = os.path.basename(os.path.normpath(data_dir))
    title = DATASET_TITLES.get(dataset, dataset)
    out = out or os.path.join(data_dir, "README.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    per_sigma = {s: [compare_cell(data_dir, published_dir, s, m) for m in METHODS] for s in _sigmas(published_dir)}
    sections = []
    for sigma, cells in per_sigma.items():
        plot_name = f"noise_{sigma}.png" if any(c.ran for c in cells) else None
        if plot_name:
            plot_sigma(os.path.join(os.path.dirname(out) or ".", plot_name), f"{title}, sigma = {sigma}", cells)
        sections.append(sigma_section(sigma, cells, plot_name))
    sections.append(pretrain_section(data_dir))
    every_cell = [c for cells in per_sigma.values() for c in cells]
    sections.append(schemes_section(data_dir, every_cell))
    sections.append(overrides_section(data_dir, every_cell))
    text = report(title, sections, command)
    temporary = out + ".tmp"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``analyze.py compare``."""
    parser.add_argument("data_dir", help="the kept cells, e.g. data/fmnist")
    parser.add_argument("published_dir", help="the published results of that data set (noise_SIGMA/METHOD/)")
    parser.add_argument("--out", default=None, help="the report (default DATA_DIR/README.md)")
    return parser


def main(argv=None) -> int:
    """``analyze.py compare`` with these arguments."""
    parser = ArgumentParser(prog="analyze.py compare",
                                     description="Our reproduced cells against the published per-image results.")
    return run(add_arguments(parser).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Write the report of ``args`` (``add_arguments``); the exit status."""
    command = "python code/analyze.py compare " + " ".join(
        [args.data_dir, "PUBLISHED_DIR"] + (["--out", args.out] if args.out else []))
    return cli_status(lambda: print(f"report written to {compare(args.data_dir, args.published_dir, args.out, command)}"))
