"""What the evaluation scripts share (certify, predict, smooth_prediction, certify_c).

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
    any image is refused. Evaluation splits are
    read without training augmentation, so every image is the same on every
    run. With ``--seed S`` the noise of image ``idx`` comes from
    ``noise_streams.noise_generator(S, idx, device, key)`` (``key``: empty, or the
    corruption of certify_c): its row depends neither on how many images
    share a forward pass, nor on how the images are split among processes,
    nor on interruptions. Without ``--seed`` rank 0 draws a fresh 128-bit
    seed for the run.
    The ``time`` column is the wall-clock time of the image's group divided by
    the group's size.

Resumable result files (``ResultFile``)
    The header is written first; each row is appended and flushed as soon as
    its image is done. Running the same command again keeps every complete
    row unchanged, drops a torn last row (no trailing newline or a wrong
    number of fields) and evaluates only the images without a row. A file
    whose first line is not the expected header is never modified: the run
    stops with one line and exit status 2 (``--overwrite`` starts over).
    When every selected image already has a row, the run says
    ``already complete: K rows, OUTFILE`` and does nothing else; every run
    ends by printing its output paths.

Settings records (``Provenance``)
    Next to each output (the TSV, and smooth_prediction's ``.npy``) lies
    ``{output}.meta.json``, written atomically by rank 0 before the first row.
    Its ``settings`` are what determines the rows: the script, the data set,
    every option of the command line except those in ``NOT_ROW_SETTINGS``
    (image selection, ``--batch-images``, output handling, input paths), the
    SHA-256 of the checkpoint's content, and per output what the script adds
    (certify_c's corruption); options added to a script later are settings
    without further ado. Its ``environment`` is recorded, not compared:
    checkpoint path, code version (SHA-256 of ``code/**/*.py``, always
    available, and the git commit when there is one), torch version, command.
    A run that finds an existing output compares, before any work:
    * a record with other settings: stop, one line naming each key
      ``old -> new`` (``--overwrite`` starts over); a larger ``--max``, another
      ``--skip``/``--start`` only add images and are allowed;
    * another code or torch version: a warning line, the run continues;
    * rows without a record (the published code, older versions): stop unless
      ``--resume-unverified``, which writes a record counting the rows it
      adopted (``unverified_rows``).
    ``--overwrite`` replaces the records with the output. analyze.py reads the
    records to refuse combining rows made with different settings.

Several processes (``torchrun --nproc_per_node K``)
    Rank 0 first merges what an interrupted run left into the result file and
    lists the selected images that have no row: this one list, sent to every
    rank (``Coordinator.share``), is dealt round-robin to the ranks. Rank r
    appends its rows to ``{outfile}.part{r}`` (a result file of its own, with
    the header). When every rank is done, rank 0 merges the result file and
    the parts, sorted by idx, into the result file (written to a temporary
    file, then renamed) and removes the parts. The output folder must be
    shared by all processes.

Row records (smooth_prediction)
    A script may attach a vector to each row (the class frequencies that go
    into the ``.npy``). The vector is appended to ``{tsv}.journal`` (fixed-size
    float64 records: idx, values) and flushed before the row is written, so
    every row has its vector on disk. Merging hands the journal records of
    the rows to the script's ``RecordStore``, which saves them (atomically),
    with the list of rows it now covers, before the parts and journals are
    removed.

The sharing protocol and its invariant
    Phases of one result file, for K processes (K = 1: no parts; the rows go
    to the result file and its journal directly):

    1. prepare (rank 0 alone; the other ranks wait in ``share``): merge the
       leftovers of an interrupted run (step 4), create the result file.
    2. snapshot (rank 0 alone, still before ``share``): todo = the selected
       images without a row in the result file. No part exists and no
       other rank writes, so nothing can change under this read. ``share``
       sends todo to every rank; each rank's share is todo[r::K].
    3. work (every rank): rank r writes only ``{outfile}.part{r}`` and its
       journal, which it creates after ``share``; nobody reads them.
    4. merge (rank 0 alone, after a barrier every rank reaches with its
       files closed): the records of rows with a complete line go to the
       store (saved atomically), then the result file is replaced
       atomically by its rows and the parts' rows, then the parts are
       removed, then the journals. The other ranks wait in the next
       ``share`` (next file) or in the final barrier.

    Invariant, at every moment (a process killed at any instruction
    included):

    (a) every row ever completed is in the result file or in a part;
    (b) every such row of a file with records has its record in a journal
        or in the store (the store's coverage lists only rows it holds);
    (c) each image has at most one complete row: an idx is dealt to
        exactly one rank, and only if it had no row in the one snapshot of
        step 2; two copies of a row (a result file renamed into place
        before the part it came from is removed) are the same line.

    (a) and (b) hold because each step writes the new copy before the old
    one goes: journal record before row; store (``.npy``, then coverage)
    before parts and journals are removed; the new result file, by rename,
    before the parts. A merge interrupted anywhere is simply done again by
    the next run (merging is idempotent; the first copy of an idx wins).
    So no row is lost or duplicated. A row that was being written when a
    process died is torn: it is dropped and its image done again, and so is
    a record without a complete row. Appends are flushed, not fsynced: a
    crash of the machine (not of the process) may lose the last rows, or
    keep a row whose record was lost; such a row is dropped with a warning
    at the next merge and its image done again.

    Earlier versions let every rank read the result file and the parts for
    itself after the barrier; a rank that already wrote a row into its part
    changed what a slower rank read, the ranks dealt different todo lists,
    and images were never done. Every rank now uses rank 0's snapshot.
"""
import datetime
import functools
import glob
import hashlib
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from common import (ArgumentParser, Distributed, UserError, check_checkpoint_file, file_sha256, load_base_classifier,
                    nonnegative_float, nonnegative_int, positive_float, positive_int, probability, replace_atomic)
from core import Smooth
from datasets import DATASETS, get_dataset, get_num_classes
from noise_streams import noise_generator
from provenance import SIDECAR_FORMAT, settings_differences, sidecar_path
from provenance import read_sidecar as read_record
from sequential import MIXTURE_SHARE, SEQUENTIAL_FINAL_SHARE, sequential_scheme

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
    group.add_argument("--resume-unverified", action="store_true",
                       help="continue a result file that has rows but no settings record ({outfile}.meta.json), "
                            "e.g. one written by the published code, taking its rows as made with this "
                            "command's settings")


def add_sequential_arguments(parser: ArgumentParser, certify: bool = True):
    """``--sequential`` and its options (``sequential.certify_sequential`` / ``predict_sequential``)."""
    group = parser.add_argument_group("sequential mode: same guarantee, fewer samples")
    final, mixture = SEQUENTIAL_FINAL_SHARE, MIXTURE_SHARE
    how = (f"with --radii, a look after every --batch, the lower bound the largest of a mixture confidence "
           f"sequence (anytime-valid, {mixture:g} alpha), Clopper-Pearson at fixed geometric looks "
           f"({round(1 - final - mixture, 10):g} alpha shared equally) and Clopper-Pearson at N-max ({final:g} "
           f"alpha); without --radii, Clopper-Pearson at the fixed geometric looks only ({round(1 - final, 10):g} "
           f"alpha shared equally by those before N-max, {final:g} alpha at N-max); N-max at most one batch is "
           f"a single look, Clopper-Pearson at alpha" if certify else
           "the test at alpha / K at each of K fixed geometric looks")
    group.add_argument("--sequential", action="store_true",
                       help="draw samples in rounds and stop as soon as the result is decided, valid whatever "
                            f"the look it stops at ({how}); adds a column 'samples'")
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


# --------------------------------------------------------------------------- provenance

CODE_FOLDER = os.path.dirname(os.path.abspath(__file__))

#: Options that never change the value of a row, so they are neither part of the
#: settings nor compared on resume: which images are done (a resumed run may add
#: images), how images are grouped (rows do not depend on it), which outputs are
#: written and how existing ones are treated, and the paths of the inputs (the
#: checkpoint is compared by its content; the paths are recorded for reference).
#: Every other option of a script, including options added later, is a setting.
NOT_ROW_SETTINGS = frozenset({
    "max", "skip", "start",
    "batch_images",
    "outfile", "corruptions", "overwrite", "resume_unverified",
    "base_classifier", "base_c_path",
})


@functools.lru_cache(maxsize=1)
def code_version() -> Dict[str, Optional[str]]:
    """The code that runs: SHA-256 of the ``.py`` files under ``code/`` and, when available, the git commit.

    The hash is always available (also in a copy of ``code/`` without git) and
    changes with any edit; the commit is for humans (None outside a git
    checkout; ``+dirty`` when ``code/`` differs from it).
    """
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(CODE_FOLDER)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, CODE_FOLDER).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    commit = None
    try:
        def git(*command):
            return subprocess.run(["git", "-C", CODE_FOLDER] + list(command), capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"code_sha256": digest.hexdigest(), "git_commit": commit}


def _json_value(value):
    """``value`` as it reads back from JSON (tuples become lists), so recorded and new settings compare equal."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class Provenance:
    """What made a result file: the settings that determine its rows, and the environment of the run.

    ``settings`` (compared on resume): the script, the data set, every option
    of the parsed command line but those in ``NOT_ROW_SETTINGS``, the SHA-256
    of the checkpoint's content and, per output, what the script adds (the
    corruption of certify_c). ``environment`` (recorded, not compared): input
    paths, the code version (``code_version``), the torch version, the command.
    """
    settings: Dict[str, object]
    environment: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def of_run(cls, args, script: str, dataset: str) -> "Provenance":
        check_checkpoint_file(args.base_classifier)
        settings = {"script": script, "dataset": dataset}
        settings.update((key, value) for key, value in vars(args).items() if key not in NOT_ROW_SETTINGS)
        settings["checkpoint_sha256"] = file_sha256(args.base_classifier)
        if getattr(args, "sequential", False) and hasattr(args, "radii"):
            # (certification) the confidence sequence and looks decide the rows: a file of another scheme is not resumed
            settings["sequential_scheme"] = sequential_scheme(sequential_n_max(args), args.batch)
        environment = {"checkpoint": os.path.abspath(args.base_classifier), **code_version(),
                       "torch": torch.__version__,
                       "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}
        if getattr(args, "base_c_path", None):
            environment["base_c_path"] = os.path.abspath(args.base_c_path)
        return cls(_json_value(settings), _json_value(environment))

    def with_settings(self, **extra) -> "Provenance":
        return Provenance(_json_value({**self.settings, **extra}), self.environment)

    def record(self, file: str, unverified_rows: int = 0) -> dict:
        """The sidecar of ``file``: the settings, the environment, and how many rows it had before its record."""
        return {"format": SIDECAR_FORMAT, "file": os.path.basename(file), "settings": self.settings,
                "environment": self.environment, "unverified_rows": unverified_rows,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def read_sidecar(path: str) -> Optional[dict]:
    """The settings record of the output ``path`` (None when there is none); ``UserError`` when unreadable."""
    try:
        return read_record(path)
    except ValueError as exc:
        raise UserError(f"{exc}; restore it, or pass --overwrite to start over")


def write_sidecar(path: str, record: dict):
    replace_atomic(sidecar_path(path), lambda handle: handle.write(json.dumps(record, indent=1) + "\n"))


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

    def covered(self) -> Optional[set]:
        """The rows whose records the store holds; None if it cannot tell (then every row counts)."""
        return None

    def save(self, records: List[Tuple[int, np.ndarray]], covered: Sequence[int], final: bool):
        """Store ``records`` (later ones win) durably, and that the rows ``covered`` are now stored.

        ``covered``: every row of the result file; each has its record in ``records`` or in
        the store already. ``final``: the run is over.
        """

    def files(self) -> List[str]:
        """The files the store writes (each gets a settings record like the result file's)."""
        return []


class ResultFile:
    """A resumable TSV result file, its per-rank parts and (optionally) their record journals."""

    def __init__(self, path: str, header: str, overwrite: bool = False, record_width: Optional[int] = None,
                 store: Optional[RecordStore] = None):
        self.path = path
        self.header = header
        self.overwrite = overwrite
        self.record_width = record_width
        self.store = store or RecordStore()
        self.provenance: Optional[Provenance] = None   # set by ``expect``
        self.resume_unverified = False

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
        """Every journal of the result file and of its parts, a part's included after the part was removed."""
        if self.record_width is None:
            return []
        pattern = re.compile(re.escape(os.path.basename(self.path)) + r"(\.part\d+)?\.journal$")
        found = glob.glob(glob.escape(self.path) + "*.journal")
        return sorted((p for p in found if pattern.fullmatch(os.path.basename(p))),
                      key=lambda p: (p.count(".part"), p))

    def records(self) -> List[Tuple[int, np.ndarray]]:
        return [record for journal in self.journals() for record in read_journal(journal, self.record_width)]

    def recorded_files(self) -> List[str]:
        """The outputs that carry a settings record: the result file and the store's files."""
        return [self.path] + self.store.files()

    # before any work -------------------------------------------------------
    def expect(self, provenance: Provenance, resume_unverified: bool = False):
        """The settings of this run; ``check`` compares them with the records of existing outputs."""
        self.provenance = provenance
        self.resume_unverified = resume_unverified

    def check(self):
        """Read-only validation: the output can be written and what exists is ours, made with these settings."""
        check_output_path(self.path)
        if not self.overwrite:
            for path in self.tsv_files():
                read_tsv(path, self.header)
        self.store.check(self)
        if not self.overwrite:
            self.check_settings()

    def check_settings(self):
        """Raise ``UserError`` when an existing output was made with other settings, or has rows but no record.

        A differing code or torch version only prints a warning (once, from
        rank 0): the settings define what each row computes, and refusing
        every resume after an upgrade would only push users to ``--overwrite``.
        """
        if self.provenance is None:
            return
        for path in self.recorded_files():
            record = read_sidecar(path)
            if record is None:
                has_rows = bool(self.done_rows()) if path == self.path else os.path.exists(path)
                if has_rows and not self.resume_unverified:
                    raise UserError(f"'{path}' has results but no settings record ('{sidecar_path(path)}': made by "
                                    "the published or an older code), so resuming could mix settings; pass "
                                    "--resume-unverified to continue it with this command's settings, or "
                                    "--overwrite to start over")
                continue
            differences = settings_differences(record["settings"], self.provenance.settings)
            if differences:
                raise UserError(f"'{path}' was made with other settings ({', '.join(differences)}); run with its "
                                "settings to continue it, choose another output, or pass --overwrite to start over")
            old, new = record.get("environment", {}), self.provenance.environment
            software_changed = old.get("code_sha256") != new.get("code_sha256") or old.get("torch") != new.get("torch")
            if software_changed and os.environ.get("RANK", "0") == "0":
                keys = ("git_commit", "code_sha256", "torch")
                changed = settings_differences({k: old.get(k) for k in keys}, {k: new.get(k) for k in keys})
                print(f"warning: '{path}' was started with other software ({', '.join(changed)}); continuing it "
                      "with the same settings", file=sys.stderr)

    def complete(self, indices: Sequence[int]) -> bool:
        """Whether every image of ``indices`` has a row and nothing is left to merge or record (or start over)."""
        if self.overwrite or self.parts() or self.journals() or not os.path.exists(self.path):
            return False
        if self.provenance is not None and any(not os.path.exists(sidecar_path(p)) for p in self.recorded_files()
                                               if os.path.exists(p)):
            return False
        return set(indices) <= set(self.done_rows())

    def done_rows(self) -> Dict[int, str]:
        rows: Dict[int, str] = {}
        for path in self.tsv_files():
            for idx, line in read_tsv(path, self.header).rows:
                rows.setdefault(idx, line)
        return rows

    # rank 0 -----------------------------------------------------------------
    def prepare(self):
        """Start over (``--overwrite``) or merge what an earlier run left; make sure the file exists.

        The settings records are written (atomically) before the result file
        gets its first row; an existing record is kept as it is.
        """
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.overwrite:
            records = [sidecar_path(p) for p in self.recorded_files() if os.path.exists(sidecar_path(p))]
            for path in self.journals() + self.parts() + ([self.path] if os.path.exists(self.path) else []) + records:
                os.remove(path)
            self.store.reset()
            self.overwrite = False   # later merges of this run keep what it wrote
        self.merge(final=False)
        if self.provenance is not None:
            for path in self.recorded_files():
                if not os.path.exists(sidecar_path(path)):
                    # rows already there were adopted with --resume-unverified: say how many
                    unverified = len(self.done_rows()) if os.path.exists(path) else 0
                    write_sidecar(path, self.provenance.record(path, unverified_rows=unverified))
        if not os.path.exists(self.path):
            write_tsv_atomic(self.path, self.header, [])

    def merge(self, final: bool):
        """Records into the store, then parts into the file (sorted by idx); then remove parts and journals.

        Runs while no other process touches these files (see the module's protocol). Each step
        makes a new copy before the next one removes an old one, so a crash at any point leaves every
        row (and its record) somewhere, and merging again finishes the work.
        """
        journals, parts = self.journals(), self.parts()
        content = read_tsv(self.path, self.header) if os.path.exists(self.path) else None
        rows = self.done_rows()
        lost = []
        if self.record_width is not None:
            records = self.records()
            stored = self.store.covered()
            if stored is not None:
                # a row whose record is nowhere (appends are not fsynced: a machine crash can do
                # that) is dropped, so that its image is done again
                with_record = {idx for idx, _ in records} | stored
                lost = [idx for idx in sorted(rows) if idx not in with_record]
                for idx in lost:
                    del rows[idx]
                if lost:
                    print(f"warning: {len(lost)} rows of '{self.path}' had lost their record "
                          f"(first: idx {lost[0]}); their images are done again", file=sys.stderr)
            # a record whose row is missing or torn belongs to an image that is done again
            self.store.save([(idx, values) for idx, values in records if idx in rows], sorted(rows), final)
        indices = [idx for idx, _ in content.rows] if content else []
        in_order = indices == sorted(set(indices))
        if content is None or parts or lost or not content.clean or not in_order:
            write_tsv_atomic(self.path, self.header, [rows[idx] for idx in sorted(rows)])
        for path in parts + journals:
            os.remove(path)

    def report(self, already_complete: bool):
        """One line on stdout: how many rows the result file holds, and where it (and the store's files) are."""
        also = "".join(f" and {path}" for path in self.store.files())
        print(f"{'already complete' if already_complete else 'done'}: {len(self.done_rows())} rows, {self.path}{also}")

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
        # a fresh part starts a fresh journal (the merge before it removed the old one)
        self.journal = open(ResultFile.journal_path(path), "wb" if fresh else "ab") if record_width is not None \
            else None

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
    noise_key: Tuple[int, ...] = ()   # the noise of image idx: noise_streams.noise_generator(seed, idx, device, noise_key)


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


def run_on_image_sets(args, dataset: str, image_sets: Sequence[Tuple[str, object]], outputs: Sequence["ResultFile"],
                      evaluate: Callable, format_row: Callable, record: Optional[Callable] = None, *, script: str,
                      output_settings: Optional[Sequence[dict]] = None,
                      noise_keys: Optional[Sequence[Tuple[int, ...]]] = None):
    """The run of every evaluation script: check the outputs, load the smoothed classifier, fill each output.

    ``image_sets``: (description, indexable of (image, label)) per output;
    ``evaluate(smooth, xs, generators)`` returns one result per image;
    ``script``: the script's file name; ``output_settings``: settings of each
    output beyond the command line's (certify_c's corruption), recorded and
    compared like them; ``noise_keys``: one ``Evaluation.noise_key`` per
    output (default: all empty).

    Before any work: an empty image selection, a foreign output and an output
    made with other settings stop the run (``UserError``). Outputs that are
    already complete are only reported. At the end, each output's path is
    printed on stdout.
    """
    selections = []
    for description, images in image_sets:
        indices = select_indices(len(images), args.skip, args.max, args.start)
        if not indices:
            raise UserError(f"no image to evaluate: --start {args.start} --max {args.max} --skip {args.skip} select "
                            f"none of the {len(images)} images ({description}); lower --start or raise --max")
        selections.append(indices)
    provenance = Provenance.of_run(args, script, dataset)
    for output, extra in zip(outputs, output_settings or [{}] * len(outputs)):
        output.expect(provenance.with_settings(**extra), resume_unverified=args.resume_unverified)
        output.check()
    # Nothing has been written yet, so every torchrun process finds the same outputs complete.
    complete = [output.complete(indices) for output, indices in zip(outputs, selections)]
    main_process = os.environ.get("RANK", "0") == "0"
    if all(complete):
        if main_process:
            for output in outputs:
                output.report(already_complete=True)
        return
    dist = Distributed()
    model = load_base_classifier(args.base_classifier, dataset, dist.device)
    smooth = make_smooth(model, get_num_classes(dataset), args.sigma, args)
    evaluations = [Evaluation(output=output, indices=indices, load=images.__getitem__,
                              evaluate=lambda xs, generators: evaluate(smooth, xs, generators),
                              format_row=format_row, record=record, description=description, noise_key=tuple(key))
                   for (description, images), output, indices, done, key
                   in zip(image_sets, outputs, selections, complete, noise_keys or [()] * len(outputs))
                   if not done]
    run_evaluations(evaluations, args, dist)
    dist.close()
    if main_process:
        for output, done in zip(outputs, complete):
            output.report(already_complete=done)
