"""A reproduction's data folder: the kept cells, and the unfinished work saved for another checkout.

A finished cell is copied to ``data/{dataset}/noise_{sigma}/{method}/``
(``data/{dataset}/pretrain/``): the checkpoint without optimizer state,
``log.txt``, the gzipped result files with their settings records, and
``cell.json`` (the commands, the measured times), written last, so that a
folder without it is an unfinished copy. ``data/{dataset}/progress/`` holds
what unfinished cells have computed so far, under the paths the files have in
the repository (docs/RESUMING.md says how work moves between machines).

Every function takes the repository root (``root``): the steps run there, so
the relative paths in a cell's commands are relative to it, and settings
records are copied with their paths made relative to it, so a record kept in
the repository names no machine.
"""
import gzip
import json
import os
import shlex
import shutil
import time
from typing import Dict, List, Optional

from common import replace_atomic
from provenance import OVERRIDES_NAME, SIDECAR_SUFFIX, read_overrides, relative_record, repository_path
from reproduce_plan import (Cell, ReproduceError, output_of, smooth_prediction_array_paths, smooth_prediction_arrays,
                            train_folder)

# --------------------------------------------------------------------------- the kept results

SEQUENTIAL_RESULT = "certify_sequential.tsv"   # the kept name of a cell's sequential file


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


def _copy_record(source: str, target: str, root: str):
    """A settings record, its paths made relative to ``root`` (a record kept in it names no machine)."""
    with open(source) as handle:
        record = json.load(handle)
    with open(target, "w") as handle:
        handle.write(json.dumps(relative_record(record, root), indent=1) + "\n")


def _copy_result(source: str, folder: str, name: str, root: str):
    """``source`` gzipped as ``name.gz``, with its settings record as ``name.meta.json``."""
    _gzip_copy(source, os.path.join(folder, name + ".gz"))
    _copy_record(source + SIDECAR_SUFFIX, os.path.join(folder, name + SIDECAR_SUFFIX), root)


def keep_cell(data_dir: str, cell: Cell, commands: Dict[str, List[str]], started: float, root: str) -> dict:
    """Copy a finished cell into the data folder; ``cell.json`` is written last, so a torn copy is redone."""
    target = data_folder(data_dir, cell)
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    run = os.path.join(root, train_folder(commands))
    _slim_checkpoint(os.path.join(run, "checkpoint.pth.tar"), os.path.join(staging, "checkpoint.pth.tar"))
    shutil.copyfile(os.path.join(run, "log.txt"), os.path.join(staging, "log.txt"))
    overrides = read_overrides(run)
    if os.path.exists(os.path.join(run, OVERRIDES_NAME)):
        # the training is not exactly the plan's command: say where it departs from it
        shutil.copyfile(os.path.join(run, OVERRIDES_NAME), os.path.join(staging, OVERRIDES_NAME))
    seconds = {"train": _log_seconds(os.path.join(run, "log.txt"))}
    for step in commands:
        if step == "train":
            continue
        source = os.path.join(root, output_of(commands[step]))
        name = {"certify": "certify.tsv", "sequential": SEQUENTIAL_RESULT,
                "smooth_prediction": "smooth_prediction_train.tsv"}[step]
        _copy_result(source, staging, name, root)
        seconds[step] = _rows_seconds(source)
        if step == "smooth_prediction":
            for npy in smooth_prediction_arrays(source, cell.sigma):
                _gzip_copy(npy, os.path.join(staging, os.path.basename(npy) + ".gz"))
                if os.path.exists(npy + SIDECAR_SUFFIX):
                    _copy_record(npy + SIDECAR_SUFFIX, os.path.join(staging, os.path.basename(npy) + SIDECAR_SUFFIX),
                                 root)
    record = {"cell": cell.name, "commands": commands, "seconds": seconds,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "driver_seconds": round(time.time() - started, 1)}
    if overrides:
        record["resume_overrides"] = overrides
    with open(os.path.join(staging, "cell.json"), "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    # a folder without cell.json is an unfinished copy; a finished cell never gets here (checked under the lock)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(staging, target)
    return record


# --------------------------------------------------------------------------- unfinished work, saved and restored

PROGRESS = "progress"
# The most processes an evaluation step may be sharded over (--procs); their parts are saved too.
MAX_PROCS = 16


def progress_files(commands: Dict[str, List[str]], root: str) -> List[str]:
    """The files that hold a cell's unfinished work, existing or not, relative to ``root``.

    The training checkpoint, ``log.txt`` and ``resume_overrides.txt`` and, for each evaluation step, its
    result file, settings record and row journal. The steps run in ``root``, so relative paths in the
    commands are relative to it.
    """
    files = [os.path.join(train_folder(commands), name) for name in ("checkpoint.pth.tar", "log.txt", OVERRIDES_NAME)]
    for step, command in commands.items():
        if step != "train":
            out = output_of(command)
            files += [out, out + ".meta.json", out + ".journal"]
            # the rows of a run sharded over K processes (--procs) wait in per-rank parts until it ends
            for rank in range(MAX_PROCS):
                files += [f"{out}.part{rank}", f"{out}.part{rank}.journal"]
            if step == "smooth_prediction":
                # the frequencies of the rows merged so far live only in the .npy, which its coverage lists
                npy, covered = smooth_prediction_array_paths(out, command[4])
                files += [npy, npy + ".meta.json", covered]
    relative = [os.path.relpath(os.path.join(root, f), root) for f in files]
    outside = [f for f in relative if f.startswith(os.pardir + os.sep)]
    if outside:
        raise ReproduceError(f"cannot save or restore '{os.path.join(root, outside[0])}': progress is kept for "
                             f"runs inside '{root}' only; give --logdir and --outdir inside it")
    return relative


def _copy_whole(source: str, target: str, root: str):
    """Copy to a temporary name, then rename: the target is the whole file or absent (a settings record with
    its paths relative to the repository)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if source.endswith(SIDECAR_SUFFIX):
        _copy_record(source, target + ".tmp", root)
    else:
        shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)


def save_progress(data_dir: str, commands: Dict[str, List[str]], root: str) -> List[str]:
    """Copy the cell's unfinished work under ``data_dir/progress/``; returns the files copied.

    Saved files of the cell that no longer exist here are removed, so the saved set is one moment's. A cell
    with no file here (never restored nor started in this checkout) keeps its saved work as it is.
    """
    files = progress_files(commands, root)
    if not any(os.path.exists(os.path.join(root, f)) for f in files):
        return []
    copied = []
    for relative in files:
        target = os.path.join(data_dir, PROGRESS, relative)
        if os.path.exists(os.path.join(root, relative)):
            _copy_whole(os.path.join(root, relative), target, root)
            copied.append(relative)
        elif os.path.exists(target):
            os.remove(target)
    return copied


def restore_progress(data_dir: str, commands: Dict[str, List[str]], root: str) -> List[str]:
    """Copy saved work back where the scripts look for it, when this checkout has none of the cell's files.

    A cell with any file here already has work of its own, which is never replaced; returns the files
    restored.
    """
    files = progress_files(commands, root)
    saved = [f for f in files if os.path.exists(os.path.join(data_dir, PROGRESS, f))]
    if not saved or any(os.path.exists(os.path.join(root, f)) for f in files):
        return []
    for relative in saved:
        _copy_whole(os.path.join(data_dir, PROGRESS, relative), os.path.join(root, relative), root)
    return saved


def take_saved(data_dir: str, commands: Dict[str, List[str]], aside: str, root: str) -> List[str]:
    """Replace the cell's work here by its saved work (say, work brought back from another machine).

    The files of the cell here are moved under ``aside`` first (never deleted); returns the files restored.
    """
    files = progress_files(commands, root)
    if not any(os.path.exists(os.path.join(data_dir, PROGRESS, f)) for f in files):
        return []
    for relative in files:
        here = os.path.join(root, relative)
        if os.path.exists(here):
            os.makedirs(os.path.dirname(os.path.join(aside, relative)), exist_ok=True)
            os.replace(here, os.path.join(aside, relative))
    return restore_progress(data_dir, commands, root)


def drop_progress(data_dir: str, commands: Dict[str, List[str]], root: str):
    """Remove a kept cell's saved work, and the folders that become empty."""
    top = os.path.join(data_dir, PROGRESS)
    for relative in progress_files(commands, root):
        path = os.path.join(top, relative)
        if os.path.exists(path):
            os.remove(path)
        folder = os.path.dirname(path)
        while os.path.isdir(folder) and not os.listdir(folder) and os.path.abspath(folder) != os.path.abspath(data_dir):
            os.rmdir(folder)
            folder = os.path.dirname(folder)


# --------------------------------------------------------------------------- a kept cell certified again


def kept_sequential_settings(data_dir: str, cell: Cell) -> dict:
    """The settings record of a kept cell's sequential file (its ``sequential_scheme`` names the scheme)."""
    with open(os.path.join(data_folder(data_dir, cell), SEQUENTIAL_RESULT + SIDECAR_SUFFIX)) as handle:
        return json.load(handle)["settings"]


def recertify_command(data_dir: str, cell: Cell, commands: Dict[str, List[str]], root: str) -> List[str]:
    """The cell's sequential command on its kept checkpoint, writing under ``recertified/`` beside its output.

    The kept checkpoint holds the trained weights without the optimizer state, so the rows equal those
    of the training run's checkpoint (the settings record then names the kept file's SHA-256).
    """
    command = list(commands["sequential"])
    checkpoint = os.path.join(data_folder(data_dir, cell), "checkpoint.pth.tar")
    command[3] = repository_path(checkpoint, root)
    output = output_of(command)
    command[5] = os.path.join(os.path.dirname(output), "recertified", os.path.basename(output))
    return command


def replace_sequential(data_dir: str, cell: Cell, command: List[str], root: str, replaced_scheme: str) -> dict:
    """Replace a kept cell's sequential file, made by ``replaced_scheme``, by the output of ``command`` (its
    ``recertify_command``).

    The old settings record, which names the old scheme, is replaced last: a replacement torn at any
    point leaves it, so the next ``--recertify`` does the cell again (its output is complete by then, so
    only the copy is redone). ``cell.json`` keeps the commands of the cell's plan and records the command
    that made the file now kept under ``recertified``.
    """
    folder = data_folder(data_dir, cell)
    source = os.path.join(root, output_of(command))
    staged = os.path.join(folder, SEQUENTIAL_RESULT + ".gz.partial")
    _gzip_copy(source, staged)
    os.replace(staged, os.path.join(folder, SEQUENTIAL_RESULT + ".gz"))
    with open(os.path.join(folder, "cell.json")) as handle:
        record = json.load(handle)
    record["seconds"]["sequential"] = _rows_seconds(source)
    record["recertified"] = {"sequential": command, "replaced_scheme": replaced_scheme,
                             "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    replace_atomic(os.path.join(folder, "cell.json"), lambda handle: handle.write(json.dumps(record, indent=1) + "\n"))
    _copy_whole(source + SIDECAR_SUFFIX, os.path.join(folder, SEQUENTIAL_RESULT + SIDECAR_SUFFIX), root)
    return record
