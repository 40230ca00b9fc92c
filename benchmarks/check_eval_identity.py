"""Rows do not move: SHA-256 of every evaluation script's output on a fixed model, for before/after a refactor.

    OMP_NUM_THREADS=1 python benchmarks/check_eval_identity.py [--out DIR] > hashes.txt

Builds a small LeNet deterministically (seed 0, one epoch of noisy SGD on the
first 256 Fashion-MNIST training images; no train_*.py involved), then runs,
each with ``--seed 0`` on 20 test images (``--skip 500``) with small N:
certify.py (fixed-N; ``--sequential --radii``; ``--sequential`` for ACR),
predict.py (fixed-N; ``--sequential``), smooth_prediction.py and certify_c.py
(on two MNIST-C-shaped corruption folders cut from the test set). It prints
one line per output: the SHA-256 of the TSV without its ``time`` column, of
smooth_prediction's ``.npy`` (and coverage), and of each settings record's
``settings`` (sorted JSON) and ``environment`` keys. Two runs of the same
code on the same machine print the same lines; a refactor that moves no
number prints them too.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(REPO, "code")
sys.path.insert(0, CODE)
os.environ.setdefault("DATASET_CACHE", os.path.join(REPO, "dataset_cache"))

from architectures import get_architecture  # noqa: E402
from datasets import get_dataset  # noqa: E402

SIGMA = "0.25"
SMALL = ["--N", "2000", "--skip", "500", "--batch", "500", "--seed", "0"]


def build_checkpoint(path: str):
    """A LeNet after one epoch of noisy SGD on 256 images: deterministic on one machine and torch version."""
    torch.manual_seed(0)
    model = get_architecture("lenet", "fmnist", "cpu")
    data = get_dataset("fmnist", "train", augment=False)
    xs = torch.stack([data[i][0] for i in range(256)])
    ys = torch.tensor([int(data[i][1]) for i in range(256)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for start in range(0, 256, 32):
        x, y = xs[start:start + 32], ys[start:start + 32]
        loss = torch.nn.functional.cross_entropy(model(x + float(SIGMA) * torch.randn_like(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"epoch": 1, "arch": "lenet", "state_dict": model.state_dict(), "optimizer": {}}, path)


def build_corruptions(folder: str):
    """Two MNIST-C-shaped corruptions (``{name}/test_images.npy``, uint8) of 8 test images each."""
    data = get_dataset("fmnist", "test", augment=False)
    images = np.stack([(data[i][0][0].numpy() * 255).round().astype(np.uint8) for i in range(8)])
    labels = np.array([int(data[i][1]) for i in range(8)], dtype=np.int64)
    for name, transform in (("identity", lambda a: a), ("flip", lambda a: a[:, :, ::-1].copy())):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        np.save(os.path.join(folder, name, "test_images.npy"), transform(images))
        np.save(os.path.join(folder, name, "test_labels.npy"), labels)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tsv_without_time(path: str) -> bytes:
    lines = open(path).read().split("\n")
    column = lines[0].split("\t").index("time")
    return "\n".join("\t".join(f for i, f in enumerate(line.split("\t")) if i != column) if line else line
                     for line in lines).encode()


def report(name: str, path: str):
    if path.endswith(".tsv"):
        print(f"{name:28s} rows        {sha(tsv_without_time(path))}")
    else:
        print(f"{name:28s} npy         {sha(open(path, 'rb').read())}")
    record = json.load(open(path + ".meta.json"))
    print(f"{name:28s} settings    {sha(json.dumps(record['settings'], sort_keys=True).encode())}")
    print(f"{name:28s} environment {sha(' '.join(sorted(record['environment'])).encode())}")


def run(script: str, *arguments: str):
    command = [sys.executable, os.path.join(CODE, script)] + list(arguments)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="folder for the outputs (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="eval_identity_")
    os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, "checkpoint.pth.tar")
    build_checkpoint(checkpoint)
    print(f"{'checkpoint':28s} weights     {sha(open(checkpoint, 'rb').read())}")
    runs = {
        "certify": ("certify.py", "certify.tsv", ["--N0", "100"]),
        "certify --sequential radii": ("certify.py", "seq_radii.tsv",
                                       ["--N0", "100", "--sequential", "--radii", "0.25", "0.5", "0.75"]),
        "certify --sequential ACR": ("certify.py", "seq_acr.tsv", ["--N0", "100", "--sequential"]),
        "predict": ("predict.py", "predict.tsv", []),
        "predict --sequential": ("predict.py", "seq_predict.tsv", ["--sequential"]),
        "smooth_prediction": ("smooth_prediction.py", os.path.join("smooth", "noise_test.tsv"), []),
    }
    for name, (script, outfile, options) in runs.items():
        path = os.path.join(out, outfile)
        run(script, "fmnist", checkpoint, SIGMA, path, *SMALL, *options)
        report(name, path)
    smooth = os.path.join(out, "smooth", f"model_conf_{SIGMA}_test.npy")
    report("smooth_prediction", smooth)
    print(f"{'smooth_prediction':28s} coverage    {sha(open(smooth[:-4] + '.covered.npy', 'rb').read())}")
    corruptions = os.path.join(out, "mnist_c")
    build_corruptions(corruptions)
    for name, options in (("certify_c", []), ("certify_c --sequential", ["--sequential", "--radii", "0.25", "0.5"])):
        prefix = os.path.join(out, name.replace(" --", "_") + "_")
        run("certify_c.py", checkpoint, prefix, "--base_c_path", corruptions, "--sigma", SIGMA, "--N0", "100",
            "--N", "2000", "--skip", "3", "--batch", "500", "--seed", "0", "--corruptions", "identity,flip", *options)
        for corruption in ("flip", "identity"):
            report(f"{name} {corruption}", f"{prefix}{corruption}.tsv")


if __name__ == "__main__":
    main()
