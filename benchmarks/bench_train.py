"""Training throughput (examples/s) of every training method on LeNet / Fashion-MNIST.

Each method's script runs as it would from the command line, for one epoch
on the first ``--train-subset`` training images (one test image), with the
method options of the published CIFAR-10 commands (SPEC section 7; MACER
without ``--deferred`` so that its robustness term is part of the epoch).
The epoch time is read from the ``time`` column of the run's ``log.txt``
(training plus a one-image test pass; start-up is not included). Scripts
that do not exist are reported as missing. The methods take turns within
each repeat; the table gives the median over the repeats.

    python benchmarks/bench_train.py --train-subset 2048 --repeats 3 --threads 2
"""
import csv
import datetime
import os
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


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-subset", type=positive_int, default=2048, help="training images in the epoch")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--methods", default=",".join(m[0] for m in METHODS),
                        help="comma-separated subset of: " + ", ".join(m[0] for m in METHODS))
    parser.add_argument("--timeout", type=positive_int, default=1800, help="seconds allowed per run")
    return parser


def epoch_seconds(log_path: str) -> float:
    with open(log_path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if len(rows) != 1:
        raise RuntimeError(f"expected one epoch in {log_path}, found {len(rows)}")
    return float(rows[0]["time"])


def run_once(name, script, options, args, workdir, run_id, smooth_prediction):
    command = [sys.executable, os.path.join(REPO, "code", script), "fmnist", "lenet", "--lr", "0.01",
               "--epochs", "1", "--train-subset", str(args.train_subset), "--test-subset", "1", "--workers", "0",
               "--seed", "0", "--id", str(run_id), "--logdir", workdir, "--print-freq", "1000000"] + options
    if name == "catrs":
        command += ["--smooth-prediction", smooth_prediction]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("DATASET_CACHE", os.path.join(REPO, "dataset_cache"))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    logs = [os.path.join(root, "log.txt") for root, _, files in os.walk(os.path.join(workdir, "fmnist"))
            if "log.txt" in files and root.endswith(os.path.join("lenet", str(run_id)))]
    if len(logs) != 1:
        raise RuntimeError(f"{script}: cannot find the run's log.txt under {workdir}")
    return epoch_seconds(logs[0])


def main(argv=None):
    run_cli(lambda: benchmark(build_parser().parse_args(argv)))


def benchmark(args):
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {m[0] for m in METHODS})
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(m[0] for m in METHODS)}")
    methods = [m for m in METHODS if m[0] in wanted]
    present = [m for m in methods if os.path.isfile(os.path.join(REPO, "code", m[1]))]
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  OMP_NUM_THREADS={args.threads}  "
          f"fmnist lenet, --train-subset {args.train_subset}, one epoch, {args.repeats} repeats", flush=True)
    seconds = {m[0]: [] for m in present}
    errors = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
        smooth_prediction = os.path.join(workdir, "model_conf_0.25_train.npy")
        rng = np.random.default_rng(0)
        np.save(smooth_prediction, rng.dirichlet(np.ones(10), size=60000).astype(np.float32))
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
    print("| method | options | examples/s | min-max | s per epoch |")
    print("|---|---|---|---|---|")
    for name, script, options in methods:
        shown = " ".join(options)
        if name in errors:
            print(f"| {name} | {shown} | failed: {errors[name]} | | |")
        elif not seconds.get(name):
            print(f"| {name} | {shown} | missing ({script} not found) | | |")
        else:
            rates = [args.train_subset / s for s in seconds[name]]
            print(f"| {name} | {shown} | {statistics.median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} | "
                  f"{statistics.median(seconds[name]):.2f} |")


if __name__ == "__main__":
    main()
