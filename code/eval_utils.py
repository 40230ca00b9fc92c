"""What the evaluation scripts share (certify, predict, smooth_prediction, certify_c): options and the loop.

Options
    The published options of each script, plus ``--seed``, ``--batch-images``,
    ``--bf16``, ``--compile``, ``--no-channels-last``, ``--overwrite`` and
    ``--resume-unverified`` (``add_*_arguments``), and the opt-in sequential
    mode of certify.py, certify_c.py and predict.py
    (``add_sequential_arguments``: its rows have a last column ``samples``,
    so its files have their own header).

Images
    Image ``idx`` is evaluated when ``idx >= --start``, ``idx % --skip == 0``
    and, when ``--max`` is not negative, ``idx < --max``; a selection without
    any image is refused. Evaluation splits are read without training
    augmentation, so every image is the same on every run. With ``--seed S``
    the noise of image ``idx`` comes from
    ``noise_streams.noise_generator(S, idx, device, key)`` (``key``: empty, or
    the corruption of certify_c): its row depends neither on how many images
    share a forward pass, nor on how the images are split among processes,
    nor on interruptions. Without ``--seed`` rank 0 draws a fresh 128-bit
    seed for the run. The ``time`` column is the wall-clock time of the
    image's group divided by the group's size.

The loop
    ``run_on_image_sets`` checks every output and its settings record before
    any work (result_files.py, provenance.py), builds the ``core.Smooth`` and
    has ``run_evaluations`` fill each output, sharing its images among the
    torchrun processes by the protocol of result_files.py.
"""
import datetime
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

import checkpoint_info
from binomial import smallest_certifying_n, smallest_predicting_n
from checkpoints import check_checkpoint_file, file_sha256, load_base_classifier, load_checkpoint
from common import (ArgumentParser, UserError, nonnegative_float, nonnegative_int, positive_float, positive_int,
                    probability)
from core import Smooth
from datasets import DATASETS, get_dataset, get_num_classes
from distributed import Distributed
from noise_streams import noise_generator
from output_lock import OutputLocks
from provenance import Provenance
from result_files import ResultFile
from rows import (CERTIFY_HEADER, PREDICT_HEADER, SEQUENTIAL_CERTIFY_HEADER,  # noqa: F401 (re-exported)
                  SEQUENTIAL_PREDICT_HEADER, SMOOTH_PREDICTION_HEADER, format_time)
from sequential import STOP_ALPHA, sequential_scheme

# --sequential's default --radius-tol, in units of sigma (why 0.1: docs/SEQUENTIAL.md)
DEFAULT_RADIUS_TOL_SIGMAS = 0.1

# Barriers wait for the slowest process, which may be hours behind on a big job.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


# --------------------------------------------------------------------------- options

def add_model_arguments(parser: ArgumentParser):
    """The published positional arguments: dataset, base_classifier, sigma, outfile."""
    parser.add_argument("dataset", choices=DATASETS, help="which dataset")
    parser.add_argument("base_classifier", type=str, help="path to the saved base classifier (checkpoint.pth.tar)")
    parser.add_argument("sigma", type=positive_float, help="noise hyperparameter")
    parser.add_argument("outfile", type=str, help="output TSV file")
    checkpoint_info.add_input_layer_argument(parser)


def add_image_arguments(parser: ArgumentParser, split: bool = True):
    """Which images, and the base classifier's batch size."""
    parser.add_argument("--batch", type=positive_int, default=1000, help="batch size (noisy samples per forward pass)")
    parser.add_argument("--skip", type=positive_int, default=1, help="evaluate every SKIP-th image")
    parser.add_argument("--max", type=int, default=-1, help="stop before image MAX (-1: no limit)")
    parser.add_argument("--start", type=nonnegative_int, default=0, help="first image index")
    if split:
        parser.add_argument("--split", choices=["train", "test"], default="test", help="train or test set")


def add_sampling_arguments(parser: ArgumentParser, n0: bool = False, alpha: bool = False):
    if n0:
        parser.add_argument("--N0", type=positive_int, default=100, help="number of samples for selection")
    parser.add_argument("--N", type=positive_int, default=100000, help="number of samples to use")
    if alpha:
        parser.add_argument("--alpha", type=probability, default=0.001, help="failure probability")


def add_engine_arguments(parser: ArgumentParser):
    """Options beyond the published ones: reproducible noise, speed, starting over."""
    group = parser.add_argument_group("reproducibility and speed")
    group.add_argument("--seed", type=nonnegative_int, default=None,
                       help="noise of image idx drawn from its own stream (seed, idx): rows do not depend on "
                            "--batch-images, torchrun or interruptions")
    group.add_argument("--batch-images", type=positive_int, default=1, metavar="G",
                       help="images sharing one forward pass of up to G * batch samples")
    group.add_argument("--bf16", action="store_true",
                       help="evaluate the base classifier under bfloat16 autocast (certificates then hold "
                            "for that classifier)")
    group.add_argument("--compile", action="store_true", help="run the base classifier through torch.compile")
    group.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                       help="feed batches in the default memory format")
    group.add_argument("--overwrite", action="store_true",
                       help="start over, replacing existing results (default: continue them)")
    group.add_argument("--resume-unverified", action="store_true",
                       help="continue a result file that has rows but no settings record ({outfile}.meta.json), "
                            "e.g. one written by the published code, taking its rows as made with this "
                            "command's settings")


def add_sequential_arguments(parser: ArgumentParser, certify: bool = True):
    """``--sequential`` and its options (``sequential.certify_sequential`` / ``predict_sequential``)."""
    group = parser.add_argument_group("sequential mode: same guarantee, fewer samples")
    group.add_argument("--sequential", action="store_true",
                       help="draw samples in rounds and stop as soon as the result is decided, with the guarantee "
                            "of the fixed-N algorithm whatever the look it stops at (docs/SEQUENTIAL.md); adds a "
                            "column 'samples'")
    group.add_argument("--N-max", dest="N_max", type=positive_int, default=None,
                       help="with --sequential: the most estimation samples per image (default: --N)")
    if certify:
        group.add_argument("--radii", nargs="+", type=nonnegative_float, default=None, metavar="R",
                           help="with --sequential: only decide the largest of these radii that is certified "
                                "(certified accuracy at these radii); default: a radius close to the N-max one")
        group.add_argument("--radius-tol", dest="radius_tol", type=nonnegative_float, default=None,
                           help="with --sequential and no --radii: stop when the radius is within this of the "
                                f"radius N-max samples would give if pA were its {1 - STOP_ALPHA:g} upper bound "
                                f"(default: {DEFAULT_RADIUS_TOL_SIGMAS} * sigma)")


def check_sequential_arguments(args):
    """Raise ``UserError`` for sequential options without ``--sequential`` or that contradict each other."""
    given = [name for name, value in (("--N-max", args.N_max), ("--radii", getattr(args, "radii", None)),
                                      ("--radius-tol", getattr(args, "radius_tol", None))) if value is not None]
    if given and not args.sequential:
        raise UserError(f"{', '.join(given)} only apply to --sequential; add --sequential or drop them")
    if getattr(args, "radii", None) is not None and getattr(args, "radius_tol", None) is not None:
        raise UserError("--radii and --radius-tol choose different stopping rules; give one of them")


def warn_if_too_few_samples(args, certify: bool):
    """One warning line when ``--N`` (``--N-max``) is too small for any image not to abstain at ``--alpha``.

    Even N of N samples of one class then fail the test (CERTIFY: pA's lower bound alpha^(1/N) < 1/2;
    PREDICT: the p-value 2^(1 - N) > alpha); a sequential run, at a part of alpha per look, needs more.
    """
    n = sequential_n_max(args) if args.sequential else args.N
    option = "--N-max" if args.sequential else "--N"
    smallest = smallest_certifying_n(args.alpha) if certify else smallest_predicting_n(args.alpha)
    if n < smallest and os.environ.get("RANK", "0") == "0":
        what = "certify" if certify else "predict"
        print(f"warning: {option} {n} cannot {what} at --alpha {args.alpha:g}: every image will abstain, since even "
              f"{n} samples all of one class fail {'CERTIFY' if certify else 'PREDICT'}'s test; the smallest N that "
              f"can {what} at this alpha is {smallest}", file=sys.stderr)


def sequential_n_max(args) -> int:
    return args.N_max if args.N_max is not None else args.N


def sequential_radius_tol(args, sigma: float) -> float:
    return args.radius_tol if args.radius_tol is not None else DEFAULT_RADIUS_TOL_SIGMAS * sigma


def select_indices(size: int, skip: int, max_index: int, start: int = 0) -> List[int]:
    """Images idx >= start with idx % skip == 0, stopping at idx == max_index (when >= 0)."""
    stop = size if max_index < 0 else min(size, max_index)
    return [i for i in range(start, stop) if i % skip == 0]


# --------------------------------------------------------------------------- inputs

def evaluation_dataset(dataset: str, split: str):
    """The split without training augmentation: image idx is the same image on every run."""
    return get_dataset(dataset, split, augment=False)


@dataclass
class ImageSet:
    """One output of a run: a set of images and the result file their rows fill.

    ``images[idx]`` is (image [C x H x W], label); ``settings``: what the script
    adds to this output's settings record (certify_c's corruption), compared
    like the command line's; ``noise_key``: the key of the images' noise
    streams (``Evaluation.noise_key``).
    """
    description: str
    images: Sequence
    output: ResultFile
    settings: Dict[str, object] = field(default_factory=dict)
    noise_key: Tuple[int, ...] = ()


# --------------------------------------------------------------------------- the loop

@dataclass
class Evaluation:
    """One result file to fill: which images, how to load and evaluate them, how to write a row.

    ``evaluate(xs, generators)`` gets a batch [G x C x H x W] on the device and one
    generator per image, and returns one result per image; ``format_row(idx, label,
    result, seconds)`` makes the TSV line; ``record(result)`` the row's record, if any.
    """
    output: ResultFile
    indices: List[int]
    load: Callable[[int], Tuple[torch.Tensor, int]]
    evaluate: Callable[[torch.Tensor, List[torch.Generator]], list]
    format_row: Callable[[int, int, object, float], str]
    record: Optional[Callable[[object], np.ndarray]] = None
    description: str = ""
    noise_key: Tuple[int, ...] = ()   # image idx's noise: noise_streams.noise_generator(seed, idx, device, noise_key)


class Coordinator:
    """What the torchrun processes share: barriers that tolerate a long wait, and rank 0's values.

    Both use a gloo group (on CPU and GPU alike), whose timeout is ``BARRIER_TIMEOUT``.
    """

    def __init__(self, dist: Distributed):
        self.rank = dist.rank
        self.group = None
        if dist.enabled:
            self.group = torch.distributed.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)

    def barrier(self):
        if self.group is not None:
            torch.distributed.barrier(group=self.group)

    def share(self, value):
        """Rank 0's ``value``, on every rank (returns once every rank has called it)."""
        if self.group is None:
            return value
        box = [value if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def run_evaluations(evaluations: Sequence[Evaluation], args, dist: Distributed):
    """Fill each result file, sharing the images among the processes; resumable (see the module's protocol)."""
    coordinator = Coordinator(dist)
    # one seed for the whole run, drawn by rank 0 when --seed is not given
    seed = coordinator.share(args.seed if args.seed is not None else secrets.randbits(128))
    device = dist.device
    for evaluation in evaluations:
        output = evaluation.output
        todo = None
        if dist.is_main:
            output.prepare()
            done = set(output.done_rows())
            todo = np.array([idx for idx in evaluation.indices if idx not in done], dtype=np.int64)
        todo = coordinator.share(todo)   # the one snapshot every rank deals from; also a barrier
        mine = [int(idx) for idx in todo[dist.rank::dist.world_size]]
        # in a log file (not a terminal) a line every 30 s is enough
        bar = tqdm(total=len(mine), file=sys.stderr, disable=not dist.is_main, dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0,
                   desc=evaluation.description or os.path.basename(output.path))
        with output.writer(dist.rank, dist.world_size) as writer:
            for start in range(0, len(mine), args.batch_images):
                group = mine[start:start + args.batch_images]
                items = [evaluation.load(idx) for idx in group]
                before = time.time()
                xs = torch.stack([x for x, _ in items]).to(device)
                generators = [noise_generator(seed, idx, device, evaluation.noise_key) for idx in group]
                results = evaluation.evaluate(xs, generators)
                seconds = (time.time() - before) / len(group)
                for idx, (_, label), result in zip(group, items, results):
                    line = evaluation.format_row(idx, int(label), result, seconds)
                    writer.write(idx, line, evaluation.record(result) if evaluation.record else None)
                bar.update(len(group))
        bar.close()
        coordinator.barrier()   # every part complete and closed
        if dist.is_main:
            output.merge(final=True)
    coordinator.barrier()   # no rank leaves before the last merge


def certification_scheme(args) -> Optional[str]:
    """The sequential scheme (``sequential.sequential_scheme``) of a certification with these options; None: fixed-N."""
    return sequential_scheme(sequential_n_max(args), args.batch) if args.sequential else None


def run_on_image_sets(args, dataset: str, image_sets: Sequence[ImageSet], evaluate: Callable, format_row: Callable,
                      record: Optional[Callable] = None, *, script: str, sequential_scheme: Optional[str] = None,
                      notes: Sequence[str] = ()):
    """The run of every evaluation script: check the outputs, load the smoothed classifier, fill each output.

    ``evaluate(smooth, xs, generators)`` returns one result per image of ``xs``
    [G x C x H x W]; ``format_row`` and ``record`` as in ``Evaluation``;
    ``script``: the script's file name; ``sequential_scheme``: the scheme of a
    sequential certification (``certification_scheme``), recorded in the
    settings; ``notes``: lines to print once the input is known to be valid.
    Before any work: an empty image selection, a foreign output, an output
    made with other settings and an output another run is writing stop the
    run (``UserError``). What the checkpoint tells is printed (a first layer
    it does not record, a sigma other than its training sigma:
    ``checkpoint_info.usage``). Outputs that are already complete are only
    reported. At the end, each output's path is printed on stdout.
    """
    selections = [selected_images(args, image_set) for image_set in image_sets]
    check_checkpoint_file(args.base_classifier)
    main_process = os.environ.get("RANK", "0") == "0"
    # the first layer the checkpoint's model needs is a setting of the rows (checkpoint_info)
    args.input_layer, lines = checkpoint_info.usage(load_checkpoint(args.base_classifier, dataset=dataset),
                                                    args.base_classifier, dataset, args.input_layer, args.sigma)
    for line in [*notes, *lines] if main_process else []:
        print(line, file=sys.stderr)
    provenance = Provenance.of_run(script, dataset, vars(args), file_sha256(args.base_classifier), torch.__version__,
                                   sequential_scheme)
    for image_set in image_sets:
        image_set.output.expect(provenance.with_settings(**image_set.settings),
                                resume_unverified=args.resume_unverified)
        image_set.output.check()
    # Nothing has been written yet, so every torchrun process finds the same outputs complete.
    complete = [image_set.output.complete(indices) for image_set, indices in zip(image_sets, selections)]
    if not all(complete):
        # one writer per output (rank 0 holds the locks for the processes of its run)
        locks = OutputLocks([s.output.path for s, done in zip(image_sets, complete) if not done and main_process])
        locks.acquire()   # (``OutputBusy``, a ``UserError``, names the run that holds one)
        try:
            for image_set in image_sets:   # what was checked may have changed before the lock was ours
                image_set.output.check()
            dist = Distributed()
            model = load_base_classifier(args.base_classifier, dataset, dist.device, input_layer=args.input_layer)
            smooth = Smooth(model, get_num_classes(dataset), args.sigma, images_per_batch=args.batch_images,
                            channels_last=args.channels_last, bf16=args.bf16, compile=args.compile)
            evaluations = [Evaluation(output=image_set.output, indices=indices, load=image_set.images.__getitem__,
                                      evaluate=lambda xs, generators: evaluate(smooth, xs, generators),
                                      format_row=format_row, record=record, description=image_set.description,
                                      noise_key=tuple(image_set.noise_key))
                           for image_set, indices, done in zip(image_sets, selections, complete) if not done]
            run_evaluations(evaluations, args, dist)
            dist.close()
        finally:
            locks.release()
    if main_process:
        for image_set, done in zip(image_sets, complete):
            image_set.output.report(already_complete=done)


def selected_images(args, image_set: ImageSet) -> List[int]:
    """The indices of ``image_set`` that ``--start``, ``--max`` and ``--skip`` select; ``UserError`` if none."""
    indices = select_indices(len(image_set.images), args.skip, args.max, args.start)
    if not indices:
        raise UserError(f"no image to evaluate: --start {args.start} --max {args.max} --skip {args.skip} select "
                        f"none of the {len(image_set.images)} images ({image_set.description}); lower --start or "
                        "raise --max")
    return indices
