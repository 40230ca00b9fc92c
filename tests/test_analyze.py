"""Tests of code/analyze.py.

Two kinds of checks:

* the certification results published with the CAT-RS paper, when
  ``$PUBLISHED_RESULTS`` names a folder of them (``{dataset}/noise_{sigma}/
  {method}/*.tsv.gz`` and a README.md with their table), must give exactly
  the numbers of that table (ACR to 3 decimals, certified accuracy in percent
  to 1 decimal); the table is parsed here, so the expected numbers live in
  one place only. They are not part of the repository, so without the
  variable these tests are skipped (CI's .ci/run sets it where CI keeps
  them, ../shared/reference-results from the repository root);
* small synthetic result files whose certified accuracies and ACR can be
  worked out by hand, plus the tables, plots and the command line, including
  its behaviour on malformed input (one ``error:`` line, exit status 2, no
  output file).
"""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

import analyze  # noqa: E402

SCRIPT = REPO / "code" / "analyze.py"
REFERENCE = Path(os.environ.get("PUBLISHED_RESULTS", "/nonexistent/published-results"))
README = REFERENCE / "README.md"


# --------------------------------------------------------------------------
# Reference results
# --------------------------------------------------------------------------

def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _parse_reference_table():
    """Rows of the README table as dicts: dataset, sigma, method, acr (str), radii, accuracies (str)."""
    lines = README.read_text().splitlines()
    start = next(i for i, l in enumerate(lines)
                 if l.startswith("|") and _cells(l)[:3] == ["dataset", "sigma", "method"])
    header = _cells(lines[start])
    radii = [float(h.replace("r=", "")) for h in header[4:]]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        c = _cells(line)
        rows.append(dict(dataset=c[0], sigma=c[1], method=c[2], acr=c[3], radii=radii,
                         accuracies=c[4:]))
    return rows


def _reference_file(row):
    folder = REFERENCE / row["dataset"] / f"noise_{row['sigma']}" / row["method"]
    path = folder / f"noise_{row['sigma']}.tsv.gz"
    if not path.exists():
        # the authors' typo: fmnist/noise_0.25/salman/noist_0.25.tsv.gz
        candidates = sorted(folder.glob("nois*_*.tsv.gz"))
        assert len(candidates) == 1, f"no unique result file in {folder}"
        path = candidates[0]
    return path


def _reference_params():
    if not README.exists():
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"reference results not found at {REFERENCE}"))]
    rows = _parse_reference_table()
    return [pytest.param(r, id=f"{r['dataset']}-{r['sigma']}-{r['method']}") for r in rows]


def test_reference_table_parsed():
    if not README.exists():
        pytest.skip(f"reference results not found at {REFERENCE}")
    rows = _parse_reference_table()
    assert len(rows) >= 10
    assert rows[0]["radii"] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    assert all(len(r["accuracies"]) == len(r["radii"]) for r in rows)


@pytest.mark.parametrize("row", _reference_params())
def test_reference_values(row):
    acc = analyze.ApproximateAccuracy(_reference_file(row))
    assert analyze.format_acr(acc.acr()) == row["acr"]
    got = [analyze.format_percent(v) for v in acc.at_radii(row["radii"])]
    assert got == row["accuracies"]


def test_reference_typo_file_found():
    if not README.exists():
        pytest.skip(f"reference results not found at {REFERENCE}")
    row = dict(dataset="fmnist", sigma="0.25", method="salman")
    path = _reference_file(row)
    assert path.name == "noist_0.25.tsv.gz"
    assert analyze.ApproximateAccuracy(path).num_examples == 10000


def test_cli_reproduces_reference_table():
    """The command line, run on every file of the README table, prints the same numbers."""
    if not README.exists():
        pytest.skip(f"reference results not found at {REFERENCE}")
    rows = _parse_reference_table()
    labels = [f"{r['dataset']}-{r['sigma']}-{r['method']}" for r in rows]
    radii = [analyze.format_radius(r) for r in rows[0]["radii"]]
    proc = _run_cli(*[str(_reference_file(r)) for r in rows], "--labels", *labels, "--radii", *radii)
    assert proc.returncode == 0, proc.stderr
    printed = {}
    for line in proc.stdout.splitlines():
        c = [x.replace("**", "") for x in _cells(line)]
        if c[0] in labels:
            printed[c[0]] = c[1:]
    for label, row in zip(labels, rows):
        assert printed[label] == [row["acr"]] + row["accuracies"], label


# --------------------------------------------------------------------------
# Synthetic results, checkable by hand
# --------------------------------------------------------------------------

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"

# (predict, radius, correct); label is always 3.  Eight rows:
# correct radii are 0.0, 0.25, 0.5, 1.0, 0.25 -> five correct images.
ROWS_A = [(3, 0.0, 1), (3, 0.25, 1), (3, 0.5, 1), (3, 1.0, 1),
          (5, 0.75, 0), (-1, 0.0, 0), (3, 0.25, 1), (2, 0.6, 0)]
# By hand: n = 8
EXPECTED_A = {0.0: 5 / 8, 0.25: 4 / 8, 0.3: 2 / 8, 0.5: 2 / 8, 0.75: 1 / 8,
              1.0: 1 / 8, 1.5: 0.0}
ACR_A = (0.0 + 0.25 + 0.5 + 1.0 + 0.25) / 8  # = 0.25

# A second method, better at large radii, worse at r = 0: four rows.
ROWS_B = [(3, 0.9, 1), (3, 0.8, 1), (1, 0.5, 0), (-1, 0.0, 0)]
# r=0: 2/4, r=0.25: 2/4, r=0.5: 2/4, r=0.75: 2/4, r=1.0: 0; ACR = 1.7/4 = 0.425


def _write(path, rows, compress=False):
    text = HEADER + "".join(f"{i}\t3\t{p}\t{r}\t{c}\t0:00:01.5\n" for i, (p, r, c) in enumerate(rows))
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        Path(path).write_text(text)
    return Path(path)


@pytest.fixture
def file_a(tmp_path):
    (tmp_path / "methodA").mkdir()
    return _write(tmp_path / "methodA" / "noise_0.25.tsv", ROWS_A)


@pytest.fixture
def file_b(tmp_path):
    (tmp_path / "methodB").mkdir()
    return _write(tmp_path / "methodB" / "noise_0.25.tsv", ROWS_B)


def test_at_radii_by_hand(file_a):
    acc = analyze.ApproximateAccuracy(file_a)
    radii = list(EXPECTED_A)
    np.testing.assert_allclose(acc.at_radii(radii), [EXPECTED_A[r] for r in radii])
    assert acc.num_examples == 8


def test_acr_by_hand(file_a):
    assert analyze.ApproximateAccuracy(file_a).acr() == pytest.approx(ACR_A)
    assert analyze.ApproximateAccuracy(file_a).acr() == pytest.approx(0.25)


def test_abstain_rate(file_a):
    assert analyze.ApproximateAccuracy(file_a).abstain_rate() == pytest.approx(1 / 8)


def test_gzip_and_plain_agree(tmp_path, file_a):
    gz = _write(tmp_path / "a.tsv.gz", ROWS_A, compress=True)
    plain, zipped = analyze.ApproximateAccuracy(file_a), analyze.ApproximateAccuracy(gz)
    radii = np.linspace(0, 1.2, 25)
    np.testing.assert_array_equal(plain.at_radii(radii), zipped.at_radii(radii))
    assert plain.acr() == zipped.acr()


def test_high_prob_accuracy_published_bound_by_default(file_a):
    """The published formula, unclipped, is the default."""
    alpha, rho, n = 0.001, 0.01, 8
    log_term = math.log(1 / rho)
    correction = alpha + math.sqrt(alpha * (1 - alpha) * log_term / n) + log_term / (3 * n)
    got = analyze.HighProbAccuracy(file_a, alpha, rho).at_radii([0.0, 0.75])
    assert got[0] == pytest.approx(5 / 8 - correction)
    assert got[1] == pytest.approx(1 / 8 - correction) and got[1] < 0  # not clipped, as published


def test_high_prob_accuracy_gives_the_published_number():
    """CIFAR-10, sigma 0.25, the published Gaussian model, alpha = rho = 0.001, r = 0: 0.7644."""
    path = REFERENCE / "cifar10" / "noise_0.25" / "cohen" / "noise_0.25.tsv.gz"
    if not path.is_file():
        pytest.skip(f"reference results not found at {REFERENCE}")
    assert round(float(analyze.HighProbAccuracy(path, 0.001, 0.001).at_radii([0.0])[0]), 4) == 0.7644


def test_high_prob_accuracy(file_a):
    alpha, rho, n = 0.001, 0.01, 8
    hoeffding = analyze.HighProbAccuracy(file_a, alpha, rho, bound="hoeffding")
    correction = alpha + math.sqrt(math.log(1 / rho) / (2 * n))  # = 0.5375...
    got = hoeffding.at_radii([0.0, 0.75])
    assert got[0] == pytest.approx(5 / 8 - correction)
    assert got[1] == 0.0  # 1/8 - correction < 0, clipped
    bernstein = analyze.HighProbAccuracy(file_a, alpha, rho, bound="bernstein")
    assert bernstein.correction() == pytest.approx(
        alpha + math.sqrt(2 * alpha * (1 - alpha) * math.log(1 / rho) / n) + 2 * math.log(1 / rho) / (3 * n))
    assert isinstance(hoeffding, analyze.Accuracy)
    with pytest.raises(ValueError):
        analyze.HighProbAccuracy(file_a, alpha, 0.0)


def test_accuracy_is_abstract():
    with pytest.raises(TypeError):
        analyze.Accuracy()


def test_radius_grid_includes_stop():
    np.testing.assert_allclose(analyze.radius_grid(0.0, 1.0, 0.25), [0, 0.25, 0.5, 0.75, 1.0])
    assert analyze.radius_grid(0.0, 0.3, 0.1).tolist() == [0.0, 0.1, 0.2, 0.3]


def test_plots_written(tmp_path, file_a, file_b):
    lines = [analyze.Line(analyze.ApproximateAccuracy(file_a), "A"),
             analyze.Line(analyze.ApproximateAccuracy(file_b), "B", plot_fmt="--", scale_x=1)]
    analyze.plot_certified_accuracy(str(tmp_path / "plots" / "big"), "title", 1.5, lines, radius_step=0.05)
    analyze.smallplot_certified_accuracy(str(tmp_path / "small"), "t", 1.5, lines, radius_step=0.05,
                                         xticks=0.5)
    for stem in (tmp_path / "plots" / "big", tmp_path / "small"):
        png, pdf = Path(f"{stem}.png"), Path(f"{stem}.pdf")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pdf.read_bytes()[:5] == b"%PDF-"


def test_tables_bold_best(tmp_path, file_a, file_b):
    methods = [analyze.Line(analyze.ApproximateAccuracy(file_a), "A"),
               analyze.Line(analyze.ApproximateAccuracy(file_b), "B")]
    md = analyze.markdown_table_certified_accuracy(str(tmp_path / "t"), 0.0, 1.0, 0.25, methods,
                                                   percent=True)
    assert md == tmp_path / "t.md"
    rows = {(c := _cells(l))[0]: c[1:] for l in md.read_text().splitlines()[2:]}
    # radii 0, 0.25, 0.5, 0.75, 1.0: A = 62.5 50.0 25.0 12.5 12.5, B = 50.0 50.0 50.0 50.0 0.0
    # at r = 0.25 both print 50.0: a tie across all rows is not bold
    assert rows["A"] == ["**62.5**", "50.0", "25.0", "12.5", "**12.5**"]
    assert rows["B"] == ["50.0", "50.0", "**50.0**", "**50.0**", "0.0"]

    tex = analyze.latex_table_certified_accuracy(str(tmp_path / "t"), 0.0, 1.0, 0.25, methods)
    assert tex == tmp_path / "t.tex"
    text = tex.read_text()
    assert r"\begin{tabular}" in text and r"\end{tabular}" in text
    # published style: fractions with two decimals
    # (0.625 and 0.125 are exact binary fractions, so .2f rounds them half to even)
    assert r"A & \textbf{0.62} & 0.50 & 0.25 & 0.12 & \textbf{0.12} \\" in text
    assert r"B & 0.50 & 0.50 & \textbf{0.50} & \textbf{0.50} & 0.00 \\" in text


def test_latex_escapes_labels(file_a, file_b):
    accs = [analyze.ApproximateAccuracy(file_a), analyze.ApproximateAccuracy(file_b)]
    text = analyze.summary_table(accs, ["cohen/noise_0.25", "a&b"], [0.0], style="latex")
    assert r"cohen/noise\_0.25 & " in text and r"a\&b & " in text


def test_default_labels_distinguish_files(file_a, file_b):
    assert analyze.default_labels([file_a, file_b]) == ["methodA/noise_0.25", "methodB/noise_0.25"]
    assert analyze.default_labels([file_a, file_a]) == ["methodA/noise_0.25", "methodA/noise_0.25 (2)"]


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("", "empty"),
    ("idx\tlabel\tpredict\tcorrect\ttime\n0\t3\t3\t1\t0:00\n", "radius"),
    ("idx,label,predict,radius,correct\n0,3,3,0.5,1\n", "tab-separated"),
    (HEADER, "no result rows"),
    (HEADER + "0\t3\t3\tabc\t1\t0:00\n", "line 2"),
])
def test_library_raises_results_file_error(tmp_path, content, problem):
    path = tmp_path / "bad.tsv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(analyze.ResultsFileError) as info:
        analyze.ApproximateAccuracy(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and str(path) in message and problem in message


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_cli_prints_table_and_plot(tmp_path, file_a, file_b):
    gz = _write(tmp_path / "a.tsv.gz", ROWS_A, compress=True)
    plot = tmp_path / "curves.png"
    proc = _run_cli(file_a, file_b, gz, "--radii", "0", "0.5", "1.0", "--plot", plot, "--abstain")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert _cells(lines[0]) == ["label", "ACR", "r=0", "0.5", "1.0", "abstain"]
    rows = {c[0]: c[1:] for c in map(_cells, lines[2:5])}
    # A and its gzipped copy tie for the best r=0 and r=1.0; B is best in ACR and at r=0.5;
    # the abstain column is never bold
    assert rows["methodA/noise_0.25"] == ["0.250", "**62.5**", "25.0", "**12.5**", "12.5"]
    # labels keep at least two path components: "<tmp folder>/a" for a.tsv.gz
    assert rows[f"{tmp_path.name}/a"] == ["0.250", "**62.5**", "25.0", "**12.5**", "12.5"]
    assert rows["methodB/noise_0.25"] == ["**0.425**", "50.0", "**50.0**", "0.0", "25.0"]
    assert f"plot written to {plot}" in proc.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_latex_and_labels(file_a, file_b):
    proc = _run_cli(file_a, file_b, "--latex", "--labels", "Gaussian", "CAT_RS")
    assert proc.returncode == 0, proc.stderr
    assert r"\begin{tabular}" in proc.stdout
    assert r"Gaussian & 0.250 & \textbf{62.5}" in proc.stdout
    assert r"CAT\_RS & \textbf{0.425} & 50.0" in proc.stdout


@pytest.mark.parametrize("kind", ["missing column", "empty", "non-existent"])
def test_cli_malformed_file(tmp_path, file_a, kind):
    bad = tmp_path / "bad.tsv"
    if kind == "missing column":
        bad.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t3\t3\t1\t0:00\n")
    elif kind == "empty":
        bad.write_text("")
    plot = tmp_path / "never.png"
    proc = _run_cli(file_a, bad, "--plot", plot)
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]
    assert "Traceback" not in proc.stderr
    assert not plot.exists()


def test_cli_label_count_mismatch(capsys, file_a, file_b):
    assert analyze.main([str(file_a), str(file_b), "--labels", "only-one"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --labels")


# --------------------------------------------------------------------------
# Settings records: rows of different settings are never combined
# --------------------------------------------------------------------------

SETTINGS = {"script": "certify.py", "dataset": "fmnist", "sigma": 0.25, "N0": 100, "N": 100000, "alpha": 0.001,
            "batch": 1000, "split": "test", "seed": 0, "checkpoint_sha256": "ab" * 32}


def _write_shard(path, rows, first_idx, settings=None):
    """A result file of images first_idx, first_idx + 1, ... and, unless settings is None, its record."""
    text = HEADER + "".join(f"{first_idx + i}\t3\t{p}\t{r}\t{c}\t0:00:01.5\n" for i, (p, r, c) in enumerate(rows))
    Path(path).write_text(text)
    if settings is not None:
        Path(str(path) + ".meta.json").write_text(json.dumps({"format": 1, "settings": settings}))
    return Path(path)


def test_shards_of_one_run_make_one_line(tmp_path, file_a):
    first = _write_shard(tmp_path / "part0.tsv", ROWS_A[:5], 0, SETTINGS)
    second = _write_shard(tmp_path / "part1.tsv", ROWS_A[5:], 5, SETTINGS)
    combined = analyze.ApproximateAccuracy([first, second])
    whole = analyze.ApproximateAccuracy(file_a)
    assert combined.num_examples == 8 and combined.acr() == pytest.approx(ACR_A)
    radii = list(EXPECTED_A)
    np.testing.assert_allclose(combined.at_radii(radii), whole.at_radii(radii))
    assert analyze.main([f"{first}+{second}", "--labels", "run"]) == 0


@pytest.mark.parametrize("change, words", [
    ({"sigma": 0.5}, ["sigma 0.25 -> 0.5"]),
    ({"N": 100, "alpha": 0.1}, ["N 100000 -> 100", "alpha 0.001 -> 0.1"]),
    ({"checkpoint_sha256": "cd" * 32}, ["checkpoint_sha256 abababababab -> cdcdcdcdcdcd"]),
])
def test_rows_of_different_settings_are_refused(tmp_path, capsys, change, words):
    first = _write_shard(tmp_path / "part0.tsv", ROWS_A[:5], 0, SETTINGS)
    second = _write_shard(tmp_path / "part1.tsv", ROWS_A[5:], 5, {**SETTINGS, **change})
    with pytest.raises(analyze.ResultsFileError) as info:
        analyze.ApproximateAccuracy([first, second])
    assert "different settings" in str(info.value) and all(w in str(info.value) for w in words)
    assert analyze.main([f"{first}+{second}"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and err[0].startswith("error: ") and words[0] in err[0]


def test_unverifiable_or_overlapping_shards_are_refused(tmp_path):
    first = _write_shard(tmp_path / "part0.tsv", ROWS_A[:5], 0, SETTINGS)
    bare = _write_shard(tmp_path / "bare.tsv", ROWS_A[5:], 5)
    with pytest.raises(analyze.ResultsFileError, match="has a settings record but .* has none"):
        analyze.ApproximateAccuracy([first, bare])
    overlapping = _write_shard(tmp_path / "part1.tsv", ROWS_A[3:], 3, SETTINGS)
    with pytest.raises(analyze.ResultsFileError, match="image 3 is in both"):
        analyze.ApproximateAccuracy([first, overlapping])
    # files without records (the published results) may still be combined
    bare0 = _write_shard(tmp_path / "bare0.tsv", ROWS_A[:5], 0)
    assert analyze.ApproximateAccuracy([bare0, bare]).num_examples == 8


def test_unreadable_record_is_named(tmp_path):
    path = _write_shard(tmp_path / "r.tsv", ROWS_A, 0, SETTINGS)
    Path(str(path) + ".meta.json").write_text("{not json")
    with pytest.raises(analyze.ResultsFileError, match="settings record .* is unreadable"):
        analyze.ApproximateAccuracy(path)


# --------------------------------------------------------------------------
# Rough edges of the command line
# --------------------------------------------------------------------------

def test_cli_checkpoint_given_instead_of_results(tmp_path, capsys):
    import torch
    checkpoint = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "lenet", "state_dict": {"w": torch.zeros(2)}}, checkpoint)
    assert analyze.main([str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "checkpoint" in err[0] and "Traceback" not in err[0]
    proc = _run_cli(checkpoint)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("radii", [["-1"], ["0", "-0.25"], ["nan"]])
def test_cli_negative_radius_refused(file_a, capsys, radii):
    assert analyze.main([str(file_a), "--radii", *radii]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and err[0].startswith("error: --radii")


# --------------------------------------------------------------------------
# Radii-mode sequential files: measured at the listed radii only
# --------------------------------------------------------------------------

SEQUENTIAL_SETTINGS = {**SETTINGS, "sequential": True, "N_max": 100000, "radii": [0.25, 0.5, 0.75],
                       "radius_tol": None}

# (predict, radius, correct, samples): certified at 0.75, 0.5, wrong, 0.25, abstained, 0 (radius below 0.25)
ROWS_SEQ = [(3, 0.781, 1, 6100), (3, 0.52, 1, 12100), (5, 0.3, 0, 3100), (3, 0.26, 1, 20100),
            (-1, 0.0, 0, 1100), (3, 0.1, 1, 100100)]
EXPECTED_SEQ = {0.0: 4 / 6, 0.25: 3 / 6, 0.5: 2 / 6, 0.75: 1 / 6}


def _write_sequential(path, settings):
    text = HEADER.rstrip("\n") + "\tsamples\n" + "".join(
        f"{i}\t3\t{p}\t{r}\t{c}\t0:00:01.5\t{n}\n" for i, (p, r, c, n) in enumerate(ROWS_SEQ))
    Path(path).write_text(text)
    Path(str(path) + ".meta.json").write_text(json.dumps({"format": 1, "settings": settings}))
    return Path(path)


@pytest.fixture
def file_seq(tmp_path):
    (tmp_path / "seq").mkdir()
    return _write_sequential(tmp_path / "seq" / "radii.tsv", SEQUENTIAL_SETTINGS)


def test_radii_mode_accuracy_only_at_the_listed_radii_and_no_acr(file_seq):
    acc = analyze.ApproximateAccuracy(file_seq)
    assert acc.listed_radii == (0.0, 0.25, 0.5, 0.75)
    np.testing.assert_allclose(acc.at_radii(list(EXPECTED_SEQ)), list(EXPECTED_SEQ.values()))
    assert np.isnan(acc.at_radii([0.3, 1.0, 0.76])).all()
    assert np.isnan(acc.acr())
    assert acc.mean_samples() == pytest.approx(sum(r[3] for r in ROWS_SEQ) / 6)
    high = analyze.HighProbAccuracy(file_seq, alpha=0.001, rho=0.001)
    assert high.listed_radii == acc.listed_radii and np.isnan(high.at_radii([1.0])).all()


def test_acr_mode_and_fixed_n_files_are_unchanged(tmp_path, file_a):
    acr_mode = _write_sequential(tmp_path / "acr.tsv", {**SEQUENTIAL_SETTINGS, "radii": None, "radius_tol": 0.025})
    fixed = _write_shard(tmp_path / "fixed.tsv", ROWS_A, 0, SETTINGS)
    for path in (acr_mode, fixed, file_a):
        acc = analyze.ApproximateAccuracy(path)
        assert acc.listed_radii is None and not np.isnan(acc.at_radii([0.3, 1.7])).any()
    assert analyze.ApproximateAccuracy(acr_mode).acr() == pytest.approx((0.781 + 0.52 + 0.26 + 0.1) / 6)
    assert analyze.ApproximateAccuracy(fixed).acr() == pytest.approx(ACR_A)
    assert analyze.default_table_radii([analyze.ApproximateAccuracy(fixed)]) == list(analyze.DEFAULT_RADII)


def test_cli_table_of_a_radii_mode_file(file_seq, file_a, capsys):
    assert analyze.main([str(file_seq), "--labels", "S"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # columns: the listed radii and 0, nothing else; the ACR is n/a
    assert _cells(lines[0]) == ["label", "ACR", "r=0", "0.25", "0.5", "0.75", "samples/image"]
    assert _cells(lines[2]) == ["S", "n/a", "66.7", "50.0", "33.3", "16.7", "23,767"]
    # beside a fixed-N file: the papers' radii too, n/a where the radii-mode file measures nothing
    assert analyze.main([str(file_seq), str(file_a), "--labels", "S", "F"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert _cells(lines[0]) == ["label", "ACR", "r=0", "0.25", "0.5", "0.75", "1.0", "1.5", "2.0", "samples/image"]
    assert _cells(lines[2]) == ["S", "n/a", "**66.7**", "50.0", "**33.3**", "**16.7**", "n/a", "n/a", "n/a", "23,767"]
    assert _cells(lines[3]) == ["F", "0.250", "62.5", "50.0", "25.0", "12.5", "12.5", "0.0", "0.0", "n/a"]
    # radii asked for explicitly: n/a at those the file does not list
    assert analyze.main([str(file_seq), "--radii", "0", "0.3", "0.75"]) == 0
    assert _cells(capsys.readouterr().out.splitlines()[2])[1:] == ["n/a", "66.7", "n/a", "16.7", "23,767"]


def test_plot_of_a_radii_mode_file_marks_the_listed_radii_only(tmp_path, file_seq, file_a):
    seq, fixed = analyze.ApproximateAccuracy(file_seq), analyze.ApproximateAccuracy(file_a)
    assert analyze._default_max_radius([seq]) == 0.75
    fig = analyze.certified_accuracy_figure(None, 1.5, [analyze.Line(seq, "S"), analyze.Line(fixed, "F")])
    try:
        marks, curve = fig.axes[0].get_lines()
        np.testing.assert_allclose(marks.get_xdata(), [0.0, 0.25, 0.5, 0.75])
        np.testing.assert_allclose(marks.get_ydata(), list(EXPECTED_SEQ.values()))
        assert marks.get_linestyle() == "None" and marks.get_marker() == "o"
        assert max(curve.get_xdata()) == pytest.approx(1.5)   # a fixed-N curve is drawn as before
    finally:
        analyze._pyplot().close(fig)
    plot = tmp_path / "seq.png"
    assert analyze.main([str(file_seq), str(file_a), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
