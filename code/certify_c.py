"""Certify the smoothed classifier on corrupted test sets (MNIST-C, CIFAR-10-C).

    python code/certify_c.py CHECKPOINT OUTPREFIX --base_c_path DIR [certify options]

Writes ``{OUTPREFIX}{corruption}.tsv`` for each corruption, in certify.py's
format (``idx`` is the image's position in the corruption's array), with
sigma ``--sigma``; without it, the published default 0.25, and a line that
says so. The layout of DIR decides the data set:

* MNIST-C: ``DIR/{corruption}/test_images.npy`` (uint8, (n, 28, 28, 1) or
  (n, 28, 28)) and ``DIR/{corruption}/test_labels.npy``; by default the 16
  published corruptions; the model must be an MNIST-sized one (lenet).
* CIFAR-10-C: ``DIR/{corruption}.npy`` (uint8, (n, 32, 32, 3); the published
  files hold 5 severities x 10,000 images, so idx // 10000 + 1 is the
  severity) and ``DIR/labels.npy``; by default every ``.npy`` in DIR but
  ``labels.npy``; the model must be a CIFAR-10 one.

``--corruptions a,b`` picks some; ``--sequential`` certifies as certify.py's
does (rows then end with a ``samples`` column). The noise of image idx of a
corruption comes from its own stream (seed, corruption, idx): the files do
not share noise, with or without ``--seed``. Each file is resumable and shared among
torchrun processes like certify.py's (see result_files.py).
"""
import hashlib
import os

import numpy as np
import torch

import checkpoint_info
from certify_rows import certify_images, result_header, row_formatter
from common import ArgumentParser, UserError, positive_float, run_cli
from datasets import get_input_shape
from eval_utils import (ImageSet, add_engine_arguments, add_image_arguments, add_sampling_arguments,
                        add_sequential_arguments, certification_scheme, run_on_image_sets)
from result_files import ResultFile

MNIST_C_CORRUPTIONS = ["identity", "brightness", "dotted_line", "glass_blur", "impulse_noise", "rotate", "shear",
                       "spatter", "translate", "canny_edges", "fog", "motion_blur", "scale", "shot_noise", "stripe",
                       "zigzag"]
CIFAR10_C_LABELS = "labels.npy"


class _NotGiven(float):
    """A default that knows it was not given on the command line (a float equal to the default)."""


# The published script certifies at this sigma when none is given.
PUBLISHED_SIGMA = _NotGiven(0.25)


class CorruptedSet:
    """One corruption's uint8 images (memory-mapped) and labels."""

    def __init__(self, name: str, images_path: str, labels_path: str, dataset: str):
        self.name = name
        self.images = _load_array(images_path)
        self.labels = _load_array(labels_path)
        channels, height, width = get_input_shape(dataset)
        shape = tuple(self.images.shape)
        fits = (len(shape) == 4 and shape[1:] == (height, width, channels)) or \
               (len(shape) == 3 and channels == 1 and shape[1:] == (height, width))
        if not fits or self.images.dtype != np.uint8:
            raise UserError(f"'{images_path}' holds {self.images.dtype} images of shape {shape}; {dataset} needs uint8 "
                            f"images of shape (n, {height}, {width}, {channels})")
        if self.labels.ndim != 1 or len(self.labels) != shape[0]:
            raise UserError(f"'{labels_path}' has shape {tuple(self.labels.shape)}, but there are {shape[0]} images "
                            f"in '{images_path}'; give one label per image")

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, idx: int):
        image = np.asarray(self.images[idx], dtype=np.float32) / 255.0
        if image.ndim == 2:
            image = image[:, :, None]
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), int(self.labels[idx])


def _load_array(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UserError(f"'{path}' not found; check --base_c_path and --corruptions")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        raise UserError(f"'{path}' is not a readable .npy file; download it again")


def find_corrupted_sets(base: str, names):
    """(dataset, [CorruptedSet]) for the layout found in ``base``."""
    if not os.path.isdir(base):
        raise UserError(f"corruption folder '{base}' not found; give --base_c_path the folder of MNIST-C "
                        "(one sub-folder per corruption) or CIFAR-10-C (one .npy per corruption and labels.npy)")
    if os.path.isfile(os.path.join(base, CIFAR10_C_LABELS)):
        dataset = "cifar10"
        if not names:
            names = sorted(f[:-4] for f in os.listdir(base) if f.endswith(".npy") and f != CIFAR10_C_LABELS)
        missing = [n for n in names if not os.path.isfile(os.path.join(base, n + ".npy"))]
        paths = [(n, os.path.join(base, n + ".npy"), os.path.join(base, CIFAR10_C_LABELS)) for n in names]
    elif any(os.path.isfile(os.path.join(base, entry, "test_images.npy")) for entry in os.listdir(base)):
        dataset = "mnist"
        names = names or MNIST_C_CORRUPTIONS
        missing = [n for n in names if not os.path.isfile(os.path.join(base, n, "test_images.npy"))]
        paths = [(n, os.path.join(base, n, "test_images.npy"), os.path.join(base, n, "test_labels.npy"))
                 for n in names]
    else:
        raise UserError(f"'{base}' holds neither MNIST-C ({{corruption}}/test_images.npy) nor CIFAR-10-C "
                        f"({{corruption}}.npy and {CIFAR10_C_LABELS}); check --base_c_path")
    if missing:
        raise UserError(f"corruptions {', '.join(missing)} not found in '{base}'; download them, or choose others "
                        "with --corruptions")
    if not names:
        raise UserError(f"no corruption found in '{base}'")
    return dataset, [CorruptedSet(n, images, labels, dataset) for n, images, labels in paths]


def corruption_noise_key(name: str):
    """The noise key of a corruption: image idx of each corruption gets its own stream (seed, name, idx)."""
    return (int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:16], "little"),)


def _corruption_list(values):
    if not values:
        return None
    return [name for value in values for name in value.split(",") if name]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Certify many examples of corrupted test sets (MNIST-C, CIFAR-10-C)")
    parser.add_argument("base_classifier", type=str, help="path to the saved base classifier (checkpoint.pth.tar)")
    parser.add_argument("outfile", type=str, help="output prefix: writes {outfile}{corruption}.tsv")
    parser.add_argument("--base_c_path", "--base-c-path", dest="base_c_path", required=True,
                        help="folder of MNIST-C or CIFAR-10-C")
    checkpoint_info.add_input_layer_argument(parser)
    parser.add_argument("--sigma", type=positive_float, default=PUBLISHED_SIGMA,
                        help=f"noise hyperparameter (default: {PUBLISHED_SIGMA:g}, as published, and a line says so)")
    parser.add_argument("--corruptions", nargs="+", default=None,
                        help="corruptions to certify (names, comma- or space-separated); default: all")
    add_image_arguments(parser, split=False)
    add_sampling_arguments(parser, n0=True, alpha=True)
    add_engine_arguments(parser)
    add_sequential_arguments(parser)
    return parser


def run(argv=None):
    args = build_parser().parse_args(argv)
    notes = []
    if isinstance(args.sigma, _NotGiven):
        args.sigma = float(args.sigma)
        notes.append(f"certify_c.py: sigma {args.sigma:g} (the published default; --sigma gives another)")
    evaluate = certify_images(args)
    dataset, sets = find_corrupted_sets(args.base_c_path, _corruption_list(args.corruptions))
    image_sets = [ImageSet(s.name, s, ResultFile(f"{args.outfile}{s.name}.tsv", result_header(args),
                                                 overwrite=args.overwrite),
                           settings={"corruption": s.name}, noise_key=corruption_noise_key(s.name)) for s in sets]
    run_on_image_sets(args, dataset, image_sets, evaluate, row_formatter(args), script="certify_c.py",
                      sequential_scheme=certification_scheme(args), notes=notes)


def main(argv=None):
    run_cli(lambda: run(argv))


if __name__ == "__main__":
    main()
