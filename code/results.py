"""Certification result files, read and checked, and the certified-accuracy quantities of the papers.

`certify.py` writes one row per test image (``idx label predict radius correct time``, and
``samples`` with ``--sequential``): the prediction of the smoothed classifier g and the L2 radius
within which g is certified to be constant, following CERTIFY of Cohen, Rosenfeld and Kolter,
"Certified Adversarial Robustness via Randomized Smoothing", ICML 2019. An abstention is written as
``predict = -1``, ``radius = 0.0``, ``correct = 0``. (result_files.py is the writing side.)

* the *approximate certified accuracy* at radius r (`ApproximateAccuracy`): the fraction of images
  that are classified correctly and certified with radius >= r (Cohen et al. 2019, Section 4).
  "Approximate" because each certificate holds only with probability at least 1 - alpha over the
  Monte Carlo sampling;
* the *average certified radius* (ACR, Zhai et al. 2020): the mean over all images of
  ``correct * radius``, i.e. the area under the certified-accuracy curve;
* `HighProbAccuracy`, a lower bound on the certified accuracy that holds with high probability once
  the per-certificate failure probability is accounted for (see its docstring).

Files may be plain or gzipped TSVs (a ``.gz`` suffix means gzip). Malformed inputs raise
`ResultsFileError` (a `common.UserError`, hence a `ValueError`) with one line that names the file and what is wrong, so that a
long sweep fails early and legibly instead of producing NaNs or a traceback.

One line of a table may gather several result files that together make one run, e.g. the image
ranges (``--start``/``--max``) certified on different machines (`load_line`). Their rows are
combined only when they can be one run: no image twice, and the settings records the evaluation
scripts write next to their outputs (``OUT.meta.json``, provenance.py) all agree, or no file has one
(published results).

Radii-mode sequential files (``certify.py --sequential --radii R1 R2 ...``, as their settings record
says) decide only whether each listed radius is certified: a row's radius is the bound at which
sampling stopped once that was decided, a lower bound on the fixed-N radius. Their certified
accuracy is measured at 0 and the listed radii only (`listed_radii`; NaN elsewhere), and their ACR
is NaN.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from common import UserError
from provenance import read_sidecar, settings_differences

PathLike = Union[str, Path]

#: Columns every certification result must have.
REQUIRED_COLUMNS = ("radius", "correct")

#: Radii of the certified-accuracy tables in the papers (Cohen et al. 2019; CAT-RS, AAAI 2023).
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


# --------------------------------------------------------------------------
# Reading and validating result files
# --------------------------------------------------------------------------

class ResultsFileError(UserError):
    """A certification-results file is missing or is not a usable TSV.

    ``str(error)`` is a single line ``"<path>: <problem>"``; ``path`` and
    ``problem`` are also available as attributes.
    """

    def __init__(self, path: PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def first_line(text: str) -> str:
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
            path, f"is not a well-formed tab-separated table ({first_line(err)})") from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        # BadGzipFile (an OSError), truncated archives, binary garbage
        raise ResultsFileError(path, f"could not be read ({first_line(err)})") from None
    except Exception as err:   # anything else pandas may raise on a file that is not a table
        raise ResultsFileError(path, f"could not be read as a table ({type(err).__name__}: "
                                     f"{first_line(err)})") from None
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
