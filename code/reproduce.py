"""Reproduce a paper table: train, certify and keep every cell of it, resumably.

    python code/reproduce.py fmnist [--cells "cohen:0.25 stab:*"] [--dry-run]

(``scripts/reproduce.sh fmnist`` is the same, with ``CELLS=...`` and ``DRY_RUN=1``.)

The cells and their commands are ``reproduce_plan``'s; the kept cells and the saved progress,
``reproduce_store``'s. Each step is one of the project's scripts, which skip finished work and
continue interrupted work, so the driver can be stopped at any moment and run again: a finished cell
is skipped, one finished with other commands is refused, never replaced. Two drivers may run at once
on different cells (``--cells``): a cell another driver holds is skipped. ``--save-progress`` and
``--take-saved`` move unfinished work between checkouts through the data folder (docs/RESUMING.md).
``--recertify`` certifies the finished cells' sequential step again where the scheme has changed since.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional

import filelock

from common import DefaultsHelpFormatter, cli_status
# the names tests and other code use as reproduce.NAME
from reproduce_plan import (ARCHITECTURE, Cell, ReproduceError, Scale, cell_commands,  # noqa: F401
                            select_cells, table_cells, train_folder)
from reproduce_store import (MAX_PROCS, PROGRESS, _copy_record, data_folder, drop_progress,  # noqa: F401
                             finished_record, keep_cell, kept_sequential_settings, recertify_command,
                             replace_sequential, restore_progress, save_progress, take_saved)
from sequential_rules import scheme_of_mode, sequential_scheme

# The checkout of this script: the steps run and are kept here. Not reproduce_plan.REPO, which names the
# folder the modules were imported from (through a symlinked copy of code/, another checkout).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Minutes per cell (training and both certifications) for LeNet on one CPU core, with a second driver on the
# other, for the estimate of the time left until a cell of the same method has been measured: the measured
# Gaussian cell (26 min training, 26 min certification), the others' training scaled by their published
# (GPU) training times; the pretrain is mostly its smoothed prediction (6 x 10^8 forward passes).
LENET_CPU_MINUTES = {"cohen": 53, "stab": 55, "consistency": 91, "macer": 221, "salman": 494,
                     "smoothmix": 390, "pretrain": 760, "catrs": 338}


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
    log = os.path.join(train_folder(commands), "log.txt")
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
        copied = save_progress(data_dir, commands, REPO)
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
        restored = take_saved(data_dir, commands, aside, REPO)
        lock.close()
        if restored:
            print(f"[reproduce] {cell.name}: took the saved work ({', '.join(restored)}); this checkout's "
                  f"files of the cell are in {aside}", flush=True)
    if held:
        print(f"error: {len(held)} cell(s) held by a running reproduce.py were left as they are ({' '.join(held)}); "
              "stop those drivers and run --take-saved again", file=sys.stderr)
        return 1
    return 0


def recertify_all(data_dir: str, finished, lock_dir: str, args) -> int:
    """Certify the sequential step of each finished cell again, from its kept checkpoint, where its kept file was
    made by another rule than today's for its mode, and replace that file (``reproduce_store.replace_sequential``), so that
    a table's sequential columns come from one scheme. Interrupted, it continues where it stopped."""
    for cell, commands in finished:
        if "sequential" not in commands:
            continue
        settings = kept_sequential_settings(data_dir, cell)
        radii = bool(settings.get("radii"))   # a rule change of the other mode leaves the file's rows as they are
        current = sequential_scheme(settings["N_max"], settings["batch"])
        if scheme_of_mode(settings.get("sequential_scheme") or "", radii) == scheme_of_mode(current, radii):
            print(f"[reproduce] {cell.name}: its sequential file is of the current scheme", flush=True)
            continue
        lock = None if args.dry_run else hold(lock_dir, cell)
        if lock is None and not args.dry_run:
            print(f"[reproduce] {cell.name}: another reproduce.py holds it; skipped", flush=True)
            continue
        command = recertify_command(data_dir, cell, commands, REPO)
        print(f"[reproduce] {cell.name}: its sequential file is of an older scheme; certified again", flush=True)
        run_step(command, args.python, args.dry_run, args.procs)
        if not args.dry_run:
            replace_sequential(data_dir, cell, command, REPO, settings.get("sequential_scheme"))
            print(f"[reproduce] {cell.name}: sequential file replaced in {data_folder(data_dir, cell)}", flush=True)
            lock.close()
    return 0


def reproduce(args) -> int:
    cells = select_cells(table_cells(args.dataset), args.cells)
    scale = Scale(shlex.split(args.train_args), args.N, args.fixed_skip, args.sequential_skip, args.max,
                  args.smooth_N, args.smooth_max, not args.no_smooth_compile)
    # relative paths are the repository's, where the steps run, whatever the working directory
    data_dir = os.path.join(REPO, args.data_dir or os.path.join("data", args.dataset))
    lock_dir = os.path.join(REPO, args.outdir, "reproduce", args.dataset)
    plans = [(cell, cell_commands(args.dataset, cell, scale, args.logdir, args.outdir)) for cell in cells]
    pending = []
    for cell, commands in plans:   # each cell.json read once: finished cells are reported, the others run
        if finished_record(data_dir, cell, commands) is None:
            pending.append((cell, commands))
        else:
            print(f"[reproduce] {cell.name}: finished, in {data_folder(data_dir, cell)}", flush=True)
    if args.save_progress:
        return save_all_progress(data_dir, pending, lock_dir)
    if args.take_saved:
        return take_all_saved(data_dir, pending, lock_dir)
    if args.recertify:
        return recertify_all(data_dir, [p for p in plans if p not in pending], lock_dir, args)
    saved_work = os.path.isdir(os.path.join(data_dir, PROGRESS))
    measured = measured_seconds(data_dir)
    for k, (cell, commands) in enumerate(pending, 1):
        left = time_left(pending[k - 1:], args.dataset, measured)
        print(f"[reproduce] cell {k} of {len(pending)}: {cell.name} ({', '.join(commands)}); "
              f"time left for the selected cells: {left}", flush=True)
        lock = None if args.dry_run else hold(lock_dir, cell)
        if lock is None and not args.dry_run:
            print(f"[reproduce] {cell.name}: another reproduce.py runs it; skipped", flush=True)
            continue
        if not args.dry_run and finished_record(data_dir, cell, commands) is not None:
            print(f"[reproduce] {cell.name}: finished meanwhile by another reproduce.py", flush=True)
            lock.close()
            continue
        if saved_work and not args.dry_run:
            restored = restore_progress(data_dir, commands, REPO)
            if restored:
                print(f"[reproduce] {cell.name}: continues the work saved in {os.path.join(data_dir, PROGRESS)} "
                      f"({', '.join(restored)})", flush=True)
        started = time.time()
        for step, command in commands.items():
            run_step(command, args.python, args.dry_run, args.procs)
        if not args.dry_run:
            record = keep_cell(data_dir, cell, commands, started, REPO)
            if saved_work:
                drop_progress(data_dir, commands, REPO)
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
    parser.add_argument("--recertify", action="store_true",
                        help="for each finished cell whose kept sequential file was made by an older sequential "
                             "scheme, certify again from the kept checkpoint (into OUTDIR/.../recertified/) and "
                             "replace that file; then stop")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the steps (default: this one)")
    parser.add_argument("--procs", type=int, default=1, choices=range(1, MAX_PROCS + 1), metavar="K",
                        help="run the smoothed prediction and certification steps as K torchrun processes "
                             "(say, one per core with OMP_NUM_THREADS=1); same rows as one process (default 1)")
    parser.add_argument("--data-dir", default=None,
                        help="where finished cells are kept; relative paths here and below are the repository's "
                             "(default data/DATASET)")
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
