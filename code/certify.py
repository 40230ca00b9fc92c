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
same guarantee and far fewer samples: the same selection step, then
estimation samples in rounds, at most ``--N-max`` (default ``--N``), stopping
once the largest certified radius among ``--radii`` is decided, or, without
``--radii``, once the radius is within ``--radius-tol`` of the best ``N-max``
samples could give. Its rows add a last column ``samples`` (the samples drawn,
N0 included) and round the radius down. The scheme, why it is valid and why
rows selected by ``samples`` are not each at level 1 - alpha:
docs/SEQUENTIAL.md.
"""
from certify_rows import certify_images, result_header, row_formatter
from common import ArgumentParser, run_cli
from eval_utils import (ImageSet, add_engine_arguments, add_image_arguments, add_model_arguments,
                        add_sampling_arguments, add_sequential_arguments, certification_scheme, evaluation_dataset,
                        run_on_image_sets)
from result_files import ResultFile


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Certify many examples")
    add_model_arguments(parser)
    add_image_arguments(parser)
    add_sampling_arguments(parser, n0=True, alpha=True)
    add_engine_arguments(parser)
    add_sequential_arguments(parser)
    return parser


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
