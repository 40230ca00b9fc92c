"""Reproduce a paper table: train, certify and keep every cell of it, resumably.

    python code/reproduce.py fmnist [--cells "cohen:0.25 stab:*"] [--dry-run]

(``scripts/reproduce.sh fmnist`` is the same, with ``CELLS=...`` and ``DRY_RUN=1``.)

A cell is one method at one sigma, trained with the settings of
``scripts/published_settings.tsv`` and ``--seed 0``, then certified twice:

* fixed-N CERTIFY (Cohen et al. 2019; N0 = 100, N = 100,000, alpha = 0.001)
  on every 100th test image, for the ACR compared image by image with the
  published results;
* sequential radii mode (``--sequential --radii 0.25 0.5 0.75 1.0 1.5 2.0``,
  at most 100,000 samples) on every 10th test image, for the certified
  accuracy at those radii on 1,000 images.

The ``pretrain`` cell is the sigma = 0.25 Gaussian model whose smoothed
prediction on the training set (N = 10,000) CAT-RS reads at every sigma; a
CAT-RS cell selects it too.

Each step is one of the project's scripts, which skip finished work and
continue interrupted work, so the driver can be stopped at any moment and run
again. A finished cell is copied to ``data/{dataset}/noise_{sigma}/{method}/``
(``data/{dataset}/pretrain/``): the checkpoint without optimizer state,
``log.txt``, the gzipped result files with their settings records, and
``cell.json`` (the commands, the measured times), written last. A finished
cell is skipped; one finished with other commands is refused, never replaced.
Two drivers may run at once on different cells (``--cells``): a cell another
driver holds is skipped.

Unfinished work can move to another machine or checkout through the data
folder: ``--save-progress`` copies what the unfinished cells have computed
so far (the training checkpoint with its optimizer and random states, the
rows certified so far with their settings records) to
``data/{dataset}/progress/``, under the paths they have in the repository;
it waits for no driver and skips a cell one holds. A driver that starts a
cell whose files are missing copies them back from there first, so the
scripts continue where the saved work stopped; a kept cell's progress files
are removed.
"""
import argparse
import fnmatch
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import filelock

from common import DefaultsHelpFormatter, UserError, cli_status
from provenance import SIDECAR_SUFFIX, relative_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = os.path.join(REPO, "scripts", "published_settings.tsv")
ARCHITECTURE = {"mnist": "lenet", "fmnist": "lenet", "cifar10": "cifar_resnet110",
                "cifar100": "cifar100_resnet110", "imagenet": "resnet50"}
RADII = ["0.25", "0.5", "0.75", "1.0", "1.5", "2.0"]
# Cheapest first, so that a session's CPU finishes whole cells; the pretrain comes before CAT-RS, which reads it.
METHOD_ORDER = ["cohen", "stab", "consistency", "macer", "salman", "smoothmix", "pretrain", "catrs"]
# Minutes per cell (training and both certifications) for LeNet on one CPU core, with a second driver on the
# other, for the estimate of the time left until a cell of the same method has been measured: the measured
# Gaussian cell (26 min training, 26 min certification), the others' training scaled by their published
# (GPU) training times; the pretrain is mostly its smoothed prediction (6 x 10^8 forward passes).
LENET_CPU_MINUTES = {"cohen": 53, "stab": 55, "consistency": 91, "macer": 221, "salman": 494,
                     "smoothmix": 390, "pretrain": 760, "catrs": 338}


class ReproduceError(UserError):
    """A problem with the request or the data folder; the message says what to do."""


@dataclass
class Cell:
    method: str          # a training script's suffix, or "pretrain"
    sigma: str           # as written in the settings, e.g. "0.25"
    run_id: str
    options: List[str]   # schedule and method options

    @property
    def name(self) -> str:
        return "pretrain" if self.method == "pretrain" else f"{self.method}:{self.sigma}"

    @property
    def script(self) -> str:
        return "train_cohen.py" if self.method == "pretrain" else f"train_{self.method}.py"


# --------------------------------------------------------------------------- which cells

def table_cells(dataset: str, settings_path: str = SETTINGS) -> List[Cell]:
    """Every training run of ``dataset`` in the settings table, cheapest first."""
    source = "cifar10" if dataset == "cifar100" else dataset
    cells = []
    with open(settings_path) as handle:
        for line in handle:
            if line.startswith("#") or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if fields[0] == source:
                cells.append(Cell(fields[1], fields[2], fields[3], shlex.split(fields[4])))
    if not cells:
        raise ReproduceError(f"no published settings for data set '{dataset}' in {settings_path}")
    return sorted(cells, key=lambda c: (METHOD_ORDER.index(c.method), float(c.sigma)))


def select_cells(cells: List[Cell], patterns: Optional[str]) -> List[Cell]:
    """The cells matching ``patterns`` ("method:sigma" globs, or "pretrain"), with the pretrain CAT-RS needs."""
    if not patterns or not patterns.split():
        chosen = set(c.name for c in cells)
    else:
        chosen = set()
        for pattern in patterns.split():
            matched = [c.name for c in cells if fnmatch.fnmatchcase(c.name, pattern)]
            if not matched:
                names = " ".join(c.name for c in cells)
                raise ReproduceError(f"cell pattern '{pattern}' matches no cell; the cells are: {names}")
            chosen.update(matched)
    if any(name.startswith("catrs:") for name in chosen):
        chosen.add("pretrain")
    return [c for c in cells if c.name in chosen]


# --------------------------------------------------------------------------- the commands of a cell

@dataclass
class Scale:
    """What the driver runs beyond the settings table; the defaults are the paper's."""
    train_args: List[str]
    n: int = 100_000
    fixed_skip: int = 100
    sequential_skip: int = 10
    max_images: int = -1
    smooth_n: int = 10_000
    smooth_max: int = -1
    # torch.compile of the smoothed prediction's model: the same predictions as eager float32 (0 of 340,000
    # noisy LeNet samples differed) at less cost per sample; off for toy runs, where compiling dominates
    smooth_compile: bool = True


def run_folder(dataset: str, cell: Cell, logdir: str, train_argv: List[str]) -> str:
    """Where the cell's training script writes (its ``--logdir``/dataset/method path/arch/id)."""
    if os.path.join(REPO, "code") not in sys.path:
        sys.path.insert(0, os.path.join(REPO, "code"))
    import importlib
    import train_utils
    module = importlib.import_module(cell.script[:-3])
    args = train_utils.parse_args(module.METHOD, train_argv)
    return train_utils.run_folder(args, module.METHOD.method_path(args))


def cell_commands(dataset: str, cell: Cell, scale: Scale, logdir: str, outdir: str) -> Dict[str, List[str]]:
    """The cell's steps as command lines (``python`` standing for the interpreter), keyed by step name."""
    arch = ARCHITECTURE[dataset]
    train = [dataset, arch, *cell.options, "--noise", cell.sigma, "--id", cell.run_id, "--seed", "0",
             "--logdir", logdir, *scale.train_args]
    prediction = os.path.join(outdir, "smooth_prediction", dataset, "cohen", "0", "model_conf_0.25_train.npy")
    if cell.method == "catrs" and os.path.normpath(outdir) != "test":   # else train_catrs.py reads it by default
        train += ["--smooth-prediction", prediction]
    folder = run_folder(dataset, cell, logdir, train)
    checkpoint = os.path.join(folder, "checkpoint.pth.tar")
    commands = {"train": ["python", f"code/{cell.script}", *train, "--resume"]}
    if cell.method == "pretrain":
        out = os.path.join(outdir, "smooth_prediction", dataset, "cohen", cell.run_id, f"noise_train_{cell.sigma}.tsv")
        commands["smooth_prediction"] = ["python", "code/smooth_prediction.py", dataset, checkpoint, cell.sigma, out,
                                         f"--N={scale.smooth_n}", "--skip=1", "--split=train", "--seed", "0",
                                         "--max", str(scale.smooth_max)] + (["--compile"] if scale.smooth_compile else [])
        return commands
    # test/certify/{dataset}/{method path without noise_s}/{id}/, as scripts/certify_all.sh names it
    method_dir = os.path.dirname(os.path.relpath(os.path.dirname(os.path.dirname(folder)), os.path.join(logdir, dataset)))
    base = os.path.join(outdir, "certify", dataset, method_dir, cell.run_id, f"noise_{cell.sigma}")
    common = ["python", "code/certify.py", dataset, checkpoint, cell.sigma]
    commands["certify"] = [*common, f"{base}_skip{scale.fixed_skip}.tsv", "--N0", "100", "--N", str(scale.n),
                           "--alpha", "0.001", "--skip", str(scale.fixed_skip), "--max", str(scale.max_images),
                           "--seed", "0"]
    commands["sequential"] = [*common, f"{base}_sequential_skip{scale.sequential_skip}.tsv", "--sequential",
                              "--radii", *RADII, "--N0", "100", "--N-max", str(scale.n), "--alpha", "0.001",
                              "--skip", str(scale.sequential_skip), "--max", str(scale.max_images), "--seed", "0"]
    return commands


def output_of(command: List[str]) -> str:
    """The output file of a certify / smooth_prediction command (its fourth positional argument)."""
    return command[5]


# --------------------------------------------------------------------------- the kept results

def data_folder(data_dir: str, cell: Cell) -> str:
    return os.path.join(data_dir, "pretrain" if cell.method == "pretrain" else os.path.join(f"noise_{cell.sigma}", cell.method))


def finished_record(data_dir: str, cell: Cell, commands: Dict[str, List[str]]) -> Optional[dict]:
    """The cell's ``cell.json`` when it is finished; refuses a cell finished with other commands."""
    path = os.path.join(data_folder(data_dir, cell), "cell.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        record = json.load(handle)
    if record.get("commands") != commands:
        step = next((s for s in commands if record.get("commands", {}).get(s) != commands[s]), "train")
        raise ReproduceError(f"{cell.name} in '{os.path.dirname(path)}' was made with another {step} command "
                             f"({shlex.join(record.get('commands', {}).get(step, []))}); move that folder away "
                             "to make it again, or pass another --data-dir")
    return record


def _gzip_copy(source: str, target: str):
    with open(source, "rb") as src, open(target, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as dst:
            shutil.copyfileobj(src, dst)


def _slim_checkpoint(source: str, target: str):
    """The weights and arguments of a training checkpoint, without optimizer or random states."""
    import torch
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    kept = {key: checkpoint[key] for key in ("epoch", "arch", "state_dict", "args", "input_layer") if key in checkpoint}
    torch.save(kept, target)


def _log_seconds(log_path: str) -> float:
    with open(log_path) as handle:
        rows = [line.split("\t") for line in handle.read().splitlines()[1:] if line.strip()]
    return sum(float(row[1]) for row in rows)


def _rows_seconds(tsv_path: str) -> float:
    """The summed ``time`` column (``H:MM:SS.ffffff``) of a result file."""
    with open(tsv_path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        column = header.index("time")
        total = 0.0
        for line in handle:
            hours, minutes, seconds = line.rstrip("\n").split("\t")[column].split(":")
            total += 3600 * int(hours) + 60 * int(minutes) + float(seconds)
    return total


def _copy_record(source: str, target: str):
    """A settings record, its paths made relative to the repository (a record kept in it names no machine)."""
    with open(source) as handle:
        record = json.load(handle)
    with open(target, "w") as handle:
        handle.write(json.dumps(relative_record(record, REPO), indent=1) + "\n")


def _copy_result(source: str, folder: str, name: str):
    """``source`` gzipped as ``name.gz``, with its settings record as ``name.meta.json``."""
    _gzip_copy(source, os.path.join(folder, name + ".gz"))
    _copy_record(source + SIDECAR_SUFFIX, os.path.join(folder, name + SIDECAR_SUFFIX))


def keep_cell(data_dir: str, cell: Cell, commands: Dict[str, List[str]], started: float) -> dict:
    """Copy a finished cell into the data folder; ``cell.json`` is written last, so a torn copy is redone."""
    target = data_folder(data_dir, cell)
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    run = _train_folder(commands)
    _slim_checkpoint(os.path.join(run, "checkpoint.pth.tar"), os.path.join(staging, "checkpoint.pth.tar"))
    shutil.copyfile(os.path.join(run, "log.txt"), os.path.join(staging, "log.txt"))
    seconds = {"train": _log_seconds(os.path.join(run, "log.txt"))}
    for step in commands:
        if step == "train":
            continue
        source = output_of(commands[step])
        name = {"certify": "certify.tsv", "sequential": "certify_sequential.tsv",
                "smooth_prediction": "smooth_prediction_train.tsv"}[step]
        _copy_result(source, staging, name)
        seconds[step] = _rows_seconds(source)
        if step == "smooth_prediction":
            for npy in _smooth_prediction_arrays(source, cell.sigma):
                _gzip_copy(npy, os.path.join(staging, os.path.basename(npy) + ".gz"))
                if os.path.exists(npy + SIDECAR_SUFFIX):
                    _copy_record(npy + SIDECAR_SUFFIX, os.path.join(staging, os.path.basename(npy) + SIDECAR_SUFFIX))
    record = {"cell": cell.name, "commands": commands, "seconds": seconds,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "driver_seconds": round(time.time() - started, 1)}
    with open(os.path.join(staging, "cell.json"), "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    # a folder without cell.json is an unfinished copy; a finished cell never gets here (checked under the lock)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(staging, target)
    return record


def _train_folder(commands: Dict[str, List[str]]) -> str:
    step = "certify" if "certify" in commands else "smooth_prediction"
    return os.path.dirname(commands[step][3])


def _smooth_prediction_array_paths(tsv: str, sigma: str) -> List[str]:
    """The ``.npy`` of a smoothed prediction's frequencies and its coverage, next to its TSV."""
    folder = os.path.dirname(tsv)
    return [os.path.join(folder, f"model_conf_{sigma}_train{suffix}") for suffix in (".npy", ".covered.npy")]


def _smooth_prediction_arrays(tsv: str, sigma: str) -> List[str]:
    return [path for path in _smooth_prediction_array_paths(tsv, sigma) if os.path.exists(path)]


# --------------------------------------------------------------------------- unfinished work, saved and restored

PROGRESS = "progress"
# The most processes an evaluation step may be sharded over (--procs); their parts are saved too.
MAX_PROCS = 16


def progress_files(commands: Dict[str, List[str]], root: Optional[str] = None) -> List[str]:
    """The files that hold a cell's unfinished work, existing or not, relative to ``root``.

    The training checkpoint and ``log.txt`` and, for each evaluation step, its result file, settings
    record and row journal. The steps run in ``root``, so relative paths in the commands are relative to it.
    """
    root = root or REPO
    files = [os.path.join(_train_folder(commands), name) for name in ("checkpoint.pth.tar", "log.txt")]
    for step, command in commands.items():
        if step != "train":
            out = output_of(command)
            files += [out, out + ".meta.json", out + ".journal"]
            # the rows of a run sharded over K processes (--procs) wait in per-rank parts until it ends
            for rank in range(MAX_PROCS):
                files += [f"{out}.part{rank}", f"{out}.part{rank}.journal"]
            if step == "smooth_prediction":
                # the frequencies of the rows merged so far live only in the .npy, which its coverage lists
                npy, covered = _smooth_prediction_array_paths(out, command[4])
                files += [npy, npy + ".meta.json", covered]
    relative = [os.path.relpath(os.path.join(root, f), root) for f in files]
    outside = [f for f in relative if f.startswith(os.pardir + os.sep)]
    if outside:
        raise ReproduceError(f"cannot save or restore '{os.path.join(root, outside[0])}': progress is kept for "
                             f"runs inside '{root}' only; give --logdir and --outdir inside it")
    return relative


def _copy_whole(source: str, target: str):
    """Copy to a temporary name, then rename: the target is the whole file or absent (a settings record with
    its paths relative to the repository)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if source.endswith(SIDECAR_SUFFIX):
        _copy_record(source, target + ".tmp")
    else:
        shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)


def save_progress(data_dir: str, commands: Dict[str, List[str]], root: Optional[str] = None) -> List[str]:
    """Copy the cell's unfinished work under ``data_dir/progress/``; returns the files copied.

    Saved files of the cell that no longer exist here are removed, so the saved set is one moment's. A cell
    with no file here (never restored nor started in this checkout) keeps its saved work as it is.
    """
    root = root or REPO
    files = progress_files(commands, root)
    if not any(os.path.exists(os.path.join(root, f)) for f in files):
        return []
    copied = []
    for relative in files:
        target = os.path.join(data_dir, PROGRESS, relative)
        if os.path.exists(os.path.join(root, relative)):
            _copy_whole(os.path.join(root, relative), target)
            copied.append(relative)
        elif os.path.exists(target):
            os.remove(target)
    return copied


def restore_progress(data_dir: str, commands: Dict[str, List[str]], root: Optional[str] = None) -> List[str]:
    """Copy saved work back where the scripts look for it, when this checkout has none of the cell's files.

    A cell with any file here already has work of its own, which is never replaced; returns the files
    restored.
    """
    root = root or REPO
    files = progress_files(commands, root)
    saved = [f for f in files if os.path.exists(os.path.join(data_dir, PROGRESS, f))]
    if not saved or any(os.path.exists(os.path.join(root, f)) for f in files):
        return []
    for relative in saved:
        _copy_whole(os.path.join(data_dir, PROGRESS, relative), os.path.join(root, relative))
    return saved


def take_saved(data_dir: str, commands: Dict[str, List[str]], aside: str, root: Optional[str] = None) -> List[str]:
    """Replace the cell's work here by its saved work (say, work brought back from another machine).

    The files of the cell here are moved under ``aside`` first (never deleted); returns the files restored.
    """
    root = root or REPO
    files = progress_files(commands, root)
    if not any(os.path.exists(os.path.join(data_dir, PROGRESS, f)) for f in files):
        return []
    for relative in files:
        here = os.path.join(root, relative)
        if os.path.exists(here):
            os.makedirs(os.path.dirname(os.path.join(aside, relative)), exist_ok=True)
            os.replace(here, os.path.join(aside, relative))
    return restore_progress(data_dir, commands, root)


def drop_progress(data_dir: str, commands: Dict[str, List[str]], root: Optional[str] = None):
    """Remove a kept cell's saved work, and the folders that become empty."""
    root = root or REPO
    top = os.path.join(data_dir, PROGRESS)
    for relative in progress_files(commands, root):
        path = os.path.join(top, relative)
        if os.path.exists(path):
            os.remove(path)
        folder = os.path.dirname(path)
        while os.path.isdir(folder) and not os.listdir(folder) and os.path.abspath(folder) != os.path.abspath(data_dir):
            os.rmdir(folder)
            folder = os.path.dirname(folder)


# --------------------------------------------------------------------------- progress

def _format_duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def estimate_seconds(cell: Cell, dataset: str, commands: Dict[str, List[str]],
                     measured: Dict[str, float]) -> Optional[float]:
    """Seconds the cell still needs: a measured cell of its method, else the table for LeNet; None if unknown."""
    per_cell = measured.get(cell.method)
    if per_cell is None and ARCHITECTURE[dataset] == "lenet":
        per_cell = 60.0 * LENET_CPU_MINUTES[cell.method]
    if per_cell is None:
        return None
    log = os.path.join(_train_folder(commands), "log.txt")
    if os.path.exists(log):   # a started training: what it measured so far replaces the guess for its epochs
        with open(log) as handle:
            rows = [line.split("\t") for line in handle.read().splitlines()[1:] if line.strip()]
        epochs = int(_option(commands["train"], "--epochs"))
        if rows:
            per_epoch = sum(float(r[1]) for r in rows) / len(rows)
            guessed_training = measured.get(cell.method + ":train", per_cell * 0.7)
            return max(0.0, per_cell - guessed_training) + per_epoch * max(0, epochs - len(rows))
    return per_cell


def _option(command: List[str], name: str) -> str:
    return command[len(command) - 1 - command[::-1].index(name) + 1]


def measured_seconds(data_dir: str) -> Dict[str, float]:
    """Per method, the mean measured seconds of its finished cells (and of their training, as METHOD:train)."""
    totals: Dict[str, List[float]] = {}
    for root, _, files in os.walk(data_dir):
        if "cell.json" in files:
            with open(os.path.join(root, "cell.json")) as handle:
                record = json.load(handle)
            method = record["cell"].split(":")[0]
            totals.setdefault(method, []).append(sum(record["seconds"].values()))
            totals.setdefault(method + ":train", []).append(record["seconds"]["train"])
    return {key: sum(v) / len(v) for key, v in totals.items()}


def time_left(pending, dataset, measured) -> str:
    estimates = [estimate_seconds(cell, dataset, commands, measured) for cell, commands in pending]
    if any(e is None for e in estimates):
        return "unknown"
    return "about " + _format_duration(sum(estimates))


# --------------------------------------------------------------------------- running

class _CellLock:
    """A held cell lock; ``close`` releases it (the operating system does when the driver ends)."""

    def __init__(self, lock: filelock.BaseFileLock):
        self.lock = lock

    def close(self):
        self.lock.release()


def hold(lock_dir: str, cell: Cell) -> Optional[_CellLock]:
    """An exclusive lock on the cell, or None when another driver holds it (``filelock``: any platform)."""
    os.makedirs(lock_dir, exist_ok=True)
    lock = filelock.FileLock(os.path.join(lock_dir, cell.name.replace(":", "_") + ".lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return None
    return _CellLock(lock)


def run_step(command: List[str], python: str, dry_run: bool, procs: int = 1):
    """Run one step; an evaluation step with ``procs`` > 1 is sharded over that many torchrun processes.

    Its rows do not depend on the sharding (each image draws from its own seeded stream), so the
    recorded command, which identifies the cell, leaves it out.
    """
    launcher = [python]
    if procs > 1 and not command[1].startswith("code/train_"):
        launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "--"]
    print("+ " + shlex.join([*launcher, *command[1:]]), flush=True)
    if dry_run:
        return
    result = subprocess.run([*launcher, *command[1:]], cwd=REPO)
    if result.returncode != 0:
        raise ReproduceError(f"'{shlex.join(command[1:3])} ...' failed (exit status {result.returncode}); "
                             "fix what it printed and run the same reproduce command again to continue")


def save_all_progress(data_dir: str, pending, lock_dir: str) -> int:
    """``--save-progress``: save the unfinished work of every cell no driver holds; 1 if a driver held some."""
    held = []
    for cell, commands in pending:
        lock = hold(lock_dir, cell)
        if lock is None:
            print(f"[reproduce] {cell.name}: a running reproduce.py holds it; not saved (stop it first)", flush=True)
            held.append(cell.name)
            continue
        copied = save_progress(data_dir, commands)
        lock.close()
        if copied:
            print(f"[reproduce] {cell.name}: saved {', '.join(copied)} in {os.path.join(data_dir, PROGRESS)}",
                  flush=True)
    if held:
        print(f"error: {len(held)} cell(s) held by a running reproduce.py were not saved ({' '.join(held)}); "
              "stop those drivers and run --save-progress again", file=sys.stderr)
        return 1
    return 0


def take_all_saved(data_dir: str, pending, lock_dir: str) -> int:
    """``--take-saved``: every cell no driver holds continues from its saved work, not from this checkout's."""
    aside = os.path.join(lock_dir, "superseded", time.strftime("%Y%m%d-%H%M%S"))
    held = []
    for cell, commands in pending:
        lock = hold(lock_dir, cell)
        if lock is None:
            held.append(cell.name)
            continue
        restored = take_saved(data_dir, commands, aside)
        lock.close()
        if restored:
            print(f"[reproduce] {cell.name}: took the saved work ({', '.join(restored)}); this checkout's "
                  f"files of the cell are in {aside}", flush=True)
    if held:
        print(f"error: {len(held)} cell(s) held by a running reproduce.py were left as they are ({' '.join(held)}); "
              "stop those drivers and run --take-saved again", file=sys.stderr)
        return 1
    return 0


def reproduce(args) -> int:
    cells = select_cells(table_cells(args.dataset), args.cells)
    scale = Scale(shlex.split(args.train_args), args.N, args.fixed_skip, args.sequential_skip, args.max,
                  args.smooth_N, args.smooth_max, not args.no_smooth_compile)
    data_dir = args.data_dir or os.path.join("data", args.dataset)
    plans = [(cell, cell_commands(args.dataset, cell, scale, args.logdir, args.outdir)) for cell in cells]
    pending = []
    for cell, commands in plans:   # each cell.json read once: finished cells are reported, the others run
        if finished_record(data_dir, cell, commands) is None:
            pending.append((cell, commands))
        else:
            print(f"[reproduce] {cell.name}: finished, in {data_folder(data_dir, cell)}", flush=True)
    if args.save_progress:
        return save_all_progress(data_dir, pending, os.path.join(args.outdir, "reproduce", args.dataset))
    if args.take_saved:
        return take_all_saved(data_dir, pending, os.path.join(args.outdir, "reproduce", args.dataset))
    saved_work = os.path.isdir(os.path.join(data_dir, PROGRESS))
    measured = measured_seconds(data_dir)
    for k, (cell, commands) in enumerate(pending, 1):
        left = time_left(pending[k - 1:], args.dataset, measured)
        print(f"[reproduce] cell {k} of {len(pending)}: {cell.name} ({', '.join(commands)}); "
              f"time left for the selected cells: {left}", flush=True)
        lock = None if args.dry_run else hold(os.path.join(args.outdir, "reproduce", args.dataset), cell)
        if lock is None and not args.dry_run:
            print(f"[reproduce] {cell.name}: another reproduce.py runs it; skipped", flush=True)
            continue
        if not args.dry_run and finished_record(data_dir, cell, commands) is not None:
            print(f"[reproduce] {cell.name}: finished meanwhile by another reproduce.py", flush=True)
            lock.close()
            continue
        if saved_work and not args.dry_run:
            restored = restore_progress(data_dir, commands)
            if restored:
                print(f"[reproduce] {cell.name}: continues the work saved in {os.path.join(data_dir, PROGRESS)} "
                      f"({', '.join(restored)})", flush=True)
        started = time.time()
        for step, command in commands.items():
            run_step(command, args.python, args.dry_run, args.procs)
        if not args.dry_run:
            record = keep_cell(data_dir, cell, commands, started)
            if saved_work:
                drop_progress(data_dir, commands)
            measured = measured_seconds(data_dir)
            print(f"[reproduce] {cell.name}: kept in {data_folder(data_dir, cell)} "
                  f"({_format_duration(sum(record['seconds'].values()))} of computing)", flush=True)
            lock.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train, certify and keep the cells of a paper table (resumable).",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("dataset", choices=sorted(ARCHITECTURE))
    parser.add_argument("--cells", default=os.environ.get("CELLS"),
                        help='cells to run, "method:sigma" globs or "pretrain" (default $CELLS, else all), '
                             'e.g. "cohen:0.25 stab:*"')
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN") == "1",
                        help="print the commands without running them (default: $DRY_RUN=1)")
    parser.add_argument("--save-progress", action="store_true",
                        help="copy the unfinished cells' work so far to DATA_DIR/progress/ and stop, so that a "
                             "driver in another checkout (after git, say) continues it; cells a running driver "
                             "holds are skipped")
    parser.add_argument("--take-saved", action="store_true",
                        help="replace this checkout's work on each unfinished cell by the work saved in "
                             "DATA_DIR/progress/ (brought back from another machine, say) and stop; the files "
                             "replaced are moved under OUTDIR/reproduce/DATASET/superseded/")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the steps (default: this one)")
    parser.add_argument("--procs", type=int, default=1, choices=range(1, MAX_PROCS + 1), metavar="K",
                        help="run the smoothed prediction and certification steps as K torchrun processes "
                             "(say, one per core with OMP_NUM_THREADS=1); same rows as one process (default 1)")
    parser.add_argument("--data-dir", default=None, help="where finished cells are kept (default data/DATASET)")
    parser.add_argument("--logdir", default="logs", help="training runs (default logs)")
    parser.add_argument("--outdir", default="test", help="certification outputs (default test)")
    small = parser.add_argument_group("scale (for trials; the defaults are the paper's)")
    small.add_argument("--train-args", default="", help='extra training options, e.g. "--train-subset 512 --epochs 1"')
    small.add_argument("--N", type=int, default=100_000, help="CERTIFY's N and the sequential N-max")
    small.add_argument("--fixed-skip", type=int, default=100, help="fixed-N CERTIFY on every K-th test image")
    small.add_argument("--sequential-skip", type=int, default=10, help="sequential CERTIFY on every K-th test image")
    small.add_argument("--max", type=int, default=-1, help="stop at this test image index (-1: all)")
    small.add_argument("--smooth-N", type=int, default=10_000, help="samples per image of the smoothed prediction")
    small.add_argument("--smooth-max", type=int, default=-1, help="smoothed prediction of the first K training images")
    small.add_argument("--no-smooth-compile", action="store_true",
                       help="run the smoothed prediction without torch.compile (for toy runs, where compiling "
                            "takes longer than the run)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli_status(lambda: reproduce(args), "run the same command again to continue (finished work is kept)")


if __name__ == "__main__":
    sys.exit(main())
