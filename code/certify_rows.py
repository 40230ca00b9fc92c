"""CERTIFY over a set of images and the rows it writes, shared by certify.py and certify_c.py.

A fixed-N row is ``idx label predict radius correct time`` (radius with 3 significant digits); a
``--sequential`` row adds ``samples`` and rounds its radius down to 3 significant digits, so that a
printed radius is always certified.
"""
import math

import sequential
from eval_utils import (CERTIFY_HEADER, SEQUENTIAL_CERTIFY_HEADER, check_sequential_arguments, format_time,
                        sequential_n_max, sequential_radius_tol)


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
        return lambda smooth, xs, generators: sequential.certify_sequential(
            smooth, xs, args.N0, sequential_n_max(args), args.alpha, args.batch, generators, radii=args.radii,
            radius_tol=sequential_radius_tol(args, smooth.sigma))
    return lambda smooth, xs, generators: smooth.certify_many(xs, args.N0, args.N, args.alpha, args.batch, generators)
