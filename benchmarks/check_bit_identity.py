"""Whether a change to the training code moves any number: the SHA-256 of each method's trained weights.

For each configuration in ``RUNS`` (every training method, some in variants that reach other code:
SmoothAdv's PGD, DDN and gradient-free PGD, consistency with and without its attack, a loader on the
host, more epochs where the epoch changes the step) the real script trains LeNet from ``--seed 0`` on
the first ``--train-subset`` Fashion-MNIST images on the CPU. The output, one JSON object, holds per
configuration the SHA-256 of the final checkpoint's ``state_dict`` tensors (raw bytes, in key order)
and of the optimizer's momentum buffers, the rows of ``log.txt`` without the epoch-time column, and
the TensorBoard scalars of each epoch (train and test loss and accuracy, in float32, more digits than
``log.txt`` keeps). Two outputs of the same torch build are equal exactly when no number moved:

    OMP_NUM_THREADS=1 python benchmarks/check_bit_identity.py --out /tmp/before.json
    (change the code)
    OMP_NUM_THREADS=1 python benchmarks/check_bit_identity.py --compare /tmp/before.json

Against a commit before copy-major became the one layout of the noisy copies (``attacks.py``), the
SmoothAdv runs with two or more noise copies and the MACER runs differ: each copy gets another noise
draw (the loss on the same noise values is unchanged); the other runs stay identical.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "code"))
from common import ArgumentParser, UserError, positive_int, run_cli  # noqa: E402

# name, script, method options (small: few attack steps and noise copies)
RUNS = [
    ("cohen", "train_cohen.py", ["--noise", "0.25"]),
    ("cohen_host_loader", "train_cohen.py", ["--noise", "0.5", "--data-on-device", "no", "--channels-last", "no"]),
    ("stab", "train_stab.py", ["--noise", "0.25", "--lbd", "2.0"]),
    ("salman_ddn", "train_salman.py", ["--noise", "0.25", "--num-steps", "2", "--num-noise-vec", "2"]),
    ("salman_pgd", "train_salman.py", ["--noise", "0.25", "--attack", "PGD", "--epsilon", "256", "--num-steps", "2",
                                       "--warmup", "2", "--num-noise-vec", "2"]),
    ("salman_pgd_m1", "train_salman.py", ["--noise", "0.25", "--attack", "PGD", "--num-steps", "2"]),
    ("salman_pgd_no_grad", "train_salman.py", ["--noise", "0.25", "--attack", "PGD", "--num-steps", "2",
                                               "--num-noise-vec", "2", "--no-grad-attack"]),
    ("macer", "train_macer.py", ["--noise", "0.5", "--num-noise-vec", "4", "--lbd", "12.0"]),
    ("consistency", "train_consistency.py", ["--noise", "0.25", "--num-noise-vec", "2", "--lbd", "20"]),
    ("consistency_adv", "train_consistency.py", ["--noise", "0.25", "--num-noise-vec", "2", "--lbd", "10",
                                                 "--adv-training", "--num-steps", "2", "--warmup", "2"]),
    ("smoothmix", "train_smoothmix.py", ["--noise", "0.5", "--num-noise-vec", "2", "--num-steps", "2",
                                         "--mix_step", "1", "--eta", "5.0", "--warmup", "2"]),
    ("catrs", "train_catrs.py", ["--noise", "0.25", "--num-noise-vec", "2", "--eps", "256", "--num-steps", "2",
                                 "--lbd", "0.5"]),
    ("catrs_mask", "train_catrs.py", ["--noise", "0.25", "--num-noise-vec", "4", "--eps", "128", "--num-steps", "1",
                                      "--confidence_mask", "--warmup", "0"]),
    # more epochs, so that what changes with the epoch (warm-up, deferred loss, dropped rate) is reached
    ("catrs_2_epochs", "train_catrs.py", ["--epochs", "2", "--noise", "0.25", "--num-noise-vec", "2", "--num-steps",
                                          "1", "--warmup", "1", "--lr_drop", "1"]),
    ("smoothmix_2_epochs", "train_smoothmix.py", ["--epochs", "2", "--noise", "0.25", "--num-noise-vec", "2",
                                                  "--num-steps", "2", "--mix_step", "1", "--warmup", "2"]),
    ("salman_2_epochs", "train_salman.py", ["--epochs", "2", "--noise", "0.25", "--attack", "PGD", "--num-steps",
                                            "1", "--warmup", "2", "--num-noise-vec", "2"]),
    ("macer_3_epochs", "train_macer.py", ["--epochs", "3", "--noise", "0.25", "--num-noise-vec", "2", "--deferred",
                                          "--lr_step_size", "1"]),
]


SCALARS = ("loss/train", "accuracy/train", "loss/test", "accuracy/test")


def tensors_sha256(tensors) -> str:
    """SHA-256 over the raw bytes of the tensors, in order (each made contiguous on the CPU)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def summarize(folder: str) -> dict:
    checkpoint = torch.load(os.path.join(folder, "checkpoint.pth.tar"), weights_only=True)
    state = checkpoint["state_dict"]
    momenta = [s["momentum_buffer"] for _, s in sorted(checkpoint["optimizer"]["state"].items())]
    with open(os.path.join(folder, "log.txt")) as handle:
        rows = ["\t".join(c for i, c in enumerate(line.rstrip("\n").split("\t")) if i != 1) for line in handle]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(folder)
    events.Reload()
    scalars = {tag: [event.value for event in events.Scalars(tag)] for tag in SCALARS}
    return {"weights": tensors_sha256(state[key] for key in state), "keys": list(state),
            "momentum": tensors_sha256(momenta), "log": rows, "scalars": scalars}


def run_all(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("DATASET_CACHE", os.path.join(REPO, "dataset_cache"))
    results = {"torch": torch.__version__}
    with tempfile.TemporaryDirectory() as workdir:
        targets = os.path.join(workdir, "pi.npy")
        np.save(targets, np.random.default_rng(0).dirichlet(np.ones(10), size=60000).astype(np.float32))
        for run_id, (name, script, options) in enumerate(RUNS):
            if args.only and name not in args.only:
                continue
            command = [sys.executable, os.path.join(REPO, "code", script), "fmnist", "lenet", "--epochs", "1",
                       "--seed", "0", "--batch", "64", "--lr", "0.01", "--train-subset", str(args.train_subset),
                       "--test-subset", str(args.test_subset), "--workers", "0", "--print-freq", "1000000",
                       "--id", str(run_id), "--logdir", workdir] + options
            if script == "train_catrs.py":
                command += ["--smooth-prediction", targets]
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f"{name} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            folder = done.stdout.strip().splitlines()[-1].split("run folder: ")[-1]
            results[name] = summarize(folder)
            print(f"{name}: {results[name]['weights'][:16]}", file=sys.stderr, flush=True)
    return results


def compare(results: dict, path: str) -> bool:
    with open(path) as handle:
        expected = json.load(handle)
    same = True
    for name in results:
        if name == "torch":
            continue
        verdict = "identical" if results[name] == expected.get(name) else "DIFFERENT"
        same &= verdict == "identical"
        print(f"{name}: {verdict}")
    if results["torch"] != expected.get("torch"):
        print(f"note: torch {results['torch']} here, {expected.get('torch')} in {path}")
    return same


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-subset", type=positive_int, default=512)
    parser.add_argument("--test-subset", type=positive_int, default=256)
    parser.add_argument("--only", nargs="*", default=None, help="names of the runs to make (default: all)")
    parser.add_argument("--out", default=None, help="write the JSON here (default: standard output)")
    parser.add_argument("--compare", default=None, metavar="JSON", help="compare with an earlier output")
    args = parser.parse_args(argv)

    def work():
        results = run_all(args)
        text = json.dumps(results, indent=1)
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(text + "\n")
        elif not args.compare:
            print(text)
        if args.compare and not compare(results, args.compare):
            sys.exit(1)
    run_cli(work)


if __name__ == "__main__":
    main()
