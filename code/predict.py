"""Predict with the smoothed classifier on many images: Cohen et al.'s PREDICT.

    python code/predict.py DATASET CHECKPOINT SIGMA OUTFILE [--N 100000 --alpha 0.001 ...]

For each selected image: class counts from N noisy samples; the top two
classes have counts nA >= nB; abstain (-1) when the two-sided binomial test of
nA successes in nA + nB trials at p = 1/2 has p-value > alpha. Writes
``idx label predict correct time`` rows. Resumable and shardable with torchrun
like certify.py (see eval_utils).
"""
from common import ArgumentParser, run_cli
from eval_utils import (PREDICT_HEADER, ResultFile, add_engine_arguments, add_image_arguments, add_model_arguments,
                        add_sampling_arguments, evaluation_dataset, format_time, run_on_image_sets)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Predict on many examples")
    add_model_arguments(parser)
    add_image_arguments(parser)
    add_sampling_arguments(parser, alpha=True)
    add_engine_arguments(parser)
    return parser


def format_row(idx: int, label: int, prediction, seconds: float) -> str:
    correct = int(prediction == label)
    return "{}\t{}\t{}\t{}\t{}".format(idx, label, prediction, correct, format_time(seconds))


def run(argv=None):
    args = build_parser().parse_args(argv)
    dataset = evaluation_dataset(args.dataset, args.split)
    output = ResultFile(args.outfile, PREDICT_HEADER, overwrite=args.overwrite)
    run_on_image_sets(args, args.dataset, [("predict", dataset)], [output],
                      lambda smooth, xs, generators: smooth.predict_many(xs, args.N, args.alpha, args.batch, generators),
                      format_row, script="predict.py")


def main(argv=None):
    run_cli(lambda: run(argv))


if __name__ == "__main__":
    main()
