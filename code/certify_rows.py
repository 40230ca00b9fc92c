"""CERTIFY over a set of images and the rows it writes (rows.py), shared by certify.py and certify_c.py."""
import sequential
from eval_utils import check_sequential_arguments, sequential_n_max, sequential_radius_tol, warn_if_too_few_samples
from rows import (CERTIFY_HEADER, SEQUENTIAL_CERTIFY_HEADER, floor_3_digits,  # noqa: F401 (floor_3_digits re-exported)
                  format_certify_row, format_sequential_certify_row)

# the names these formats had here
format_row, format_sequential_row = format_certify_row, format_sequential_certify_row


def result_header(args) -> str:
    return SEQUENTIAL_CERTIFY_HEADER if args.sequential else CERTIFY_HEADER


def row_formatter(args):
    return format_sequential_row if args.sequential else format_row


def certify_images(args):
    """``evaluate(smooth, xs, generators)`` for ``run_on_image_sets``: CERTIFY with the options of ``args``."""
    check_sequential_arguments(args)
    warn_if_too_few_samples(args, certify=True)
    if args.sequential:
        return lambda smooth, xs, generators: sequential.certify_sequential(
            smooth, xs, args.N0, sequential_n_max(args), args.alpha, args.batch, generators, radii=args.radii,
            radius_tol=sequential_radius_tol(args, smooth.sigma))
    return lambda smooth, xs, generators: smooth.certify_many(xs, args.N0, args.N, args.alpha, args.batch, generators)
