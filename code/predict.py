"""Predict with the smoothed classifier on many images: Cohen et al.'s PREDICT.

    python code/predict.py DATASET CHECKPOINT SIGMA OUTFILE [--N 100000 --alpha 0.001 ...]

For each selected image: class counts from N noisy samples; the top two
classes have counts nA >= nB; abstain (-1) when the two-sided binomial test of
nA successes in nA + nB trials at p = 1/2 has p-value > alpha. Writes
``idx label predict correct time`` rows. Resumable and shardable with torchrun
like certify.py (see result_files.py).

``--sequential`` (opt-in) runs the same test in rounds with alpha-spending
over a fixed schedule of looks (``sequential.SequentialPredictor``): it stops at the
first look whose test rejects at that look's level, or, abstaining, once
``--N-max`` samples (default ``--N``) could not make it reject; same guarantee.
Rows then end with a column ``samples``, the samples drawn for the image.
"""
import sequential
from common import ArgumentParser, run_cli
from eval_utils import (ImageSet, add_engine_arguments, add_image_arguments, add_model_arguments,
                        add_sampling_arguments, add_sequential_arguments, check_sequential_arguments,
                        evaluation_dataset, run_on_image_sets, sequential_n_max, warn_if_too_few_samples)
from result_files import ResultFile
from rows import PREDICT_HEADER, SEQUENTIAL_PREDICT_HEADER, format_predict_row, format_sequential_predict_row


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Predict on many examples")
    add_model_arguments(parser)
    add_image_arguments(parser)
    add_sampling_arguments(parser, alpha=True)
    add_engine_arguments(parser)
    add_sequential_arguments(parser, certify=False)
    return parser


def run(argv=None):
    args = build_parser().parse_args(argv)
    check_sequential_arguments(args)
    warn_if_too_few_samples(args, certify=False)
    dataset = evaluation_dataset(args.dataset, args.split)
    if args.sequential:
        header, row = SEQUENTIAL_PREDICT_HEADER, format_sequential_predict_row
        evaluate = lambda smooth, xs, generators: sequential.predict_sequential(  # noqa: E731
            smooth, xs, sequential_n_max(args), args.alpha, args.batch, generators)
    else:
        header, row = PREDICT_HEADER, format_predict_row
        evaluate = lambda smooth, xs, generators: smooth.predict_many(  # noqa: E731
            xs, args.N, args.alpha, args.batch, generators)
    output = ResultFile(args.outfile, header, overwrite=args.overwrite)
    run_on_image_sets(args, args.dataset, [ImageSet("predict", dataset, output)], evaluate, row, script="predict.py")


def main(argv=None):
    run_cli(lambda: run(argv))


if __name__ == "__main__":
    main()
