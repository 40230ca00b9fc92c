"""Turn per-image certification results into certified-accuracy numbers, tables and plots.

`certify.py` writes one row per test image (``idx label predict radius correct
time``): the prediction of the smoothed classifier g and the L2 radius within
which g is certified to be constant, following CERTIFY of Cohen, Rosenfeld and
Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019.
An abstention is written as ``predict = -1``, ``radius = 0.0``, ``correct = 0``.

The quantities the papers report are computed from these rows:

* the *approximate certified accuracy* at radius r: the fraction of images
  that are classified correctly and certified with radius >= r (Cohen et al.
  2019, Section 4). "Approximate" because each certificate holds only with
  probability at least 1 - alpha over the Monte Carlo sampling;
* the *average certified radius* (ACR, Zhai et al. 2020): the mean over all
  images of ``correct * radius``, i.e. the area under the certified-accuracy
  curve;
* `HighProbAccuracy`, a lower bound on the certified accuracy that holds with
  high probability once the per-certificate failure probability is accounted
  for (see its docstring).

The library keeps the names of the published analysis module
(`ApproximateAccuracy`, `HighProbAccuracy`, `Line`, `plot_certified_accuracy`,
`smallplot_certified_accuracy`, `latex_table_certified_accuracy`,
`markdown_table_certified_accuracy`) so scripts written against it keep
working.  Files may be plain or gzipped TSVs (a ``.gz`` suffix means gzip).
Malformed inputs raise `ResultsFileError` (a `ValueError`) with one line that
names the file and what is wrong, so that a long sweep fails early and legibly
instead of producing NaNs or a traceback.

One line (a table row, a curve) may gather several result files that together
make one run, e.g. the image ranges (``--start``/``--max``) certified on
different machines: give `ApproximateAccuracy` a list of paths, or join them
with ``+`` on the command line.  Their rows are combined only when they can be
one run: no image twice, and the settings records the evaluation scripts write
next to their outputs (``OUT.meta.json``: sigma, N, alpha, checkpoint hash, ...;
see provenance.py) all agree, or no file has one (published results).
Otherwise `ResultsFileError` names the differing settings.

Command line (run from the repository root)::

    python code/analyze.py RESULT.tsv[.gz][+PART.tsv ...] [RESULT.tsv ...] [--radii 0 0.25 ...]
        [--labels L1 L2 ...] [--latex] [--plot FILE.png] [--max-radius R]
        [--title T] [--abstain]
    python code/analyze.py compare data/fmnist PUBLISHED_DIR [--out REPORT.md]

prints, for each file, its ACR and its certified accuracy (percent) at the
chosen radii (and, when any file has the ``samples`` column of
``certify.py --sequential``, the mean samples per image) as a markdown table (LaTeX with ``--latex``), the best value of
each column in bold, and optionally draws all certified-accuracy curves into
one figure.  Errors in the inputs print one ``error: ...`` line on stderr and
exit with status 2 without writing anything.  ``compare`` writes the report of
a reproduced table against the published per-image results (see comparison.py).

Radii-mode sequential files (``certify.py --sequential --radii R1 R2 ...``,
as their settings record says) decide only whether each listed radius is
certified: a row's radius is the bound at which sampling stopped once that
was decided, a lower bound on the fixed-N radius.  For them the certified
accuracy is shown at 0 and the listed radii only (``n/a`` at other radii; by
default the table's columns are those radii), the ACR is ``n/a``, and the
plot marks the values at those radii, nothing between or beyond them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:   # provenance.py, when imported from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import read_sidecar, settings_differences  # noqa: E402

PathLike = Union[str, Path]

#: Columns every certification result must have.
REQUIRED_COLUMNS = ("radius", "correct")

#: Radii of the certified-accuracy tables in the papers (Cohen et al. 2019; CAT-RS, AAAI 2023).
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


# --------------------------------------------------------------------------
# Reading and validating result files
# --------------------------------------------------------------------------

class ResultsFileError(ValueError):
    """A certification-results file is missing or is not a usable TSV.

    ``str(error)`` is a single line ``"<path>: <problem>"``; ``path`` and
    ``problem`` are also available as attributes.
    """

    def __init__(self, path: PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else text


def load_results(path: PathLike) -> pd.DataFrame:
    """Read a certify/predict TSV (plain or ``.gz``) and check it can be analysed.

    Returns the table with ``radius`` as float and ``correct`` as int (0/1).
    Raises `ResultsFileError` when the file is missing, empty, not
    tab-separated, lacks the ``radius`` or ``correct`` column, has no rows, or
    holds values in those columns that are not numbers (``correct`` must be 0
    or 1).
    """
    expected = "a tab-separated certification result with columns " + ", ".join(REQUIRED_COLUMNS)
    df = _read_table(path, expected)
    _check_columns(path, df, expected)
    radius = pd.to_numeric(df["radius"], errors="coerce")
    correct = pd.to_numeric(df["correct"], errors="coerce")
    bad = radius.isna().to_numpy() | ~np.isin(correct.to_numpy(), (0, 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        # +2: one for the header, one because file lines count from 1
        raise ResultsFileError(
            path, f"line {row + 2}: radius must be a number and correct must be 0 or 1 "
                  f"(got radius={str(df['radius'].iloc[row])!r}, "
                  f"correct={str(df['correct'].iloc[row])!r})")
    df = df.copy()
    df["radius"] = radius.astype(float)
    df["correct"] = correct.astype(int)
    return df


def _read_table(path: PathLike, expected: str) -> pd.DataFrame:
    """The file as a table (columns stripped of blanks); `ResultsFileError` when it is none."""
    p = Path(path)
    if not p.exists():
        raise ResultsFileError(path, "no such file")
    if p.is_dir():
        raise ResultsFileError(path, f"is a directory, expected {expected}")
    if p.stat().st_size == 0:
        raise ResultsFileError(path, f"file is empty, expected {expected}")
    with open(p, "rb") as handle:
        head = handle.read(512)
    if not p.name.endswith(".gz") and (head.startswith((b"PK\x03\x04", b"\x80")) or head[257:262] == b"ustar"):
        raise ResultsFileError(path, f"is a PyTorch checkpoint or another archive, expected {expected} "
                                     "(give the TSV written by certify.py)")
    try:
        df = pd.read_csv(p, sep="\t", compression="gzip" if p.name.endswith(".gz") else None)
    except pd.errors.EmptyDataError:
        # e.g. a gzip archive of an empty file, or only blank lines
        raise ResultsFileError(path, f"file is empty, expected {expected}") from None
    except pd.errors.ParserError as err:
        raise ResultsFileError(
            path, f"is not a well-formed tab-separated table ({_first_line(err)})") from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        # BadGzipFile (an OSError), truncated archives, binary garbage
        raise ResultsFileError(path, f"could not be read ({_first_line(err)})") from None
    except Exception as err:   # anything else pandas may raise on a file that is not a table
        raise ResultsFileError(path, f"could not be read as a table ({type(err).__name__}: "
                                     f"{_first_line(err)})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _check_columns(path: PathLike, df: pd.DataFrame, expected: str):
    """`ResultsFileError` unless the table has the required columns and at least one row."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        header = "\t".join(df.columns)
        if len(df.columns) == 1 and any(sep in header for sep in (",", ";", " ")):
            raise ResultsFileError(
                path, f"is not tab-separated (header line {header[:80]!r}); expected {expected}")
        found = ", ".join(df.columns[:10]) + (", ..." if len(df.columns) > 10 else "")
        raise ResultsFileError(
            path, f"lacks column{'s' if len(missing) > 1 else ''} "
                  f"{', '.join(missing)} (found: {found})")
    if len(df) == 0:
        raise ResultsFileError(path, "has a header but no result rows")


def result_settings(path: PathLike) -> Optional[dict]:
    """The settings recorded next to a result file by the evaluation scripts; None when it has no record."""
    try:
        record = read_sidecar(str(path))
    except ValueError as err:
        raise ResultsFileError(path, str(err)) from None
    return None if record is None else record["settings"]


def load_line(paths: Sequence[PathLike]) -> pd.DataFrame:
    """The rows of one table line: one result file, or several that together make one run.

    Each file is read by `load_results`.  Several files are combined only when
    no image (``idx``) appears twice and their settings records agree (or none
    of them has one); otherwise `ResultsFileError` names the files and what
    differs.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("no result file given")
    frames = [load_results(p) for p in paths]
    records = [result_settings(p) for p in paths]   # also checks that a lone file's record is readable
    if len(paths) == 1:
        return frames[0]
    together = " + ".join(str(p) for p in paths)
    with_record = [str(p) for p, r in zip(paths, records) if r is not None]
    if with_record and len(with_record) < len(paths):
        without = next(str(p) for p, r in zip(paths, records) if r is None)
        raise ResultsFileError(together, f"'{with_record[0]}' has a settings record but '{without}' has none, so "
                                         "they cannot be shown to come from one run; analyse them as separate lines")
    for p, r in zip(paths[1:], records[1:]):
        differences = settings_differences(records[0], r) if r is not None else []
        if differences:
            raise ResultsFileError(together, f"'{paths[0]}' and '{p}' were made with different settings "
                                             f"({', '.join(differences)}); analyse them as separate lines")
    if all("idx" in f.columns for f in frames):
        seen: dict = {}
        for p, f in zip(paths, frames):
            for idx in f["idx"].tolist():
                if idx in seen:
                    raise ResultsFileError(together, f"image {idx} is in both '{seen[idx]}' and '{p}'; a line may "
                                                     "combine only files with different images")
                seen[idx] = p
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------
# Accuracy quantities
# --------------------------------------------------------------------------

def listed_radii(settings: Optional[dict]) -> Optional[tuple]:
    """0 and the ``--radii`` of a radii-mode sequential certification record, sorted; None for any other.

    Such a run decides, per image, the largest of these radii that is certified and stops: the
    certified accuracy is measured there and nowhere else, and its radii understate the fixed-N ones.
    """
    if not settings or not settings.get("sequential") or not settings.get("radii"):
        return None
    return tuple(sorted({0.0} | {float(r) for r in settings["radii"]}))


class Accuracy(ABC):
    """Something that has a certified accuracy at every radius.

    ``listed_radii``: None, or the only radii at which it is measured (a radii-mode sequential run;
    see `listed_radii`).
    """

    listed_radii: Optional[tuple] = None

    @abstractmethod
    def at_radii(self, radii) -> np.ndarray:
        """Certified accuracy (a fraction in [0, 1]) at each radius in ``radii``."""


class ApproximateAccuracy(Accuracy):
    """Approximate certified accuracy of one certification result (Cohen et al. 2019).

    ``data_file_path``: one result file, or a list of files that make one run
    (see `load_line`).  The files are read and validated once, when the
    object is created.  A radii-mode sequential run (its settings record
    says so) has `listed_radii`: `at_radii` is NaN at any other radius and
    `acr` is NaN.
    """

    def __init__(self, data_file_path: Union[PathLike, Sequence[PathLike]]):
        self.data_file_path = data_file_path
        paths = [data_file_path] if isinstance(data_file_path, (str, Path)) else list(data_file_path)
        self.df = load_line(paths)
        # (load_line has checked that the files of a line share their settings)
        self.listed_radii = listed_radii(result_settings(paths[0]))
        correct = self.df["correct"].to_numpy() == 1
        # Radii of the correctly classified images, sorted, so that the count
        # with radius >= r is one binary search per radius.
        self._correct_radii = np.sort(self.df["radius"].to_numpy()[correct])
        self.num_examples = len(self.df)

    def at_radii(self, radii) -> np.ndarray:
        """Fraction of all rows with ``correct == 1`` and ``radius >= r``, for each r.

        NaN at a radius that is not one of `listed_radii` (when there are listed radii).
        """
        r = np.asarray(radii, dtype=float)
        below = np.searchsorted(self._correct_radii, r.ravel(), side="left")
        counts = len(self._correct_radii) - below
        values = counts / self.num_examples
        if self.listed_radii is not None:
            listed = np.isclose(r.ravel()[:, None], np.asarray(self.listed_radii)[None, :], rtol=0, atol=1e-9)
            values = np.where(listed.any(axis=1), values, np.nan)
        return values.reshape(r.shape)

    def acr(self) -> float:
        """Average certified radius: mean over all rows of ``correct * radius``.

        NaN for a radii-mode sequential run: its radii are where sampling stopped once the listed
        radius was decided, so their mean would understate the fixed-N ACR.
        """
        if self.listed_radii is not None:
            return float("nan")
        return float((self.df["correct"] * self.df["radius"]).mean())

    def mean_samples(self) -> float:
        """Mean of the ``samples`` column (samples drawn per image, ``certify.py --sequential``).

        NaN when the file has no such column (fixed-N CERTIFY draws N0 + N per image).
        """
        if "samples" not in self.df.columns:
            return float("nan")
        samples = pd.to_numeric(self.df["samples"], errors="coerce")
        if samples.isna().any() or (samples <= 0).any():
            row = int(np.flatnonzero(samples.isna().to_numpy() | (samples <= 0).to_numpy())[0])
            raise ResultsFileError(self.data_file_path, f"line {row + 2}: samples must be a positive number "
                                                        f"(got {str(self.df['samples'].iloc[row])!r})")
        return float(samples.mean())

    def abstain_rate(self) -> float:
        """Fraction of rows where the smoothed classifier abstained (``predict == -1``).

        NaN when the file has no ``predict`` column.
        """
        if "predict" not in self.df.columns:
            return float("nan")
        predict = pd.to_numeric(self.df["predict"], errors="coerce")
        return float((predict == -1).mean())


class HighProbAccuracy(Accuracy):
    """Certified accuracy lower bound that holds with probability at least ``1 - rho``.

    Cohen et al. (2019, Appendix) point out that the approximate certified
    accuracy counts certificates each of which may be wrong with probability
    at most ``alpha`` (the ``--alpha`` of CERTIFY), independently across
    images because every image gets fresh Monte Carlo noise.  The number W of
    wrong certificates among the n images is then a sum of independent
    Bernoulli variables with means <= alpha, and the true certified accuracy
    at radius r is at least ``mean_r - W / n`` with ``mean_r`` the approximate
    accuracy.  Bounding W / n once (the same W serves every radius) gives,
    with probability >= 1 - rho:

    * ``bound="published"`` (default; the published analysis code, so its
      numbers are reproduced: 0.7644 at r = 0 for the published CIFAR-10
      sigma = 0.25 Gaussian results with alpha = rho = 0.001)::

          mean_r - alpha - sqrt(alpha (1 - alpha) log(1 / rho) / n) - log(1 / rho) / (3 n)

      not clipped (it can be negative).  Its constants are smaller than
      those of the textbook Bernstein inequality below.
    * ``bound="hoeffding"`` (Hoeffding's inequality)::

          mean_r - alpha - sqrt(log(1 / rho) / (2 n))

    * ``bound="bernstein"`` (Bernstein's inequality, variance <= alpha (1 - alpha);
      much tighter than Hoeffding when alpha is small)::

          mean_r - alpha - sqrt(2 alpha (1 - alpha) log(1 / rho) / n) - 2 log(1 / rho) / (3 n)

    The two textbook bounds are clipped at 0 (a negative lower bound on an
    accuracy says nothing more than 0).

    Argument names follow the published class: ``alpha`` is the
    per-certificate failure probability (as in certify.py), ``rho`` the
    probability that the statement about the whole test set fails, n the
    number of rows of the file.
    """

    BOUNDS = ("published", "hoeffding", "bernstein")

    def __init__(self, data_file_path: PathLike, alpha: float, rho: float,
                 bound: str = "published"):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho must lie in (0, 1), got {rho}")
        if bound not in self.BOUNDS:
            raise ValueError(f"bound must be one of {self.BOUNDS}, got {bound!r}")
        self.data_file_path = data_file_path
        self.alpha = alpha
        self.rho = rho
        self.bound = bound
        self._approx = ApproximateAccuracy(data_file_path)
        self.num_examples = self._approx.num_examples
        self.listed_radii = self._approx.listed_radii

    def correction(self) -> float:
        """The amount subtracted from the approximate accuracy at every radius."""
        n = self.num_examples
        log_term = math.log(1.0 / self.rho)
        if self.bound == "published":
            return (self.alpha
                    + math.sqrt(self.alpha * (1.0 - self.alpha) * log_term / n)
                    + log_term / (3.0 * n))
        if self.bound == "hoeffding":
            return self.alpha + math.sqrt(log_term / (2.0 * n))
        return (self.alpha
                + math.sqrt(2.0 * self.alpha * (1.0 - self.alpha) * log_term / n)
                + 2.0 * log_term / (3.0 * n))

    def at_radii(self, radii) -> np.ndarray:
        bounds = self._approx.at_radii(radii) - self.correction()
        if self.bound == "published":
            return bounds
        return np.maximum(bounds, 0.0)


class Line:
    """One curve of a plot or one row of a table (the published interface)."""

    def __init__(self, quantity: Accuracy, legend: str, plot_fmt: str = "", scale_x: float = 1):
        self.quantity = quantity
        self.legend = legend
        self.plot_fmt = plot_fmt
        self.scale_x = scale_x

    def __repr__(self) -> str:
        return f"Line({self.legend!r})"


# --------------------------------------------------------------------------
# Formatting helpers (shared by the tables and the command line)
# --------------------------------------------------------------------------

def format_percent(fraction: float) -> str:
    """A fraction as a percentage with one decimal, as in the papers' tables."""
    return "n/a" if fraction is None or np.isnan(fraction) else f"{100.0 * fraction:.1f}"


def format_acr(value: float) -> str:
    """An average certified radius with three decimals."""
    return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


def format_samples(value: float) -> str:
    """Mean samples per image, a whole number with thousands separators."""
    return "n/a" if value is None or np.isnan(value) else f"{value:,.0f}"


def format_radius(r: float) -> str:
    """A radius as a column header: ``0`` for zero, else the shortest float repr (0.25, 1.0)."""
    r = float(r)
    return "0" if r == 0 else repr(round(r, 10))


def radius_grid(radius_start: float, radius_stop: float, radius_step: float) -> np.ndarray:
    """Radii ``start, start + step, ...`` up to and including ``stop``.

    Built from an integer count and rounded, so that e.g. 0.1 * 3 prints as 0.3
    and ``stop`` is not lost to floating-point error (unlike ``np.arange``).
    """
    if radius_step <= 0:
        raise ValueError(f"radius_step must be positive, got {radius_step}")
    if radius_stop < radius_start:
        raise ValueError(f"radius_stop ({radius_stop}) is below radius_start ({radius_start})")
    n = int(math.floor((radius_stop - radius_start) / radius_step + 1e-9)) + 1
    return np.round(radius_start + radius_step * np.arange(n), 10)


def _escape_latex(text: str) -> str:
    replacements = {
        "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    }
    return "".join(replacements.get(ch, ch) for ch in str(text))


def _escape_markdown(text: str) -> str:
    return str(text).replace("|", r"\|")


class _Column:
    """A numeric table column: header, formatter, and whether its best (largest) value is bold."""

    def __init__(self, header: str, latex_header: str, fmt: Callable[[float], str],
                 bold_best: bool = True):
        self.header = header
        self.latex_header = latex_header
        self.fmt = fmt
        self.bold_best = bold_best


def _bold_mask(cells: List[str]) -> List[bool]:
    """Which cells of a column hold its best value.

    Compared on the printed values, so ties as displayed are all bold.  Nothing
    is bold when there is a single row or every row has the same value (no
    method is better than another there, e.g. at a radius nobody certifies).
    """
    values = []
    for cell in cells:
        try:
            values.append(float(cell))
        except ValueError:
            values.append(float("nan"))
    finite = [v for v in values if not np.isnan(v)]
    if len(finite) < 2 or len(set(finite)) == 1:
        return [False] * len(cells)
    best = max(finite)
    return [(not np.isnan(v)) and v == best for v in values]


def render_table(labels: Sequence[str], columns: Sequence[_Column],
                 values: Sequence[Sequence[float]], style: str = "markdown",
                 label_header: str = "label") -> str:
    """Render ``values[row][col]`` as a markdown or LaTeX table, best values in bold."""
    cells = [[col.fmt(values[i][j]) for j, col in enumerate(columns)] for i in range(len(labels))]
    bold = [[False] * len(columns) for _ in labels]
    for j, col in enumerate(columns):
        if col.bold_best:
            mask = _bold_mask([row[j] for row in cells])
            for i in range(len(labels)):
                bold[i][j] = mask[i]

    if style == "markdown":
        out = ["| " + " | ".join([_escape_markdown(label_header)] + [c.header for c in columns]) + " |",
               "|" + "---|" + "---:|" * len(columns)]
        for i, label in enumerate(labels):
            row = [f"**{c}**" if b else c for c, b in zip(cells[i], bold[i])]
            out.append("| " + " | ".join([_escape_markdown(label)] + row) + " |")
        return "\n".join(out) + "\n"
    if style == "latex":
        out = [r"\begin{tabular}{l" + "c" * len(columns) + "}",
               r"\hline",
               " & ".join([_escape_latex(label_header)] + [c.latex_header for c in columns]) + r" \\",
               r"\hline"]
        for i, label in enumerate(labels):
            row = [rf"\textbf{{{c}}}" if b else c for c, b in zip(cells[i], bold[i])]
            out.append(" & ".join([_escape_latex(label)] + row) + r" \\")
        out.append(r"\hline")
        out.append(r"\end{tabular}")
        return "\n".join(out) + "\n"
    raise ValueError(f"style must be 'markdown' or 'latex', got {style!r}")


def _with_suffix(outfile: PathLike, suffix: str) -> Path:
    """``outfile`` + ``suffix`` unless it already ends with it (published callers pass stems)."""
    p = Path(outfile)
    if p.suffix != suffix:
        p = p.with_name(p.name + suffix)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _certified_accuracy_table(radius_start, radius_stop, radius_step, methods: Sequence[Line],
                              style: str, percent: bool) -> str:
    radii = radius_grid(radius_start, radius_stop, radius_step)
    if percent:
        fmt = format_percent
    else:
        fmt = lambda v: "n/a" if np.isnan(v) else f"{v:.2f}"  # noqa: E731  (published style)
    columns = [_Column(f"r = {format_radius(r)}", f"$r = {format_radius(r)}$", fmt) for r in radii]
    values = [np.asarray(m.quantity.at_radii(radii), dtype=float) for m in methods]
    return render_table([m.legend for m in methods], columns, values, style=style, label_header="")


def latex_table_certified_accuracy(outfile: PathLike, radius_start: float, radius_stop: float,
                                   radius_step: float, methods: Sequence[Line],
                                   percent: bool = False) -> Path:
    """Write a LaTeX ``tabular`` of certified accuracy (methods x radii) to ``outfile.tex``.

    Values are fractions with two decimals as in the published code, or
    percentages with one decimal with ``percent=True``; the best value at each
    radius is in bold.  Returns the path written.
    """
    path = _with_suffix(outfile, ".tex")
    path.write_text(_certified_accuracy_table(radius_start, radius_stop, radius_step, methods,
                                              "latex", percent))
    return path


def markdown_table_certified_accuracy(outfile: PathLike, radius_start: float, radius_stop: float,
                                      radius_step: float, methods: Sequence[Line],
                                      percent: bool = False) -> Path:
    """Write a markdown table of certified accuracy (methods x radii) to ``outfile.md``.

    Same contents as `latex_table_certified_accuracy`.  Returns the path written.
    """
    path = _with_suffix(outfile, ".md")
    path.write_text(_certified_accuracy_table(radius_start, radius_stop, radius_step, methods,
                                              "markdown", percent))
    return path


def latex_table_abstain_rate(outfile: PathLike, methods: Sequence[Line]) -> Path:
    """Write a LaTeX table of abstention rates (percent) to ``outfile.tex``.

    Only lines whose quantity is an `ApproximateAccuracy` of a file with a
    ``predict`` column have a value; the others read n/a.  Nothing is bold
    (a lower abstention rate is not better by itself).
    """
    values = []
    for m in methods:
        rate = m.quantity.abstain_rate() if isinstance(m.quantity, ApproximateAccuracy) else float("nan")
        values.append([rate])
    column = _Column("abstain (%)", r"abstain (\%)", format_percent, bold_best=False)
    path = _with_suffix(outfile, ".tex")
    path.write_text(render_table([m.legend for m in methods], [column], values, style="latex",
                                 label_header=""))
    return path


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------

def _pyplot():
    """matplotlib.pyplot, imported on first use with the non-interactive Agg backend.

    Agg is selected before pyplot is imported so that plotting works on
    clusters and in CI where there is no display.  If the caller imported
    pyplot already (e.g. in a notebook), its backend is left alone.  The
    import is deferred because it costs about a second, which the table-only
    command line does not need to pay.
    """
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _draw_curves(ax, max_radius: float, lines: Sequence[Line], radius_step: float) -> None:
    radii = radius_grid(0.0, max_radius, radius_step)
    # open markers of different shapes and shrinking sizes, so that lines with equal values stay apart
    shapes = iter([(shape, max(11 - 2.5 * k, 4)) for k, shape in enumerate(("o", "s", "^", "D", "v", "<", ">", "p")
                                                                             * len(lines))])
    for line in lines:
        listed = getattr(line.quantity, "listed_radii", None)
        if listed is None:
            ax.plot(radii * line.scale_x, line.quantity.at_radii(radii), line.plot_fmt,
                    label=line.legend)
            continue
        # measured at the listed radii only: a marker at each, no curve between or beyond them
        at = np.array([r for r in listed if r <= max_radius + 1e-9])
        drawn, = ax.plot(at * line.scale_x, line.quantity.at_radii(at), line.plot_fmt, label=line.legend)
        drawn.set_linestyle("none")
        if drawn.get_marker() in (None, "", "None", "none"):
            shape, size = next(shapes)
            drawn.set_marker(shape)
            drawn.set_fillstyle("none")
            drawn.set_markersize(size)
            drawn.set_markeredgewidth(1.5)
        drawn.set_clip_on(False)   # a marker on the axes' edge stays whole
    ax.set_ylim((0, 1))
    ax.set_xlim((0, max_radius))


def _save(fig, outfile: PathLike) -> List[Path]:
    """Save ``fig`` as ``outfile.pdf`` and ``outfile.png`` (a given .pdf/.png suffix is replaced)."""
    stem = Path(outfile)
    if stem.suffix in (".pdf", ".png"):
        stem = stem.with_suffix("")
    written = []
    for suffix in (".pdf", ".png"):
        path = _with_suffix(stem, suffix)
        fig.savefig(path, dpi=300 if suffix == ".png" else None, bbox_inches="tight")
        written.append(path)
    return written


def certified_accuracy_figure(title: Optional[str], max_radius: float, lines: Sequence[Line],
                              radius_step: float = 0.01):
    """A matplotlib figure of certified accuracy against radius, one curve per line."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.8))
    _draw_curves(ax, max_radius, lines, radius_step)
    _label_axes(ax, title, lines, tick_size=12, label_size=14, legend_size=11)
    fig.tight_layout()
    return fig


def _label_axes(ax, title: Optional[str], lines: Sequence[Line], tick_size: int, label_size: int, legend_size: int):
    """Axis labels, grid, legend (when a line has one) and title of a certified-accuracy plot."""
    ax.tick_params(labelsize=tick_size)
    ax.set_xlabel("radius", fontsize=label_size)
    ax.set_ylabel("certified accuracy", fontsize=label_size)
    ax.grid(alpha=0.3)
    if any(line.legend for line in lines):
        ax.legend(fontsize=legend_size, loc="upper right")
    if title:
        ax.set_title(title, fontsize=label_size)


def plot_certified_accuracy(outfile: PathLike, title: Optional[str], max_radius: float,
                            lines: Sequence[Line], radius_step: float = 0.01) -> List[Path]:
    """Plot certified accuracy curves to ``outfile.pdf`` and ``outfile.png``; returns both paths."""
    fig = certified_accuracy_figure(title, max_radius, lines, radius_step)
    try:
        return _save(fig, outfile)
    finally:
        _pyplot().close(fig)


def smallplot_certified_accuracy(outfile: PathLike, title: Optional[str], max_radius: float,
                                 methods: Sequence[Line], radius_step: float = 0.01,
                                 xticks: float = 0.5) -> List[Path]:
    """A compact version of the plot (for a figure with several panels).

    Larger fonts relative to its size, x ticks every ``xticks``; writes
    ``outfile.pdf`` and ``outfile.png`` and returns both paths.
    """
    fig, ax = _pyplot().subplots(figsize=(3.2, 2.6))
    _draw_curves(ax, max_radius, methods, radius_step)
    ax.set_xticks(np.round(np.arange(0, max_radius + 1e-9, xticks), 10))
    _label_axes(ax, title, methods, tick_size=9, label_size=10, legend_size=7)
    fig.tight_layout()
    try:
        return _save(fig, outfile)
    finally:
        _pyplot().close(fig)


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


def summary_table(accuracies: Sequence[ApproximateAccuracy], labels: Sequence[str],
                  radii: Sequence[float], style: str = "markdown",
                  abstain: bool = False) -> str:
    """The command line's table: label, ACR, certified accuracy (%) at each radius[, abstain %].

    ``n/a`` where a file does not measure the quantity (a radii-mode run: the ACR, unlisted radii).
    """
    columns = [_Column("ACR", "ACR", format_acr)]
    for k, r in enumerate(radii):
        head = f"r={format_radius(r)}" if k == 0 else format_radius(r)
        columns.append(_Column(head, f"$r={format_radius(r)}$" if k == 0 else f"${format_radius(r)}$",
                               format_percent))
    if abstain:
        columns.append(_Column("abstain", r"abstain (\%)", format_percent, bold_best=False))
    # the cost of sequential certification, when a file records it
    samples = [acc.mean_samples() for acc in accuracies]
    with_samples = not all(np.isnan(samples))
    if with_samples:
        columns.append(_Column("samples/image", "samples/image", format_samples, bold_best=False))
    values = []
    for acc, mean_samples in zip(accuracies, samples):
        row = [acc.acr()] + list(acc.at_radii(radii))
        if abstain:
            row.append(acc.abstain_rate())
        if with_samples:
            row.append(mean_samples)
        values.append(row)
    return render_table(labels, columns, values, style=style, label_header="label")


class _UsageError(Exception):
    pass


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analyze.py",
        description="Certified accuracy (percent) at given radii and average certified radius "
                    "(ACR) of certify.py outputs (Cohen et al. 2019), as a markdown or LaTeX "
                    "table, optionally with a plot of the certified-accuracy curves.")
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


def _line_files(argument: str) -> List[str]:
    """The files of one command-line argument: ``A+B`` is two files, unless a file of that very name exists."""
    if "+" not in argument or Path(argument).exists():
        return [argument]
    return argument.split("+")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:   # our reproduced table against the published results (comparison.py)
        import comparison
        return comparison.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.labels is not None and len(args.labels) != len(args.files):
            raise _UsageError(f"--labels got {len(args.labels)} label(s) for {len(args.files)} file(s)")
        if args.max_radius is not None and args.max_radius <= 0:
            raise _UsageError(f"--max-radius must be positive, got {args.max_radius}")
        bad = [r for r in args.radii or [] if not (math.isfinite(r) and r >= 0)]
        if bad:
            raise _UsageError(f"--radii must be non-negative numbers, got {bad[0]:g}")
        # Read every file before printing or writing anything: a bad file
        # late in the list must not leave a partial table or plot behind.
        lines = [_line_files(f) for f in args.files]
        accuracies = [ApproximateAccuracy(files) for files in lines]
        for accuracy in accuracies:
            accuracy.mean_samples()   # validates the samples column, if any
    except (ResultsFileError, _UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

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
            print(f"error: cannot write plot {plot_path}: {_first_line(err)}", file=sys.stderr)
            return 2
        finally:
            _pyplot().close(fig)

    sys.stdout.write(table)
    if plot_path is not None:
        print(f"plot written to {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
