"""Tables and plots of certified accuracy: markdown and LaTeX tables, matplotlib figures.

The published analysis module's table and plot functions (`Line`, `plot_certified_accuracy`,
`smallplot_certified_accuracy`, `latex_table_certified_accuracy`,
`markdown_table_certified_accuracy`, `latex_table_abstain_rate`) with their published arguments, and
`summary_table`, the table of ``analyze.py``. The quantities come from results.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from results import Accuracy, ApproximateAccuracy, PathLike

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

def pyplot():
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
    fig, ax = pyplot().subplots(figsize=(6.4, 4.8))
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
        pyplot().close(fig)


def smallplot_certified_accuracy(outfile: PathLike, title: Optional[str], max_radius: float,
                                 methods: Sequence[Line], radius_step: float = 0.01,
                                 xticks: float = 0.5) -> List[Path]:
    """A compact version of the plot (for a figure with several panels).

    Larger fonts relative to its size, x ticks every ``xticks``; writes
    ``outfile.pdf`` and ``outfile.png`` and returns both paths.
    """
    fig, ax = pyplot().subplots(figsize=(3.2, 2.6))
    _draw_curves(ax, max_radius, methods, radius_step)
    ax.set_xticks(np.round(np.arange(0, max_radius + 1e-9, xticks), 10))
    _label_axes(ax, title, methods, tick_size=9, label_size=10, legend_size=7)
    fig.tight_layout()
    try:
        return _save(fig, outfile)
    finally:
        pyplot().close(fig)


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
