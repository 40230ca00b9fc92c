"""Seconds per epoch of a training method on CIFAR-10 with ResNet-110 (a GPU benchmark).

Runs the method's script as the published CIFAR-10 command does (``--lr 0.1
--batch 256``, the method options of ``bench_train.METHODS``; by default
CAT-RS: sigma 0.25, m = 4, eps 256, 4 steps, lbd 0.5) for one epoch, once per
``--variant`` of our options, and, with ``--published PATH``, the published
script with the same options (see ``bench_train``: it runs unmodified, from a
temporary folder). The time is the ``time`` column of each run's
``log.txt``: the training epoch plus the noisy test pass, as in the
published logs (the published CAT-RS CIFAR-10 sigma 0.25 log reads 352 to
355 s per epoch). With ``--epochs N`` each run trains N epochs and the
table gives the last one's time: a run's first epoch also holds one-off
work (cuDNN's timed choice of kernels, ``--compile``'s compilation), which a
150-epoch run pays once. Runs take turns, in an order that switches every
repeat.

CIFAR-10 is read from the data cache; ``--synthetic`` (or a cache without
CIFAR-10) writes random images and labels in the real format to a temporary
cache instead: the arithmetic of an epoch does not depend on the pixels, so
the timing holds, but the accuracies of such runs mean nothing. The CAT-RS
targets are random Dirichlet draws either way.

    python benchmarks/bench_train_cifar.py --synthetic --published /path/to/published \\
        --variant fast="--bf16 --channels-last yes --data-on-device yes" --variant plain="--channels-last no"
"""
import datetime
import os
import pickle
import shlex
import statistics
import sys
import tempfile

import numpy as np

from bench_train import (METHODS, REPO, epoch_times, find_log, prepare_published, published_code_dir,
                         random_targets, run_script)

sys.path.insert(0, os.path.join(REPO, "code"))
from common import ArgumentParser, UserError, positive_int, run_cli  # noqa: E402

ARCH = "cifar_resnet110"


def write_synthetic_cifar10(folder: str, train: int = 50000, test: int = 10000, seed: int = 0):
    """Random uint8 images and labels in the python-pickle format of the CIFAR-10 archive."""
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    sizes = {f"data_batch_{i}": train // 5 for i in range(1, 6)}
    sizes["test_batch"] = test
    for name, n in sizes.items():
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump({"batch_label": name, "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                         "labels": [int(v) for v in rng.integers(0, 10, size=n)]}, handle, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": train // 5,
                     "num_vis": 3072}, handle, protocol=2)


def parse_variant(text: str):
    name, sep, options = text.partition("=")
    if not sep or not name:
        raise UserError(f"--variant '{text}' is not NAME=OPTIONS; e.g. --variant fast=\"--bf16\"")
    return name, shlex.split(options)


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="catrs", choices=[m[0] for m in METHODS])
    parser.add_argument("--variant", action="append", type=parse_variant, default=None, metavar="NAME=OPTIONS",
                        help="our script with these extra options (repeatable; default: fast = bf16, "
                             "channels-last, data on the device)")
    parser.add_argument("--published", default=None, metavar="PATH", help="also time the published script")
    parser.add_argument("--train-subset", type=positive_int, default=None, help="training images (default: all)")
    parser.add_argument("--test-subset", type=positive_int, default=None, help="test images (default: all)")
    parser.add_argument("--workers", type=int, default=4, help="loader processes (both sides)")
    parser.add_argument("--epochs", type=positive_int, default=1,
                        help="epochs per run; the table gives the last epoch's time")
    parser.add_argument("--repeats", type=positive_int, default=1)
    parser.add_argument("--synthetic", action="store_true", help="random images in the CIFAR-10 format")
    parser.add_argument("--timeout", type=positive_int, default=3600, help="seconds allowed per run")
    return parser


def run(command, cwd, env, timeout, log_root, run_id, label, epochs):
    run_script(command, cwd, env, timeout, label, stderr_tail=500)
    return epoch_times(find_log(log_root, label, run_id, arch=ARCH), epochs)


def benchmark(args):
    name, script, options = next(m for m in METHODS if m[0] == args.method)
    variants = args.variant or [("fast", ["--bf16", "--channels-last", "yes", "--data-on-device", "yes"])]
    common_options = ["--lr", "0.1", "--batch", "256", "--epochs", str(args.epochs), "--workers", str(args.workers),
                      "--print-freq", "1000000"] + options
    with tempfile.TemporaryDirectory(prefix="bench_train_cifar_") as workdir:
        cache = os.path.abspath(os.environ.get("DATASET_CACHE", os.path.join(REPO, "dataset_cache")))
        synthetic = args.synthetic or not os.path.isdir(os.path.join(cache, "cifar-10-batches-py"))
        if synthetic:
            cache = os.path.join(workdir, "dataset_cache")
            write_synthetic_cifar10(os.path.join(cache, "cifar-10-batches-py"))
        targets = random_targets(workdir, rows=50000)
        env = dict(os.environ, DATASET_CACHE=cache)
        if synthetic:
            env["BENCH_SYNTHETIC_CIFAR"] = "1"
        root = None
        if args.published:
            root = prepare_published(published_code_dir(args.published), workdir, targets, "cifar10", cache)
        subset = (["--train-subset", str(args.train_subset)] if args.train_subset else []) + \
                 (["--test-subset", str(args.test_subset)] if args.test_subset else [])
        published_env = dict(env, BENCH_TRAIN_SUBSET=str(args.train_subset or 50000),
                             BENCH_TEST_SUBSET=str(args.test_subset or 10000))
        print(f"# {datetime.datetime.now().isoformat(timespec='seconds')} {name} cifar10 {ARCH} "
              f"{' '.join(common_options)}; train images {args.train_subset or 50000}, test images "
              f"{args.test_subset or 10000}{', synthetic images' if synthetic else ''}", flush=True)
        runs = ([("published", None)] if root else []) + [(label, extra) for label, extra in variants]
        times = {label: [] for label, _ in runs}
        first = {label: [] for label, _ in runs}
        run_id = 0
        for repeat in range(args.repeats):
            for label, extra in (runs if repeat % 2 == 0 else runs[::-1]):
                run_id += 1
                if extra is None:
                    command = [sys.executable, "run_subset.py", os.path.join("code", script), "cifar10", ARCH,
                               "--id", str(run_id)] + common_options
                    seconds = run(command, root, published_env, args.timeout, os.path.join(root, "logs"),
                                  run_id, "published " + script, args.epochs)
                else:
                    command = [sys.executable, os.path.join(REPO, "code", script), "cifar10", ARCH,
                               "--id", str(run_id), "--seed", "0", "--logdir", os.path.join(workdir, "ours"),
                               "--smooth-prediction", targets] + common_options + subset + extra
                    seconds = run(command, REPO, env, args.timeout, os.path.join(workdir, "ours"), run_id, script,
                                  args.epochs)
                times[label].append(seconds[-1])
                first[label].append(seconds[0])
                print(f"#   repeat {repeat} {label}: {', '.join(f'{s:.1f}' for s in seconds)} s", flush=True)
    published = statistics.median(times["published"]) if root else None
    last = "s per epoch" if args.epochs == 1 else f"s in epoch {args.epochs - 1} | s in epoch 0"
    print(f"| run | extra options | {last} | ratio vs published (speed) |")
    print("|---|---|---|---|" + ("---|" if args.epochs > 1 else ""))
    for label, extra in runs:
        seconds = statistics.median(times[label])
        ratio = f"{published / seconds:.2f}x" if published else ""
        shown = "(published code)" if extra is None else " ".join(extra)
        epoch0 = f" {statistics.median(first[label]):.1f} |" if args.epochs > 1 else ""
        print(f"| {label} | {shown} | {seconds:.1f} |{epoch0} {ratio} |")


def main(argv=None):
    run_cli(lambda: benchmark(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
