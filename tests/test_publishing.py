"""What the repository publishes: records without machine paths, reproducible installs, the pretrained models'
table, the citation.

* No committed file under data/ or docs/ (nor README.md, EXPERIMENTS.md, CITATION.cff) names a machine's
  folders; settings records name their inputs relative to the repository root, and a record written with
  absolute paths is still resumed.
* requirements.txt pins every third-party package the code, the tests and the benchmarks import, to the
  version installed here, and environment.yml holds the same pins; the README's Python minimum is the one
  those versions need.
* docs/PRETRAINED.md has a row per kept cell, with the numbers of its result files (computed here from the
  rows: ACR = mean of correct * radius, certified accuracy = share of correct rows with radius >= r).
* README's Pretrained models and Citation sections, CITATION.cff and LICENSE.
"""
import ast
import gzip
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys


from conftest import REPO
from test_eval_scripts import CERTIFY_FAST, call, rows, save_lenet

import certify  # noqa: E402
import provenance  # noqa: E402
import reproduce  # noqa: E402
import train_utils  # noqa: E402

PUBLISHED = ["data", "docs", "README.md", "EXPERIMENTS.md", "CITATION.cff", "benchmarks/README.md"]
# Folders that only exist on some machine: home and work folders, pytest's temporary folders, Windows profiles.
# Imported only when installed, never needed: IBM ART, which benchmarks/bench_certify.py compares with.
OPTIONAL_IMPORTS = {"art"}
# Pinned and run, never imported: the linter of `make lint`.
TOOLS = {"ruff"}
MACHINE_PATH = re.compile(rb"(?<![\w.~-])/(?:work|home|Users|root|mnt|scratch|var/folders|private/var)/|"
                          rb"/tmp/pytest-of-|[A-Za-z]:\\(?:Users|work)\\")


def committed_files(paths):
    try:
        listed = subprocess.run(["git", "-C", REPO, "ls-files", "--", *paths], capture_output=True, text=True,
                                check=True).stdout.split("\n")
        return [os.path.join(REPO, f) for f in listed if f and os.path.isfile(os.path.join(REPO, f))]
    except (OSError, subprocess.CalledProcessError):   # not a git checkout: every file there
        found = []
        for path in paths:
            full = os.path.join(REPO, path)
            if os.path.isfile(full):
                found.append(full)
            for folder, _, files in os.walk(full):
                found += [os.path.join(folder, f) for f in files]
        return found


def test_no_committed_file_names_a_machine_path():
    files = committed_files(PUBLISHED)
    assert any(f.endswith(".meta.json") for f in files) and any(f.endswith(".pth.tar") for f in files)
    here = [p.encode() for p in {REPO, os.path.expanduser("~")} if len(p) > 1]
    found = []
    for path in files:
        with open(path, "rb") as handle:
            content = handle.read()
        if path.endswith(".gz"):
            content = gzip.decompress(content)
        match = MACHINE_PATH.search(content) or next((re.search(re.escape(p), content) for p in here
                                                      if p in content), None)
        if match:
            found.append(f"{os.path.relpath(path, REPO)}: {content[max(0, match.start() - 30):match.end() + 40]!r}")
    assert not found, "machine paths in committed files:\n" + "\n".join(found)


def test_the_scan_sees_a_machine_path():
    for text in (b'"checkpoint": "/work/main/logs/x.pth.tar"', b"/home/someone/x", b"C:\\Users\\me\\x",
                 b"/tmp/pytest-of-root/pytest-3/x"):
        assert MACHINE_PATH.search(text), text
    for text in (b"/usr/share/datasets/fashion-mnist/", b"--out /tmp/before.json", b"logs/fmnist/x"):
        assert not MACHINE_PATH.search(text), text


# --------------------------------------------------------------------------- settings records

def test_records_name_inputs_relative_to_the_repository(tmp_path, monkeypatch):
    inside = os.path.join(REPO, "data", "fmnist", "noise_0.25", "cohen", "checkpoint.pth.tar")
    outside = str(tmp_path / "model.pth.tar")
    monkeypatch.setattr(sys, "argv", ["code/certify.py", "fmnist", inside, "0.25", f"--out={REPO}/test/x.tsv"])
    record = provenance.Provenance.of_run("certify.py", "fmnist", {"base_classifier": inside, "sigma": 0.25},
                                          "0" * 64, "2")
    assert record.environment["checkpoint"] == "data/fmnist/noise_0.25/cohen/checkpoint.pth.tar"
    assert shlex.split(record.environment["command"]) == [
        "certify.py", "fmnist", "data/fmnist/noise_0.25/cohen/checkpoint.pth.tar", "0.25", "--out=test/x.tsv"]
    other = provenance.Provenance.of_run("certify.py", "fmnist", {"base_classifier": outside}, "0" * 64, "2")
    assert other.environment["checkpoint"] == outside, "a file outside the repository keeps its absolute path"
    # a record written with absolute paths on another machine, rewritten as it is kept (reproduce.py)
    old = {"settings": {"sigma": 0.25, "checkpoint_sha256": "ab"},
           "environment": {"checkpoint": "/elsewhere/repo/logs/a/checkpoint.pth.tar", "torch": "2",
                           "command": "certify.py fmnist /elsewhere/repo/logs/a/checkpoint.pth.tar 0.25 out.tsv"}}
    new = provenance.relative_record(old, "/elsewhere/repo")
    assert new["settings"] == old["settings"]
    assert new["environment"]["checkpoint"] == "logs/a/checkpoint.pth.tar"
    assert new["environment"]["command"] == "certify.py fmnist logs/a/checkpoint.pth.tar 0.25 out.tsv"
    source, target = tmp_path / "r.meta.json", tmp_path / "kept.meta.json"
    kept = {**old, "environment": {**old["environment"], "checkpoint": f"{reproduce.REPO}/logs/a/c.pth.tar"}}
    source.write_text(json.dumps(kept))
    reproduce._copy_record(str(source), str(target), reproduce.REPO)
    assert json.loads(target.read_text())["environment"]["checkpoint"] == "logs/a/c.pth.tar"


def test_a_record_with_absolute_paths_or_without_later_settings_is_resumed(tmp_path, monkeypatch, capsys):
    checkpoint = save_lenet(tmp_path / "checkpoint.pth.tar")
    out = tmp_path / "c.tsv"
    assert call(certify, ["fmnist", checkpoint, 0.25, out, "--max", 1] + CERTIFY_FAST) == 0
    record = json.loads((tmp_path / "c.tsv.meta.json").read_text())
    assert record["settings"]["input_layer"] == "normalize"
    # as the drivers before this change wrote it: absolute paths, no input_layer setting
    record["environment"]["checkpoint"] = os.path.abspath(checkpoint)
    record["environment"]["command"] = f"certify.py fmnist {os.path.abspath(checkpoint)} 0.25 {out}"
    del record["settings"]["input_layer"]
    (tmp_path / "c.tsv.meta.json").write_text(json.dumps(record, indent=1) + "\n")
    monkeypatch.chdir(tmp_path)
    assert call(certify, ["fmnist", "checkpoint.pth.tar", 0.25, "c.tsv", "--max", 2] + CERTIFY_FAST) == 0
    assert [row[0] for row in rows(out)[1]] == ["0", "1"]
    assert json.loads((tmp_path / "c.tsv.meta.json").read_text()) == record, "the record is kept as it was"
    # another first layer is another setting
    capsys.readouterr()
    assert call(certify, ["fmnist", "checkpoint.pth.tar", 0.25, "c.tsv", "--max", 3, "--input-layer", "center"]
                + CERTIFY_FAST) == 2
    assert 'input_layer "normalize" -> "center"' in capsys.readouterr().err


def test_training_checkpoints_store_paths_relative_and_compare_them_by_file(tmp_path, monkeypatch):
    inside = os.path.join(REPO, "data", "fmnist", "noise_0.25", "cohen", "checkpoint.pth.tar")
    args = train_utils.parse_args(train_utils.Method("x", lambda a: "x", None),
                                  ["fmnist", "lenet", "--pretrained-model", inside, "--logdir", str(tmp_path)])
    stored = train_utils.stored_arguments(args)
    assert stored["pretrained_model"] == "data/fmnist/noise_0.25/cohen/checkpoint.pth.tar"
    assert stored["logdir"] == str(tmp_path) and stored["input_layer"] == "normalize"
    monkeypatch.chdir(os.path.join(REPO, "data"))   # the same file named from elsewhere
    same = {**stored, "pretrained_model": os.path.join("fmnist", "noise_0.25", "cohen", "checkpoint.pth.tar")}
    assert train_utils.changed_arguments(stored, same, {}) == []
    assert train_utils.changed_arguments({**stored, "pretrained_model": inside}, same, {}) == [], "an old record"
    other = {**stored, "pretrained_model": os.path.join("fmnist", "noise_0.5", "cohen", "checkpoint.pth.tar")}
    assert [c.split(":")[0] for c in train_utils.changed_arguments(stored, other, {})] == ["pretrained_model"]


# --------------------------------------------------------------------------- installs

def pins(text, prefix=""):
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith(prefix) or line.startswith("#"):
            continue
        line = line[len(prefix):].strip()
        if "==" in line:
            name, version = line.split("==")
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def requirement_pins():
    with open(os.path.join(REPO, "requirements.txt")) as handle:
        lines = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+-]*", line) for line in lines), \
        "every requirement pinned with =="
    return pins("\n".join(lines))


def third_party_imports():
    local = set()
    for folder in ("code", "code/archs", "tests", "benchmarks"):
        local |= {f[:-3] for f in os.listdir(os.path.join(REPO, folder)) if f.endswith(".py")}
    local |= {"archs"}
    found = set()
    for folder in ("code", "tests", "benchmarks"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in (f for f in files if f.endswith(".py")):
                with open(os.path.join(root, name)) as handle:
                    tree = ast.parse(handle.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        found |= {alias.name.split(".")[0] for alias in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        found.add(node.module.split(".")[0])
    return {m for m in found if m not in local | OPTIONAL_IMPORTS and m not in sys.stdlib_module_names
            and m != "__future__"}


def test_requirements_pin_every_direct_dependency_and_match_environment_yml():
    required = requirement_pins()
    with open(os.path.join(REPO, "environment.yml")) as handle:
        conda = pins(handle.read(), prefix="- ")
    assert conda == required, "environment.yml and requirements.txt pin other versions"
    distributions = importlib.metadata.packages_distributions()
    imported = {module: {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
                for module in third_party_imports()}
    unpinned = {m: d for m, d in imported.items() if not d & set(required)}
    assert not unpinned, f"imported but not pinned: {unpinned}"
    unused = set(required) - set().union(*imported.values()) - TOOLS
    assert not unused, f"pinned but imported nowhere: {unused}"
    for name, version in required.items():
        installed = importlib.metadata.version(name)
        assert installed.split("+")[0] == version, f"{name} {installed} installed, {version} pinned"


def test_the_python_minimum_is_what_the_pinned_versions_need():
    needed = (3, 0)
    for name in requirement_pins():
        spec = importlib.metadata.metadata(name).get("Requires-Python") or ""
        for low in re.findall(r">=\s*(\d+)\.(\d+)", spec):
            needed = max(needed, tuple(map(int, low)))
    with open(os.path.join(REPO, "README.md")) as handle:
        stated = re.search(r"Python (\d+)\.(\d+) or newer", handle.read())
    assert stated and tuple(map(int, stated.groups())) == needed, (stated and stated.group(0), needed)
    with open(os.path.join(REPO, "environment.yml")) as handle:
        conda_python = re.search(r"- python=(\d+)\.(\d+)", handle.read())
    assert tuple(map(int, conda_python.groups())) >= needed
    assert sys.version_info[:2] >= needed


# --------------------------------------------------------------------------- the pretrained models' table

def kept_cells():
    data = os.path.join(REPO, "data", "fmnist")
    cells = []
    for sigma_folder in sorted(os.listdir(data)):
        if not sigma_folder.startswith("noise_") or not os.path.isdir(os.path.join(data, sigma_folder)):
            continue
        for method in sorted(os.listdir(os.path.join(data, sigma_folder))):
            if os.path.exists(os.path.join(data, sigma_folder, method, "cell.json")):
                cells.append((sigma_folder[len("noise_"):], method))
    return cells


def gz_rows(path):
    with gzip.open(path, "rt") as handle:
        lines = handle.read().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


NAMES = {"cohen": "Gaussian", "stab": "Stability", "salman": "SmoothAdv", "macer": "MACER",
         "consistency": "Consistency", "smoothmix": "SmoothMix", "catrs": "CAT-RS"}


def expected_row(sigma, method):
    folder = f"data/fmnist/noise_{sigma}/{method}"
    fixed = gz_rows(os.path.join(REPO, folder, "certify.tsv.gz"))
    sequential = gz_rows(os.path.join(REPO, folder, "certify_sequential.tsv.gz"))
    acr = sum(int(r["correct"]) * float(r["radius"]) for r in fixed) / len(fixed)
    accuracy = [100 * sum(int(r["correct"]) == 1 and float(r["radius"]) >= radius for r in sequential) / len(sequential)
                for radius in (0.25, 0.5, 1.0)]
    command = f"python code/certify.py fmnist {folder}/checkpoint.pth.tar {sigma} OUT.tsv --skip 100 --seed 0"
    return (f"| {NAMES[method]} | {sigma} | `{folder}/checkpoint.pth.tar` | {acr:.3f} | "
            f"{' / '.join(f'{a:.1f}' for a in accuracy)} | `{command}` |")


def test_pretrained_table_has_each_kept_cell_with_its_numbers():
    with open(os.path.join(REPO, "docs", "PRETRAINED.md")) as handle:
        table = [line for line in handle.read().splitlines() if line.startswith("| ") and "`data/fmnist/" in line]
    cells = kept_cells()
    assert cells, "no kept cell found"
    expected = [expected_row(sigma, method) for sigma, method in cells]
    missing = [row for row in expected if row not in table]
    assert not missing, "rows of docs/PRETRAINED.md to add or correct:\n" + "\n".join(missing)
    assert len(table) == len(expected), "a row for a cell that is not kept"
    # the command parses as certify.py's and certifies as the kept file was made
    command = shlex.split(expected[0].split("`")[3])[2:]
    args = certify.build_parser().parse_args(command)
    kept = json.load(open(os.path.join(REPO, f"data/fmnist/noise_{cells[0][0]}/{cells[0][1]}/certify.tsv.meta.json")))
    for key in ("N0", "N", "alpha", "seed", "batch", "sigma"):
        assert kept["settings"][key] == getattr(args, key), key
    assert args.skip == 100


# --------------------------------------------------------------------------- citation and license

TITLES = ["Confidence-aware Training of Smoothed Classifiers for Certified Robustness",
          "Certified Adversarial Robustness via Randomized Smoothing",
          "Certified Adversarial Robustness with Additive Noise",
          "Provably Robust Deep Learning via Adversarially Trained Smoothed Classifiers",
          "MACER: Attack-free and Scalable Robust Training via Maximizing Certified Radius",
          "Consistency Regularization for Certified Robustness of Smoothed Classifiers",
          "SmoothMix: Training Confidence-calibrated Smoothed Classifiers for Certified Robustness"]


def test_readme_citation_and_license():
    with open(os.path.join(REPO, "README.md")) as handle:
        readme = handle.read()
    assert "\n## Pretrained models\n" in readme and "\n## Citation\n" in readme
    bibtex = readme.split("\n## Citation\n")[1].split("```bibtex\n")[1].split("```")[0]
    entries = re.findall(r"@inproceedings\{", bibtex)
    titles = [re.sub(r"[{}]", "", t) for t in re.findall(r"\btitle\s*=\s*\{(.*)\},", bibtex)]
    assert len(entries) == len(TITLES) and titles == TITLES
    with open(os.path.join(REPO, "CITATION.cff")) as handle:
        cff = handle.read()
    assert cff.startswith("cff-version: 1.2.0\n") and "preferred-citation:" in cff
    assert [t for t in TITLES if f'title: "{t}"' in cff] == TITLES
    with open(os.path.join(REPO, "LICENSE")) as handle:
        assert handle.readline().strip() == "MIT License"
