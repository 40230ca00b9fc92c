"""Certified-accuracy tables, plots and the reproduction report, from the command line.

    python code/analyze.py [table] RESULT.tsv[.gz][+PART.tsv ...] [RESULT.tsv ...] [--radii 0 0.25 ...]
        [--labels L1 L2 ...] [--latex] [--plot FILE.png] [--max-radius R] [--title T] [--abstain]
    python code/analyze.py compare data/fmnist PUBLISHED_DIR [--out REPORT.md]

``table`` (the default subcommand, which may be left out) prints, for each line (a file, or files
joined by ``+`` that together make one run), its ACR and its certified accuracy (percent) at the
chosen radii, and the mean samples per image when a file has the ``samples`` column of
``certify.py --sequential``, as a markdown table (LaTeX with ``--latex``), the best value of each
column in bold, and optionally draws all certified-accuracy curves into one figure. Radii-mode
sequential files are shown at 0 and their listed radii only (results.py). ``compare`` writes the
report of a reproduced table against the published per-image results (comparison.py). Errors in the
inputs print one ``error: ...`` line on stderr and exit with status 2 without writing anything.

From Python this module keeps the names of the published analysis module (`ApproximateAccuracy`,
`HighProbAccuracy`, `Line`, `plot_certified_accuracy`, `smallplot_certified_accuracy`,
`latex_table_certified_accuracy`, `markdown_table_certified_accuracy`), re-exported from
results.py (reading result files, the accuracy quantities) and reporting.py (tables and plots).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:   # results.py and the rest, when imported from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comparison  # noqa: E402
from common import ArgumentParser, UserError, cli_status  # noqa: E402
from reporting import (Line, certified_accuracy_figure, format_acr, format_percent, format_radius,  # noqa: E402,F401
                       format_samples, latex_table_abstain_rate, latex_table_certified_accuracy,
                       markdown_table_certified_accuracy, plot_certified_accuracy, pyplot, radius_grid,
                       render_table, smallplot_certified_accuracy, summary_table)
from results import (DEFAULT_RADII, REQUIRED_COLUMNS, Accuracy, ApproximateAccuracy, HighProbAccuracy,  # noqa: E402,F401
                     PathLike, ResultsFileError, first_line, listed_radii, load_line, load_results,
                     result_settings)

#: The published name of reporting.pyplot.
_pyplot = pyplot


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".tsv", ".txt"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def default_labels(paths: Sequence[PathLike]) -> List[str]:
    """Short unique labels for result files, derived from their paths.

    The leading folders that all files share are dropped, keeping at least
    the last two components, with the file name stripped of ``.tsv``/``.gz``:
    ``.../cifar10/noise_0.25/cohen/noise_0.25.tsv.gz`` next to
    ``.../cifar10/noise_0.25/cat-rs/noise_0.25.tsv.gz`` gives
    ``cohen/noise_0.25`` and ``cat-rs/noise_0.25``; next to the fmnist file
    it gives ``cifar10/noise_0.25/cohen/noise_0.25``.  A file given twice
    gets `` (2)`` appended so that rows stay distinguishable.
    """
    parts = []
    for p in paths:
        full = Path(p).resolve()
        parts.append(list(full.parent.parts[1:]) + [_stem(full)])  # drop the root "/"
    common = 0
    shortest = min(len(x) for x in parts)
    while common < shortest - 1 and len({x[common] for x in parts}) == 1:
        common += 1
    labels = ["/".join(x[min(common, max(len(x) - 2, 0)):]) for x in parts]
    seen: dict = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return unique


def _default_max_radius(accuracies: Sequence[ApproximateAccuracy]) -> float:
    """Far enough to show every certified radius (of a radii-mode run: every listed radius), rounded up to 0.25."""
    largest = max([0.0] + [float(a.listed_radii[-1]) if a.listed_radii is not None else float(a._correct_radii[-1])
                           for a in accuracies if a.listed_radii is not None or len(a._correct_radii)])
    return max(0.25, math.ceil(largest * 4 - 1e-9) / 4)


def default_table_radii(accuracies: Sequence[Accuracy]) -> List[float]:
    """The table's columns without ``--radii``: the papers' radii, and the listed radii of radii-mode runs.

    Only the listed radii (with 0) when every line is a radii-mode run: nothing else is measured.
    """
    listed = [a.listed_radii for a in accuracies if a.listed_radii is not None]
    radii = set() if len(listed) == len(accuracies) else set(DEFAULT_RADII)
    for each in listed:
        radii |= set(each)
    return sorted(radii)


def add_table_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``analyze.py table``."""
    parser.add_argument("files", nargs="+", metavar="RESULT.tsv",
                        help="certify.py output files (plain or .gz), one per line; A.tsv+B.tsv makes one line of "
                             "files that together make one run (other images, the same settings)")
    parser.add_argument("--radii", nargs="+", type=float, default=None,
                        metavar="R", help="radii of the table columns (default: "
                                          f"{' '.join(format_radius(r) for r in DEFAULT_RADII)}; for radii-mode "
                                          "sequential files (certify.py --sequential --radii) 0 and their listed "
                                          "radii, the only ones they are measured at)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="row labels, one per file (default: derived from the paths)")
    parser.add_argument("--latex", action="store_true", help="print a LaTeX tabular instead of markdown")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw the certified-accuracy curves of all files into FILE.png")
    parser.add_argument("--max-radius", type=float, default=None, metavar="R",
                        help="x range of the plot (default: largest certified radius, rounded up to 0.25)")
    parser.add_argument("--title", default=None, help="plot title")
    parser.add_argument("--abstain", action="store_true",
                        help="add a column with the abstention rate (percent of predict == -1)")
    return parser


SUBCOMMANDS = ("table", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="analyze.py", description="Certified-accuracy tables and plots of certify.py outputs, and the "
                                       "reproduction report. Without a subcommand: table.")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    add_table_arguments(commands.add_parser(
        "table", help="ACR and certified accuracy (percent) at given radii, as a markdown or LaTeX table, "
                      "optionally with a plot of the certified-accuracy curves (the default)",
        description="Certified accuracy (percent) at given radii and average certified radius (ACR) of "
                    "certify.py outputs (Cohen et al. 2019), as a markdown or LaTeX table, optionally with "
                    "a plot of the certified-accuracy curves."))
    comparison.add_arguments(commands.add_parser(
        "compare", help="our reproduced cells against the published per-image results (a markdown report)",
        description="Our reproduced cells against the published per-image results."))
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments; ``table`` when no subcommand is named (the published ``analyze.py FILE ...``)."""
    argv = list(argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["table"] + argv
    return build_parser().parse_args(argv)


def _line_files(argument: str) -> List[str]:
    """The files of one command-line argument: ``A+B`` is two files, unless a file of that very name exists."""
    if "+" not in argument or Path(argument).exists():
        return [argument]
    return argument.split("+")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "compare":
        return comparison.run(args)
    return cli_status(lambda: table(args))


def table(args: argparse.Namespace) -> int:
    """``analyze.py table``: print the table (and write the plot); the exit status."""
    if args.labels is not None and len(args.labels) != len(args.files):
        raise UserError(f"--labels got {len(args.labels)} label(s) for {len(args.files)} file(s)")
    if args.max_radius is not None and args.max_radius <= 0:
        raise UserError(f"--max-radius must be positive, got {args.max_radius}")
    bad = [r for r in args.radii or [] if not (math.isfinite(r) and r >= 0)]
    if bad:
        raise UserError(f"--radii must be non-negative numbers, got {bad[0]:g}")
    # Read every file before printing or writing anything: a bad file
    # late in the list must not leave a partial table or plot behind.
    lines = [_line_files(f) for f in args.files]
    accuracies = [ApproximateAccuracy(files) for files in lines]
    for accuracy in accuracies:
        accuracy.mean_samples()   # validates the samples column, if any

    labels = args.labels if args.labels is not None else default_labels([files[0] for files in lines])
    radii = args.radii if args.radii is not None else default_table_radii(accuracies)
    table = summary_table(accuracies, labels, radii,
                          style="latex" if args.latex else "markdown", abstain=args.abstain)

    plot_path = None
    if args.plot:
        plot_path = Path(args.plot)
        if not plot_path.suffix:
            plot_path = plot_path.with_name(plot_path.name + ".png")
        max_radius = args.max_radius or _default_max_radius(accuracies)
        fig = certified_accuracy_figure(args.title, max_radius,
                                        [Line(a, label) for a, label in zip(accuracies, labels)])
        try:
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(plot_path, dpi=200, bbox_inches="tight")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot write plot {plot_path}: {first_line(err)}") from None
        finally:
            pyplot().close(fig)

    sys.stdout.write(table)
    if plot_path is not None:
        print(f"plot written to {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
