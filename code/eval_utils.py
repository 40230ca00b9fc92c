"""What the evaluation scripts share (certify, predict, smooth_prediction, certify_c).

Options
    The published options of each script, plus ``--seed``, ``--batch-images``,
    ``--bf16``, ``--compile``, ``--no-channels-last`` and ``--overwrite``
    (``add_*_arguments``), and the opt-in sequential mode of certify.py,
    certify_c.py and predict.py (``add_sequential_arguments``: its rows have
    a last column ``samples``, so its files have their own header).

Images
    Image ``idx`` is evaluated when ``idx >= --start``, ``idx % --skip == 0``
    and, when ``--max`` is not negative, ``idx < --max``. Evaluation splits are
    read without training augmentation, so every image is the same on every
    run. With ``--seed S`` the noise of image ``idx`` comes from
    ``core.noise_generator(S, idx, device)``: its row depends neither on how
    many images share a forward pass, nor on how the images are split among
    processes, nor on interruptions. Without ``--seed`` a fresh seed is drawn.
    The ``time`` column is the wall-clock time of the image's group divided by
    the group's size.

Resumable result files (``ResultFile``)
    The header is written first; each row is appended and flushed as soon as
    its image is done. Running the same command again keeps every complete
    row unchanged, drops a torn last row (no trailing newline or a wrong
    number of fields) and evaluates only the images without a row. A file
    whose first line is not the expected header is never modified: the run
    stops with one line and exit status 2 (``--overwrite`` starts over).

Several processes (``torchrun --nproc_per_node K``)
    Rank 0 first merges what an interrupted run left into the result file;
    then the images without a row are dealt round-robin to the ranks. Rank r
    appends its rows to ``{outfile}.part{r}`` (a result file of its own, with
    the header). When every rank is done, rank 0 merges the result file and
    the parts, sorted by idx, into the result file (written to a temporary
    file, then renamed) and removes the parts. The output folder must be
    shared by all processes.

Row records (smooth_prediction)
    A script may attach a vector to each row (the class frequencies that go
    into the ``.npy``). The vector is appended to ``{tsv}.journal`` (fixed-size
    float64 records: idx, values) and flushed before the row is written, so
    every row has its vector on disk. Merging hands all journal records to the
    script's ``RecordStore``, which saves them (atomically) before the
    journals are removed.
"""
import datetime
import glob
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from common import (ArgumentParser, Distributed, UserError, load_base_classifier, nonnegative_float,
                    nonnegative_int, positive_float, positive_int, probability, replace_atomic)
from core import Smooth, noise_generator
from datasets import DATASETS, get_dataset, get_num_classes

CERTIFY_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
PREDICT_HEADER = "idx\tlabel\tpredict\tcorrect\ttime"
# --sequential: the same columns and the samples drawn for the image
SEQUENTIAL_CERTIFY_HEADER = CERTIFY_HEADER + "\tsamples"
SEQUENTIAL_PREDICT_HEADER = PREDICT_HEADER + "\tsamples"
# --sequential's default --radius-tol, in units of sigma. Radii scale with sigma, and so does what a
# sample size buys: at pA near 1 each doubling of the samples adds about 0.2 sigma to the radius, so a
# tolerance much below 0.1 sigma makes every confident image run to N-max. At 0.1 sigma the mean loss
# against fixed-N CERTIFY stays near 0.03 sigma per image (docs/BENCHMARKS.md).
DEFAULT_RADIUS_TOL_SIGMAS = 0.1
SMOOTH_PREDICTION_HEADER = "idx\tlabel\tp1\tp2\tc1\tc2\tcorrect\ttime"

# Barriers wait for the slowest process, which may be hours behind on a big job.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


# --------------------------------------------------------------------------- options

def add_model_arguments(parser: ArgumentParser):
    """The published positional arguments: dataset, base_classifier, sigma, outfile."""
    parser.add_argument("dataset", choices=DATASETS, help="which dataset")
    parser.add_argument("base_classifier", type=str, help="path to the saved base classifier (checkpoint.pth.tar)")
    parser.add_argument("sigma", type=positive_float, help="noise hyperparameter")
    parser.add_argument("outfile", type=str, help="output TSV file")


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


def add_sequential_arguments(parser: ArgumentParser, certify: bool = True):
    """``--sequential`` and its options (``core.Smooth.certify_sequential_many`` / ``predict_sequential_many``)."""
    group = parser.add_argument_group("sequential (anytime-valid) mode: same guarantee, fewer samples")
    group.add_argument("--sequential", action="store_true",
                       help="draw samples in rounds and stop as soon as the result is decided (alpha-spending "
                            "over a fixed schedule of looks); adds a column 'samples'")
    group.add_argument("--N-max", dest="N_max", type=positive_int, default=None,
                       help="with --sequential: the most estimation samples per image (default: --N)")
    if certify:
        group.add_argument("--radii", nargs="+", type=nonnegative_float, default=None, metavar="R",
                           help="with --sequential: only decide the largest of these radii that is certified "
                                "(certified accuracy at these radii); default: a radius close to the N-max one")
        group.add_argument("--radius-tol", dest="radius_tol", type=nonnegative_float, default=None,
                           help="with --sequential and no --radii: stop when the radius is within this of the "
                                f"best N-max samples could give (default: {DEFAULT_RADIUS_TOL_SIGMAS} * sigma)")


def check_sequential_arguments(args):
    """Raise ``UserError`` for sequential options without ``--sequential`` or that contradict each other."""
    given = [name for name, value in (("--N-max", args.N_max), ("--radii", getattr(args, "radii", None)),
                                      ("--radius-tol", getattr(args, "radius_tol", None))) if value is not None]
    if given and not args.sequential:
        raise UserError(f"{', '.join(given)} only apply to --sequential; add --sequential or drop them")
    if getattr(args, "radii", None) is not None and getattr(args, "radius_tol", None) is not None:
        raise UserError("--radii and --radius-tol choose different stopping rules; give one of them")


def sequential_n_max(args) -> int:
    return args.N_max if args.N_max is not None else args.N


def sequential_radius_tol(args, sigma: float) -> float:
    return args.radius_tol if args.radius_tol is not None else DEFAULT_RADIUS_TOL_SIGMAS * sigma


def select_indices(size: int, skip: int, max_index: int, start: int = 0) -> List[int]:
    """Images idx >= start with idx % skip == 0, stopping at idx == max_index (when >= 0)."""
    stop = size if max_index < 0 else min(size, max_index)
    return [i for i in range(start, stop) if i % skip == 0]


def format_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=seconds))


# --------------------------------------------------------------------------- inputs

def check_output_path(path: str):
    """Raise ``UserError`` unless ``path`` can be created or appended to (creates nothing)."""
    if path == "" or path.endswith(os.sep) or os.path.isdir(path):
        raise UserError(f"output '{path}' is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"cannot create output folder '{folder}': '{probe}' is a file; choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder '{probe}' is not writable; choose another output path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"output file '{path}' is not writable; choose another output path")


def evaluation_dataset(dataset: str, split: str):
    """The split without training augmentation: image idx is the same image on every run."""
    return get_dataset(dataset, split, augment=False)


def make_smooth(model: torch.nn.Module, num_classes: int, sigma: float, args) -> Smooth:
    return Smooth(model, num_classes, sigma, images_per_batch=args.batch_images, channels_last=args.channels_last,
                  bf16=args.bf16, compile=args.compile)


# --------------------------------------------------------------------------- result files

@dataclass
class TsvContent:
    rows: List[Tuple[int, str]]   # (idx, line without newline), in file order
    clean: bool                   # False: a torn header or last row must be dropped

    @property
    def indices(self):
        return {idx for idx, _ in self.rows}


def read_tsv(path: str, header: str, what: str = "result file") -> TsvContent:
    """The complete rows of a result file; raises ``UserError`` for a file that is not one."""
    try:
        with open(path, "r", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise UserError(f"'{path}' exists and is not a {what} (it is not text); choose another output path, "
                        "or pass --overwrite to replace it")
    except OSError as exc:
        raise UserError(f"cannot read '{path}' ({exc.strerror}); choose another output path")
    if "\n" not in text and header.startswith(text):
        return TsvContent([], clean=False)   # empty, or a header cut short
    if not text.startswith(header + "\n"):
        first = text.split("\n", 1)[0][:80].replace("\t", " ")
        raise UserError(f"'{path}' exists and is not a {what} (its first line is '{first}', not "
                        f"'{header.replace(chr(9), ' ')}'); choose another output path, or pass --overwrite "
                        "to replace it")
    lines = text[len(header) + 1:].split("\n")
    clean = lines.pop() == ""   # text after the last newline is a torn row
    num_fields = header.count("\t") + 1
    rows = []
    for number, line in enumerate(lines):
        fields = line.split("\t")
        if len(fields) != num_fields or not re.fullmatch(r"\d+", fields[0]):
            if number == len(lines) - 1:
                clean = False
                break
            raise UserError(f"line {number + 2} of '{path}' is damaged (expected {num_fields} tab-separated "
                            "fields); repair or remove it, or pass --overwrite to start over")
        rows.append((int(fields[0]), line))
    return TsvContent(rows, clean)


def write_tsv_atomic(path: str, header: str, lines: Sequence[str]):
    """Write header and rows to a temporary file, then rename it over ``path``."""
    def write(handle):
        handle.write(header + "\n")
        for line in lines:
            handle.write(line + "\n")
    replace_atomic(path, write)


def read_journal(path: str, width: int) -> List[Tuple[int, np.ndarray]]:
    """The complete records (idx, values[width]) of a journal; a torn last record is ignored."""
    if not os.path.exists(path):
        return []
    data = np.fromfile(path, dtype=np.float64)
    data = data[:len(data) // (width + 1) * (width + 1)].reshape(-1, width + 1)
    return [(int(row[0]), row[1:].copy()) for row in data]


class RecordStore:
    """Where row records end up (smooth_prediction's ``.npy``); the default keeps none."""

    def check(self, result: "ResultFile"):
        """Raise ``UserError`` before any work if the store does not fit the result file."""

    def reset(self):
        """Forget everything (``--overwrite``)."""

    def save(self, records: List[Tuple[int, np.ndarray]], final: bool):
        """Store ``records`` (later ones win) durably; ``final``: the run is over."""


class ResultFile:
    """A resumable TSV result file, its per-rank parts and (optionally) their record journals."""

    def __init__(self, path: str, header: str, overwrite: bool = False, record_width: Optional[int] = None,
                 store: Optional[RecordStore] = None):
        self.path = path
        self.header = header
        self.overwrite = overwrite
        self.record_width = record_width
        self.store = store or RecordStore()

    # files ---------------------------------------------------------------
    def part_path(self, rank: int) -> str:
        return f"{self.path}.part{rank}"

    @staticmethod
    def journal_path(tsv_path: str) -> str:
        return tsv_path + ".journal"

    def parts(self) -> List[str]:
        pattern = re.compile(re.escape(os.path.basename(self.path)) + r"\.part\d+$")
        found = glob.glob(glob.escape(self.path) + ".part*")
        return sorted((p for p in found if pattern.fullmatch(os.path.basename(p))),
                      key=lambda p: int(p.rsplit(".part", 1)[1]))

    def tsv_files(self) -> List[str]:
        return ([self.path] if os.path.exists(self.path) else []) + self.parts()

    def journals(self) -> List[str]:
        if self.record_width is None:
            return []
        return [j for j in (self.journal_path(p) for p in [self.path] + self.parts()) if os.path.exists(j)]

    def records(self) -> List[Tuple[int, np.ndarray]]:
        return [record for journal in self.journals() for record in read_journal(journal, self.record_width)]

    # before any work -------------------------------------------------------
    def check(self):
        """Read-only validation: the output can be written and what exists is ours."""
        check_output_path(self.path)
        if not self.overwrite:
            for path in self.tsv_files():
                read_tsv(path, self.header)
        self.store.check(self)

    def done_rows(self) -> Dict[int, str]:
        rows: Dict[int, str] = {}
        for path in self.tsv_files():
            for idx, line in read_tsv(path, self.header).rows:
                rows.setdefault(idx, line)
        return rows

    # rank 0 -----------------------------------------------------------------
    def prepare(self):
        """Start over (``--overwrite``) or merge what an earlier run left; make sure the file exists."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.overwrite:
            for path in self.journals() + self.parts() + ([self.path] if os.path.exists(self.path) else []):
                os.remove(path)
            self.store.reset()
            self.overwrite = False   # later merges of this run keep what it wrote
        self.merge(final=False)
        if not os.path.exists(self.path):
            write_tsv_atomic(self.path, self.header, [])

    def merge(self, final: bool):
        """Records into the store, then parts into the file (sorted by idx); then remove parts and journals."""
        journals, parts = self.journals(), self.parts()
        self.store.save(self.records(), final)
        content = read_tsv(self.path, self.header) if os.path.exists(self.path) else None
        rows = self.done_rows()
        indices = [idx for idx, _ in content.rows] if content else []
        in_order = indices == sorted(set(indices))
        if content is None or parts or not content.clean or not in_order:
            write_tsv_atomic(self.path, self.header, [rows[idx] for idx in sorted(rows)])
        for path in parts + journals:
            os.remove(path)

    # every rank ---------------------------------------------------------------
    def writer(self, rank: int, world_size: int) -> "RowWriter":
        if world_size == 1:
            return RowWriter(self.path, self.header, fresh=False, record_width=self.record_width)
        return RowWriter(self.part_path(rank), self.header, fresh=True, record_width=self.record_width)


class RowWriter:
    """Appends rows (and their records, first) to a result file or part, flushing each."""

    def __init__(self, path: str, header: str, fresh: bool, record_width: Optional[int] = None):
        self.tsv = open(path, "w" if fresh else "a")
        if fresh:
            self.tsv.write(header + "\n")
            self.tsv.flush()
        self.record_width = record_width
        self.journal = open(ResultFile.journal_path(path), "ab") if record_width is not None else None

    def write(self, idx: int, line: str, record: Optional[np.ndarray] = None):
        if self.journal is not None:
            values = np.asarray(record, dtype=np.float64).reshape(-1)
            if values.size != self.record_width:
                raise ValueError(f"record of size {values.size}, expected {self.record_width}")
            self.journal.write(np.concatenate([[float(idx)], values]).tobytes())
            self.journal.flush()
        self.tsv.write(line + "\n")
        self.tsv.flush()

    def close(self):
        self.tsv.close()
        if self.journal is not None:
            self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


class Barrier:
    """A barrier among the torchrun processes that tolerates a long wait (gloo, on CPU and GPU alike)."""

    def __init__(self, dist: Distributed):
        self.group = None
        if dist.enabled:
            self.group = torch.distributed.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)

    def __call__(self):
        if self.group is not None:
            torch.distributed.barrier(group=self.group)


def run_evaluations(evaluations: Sequence[Evaluation], args, dist: Distributed):
    """Fill each result file, sharing the images among the processes; resumable."""
    seed = args.seed if args.seed is not None else secrets.randbits(62)
    barrier = Barrier(dist)
    device = dist.device
    for evaluation in evaluations:
        output = evaluation.output
        if dist.is_main:
            output.prepare()
        barrier()
        done = set(output.done_rows())
        todo = [idx for idx in evaluation.indices if idx not in done]
        mine = todo[dist.rank::dist.world_size]
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
                generators = [noise_generator(seed, idx, device) for idx in group]
                results = evaluation.evaluate(xs, generators)
                seconds = (time.time() - before) / len(group)
                for idx, (_, label), result in zip(group, items, results):
                    line = evaluation.format_row(idx, int(label), result, seconds)
                    writer.write(idx, line, evaluation.record(result) if evaluation.record else None)
                bar.update(len(group))
        bar.close()
        barrier()
        if dist.is_main:
            output.merge(final=True)
    barrier()


def run_on_image_sets(args, dataset: str, image_sets: Sequence[Tuple[str, object]], outputs: Sequence["ResultFile"],
                      evaluate: Callable, format_row: Callable, record: Optional[Callable] = None):
    """The run of every evaluation script: check the outputs, load the smoothed classifier, fill each output.

    ``image_sets``: (description, indexable of (image, label)) per output;
    ``evaluate(smooth, xs, generators)`` returns one result per image.
    """
    for output in outputs:
        output.check()
    dist = Distributed()
    model = load_base_classifier(args.base_classifier, dataset, dist.device)
    smooth = make_smooth(model, get_num_classes(dataset), args.sigma, args)
    evaluations = [Evaluation(output=output, indices=select_indices(len(images), args.skip, args.max, args.start),
                              load=images.__getitem__,
                              evaluate=lambda xs, generators: evaluate(smooth, xs, generators),
                              format_row=format_row, record=record, description=description)
                   for (description, images), output in zip(image_sets, outputs)]
    run_evaluations(evaluations, args, dist)
    dist.close()
