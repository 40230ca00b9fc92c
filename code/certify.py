"""Certify the smoothed classifier on many images: Cohen et al.'s CERTIFY.

    python code/certify.py DATASET CHECKPOINT SIGMA OUTFILE [--N0 100 --N 100000 --alpha 0.001 ...]

For each selected image: class cA from N0 noisy samples, then the one-sided
(1 - alpha) Clopper-Pearson lower bound pA of cA's frequency among N fresh
samples; abstain (predict -1, radius 0.0) when pA < 1/2, else radius
sigma * PhiInv(pA). Writes ``idx label predict radius correct time`` rows
(radius with 3 significant digits) and the settings record
``OUTFILE.meta.json``. Re-running the same command continues an interrupted
run (a run with other settings is refused); ``torchrun --nproc_per_node K``
shares the images among K processes and leaves one file (see eval_utils).
"""
from common import ArgumentParser, run_cli
from eval_utils import (CERTIFY_HEADER, ResultFile, add_engine_arguments, add_image_arguments, add_model_arguments,
                        add_sampling_arguments, evaluation_dataset, format_time, run_on_image_sets)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Certify many examples")
    add_model_arguments(parser)
    add_image_arguments(parser)
    add_sampling_arguments(parser, n0=True, alpha=True)
    add_engine_arguments(parser)
    return parser


def format_row(idx: int, label: int, result, seconds: float) -> str:
    prediction, radius = result
    correct = int(prediction == label)
    return "{}\t{}\t{}\t{:.3}\t{}\t{}".format(idx, label, prediction, radius, correct, format_time(seconds))


def certify_images(args):
    """``evaluate(smooth, xs, generators)`` for ``run_on_image_sets``: CERTIFY with the options of ``args``."""
    return lambda smooth, xs, generators: smooth.certify_many(xs, args.N0, args.N, args.alpha, args.batch, generators)


def run(argv=None):
    args = build_parser().parse_args(argv)
    dataset = evaluation_dataset(args.dataset, args.split)
    output = ResultFile(args.outfile, CERTIFY_HEADER, overwrite=args.overwrite)
    run_on_image_sets(args, args.dataset, [("certify", dataset)], [output], certify_images(args), format_row,
                      script="certify.py")


def main(argv=None):
    run_cli(lambda: run(argv))


if __name__ == "__main__":
    main()
