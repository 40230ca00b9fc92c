"""Final noisy test accuracy of every training method, ours and the published code, side by side.

For every method the published script and ours train LeNet on the same
first ``--train-subset`` Fashion-MNIST training images for ``--epochs``
epochs with the same options (``bench_train.COMPARISON``, sigma 0.5; for
SmoothAdv fewer noise copies and attack steps and a two-epoch warm-up, see
``OVERRIDES``), once per seed, alternately (which side goes first switches
every seed). The number recorded is the last row's ``test acc`` of the run's
``log.txt``: accuracy (%) on the first ``--test-subset`` test images under
N(0, sigma^2) noise after the last epoch. The table gives mean and sample
standard deviation per side, and the difference of the means.

Seeds: our scripts take ``--seed``. The published scripts take no seed and
seed nothing; they run through the launcher of ``bench_train.py`` (first N
examples, unmodified scripts in a temporary folder) behind a small wrapper
that calls ``random.seed``, ``numpy.random.seed`` and ``torch.manual_seed``
with the seed before the script starts, so that their weight
initialisation, data order and noise are drawn from a seeded generator.
The same seed does not give the same draws on both sides (the scripts
consume the generators differently); the comparison is between the two
distributions over seeds.

    python benchmarks/bench_accuracy.py --published /path/to/published --seeds 3 \
        --train-subset 2000 --test-subset 1000 --epochs 2 --lr 0.05 --batch 64 --threads 1
"""
import csv
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import (COMPARISON, REPO, find_log, load_text, prepare_published, print_method_table,  # noqa: E402
                         published_code_dir, random_targets, run_env, run_script, select_methods)
from common import (ArgumentParser, UserError, nonnegative_int, positive_float, positive_int,  # noqa: E402
                    run_cli)

# Cheaper SmoothAdv for an accuracy comparison that fits a short run: 2 noise copies, 4 PGD steps, and a
# warm-up over the 2 epochs (epsilon 128/256 in the first, 256/256 in the second).
OVERRIDES = {
    "salman": ["--noise_sd", "0.5", "--attack", "PGD", "--epsilon", "256", "--num-steps", "4", "--warmup", "2",
               "--num-noise-vec", "2"],
}

# Seeds the published script's generators, then hands over to bench_train's subset launcher.
SEEDED_LAUNCHER = """import os, random, runpy, sys
import numpy, torch
seed = int(os.environ["BENCH_SEED"])
random.seed(seed)
numpy.random.seed(seed)
torch.manual_seed(seed)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--published", metavar="PATH",
                        help="the published code (PATH holds its code/train_*.py); required unless --summarise")
    parser.add_argument("--summarise", nargs="+", metavar="OUTPUT",
                        help="print the table of earlier outputs of this script instead of training: their "
                             "per-run lines, pooled; the outputs must have the same settings (all but the seeds) "
                             "and no method, seed and side twice")
    parser.add_argument("--seeds", type=positive_int, default=3, help="how many seeds on each side")
    parser.add_argument("--first-seed", type=nonnegative_int, default=0,
                        help="seeds --first-seed .. --first-seed + --seeds - 1 (to add seeds to an earlier run)")
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--train-subset", type=positive_int, default=2000, help="training images")
    parser.add_argument("--test-subset", type=positive_int, default=1000, help="test images of the noisy test")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="learning rate on both sides")
    parser.add_argument("--batch", type=positive_int, default=64,
                        help="batch size on both sides (smaller than the default 256: more steps in a short run)")
    parser.add_argument("--threads", type=positive_int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--methods", default=",".join(m[0] for m in COMPARISON),
                        help="comma-separated subset of: " + ", ".join(m[0] for m in COMPARISON))
    parser.add_argument("--timeout", type=positive_int, default=3600, help="seconds allowed per run")
    return parser


def final_test_accuracy(log_path: str, epochs: int) -> float:
    """The last row's ``test acc``; the log must hold exactly ``epochs`` rows (no mixed or partial runs)."""
    with open(log_path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if len(rows) != epochs:
        raise RuntimeError(f"expected {epochs} epochs in {log_path}, found {len(rows)}")
    return float(rows[-1]["test acc"])


def common_options(args):
    return ["fmnist", "lenet", "--lr", str(args.lr), "--epochs", str(args.epochs), "--batch", str(args.batch),
            "--workers", "0",
            "--print-freq", "1000000"]


def run_ours(name, script, options, args, workdir, run_id, seed, smooth_prediction):
    command = [sys.executable, os.path.join(REPO, "code", script)] + common_options(args) + [
        "--train-subset", str(args.train_subset), "--test-subset", str(args.test_subset), "--seed", str(seed),
        "--id", str(run_id), "--logdir", workdir] + options
    if name == "catrs":
        command += ["--smooth-prediction", smooth_prediction]
    run_script(command, REPO, run_env(args.threads), args.timeout, script)
    return final_test_accuracy(find_log(os.path.join(workdir, "fmnist"), script, run_id), args.epochs)


def run_published(script, options, args, root, run_id, seed):
    command = [sys.executable, "run_seeded.py", "run_subset.py", os.path.join("code", script)] + \
        common_options(args) + ["--id", str(run_id)] + options
    env = run_env(args.threads, BENCH_TRAIN_SUBSET=str(args.train_subset), BENCH_TEST_SUBSET=str(args.test_subset),
                  BENCH_SEED=str(seed))
    run_script(command, root, env, args.timeout, f"published {script}")
    return final_test_accuracy(find_log(os.path.join(root, "logs", "fmnist"), script, run_id), args.epochs)


def summary(values):
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def print_table(methods, accuracy, errors):
    def cells(name, _script):
        published, ours = accuracy[name]["published"], accuracy[name]["ours"]
        if not published or not ours:
            return None
        return [summary(published), summary(ours), f"{statistics.mean(ours) - statistics.mean(published):+.1f}",
                f"{len(published)} / {len(ours)}"]
    print_method_table(["published test acc (mean ± sd)", "ours", "ours - published", "seeds"], methods, errors,
                       cells)


HEADER = re.compile(r"^# \S+  (OMP_NUM_THREADS=.*), seeds \d+\.\.\d+, published code from ")
RUN_LINE = re.compile(r"^#   (\w+) seed (\d+) (published|ours): test acc ([0-9.]+) ")


def summarise(paths):
    """The table of earlier outputs, pooled; refuses outputs of other settings and repeated runs."""
    settings, seen = None, set()
    accuracy = {name: {"published": [], "ours": []} for name, _, _ in COMPARISON}
    for path in paths:
        try:
            with open(path) as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise UserError(f"cannot read --summarise output '{path}': {exc.strerror}") from None
        header = HEADER.match(lines[0]) if lines else None
        if header is None:
            raise UserError(f"'{path}' does not start with the header line of a bench_accuracy.py output")
        if settings not in (None, header.group(1)):
            raise UserError(f"'{path}' was run with other settings ({header.group(1)}) than the outputs before it "
                            f"({settings}); summarise outputs of one setting at a time")
        settings = header.group(1)
        for line in lines:
            run = RUN_LINE.match(line)
            if run is None:
                continue
            name, seed, side, acc = run.group(1), int(run.group(2)), run.group(3), float(run.group(4))
            if (name, seed, side) in seen:
                raise UserError(f"'{path}' repeats {name} seed {seed} {side}; give each run once")
            seen.add((name, seed, side))
            accuracy[name][side].append(acc)
    print(f"# {settings}; pooled from {', '.join(paths)}")
    methods = [(name, script, OVERRIDES.get(name, options)) for name, script, options in COMPARISON]
    print_table(methods, accuracy, {})


def compare(args):
    code_dir = published_code_dir(args.published)
    methods = [(name, script, OVERRIDES.get(name, options))
               for name, script, options in select_methods(args.methods, COMPARISON)]
    print(f"# {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  "
          f"OMP_NUM_THREADS={args.threads}  fmnist lenet --lr {args.lr} --epochs {args.epochs} --batch {args.batch}, "
          f"--train-subset {args.train_subset} --test-subset {args.test_subset}, "
          f"seeds {args.first_seed}..{args.first_seed + args.seeds - 1}, "
          f"published code from {code_dir}; {load_text()}", flush=True)
    accuracy = {name: {"published": [], "ours": []} for name, _, _ in methods}
    errors = {}
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as workdir:
        smooth_prediction = random_targets(workdir)
        root = prepare_published(code_dir, workdir, smooth_prediction)
        with open(os.path.join(root, "run_seeded.py"), "w") as handle:
            handle.write(SEEDED_LAUNCHER)
        run_id = 0
        for name, script, options in methods:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for side in (["published", "ours"] if seed % 2 == 0 else ["ours", "published"]):
                    if name in errors:
                        continue
                    run_id += 1
                    try:
                        if side == "published":
                            acc = run_published(script, options, args, root, run_id, seed)
                        else:
                            acc = run_ours(name, script, options, args, workdir, run_id, seed, smooth_prediction)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        errors[name] = f"{side}: " + (str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)
                        continue
                    accuracy[name][side].append(acc)
                    print(f"#   {name} seed {seed} {side}: test acc {acc:.1f} "
                          f"({datetime.datetime.now(datetime.timezone.utc).strftime('%H:%M:%S')}, {load_text()})",
                          flush=True)
    print_table(methods, accuracy, errors)
    print(f"# finished {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; {load_text()}")


def benchmark(args):
    if args.summarise:
        return summarise(args.summarise)
    if args.published is None:
        raise UserError("give --published PATH (the published code) to train, or --summarise OUTPUT ... to "
                        "tabulate earlier outputs")
    return compare(args)


def main(argv=None):
    run_cli(lambda: benchmark(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
