"""Training throughput (examples/s) of every training method on LeNet / Fashion-MNIST.

Each method's script runs as it would from the command line, for one epoch
on the first ``--train-subset`` training images (``--test-subset`` test
images, one by default), with the method options of the published CIFAR-10
commands (EXPERIMENTS.md; MACER without ``--deferred`` so that its
robustness term is part of the epoch). The epoch time is read from the
``time`` column of the run's ``log.txt`` (training plus the noisy test
pass; start-up is not included). Scripts that do not exist are reported as
missing. The methods take turns within each repeat; the table gives the
median over the repeats.

    python benchmarks/bench_train.py --train-subset 2048 --repeats 3 --threads 2

``--published PATH`` compares with a copy of the published code (PATH holds
its ``code/train_*.py``; nothing of it is stored in this repository): for
every method the published script and ours run one epoch each with the same
options (``COMPARISON``, sigma 0.5), alternately (which goes first switches
every repeat), and the table gives both epoch times and the speed ratio
published / ours (median of the per-repeat ratios). The published scripts
run unmodified from a temporary folder that holds a copy of their ``code/``,
a ``./dataset_cache`` whose ``FashionMNIST`` and ``FMNIST_Targeted`` (the
name torchvision derives from the published CAT-RS data class) both link to
the data cache's ``FashionMNIST`` folder, and the CAT-RS
smoothed-prediction file at their relative path
``test/smooth_prediction/fmnist/0/model_conf_0.25_train.npy`` (the same
random Dirichlet targets as ours get); a small launcher replaces their
``datasets.get_dataset`` by one that returns the first ``--train-subset`` /
``--test-subset`` examples (they have no such option). Nothing else is
changed: on a machine without a GPU they pick the CPU themselves.

    python benchmarks/bench_train.py --published /path/to/published --train-subset 10000 \
        --test-subset 10000 --repeats 2 --threads 2
"""
import csv
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "code"))

from common import ArgumentParser, UserError, positive_int, run_cli  # noqa: E402

# script, method options (the published CIFAR-10 commands, Fashion-MNIST learning rate)
METHODS = [
    ("cohen", "train_cohen.py", ["--noise", "0.25"]),
    ("stab", "train_stab.py", ["--noise", "0.25", "--lbd", "2.0"]),
    ("salman", "train_salman.py", ["--noise", "0.25", "--attack", "PGD", "--epsilon", "256.0", "--num-steps", "10",
                                   "--warmup", "10", "--num-noise-vec", "4"]),
    ("macer", "train_macer.py", ["--noise", "1.0", "--num-noise-vec", "16", "--beta", "16.0", "--margin", "8.0",
                                 "--lbd", "12.0"]),
    ("consistency", "train_consistency.py", ["--noise", "0.25", "--num-noise-vec", "2", "--lbd", "20"]),
    ("smoothmix", "train_smoothmix.py", ["--noise", "0.5", "--num-noise-vec", "2", "--num-steps", "4",
                                         "--alpha", "1.0", "--mix_step", "1", "--eta", "5.0"]),
    ("catrs", "train_catrs.py", ["--num-noise-vec", "4", "--noise", "0.25", "--eps", "256.0", "--num-steps", "4",
                                 "--lbd", "0.5"]),
]

# The side-by-side comparison with the published code: sigma 0.5, the same options on both sides.
COMPARISON = [
    ("cohen", "train_cohen.py", ["--noise_sd", "0.5"]),
    ("stab", "train_stab.py", ["--noise_sd", "0.5", "--lbd", "2"]),
    ("consistency", "train_consistency.py", ["--noise_sd", "0.5", "--num-noise-vec", "2", "--lbd", "10"]),
    ("macer", "train_macer.py", ["--noise_sd", "0.5", "--num-noise-vec", "16", "--beta", "16", "--margin", "8",
                                 "--lbd", "6"]),
    ("smoothmix", "train_smoothmix.py", ["--noise_sd", "0.5", "--num-noise-vec", "2", "--num-steps", "4",
                                         "--alpha", "1", "--mix_step", "1", "--eta", "5"]),
    ("catrs", "train_catrs.py", ["--noise_sd", "0.5", "--num-noise-vec", "4", "--epsilon", "256", "--num-steps",
                                 "4", "--lbd", "1"]),
    ("salman", "train_salman.py", ["--noise_sd", "0.5", "--attack", "PGD", "--epsilon", "256", "--num-steps", "10",
                                   "--warmup", "10", "--num-noise-vec", "8"]),
]

# Runs a published training script on the first N training / test examples (env BENCH_TRAIN_SUBSET,
# BENCH_TEST_SUBSET) by wrapping its datasets.get_dataset before the script imports it. Where tensorboardX
# is not installed, torch's own SummaryWriter stands in for it (the published code imports tensorboardX).
PUBLISHED_LAUNCHER = """import os, runpy, sys
from torch.utils.data import Subset
sys.path.insert(0, os.path.join(os.getcwd(), "code"))
try:
    import tensorboardX
except ImportError:  # the same SummaryWriter, shipped with torch
    import torch.utils.tensorboard
    sys.modules["tensorboardX"] = torch.utils.tensorboard
if os.environ.get("BENCH_SYNTHETIC_CIFAR"):  # random images in the real format: their checksums differ
    import torchvision.datasets.cifar
    torchvision.datasets.cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
import datasets
_get_dataset = datasets.get_dataset
def get_dataset(dataset, split):
    data = _get_dataset(dataset, split)
    limit = int(os.environ["BENCH_TEST_SUBSET" if split == "test" else "BENCH_TRAIN_SUBSET"])
    return Subset(data, range(min(limit, len(data))))
datasets.get_dataset = get_dataset
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-subset", type=positive_int, default=2048, help="training images in the epoch")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--methods", default=",".join(m[0] for m in METHODS),
                        help="comma-separated subset of: " + ", ".join(m[0] for m in METHODS))
    parser.add_argument("--timeout", type=positive_int, default=1800, help="seconds allowed per run")
    parser.add_argument("--test-subset", type=positive_int, default=1, help="test images in the noisy test pass")
    parser.add_argument("--baseline", default=None, metavar="PATH",
                        help="compare with another checkout of this repository in PATH (e.g. `git worktree add "
                             "PATH REV`), side by side: does a change make training slower?")
    parser.add_argument("--published", default=None, metavar="PATH",
                        help="compare with the published code in PATH (its code/train_*.py), side by side")
    return parser


def select_methods(text: str, table):
    """The rows of ``table`` named in the comma-separated ``text``, in the table's order; unknown names refused."""
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(wanted) - {row[0] for row in table})
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(row[0] for row in table)}")
    return [row for row in table if row[0] in wanted]


def random_targets(folder: str, rows: int = 60000) -> str:
    """Random Dirichlet CAT-RS targets pi (rows x 10, the same file for both sides), saved in ``folder``."""
    path = os.path.join(folder, "model_conf_0.25_train.npy")
    np.save(path, np.random.default_rng(0).dirichlet(np.ones(10), size=rows).astype(np.float32))
    return path


def epoch_times(log_path: str, epochs: int) -> list:
    """The ``time`` column of a run's log.txt, which must hold ``epochs`` rows."""
    with open(log_path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if len(rows) != epochs:
        raise RuntimeError(f"expected {epochs} epoch(s) in {log_path}, found {len(rows)}")
    return [float(row["time"]) for row in rows]


def epoch_seconds(log_path: str) -> float:
    return epoch_times(log_path, 1)[0]


def run_env(threads: int, **extra: str) -> dict:
    """The environment of one run: ``threads`` intra-op threads, the ``extra`` variables, and the
    repository's data cache unless DATASET_CACHE names another (the published code reads ./dataset_cache)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra)
    env.setdefault("DATASET_CACHE", os.path.join(REPO, "dataset_cache"))
    return env


def run_script(command, cwd: str, env: dict, timeout: int, label: str, stderr_tail: int = 300):
    """Run one training script to its end; a failure raises RuntimeError with the end of its stderr."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed ({done.returncode}): {done.stderr.strip()[-stderr_tail:]}")


def run_once(name, script, options, args, workdir, run_id, smooth_prediction, repo=REPO):
    """One epoch of ``script`` of the checkout ``repo`` (this one by default); its seconds per epoch."""
    command = [sys.executable, os.path.join(repo, "code", script), "fmnist", "lenet", "--lr", "0.01",
               "--epochs", "1", "--train-subset", str(args.train_subset), "--test-subset", str(args.test_subset),
               "--workers", "0",
               "--seed", "0", "--id", str(run_id), "--logdir", workdir, "--print-freq", "1000000"] + options
    if name == "catrs":
        command += ["--smooth-prediction", smooth_prediction]
    run_script(command, repo, run_env(args.threads), args.timeout, script)
    return epoch_seconds(find_log(os.path.join(workdir, "fmnist"), script, run_id))


def find_log(root_dir, script, run_id, arch="lenet"):
    logs = [os.path.join(root, "log.txt") for root, _, files in os.walk(root_dir)
            if "log.txt" in files and root.endswith(os.path.join(arch, str(run_id)))]
    if len(logs) != 1:
        raise RuntimeError(f"{script}: cannot find the run's log.txt under {root_dir}")
    return logs[0]


def published_code_dir(path: str) -> str:
    """The folder with the published train_*.py scripts: PATH/code or PATH itself."""
    for candidate in (os.path.join(path, "code"), path):
        if os.path.isfile(os.path.join(candidate, "train_cohen.py")):
            return candidate
    raise UserError(f"--published '{path}' holds no train_cohen.py (nor code/train_cohen.py); "
                    "give the folder of the published repository")


# Where the published datasets.py looks: data folders under ./dataset_cache (torchvision names a folder after
# its class, so the published CAT-RS split of Fashion-MNIST reads FMNIST_Targeted) and the CAT-RS targets.
PUBLISHED_DATA = {
    "fmnist": (("FashionMNIST", {"FashionMNIST": "FashionMNIST", "FMNIST_Targeted": "FashionMNIST"}),
               "test/smooth_prediction/fmnist/0/model_conf_0.25_train.npy"),
    "cifar10": (("cifar-10-batches-py", {"cifar-10-batches-py": "cifar-10-batches-py"}),
                "test/smooth_prediction/cifar10/cohen/0/model_conf_0.25_train.npy"),
}


def prepare_published(code_dir, workdir, smooth_prediction, dataset="fmnist", cache=None):
    """A temporary run folder for the published scripts (see the module docstring); returns its path."""
    root = os.path.join(workdir, "published")
    shutil.copytree(code_dir, os.path.join(root, "code"), ignore=shutil.ignore_patterns("__pycache__"))
    cache = os.path.abspath(cache or os.environ.get("DATASET_CACHE", os.path.join(REPO, "dataset_cache")))
    (folder, links), targets = PUBLISHED_DATA[dataset]
    if not os.path.isdir(os.path.join(cache, folder)):
        raise UserError(f"no {folder} folder in the data cache '{cache}'; set DATASET_CACHE")
    os.makedirs(os.path.join(root, "dataset_cache"))
    for name, target in links.items():
        os.symlink(os.path.join(cache, target), os.path.join(root, "dataset_cache", name))
    os.makedirs(os.path.dirname(os.path.join(root, targets)))
    shutil.copy(smooth_prediction, os.path.join(root, targets))
    with open(os.path.join(root, "run_subset.py"), "w") as handle:
        handle.write(PUBLISHED_LAUNCHER)
    return root


def run_published(script, options, args, root, run_id):
    command = [sys.executable, "run_subset.py", os.path.join("code", script), "fmnist", "lenet", "--lr", "0.01",
               "--epochs", "1", "--workers", "0", "--id", str(run_id), "--print-freq", "1000000"] + options
    env = run_env(args.threads, BENCH_TRAIN_SUBSET=str(args.train_subset), BENCH_TEST_SUBSET=str(args.test_subset))
    run_script(command, root, env, args.timeout, f"published {script}")
    return epoch_seconds(find_log(os.path.join(root, "logs", "fmnist"), script, run_id))


def main(argv=None):
    run_cli(lambda: benchmark(build_parser().parse_args(argv)))


def load_text() -> str:
    return "load average " + ", ".join(f"{value:.1f}" for value in os.getloadavg())


def side_by_side(args, methods, other: str, run_other, description: str):
    """``other`` and ours, alternately, one epoch per method and repeat; ratio = other s/epoch / ours.

    ``run_other(name, script, options, workdir, run_id, smooth_prediction)`` times the other side's epoch.
    """
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  OMP_NUM_THREADS={args.threads}  "
          f"fmnist lenet --lr 0.01, --train-subset {args.train_subset} --test-subset {args.test_subset}, "
          f"one epoch, {args.repeats} repeats, {description}; {load_text()}", flush=True)
    times = {name: {other: [], "ours": []} for name, _, _ in methods}
    errors = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
        smooth_prediction = random_targets(workdir)
        run_id = 0
        for repeat in range(args.repeats):
            for name, script, options in methods:
                for side in ([other, "ours"] if repeat % 2 == 0 else ["ours", other]):
                    if name in errors:
                        continue
                    run_id += 1
                    try:
                        if side == other:
                            seconds = run_other(name, script, options, workdir, run_id, smooth_prediction)
                        else:
                            seconds = run_once(name, script, options, args, workdir, run_id, smooth_prediction)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        errors[name] = f"{side}: " + (str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)
                        continue
                    times[name][side].append(seconds)
                    print(f"#   repeat {repeat} {name} {side}: {seconds:.2f} s ({load_text()})", flush=True)

    def cells(name, _script):
        theirs, ours = times[name][other], times[name]["ours"]
        ratios = [p / o for p, o in zip(theirs, ours)]
        return [f"{statistics.median(theirs):.2f}", f"{statistics.median(ours):.2f}",
                f"{statistics.median(ratios):.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}x"]
    print_method_table([f"{other} s/epoch", "ours s/epoch", f"ours vs {other} (speed)", "min-max"], methods,
                       errors, cells)
    print(f"# finished {datetime.datetime.now().isoformat(timespec='seconds')}; {load_text()}")


def compare_with_published(args):
    """The published scripts against ours (sigma 0.5, the same options on both sides)."""
    code_dir = published_code_dir(args.published)
    roots = {}

    def run_published_side(name, script, options, workdir, run_id, smooth_prediction):
        if workdir not in roots:   # one prepared folder for the published scripts per benchmark
            roots[workdir] = prepare_published(code_dir, workdir, smooth_prediction)
        return run_published(script, options, args, roots[workdir], run_id)
    side_by_side(args, select_methods(args.methods, COMPARISON), "published", run_published_side,
                 f"published code from {code_dir}")


def compare_with_baseline(args):
    """Another checkout of this repository against this one (the options of the throughput table)."""
    baseline = os.path.abspath(args.baseline)

    def run_baseline(name, script, options, workdir, run_id, smooth_prediction):
        return run_once(name, script, options, args, workdir, run_id, smooth_prediction, baseline)
    side_by_side(args, select_methods(args.methods, METHODS), "baseline", run_baseline, f"baseline {baseline}")


def benchmark(args):
    if args.published is not None:
        return compare_with_published(args)
    if args.baseline is not None:
        return compare_with_baseline(args)
    methods = select_methods(args.methods, METHODS)
    present = [m for m in methods if os.path.isfile(os.path.join(REPO, "code", m[1]))]
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  OMP_NUM_THREADS={args.threads}  "
          f"fmnist lenet, --train-subset {args.train_subset}, one epoch, {args.repeats} repeats", flush=True)
    seconds = {m[0]: [] for m in present}
    errors = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
        smooth_prediction = random_targets(workdir)
        run_id = 0
        for repeat in range(args.repeats):
            for name, script, options in present:
                if name in errors:
                    continue
                run_id += 1
                try:
                    seconds[name].append(run_once(name, script, options, args, workdir, run_id, smooth_prediction))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    errors[name] = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
    def cells(name, script):
        if not seconds.get(name):
            return [f"missing ({script} not found)", "", ""]
        rates = [args.train_subset / s for s in seconds[name]]
        return [f"{statistics.median(rates):.0f}", f"{min(rates):.0f}-{max(rates):.0f}",
                f"{statistics.median(seconds[name]):.2f}"]
    print_method_table(["examples/s", "min-max", "s per epoch"], methods, errors, cells)


def print_method_table(columns, methods, errors, cells):
    """A markdown table with a row per method: its name, options and ``cells(name, script)``.

    A method in ``errors`` gets "failed: ..." instead; ``cells`` returning None leaves the method out.
    """
    print("| method | options | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 2))
    for name, script, options in methods:
        row = [f"failed: {errors[name]}"] + [""] * (len(columns) - 1) if name in errors else cells(name, script)
        if row is not None:
            print(f"| {name} | {' '.join(options)} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
