"""Certify the smoothed classifier on many images: Cohen et al.'s CERTIFY.

    python code/certify.py DATASET CHECKPOINT SIGMA OUTFILE [--N0 100 --N 100000 --alpha 0.001 ...]

For each selected image: class cA from N0 noisy samples, then the one-sided
(1 - alpha) Clopper-Pearson lower bound pA of cA's frequency among N fresh
samples; abstain (predict -1, radius 0.0) when pA < 1/2, else radius
sigma * PhiInv(pA). Writes ``idx label predict radius correct time`` rows
(radius with 3 significant digits) and the settings record
``OUTFILE.meta.json``. Re-running the same command continues an interrupted
run (a run with other settings is refused); ``torchrun --nproc_per_node K``
shares the images among K processes and leaves one file (see result_files.py).

``--sequential`` (opt-in; not the published algorithm) certifies with the
same guarantee and far fewer samples (``sequential.SequentialCertifier``): the same
selection step, then estimation samples in rounds, at most ``--N-max``
(default ``--N``), stopping as soon as the answer is decided:

* ``--radii R1 R2 ...``: decided is the largest listed radius certified (or
  abstain). The ``radius`` column holds the certified radius at stopping,
  which lies between the largest listed radius decided and the next one, so
  the certified accuracy at every listed radius is the decided one (and the
  radius is a valid certificate at every radius below it).
* otherwise: the radius is within ``--radius-tol`` (default 0.1 * sigma) of
  the best ``N-max`` samples could give (for ACR).

Sequential rows have the published columns and a last column ``samples``:
the samples drawn for the image, selection (N0) included, i.e. the number of
forward passes (fixed-N CERTIFY draws N0 + N). Their radius is rounded down
to 3 significant digits (never up, so a printed radius is always certified).
Each row is a false certificate with probability at most alpha over the whole
procedure, not conditionally on its ``samples``: rows that ran to N-max are
near a decision and are wrong more often, so rows selected by ``samples`` are
not each at level 1 - alpha. With ``--radii``, analyze.py shows the certified
accuracy at the listed radii only, and no ACR.
"""
import math

from common import ArgumentParser, run_cli
from eval_utils import (CERTIFY_HEADER, SEQUENTIAL_CERTIFY_HEADER, ImageSet, add_engine_arguments, add_image_arguments,
                        add_model_arguments, add_sampling_arguments, add_sequential_arguments, certification_scheme,
                        check_sequential_arguments, evaluation_dataset, format_time, run_on_image_sets,
                        sequential_n_max, sequential_radius_tol)
from result_files import ResultFile


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Certify many examples")
    add_model_arguments(parser)
    add_image_arguments(parser)
    add_sampling_arguments(parser, n0=True, alpha=True)
    add_engine_arguments(parser)
    add_sequential_arguments(parser)
    return parser


def format_row(idx: int, label: int, result, seconds: float) -> str:
    prediction, radius = result
    correct = int(prediction == label)
    return "{}\t{}\t{}\t{:.3}\t{}\t{}".format(idx, label, prediction, radius, correct, format_time(seconds))


def floor_3_digits(value: float) -> float:
    """``value`` rounded down to 3 significant digits (0 stays 0)."""
    if value <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(value)) - 2)
    # (the 1e-9 keeps a value that is already a 3-digit number from dropping a digit to float error)
    return math.floor(value / step + 1e-9) * step


def format_sequential_row(idx: int, label: int, result, seconds: float) -> str:
    prediction, radius, samples = result
    correct = int(prediction == label)
    return "{}\t{}\t{}\t{:.3}\t{}\t{}\t{}".format(idx, label, prediction, floor_3_digits(radius), correct,
                                               format_time(seconds), samples)


def result_header(args) -> str:
    return SEQUENTIAL_CERTIFY_HEADER if args.sequential else CERTIFY_HEADER


def row_formatter(args):
    return format_sequential_row if args.sequential else format_row


def certify_images(args):
    """``evaluate(smooth, xs, generators)`` for ``run_on_image_sets``: CERTIFY with the options of ``args``."""
    check_sequential_arguments(args)
    if args.sequential:
        return lambda smooth, xs, generators: smooth.certify_sequential_many(
            xs, args.N0, sequential_n_max(args), args.alpha, args.batch, generators, radii=args.radii,
            radius_tol=sequential_radius_tol(args, smooth.sigma))
    return lambda smooth, xs, generators: smooth.certify_many(xs, args.N0, args.N, args.alpha, args.batch, generators)


def run(argv=None):
    args = build_parser().parse_args(argv)
    evaluate = certify_images(args)
    dataset = evaluation_dataset(args.dataset, args.split)
    output = ResultFile(args.outfile, result_header(args), overwrite=args.overwrite)
    run_on_image_sets(args, args.dataset, [ImageSet("certify", dataset, output)], evaluate, row_formatter(args),
                      script="certify.py", sequential_scheme=certification_scheme(args))


def main(argv=None):
    run_cli(lambda: run(argv))


if __name__ == "__main__":
    main()
