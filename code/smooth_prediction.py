"""Smoothed prediction of a base classifier: class frequencies under Gaussian noise.

    python code/smooth_prediction.py DATASET CHECKPOINT SIGMA OUTFILE [--N 100000 --split train ...]

For each selected image, the class counts of f on N noisy copies. Writes
``idx label p1 p2 c1 c2 correct time`` rows (p1, p2: the two most frequent
classes, lowest class first on ties; c1, c2: their frequencies with 5
significant digits; correct: p1 == label) and saves
``model_conf_{sigma}_{split}.npy`` next to OUTFILE: shape (dataset size, K),
row idx = counts / N for the images done, 1/K for the others (the published
format), and ``model_conf_{sigma}_{split}.covered.npy`` next to it: a bool
vector, True for the rows computed (see ``datasets.coverage_path``); a run
that leaves rows uncomputed says so in a warning. CAT-RS reads the ``.npy``
as the ``train_t{sigma}`` split's pi and refuses rows it does not cover.

Resuming keeps the ``.npy`` consistent with the TSV: each image's frequencies
are appended to a journal (``{tsv}.journal``) before its TSV row is written;
when a run ends, or when the next one starts, the journals are written into
the ``.npy`` (atomically), then the coverage, and the journals are removed. So every image with a TSV row has its
frequencies in the journal or the ``.npy``; an image whose row is missing is
simply done again. A ``.npy`` that exists without the TSV belongs to another
run and is not touched (``--overwrite`` replaces both). Both files get a
settings record (``.meta.json``, see provenance.py), checked when a run resumes.
"""
import os
import sys

import numpy as np

from common import ArgumentParser, UserError, replace_atomic, run_cli
from datasets import coverage_path, get_num_classes
from eval_utils import (ImageSet, add_engine_arguments, add_image_arguments, add_model_arguments, add_sampling_arguments,
                        evaluation_dataset, run_on_image_sets)
from result_files import RecordStore, ResultFile, check_output_path
from rows import SMOOTH_PREDICTION_HEADER, format_smooth_prediction_row


def confidence_path(outfile: str, sigma: float, split: str) -> str:
    return os.path.join(os.path.dirname(outfile), f"model_conf_{sigma}_{split}.npy")


class ConfidenceArray(RecordStore):
    """The ``.npy`` of class frequencies, updated atomically from the rows' records."""

    def __init__(self, path: str, shape, overwrite: bool):
        self.path = path
        self.shape = tuple(shape)
        self.overwrite = overwrite

    def check(self, result: ResultFile):
        check_output_path(self.path)
        if self.overwrite:
            return
        if os.path.exists(self.path):
            try:
                array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except Exception:
                raise UserError(f"'{self.path}' exists and is not a readable .npy file; move it away, "
                                "or pass --overwrite to replace it")
            if tuple(array.shape) != self.shape:
                raise UserError(f"'{self.path}' has shape {tuple(array.shape)}, but this run writes {self.shape}; "
                                "move it away, or pass --overwrite to replace it")
            if not result.tsv_files():
                raise UserError(f"'{self.path}' exists but '{result.path}' does not, so it belongs to another run; "
                                "move it away, choose another output folder, or pass --overwrite to replace it")
        else:
            covered = {idx for idx, _ in result.records()}
            missing = set(result.done_rows()) - covered
            if missing:
                raise UserError(f"'{result.path}' has {len(missing)} rows whose frequencies are missing ('{self.path}' "
                                "not found); restore it, or pass --overwrite to start over")

    def files(self):
        return [self.path]

    def reset(self):
        # the coverage first: a crash in between leaves a .npy without coverage, which check() refuses
        # to resume (its TSV is gone) and train_catrs.py reads with the caution due to a published file
        for path in (coverage_path(self.path), self.path):
            if os.path.exists(path):
                os.remove(path)
        self.overwrite = False

    def covered(self):
        """The rows of the coverage file; None for a .npy without one (its TSV rows count)."""
        if not os.path.exists(self.path):
            return set()
        try:
            mask = np.load(coverage_path(self.path), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if mask.dtype != np.bool_ or mask.shape != (self.shape[0],):
            return None
        return set(np.flatnonzero(mask).tolist())

    def save(self, records, covered, final: bool):
        """The records into the ``.npy`` (atomically), then the coverage: the rows of the TSV (atomically).

        In this order a crash leaves a coverage that claims no row the ``.npy`` lacks (the
        journals, removed only after both, make the next merge finish the work).
        """
        exists = os.path.exists(self.path)
        mask_path = coverage_path(self.path)
        covered = [idx for idx in covered if 0 <= idx < self.shape[0]]
        if not records and exists and os.path.exists(mask_path) and not final:
            return
        if exists:
            array = np.load(self.path, allow_pickle=False)
        else:
            if os.path.exists(mask_path):   # left by a .npy removed by hand: it describes nothing now
                os.remove(mask_path)
            array = np.full(self.shape, 1.0 / self.shape[1])
        for idx, values in records:
            if 0 <= idx < self.shape[0]:
                array[idx] = values
        if records or not exists:
            replace_atomic(self.path, lambda handle: np.save(handle, array), binary=True)
        mask = np.zeros(self.shape[0], dtype=bool)
        mask[covered] = True
        replace_atomic(mask_path, lambda handle: np.save(handle, mask), binary=True)
        if final and len(covered) < self.shape[0]:
            print(f"warning: '{self.path}' holds the smoothed prediction of {len(covered)} of {self.shape[0]} "
                  f"images (the others are 1/{self.shape[1]}; '{mask_path}' lists which); train_catrs.py uses it "
                  "only for covered images", file=sys.stderr)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Smoothed prediction (class frequencies under noise) of many examples")
    add_model_arguments(parser)
    add_image_arguments(parser)
    add_sampling_arguments(parser)
    add_engine_arguments(parser)
    return parser


def top_two(counts: np.ndarray):
    order = np.argsort(-counts, kind="stable")
    return int(order[0]), int(order[1])


def run(argv=None):
    args = build_parser().parse_args(argv)
    dataset = evaluation_dataset(args.dataset, args.split)
    num_classes = get_num_classes(args.dataset)
    store = ConfidenceArray(confidence_path(args.outfile, args.sigma, args.split), (len(dataset), num_classes),
                            args.overwrite)
    output = ResultFile(args.outfile, SMOOTH_PREDICTION_HEADER, overwrite=args.overwrite, record_width=num_classes,
                        store=store)

    def format_row(idx, label, counts, seconds):
        p1, p2 = top_two(counts)
        return format_smooth_prediction_row(idx, label, p1, p2, counts[p1] / args.N, counts[p2] / args.N, seconds)

    def evaluate(smooth, xs, generators):
        return list(smooth.sample_counts_many(xs, args.N, args.batch, generators))

    run_on_image_sets(args, args.dataset, [ImageSet("smooth prediction", dataset, output)], evaluate, format_row,
                      record=lambda counts: counts / args.N, script="smooth_prediction.py")


def main(argv=None):
    run_cli(lambda: run(argv))


if __name__ == "__main__":
    main()
