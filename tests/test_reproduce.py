"""The sweeps run the published settings; the table driver (reproduce.py) and its comparison (analyze.py compare).

The published settings are restated here from the papers' EXPERIMENTS files, independently of
scripts/published_settings.tsv, and every sweep's DRY_RUN=1 output is parsed by the training scripts'
own parsers and compared with them.
"""
import gzip
import importlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, python_env

import comparison
import reproduce
import train_utils

CIFAR = "--lr 0.1 --lr_step_size 50 --epochs 150"
LENET = "--lr 0.01 --lr_step_size 30 --epochs 90"
LENET_LONG = "--lr 0.01 --lr_step_size 50 --epochs 150"
SIGMAS = ("0.25", "0.5", "1.0")


def _per_sigma(prefix, values):
    return dict(zip(SIGMAS, [f"{prefix} {v}".strip() for v in values]))


CIFAR10_PUBLISHED = {
    "cohen": _per_sigma("", ["", "", ""]),
    "stab": _per_sigma("", ["--lbd 2.0", "--lbd 2.0", "--lbd 1.0"]),
    "salman": _per_sigma("--attack PGD --num-steps 10 --warmup 10",
                         ["--epsilon 256.0 --num-noise-vec 4", "--epsilon 256.0 --num-noise-vec 8",
                          "--epsilon 512.0 --num-noise-vec 2"]),
    "macer": _per_sigma("--num-noise-vec 16 --beta 16.0 --margin 8.0",
                        ["--lbd 12.0", "--lbd 6.0", "--lbd 12.0 --deferred"]),
    "consistency": _per_sigma("--num-noise-vec 2", ["--lbd 20", "--lbd 10", "--lbd 10"]),
    "smoothmix": _per_sigma("--num-noise-vec 2 --num-steps 4 --eta 5.0",
                            ["--alpha 0.5 --mix_step 0", "--alpha 1.0 --mix_step 1", "--alpha 2.0 --mix_step 1"]),
    "catrs": _per_sigma("--num-noise-vec 4 --eps 256.0 --num-steps 4", ["--lbd 0.5", "--lbd 1.0", "--lbd 2.0"]),
}
# MNIST settings of the SmoothMix / Consistency EXPERIMENTS files; SmoothMix's eta = 5 variant and CAT-RS's
# options are the determined ones (see the comments of scripts/published_settings.tsv).
MNIST_PUBLISHED = {
    "cohen": _per_sigma("", ["", "", ""]),
    "stab": _per_sigma("--lbd 2", ["", "", ""]),
    "salman": _per_sigma("--attack PGD --epsilon 255 --num-steps 10 --warmup 10 --num-noise-vec 4", ["", "", ""]),
    "macer": _per_sigma("--num-noise-vec 16 --beta 16.0 --margin 8.0 --deferred",
                        ["--lbd 16.0", "--lbd 16.0", "--lbd 6.0"]),
    "consistency": _per_sigma("--num-noise-vec 2", ["--lbd 10", "--lbd 5", "--lbd 5"]),
    "smoothmix": _per_sigma("--num-noise-vec 4 --alpha 1.0 --eta 5.0 --mix_step 1",
                            ["--num-steps 2", "--num-steps 4", "--num-steps 8"]),
    "catrs": _per_sigma("--num-noise-vec 4 --eps 256.0 --num-steps 4", ["--lbd 0.5", "--lbd 1.0", "--lbd 2.0"]),
}


def published_runs(dataset):
    """(script, options) of every training run the sweep of ``dataset`` must make, pretrain first."""
    if dataset == "imagenet":
        base = "--lr 0.1 --lr_step_size 30 --epochs 90 --batch 256"
        return [("train_cohen.py", f"imagenet resnet50 {base} --noise 0.25 --id 0"),
                ("train_catrs.py", f"imagenet resnet50 {base} --num_noise_vec 2 --noise 1.0 --id 0 --eps 256.0 "
                                   "--num-steps 1 --lbd 2.0 --lr_drop 85 --warmup 80 --confidence_mask")]
    lenet = dataset in ("mnist", "fmnist")
    arch = {"cifar10": "cifar_resnet110", "cifar100": "cifar100_resnet110"}.get(dataset, "lenet")
    table = MNIST_PUBLISHED if lenet else CIFAR10_PUBLISHED
    runs = [("train_cohen.py", f"{dataset} {arch} {LENET_LONG if lenet else CIFAR} --noise 0.25 --id 0")]
    for method, per_sigma in table.items():
        for sigma, options in per_sigma.items():
            if method == "cohen" and sigma == "0.25" and not lenet:
                continue   # on CIFAR the pretrain is the table's Gaussian run
            schedule = LENET_LONG if lenet and method == "catrs" else LENET if lenet else CIFAR
            if lenet and method == "catrs" and sigma == "0.25":
                # MNIST: the published run's folder; Fashion-MNIST: the published log's first epochs
                options = options.replace("--lbd 0.5", "--lbd 1.0")
            if lenet and method == "catrs" and sigma == "1.0":
                options = options.replace("--lbd 2.0", "--lbd 1.0")   # Fashion-MNIST's published log's first epochs
            if dataset == "fmnist" and method == "catrs":
                options += " --bf16"   # a speed option only (the table's comments)
            if dataset == "fmnist" and method == "smoothmix":
                options = options.replace("--mix_step 1", "--mix_step 0")   # the published logs' first epochs
            run_id = "1" if lenet and method == "cohen" and sigma == "0.25" else "0"
            runs.append((f"train_{method}.py", f"{dataset} {arch} {schedule} {options} --noise {sigma} --id {run_id}"))
    return runs


def parsed(script, argv):
    module = importlib.import_module(script[:-3])
    args = train_utils.parse_args(module.METHOD, shlex.split(argv))
    return vars(args), train_utils.run_folder(args, module.METHOD.method_path(args))


def dry_run(script, stages="pretrain train"):
    env = {k: v for k, v in os.environ.items() if k not in ("PY", "STAGES")}
    env.update(DRY_RUN="1", STAGES=stages, PY="python")
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", script)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "mnist", "fmnist", "imagenet"])
def test_every_sweep_trains_the_published_settings(dataset):
    commands = [c for c in dry_run(f"{dataset}.sh") if "/train_" in c.split()[1]]
    got = [(os.path.basename(c.split()[1]), " ".join(c.split()[2:])) for c in commands]
    expected = published_runs(dataset)
    assert len(got) == len(expected), got
    got_parsed = sorted((s,) + (json.dumps(parsed(s, a)[0], sort_keys=True),) for s, a in got)
    expected_parsed = sorted((s,) + (json.dumps(parsed(s, a)[0], sort_keys=True),) for s, a in expected)
    assert got_parsed == expected_parsed


def test_fmnist_sweep_names_the_published_run_folders():
    folders = {parsed(os.path.basename(c.split()[1]), " ".join(c.split()[2:]))[1]
               for c in dry_run("fmnist.sh") if "/train_" in c.split()[1]}
    assert "logs/fmnist/cohen/noise_0.25/lenet/0" in folders          # the pretrain, which CAT-RS reads
    assert "logs/fmnist/cohen/noise_0.25/lenet/1" in folders          # the table's 90-epoch run
    assert "logs/fmnist/macer_deferred30/num_16/lbd_6.0/gamma_8.0/beta_16.0/noise_1.0/lenet/0" in folders
    assert "logs/fmnist/consistency/cohen/num_2/lbd_5.0/eta_0.5/noise_0.5/lenet/0" in folders
    assert "logs/fmnist/smix_1.0_2_m0/eta_5.0/num_4/noise_0.25/lenet/0" in folders
    assert "logs/fmnist/salman/pgd_255.0_10_10/num_4/noise_1.0/lenet/0" in folders
    smooth = [c for c in dry_run("fmnist.sh", "pretrain") if "smooth_prediction.py" in c]
    assert smooth == ["python code/smooth_prediction.py fmnist logs/fmnist/cohen/noise_0.25/lenet/0/checkpoint.pth.tar "
                      "0.25 test/smooth_prediction/fmnist/cohen/0/noise_train_0.25.tsv --N=10000 --skip=1 --split=train"]


# --------------------------------------------------------------------------- the driver

def driver(*arguments, env=None, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "code", "reproduce.py"), *arguments], cwd=cwd,
                          env=env or python_env(), capture_output=True, text=True, timeout=600)


def test_driver_dry_run_prints_every_cell_with_the_sweep_settings(tmp_path):
    result = driver("fmnist", "--dry-run", *toy_paths(tmp_path)[:2])
    assert result.returncode == 0, result.stderr
    cells = [line for line in result.stdout.splitlines() if line.startswith("[reproduce] cell ")]
    assert len(cells) == 22 and "cell 1 of 22: cohen:0.25" in cells[0] and "time left" in cells[0]
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    trains = [c for c in commands if "/train_" in c]
    sweep = {" ".join(c.split()[1:]) for c in dry_run("fmnist.sh") if "/train_" in c.split()[1]}
    assert len(trains) == 22
    for command in trains:   # the sweep's command, with the seed, the log folder and --resume
        words = " ".join(command.split()[1:])
        assert words.endswith(" --seed 0 --logdir logs --resume")
        assert words[:-len(" --seed 0 --logdir logs --resume")] in sweep
    certify = [c for c in commands if "certify.py" in c and "--sequential" not in c]
    assert all("--N0 100 --N 100000 --alpha 0.001 --skip 100" in c and "--seed 0" in c for c in certify)
    sequential = [c for c in commands if "--sequential" in c]
    assert all("--radii 0.25 0.5 0.75 1.0 1.5 2.0 --N0 100 --N-max 100000" in c and "--skip 10 " in c
               for c in sequential)
    assert len(certify) == len(sequential) == 21
    assert os.listdir(tmp_path) == []   # a dry run writes nothing


def test_cells_select_and_catrs_brings_its_pretrain():
    cells = reproduce.table_cells("fmnist")
    names = [c.name for c in reproduce.select_cells(cells, "cohen:0.25 stab:*")]
    assert names == ["cohen:0.25", "stab:0.25", "stab:0.5", "stab:1.0"]
    assert [c.name for c in reproduce.select_cells(cells, "catrs:0.5")] == ["pretrain", "catrs:0.5"]
    result = driver("fmnist", "--dry-run", "--cells", "cohen:0.3")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cohen:0.3" in result.stderr and "stab:0.5" in result.stderr


TOY = ["--train-args", "--train-subset 128 --test-subset 64 --epochs 1 --print-freq 1000", "--N", "100",
       "--fixed-skip", "2500", "--sequential-skip", "2000", "--smooth-N", "8", "--smooth-max", "128",
       "--no-smooth-compile"]


def toy_paths(tmp_path):
    return ["--data-dir", str(tmp_path / "data"), "--logdir", str(tmp_path / "logs"), "--outdir", str(tmp_path / "test")]


def test_driver_keeps_a_cell_skips_it_when_finished_and_refuses_other_settings(tmp_path):
    result = driver("fmnist", "--cells", "catrs:0.25", *toy_paths(tmp_path), *TOY, env=python_env(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    kept = tmp_path / "data" / "noise_0.25" / "catrs"
    assert sorted(os.listdir(kept)) == ["cell.json", "certify.tsv.gz", "certify.tsv.meta.json",
                                        "certify_sequential.tsv.gz", "certify_sequential.tsv.meta.json",
                                        "checkpoint.pth.tar", "log.txt"]
    import torch
    checkpoint = torch.load(kept / "checkpoint.pth.tar", weights_only=True)
    assert set(checkpoint) == {"epoch", "arch", "state_dict", "args", "input_layer"}   # no optimizer state
    assert checkpoint["input_layer"] == "normalize"
    with gzip.open(kept / "certify.tsv.gz", "rt") as handle:
        assert [line.split("\t")[0] for line in handle.read().splitlines()[1:]] == ["0", "2500", "5000", "7500"]
    with gzip.open(kept / "certify_sequential.tsv.gz", "rt") as handle:
        assert handle.readline().rstrip("\n").split("\t")[-1] == "samples"
    pretrain = tmp_path / "data" / "pretrain"
    assert {"smooth_prediction_train.tsv.gz", "model_conf_0.25_train.npy.gz", "cell.json"} <= set(os.listdir(pretrain))
    record = json.loads((kept / "cell.json").read_text())
    assert record["commands"]["train"][:3] == ["python", "code/train_catrs.py", "fmnist"]

    again = driver("fmnist", "--cells", "catrs:0.25", *toy_paths(tmp_path), *TOY, env=python_env(tmp_path))
    assert again.returncode == 0 and "+ " not in again.stdout   # nothing runs again
    assert "catrs:0.25: finished" in again.stdout

    other = [a if a != "100" else "200" for a in TOY]   # another N: the finished cell is not replaced
    refused = driver("fmnist", "--cells", "catrs:0.25", *toy_paths(tmp_path), *other, env=python_env(tmp_path))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "another" in refused.stderr
    assert json.loads((kept / "cell.json").read_text()) == record

    # --recertify: a file of an older scheme is certified again from the kept checkpoint alone (the training
    # run is gone), with the same rows
    def without_time(path):
        with gzip.open(path, "rt") as handle:
            return [line.split("\t")[:5] + line.split("\t")[6:] for line in handle.read().splitlines()]
    meta_path = kept / "certify_sequential.tsv.meta.json"
    meta, rows = json.loads(meta_path.read_text()), without_time(kept / "certify_sequential.tsv.gz")
    current = meta["settings"]["sequential_scheme"]   # N-max 100 is one batch: a single look
    meta["settings"]["sequential_scheme"] = "single look: an older rule"
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "logs")
    recertify = ("fmnist", "--cells", "catrs:0.25", "--recertify", *toy_paths(tmp_path), *TOY)
    result = driver(*recertify, env=python_env(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "catrs:0.25: its sequential file is of an older scheme" in result.stdout
    assert "pretrain: its" not in result.stdout   # a cell without a sequential step is left
    new_meta = json.loads(meta_path.read_text())
    assert new_meta["settings"]["sequential_scheme"] == current
    import hashlib
    assert new_meta["settings"]["checkpoint_sha256"] == hashlib.sha256((kept / "checkpoint.pth.tar").read_bytes()).hexdigest()
    assert without_time(kept / "certify_sequential.tsv.gz") == rows   # the same weights and seed: the same rows
    new_record = json.loads((kept / "cell.json").read_text())
    assert new_record["commands"] == record["commands"]   # still the plan's cell: the driver reports it finished
    assert new_record["recertified"]["sequential"][3] == str(kept / "checkpoint.pth.tar")
    assert new_record["recertified"]["replaced_scheme"] == "single look: an older rule"
    assert not [name for name in os.listdir(kept) if name.endswith(".partial")]
    done = driver(*recertify, env=python_env(tmp_path))
    assert done.returncode == 0 and "+ " not in done.stdout and "catrs:0.25: its sequential file is of the current" in done.stdout



def _checkout(tmp_path, name):
    """A folder standing for another clone: the code, and nothing computed."""
    root = tmp_path / name
    root.mkdir()
    os.symlink(os.path.join(REPO, "code"), root / "code")
    return root


def _drive_in(monkeypatch, root, *arguments, cells="cohen:0.25"):
    """The driver of the checkout ``root``, started from another working directory: its relative paths
    (the data folder here, the run folders and outputs in the commands) are the checkout's."""
    monkeypatch.setattr(reproduce, "REPO", str(root))
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)
    return reproduce.main(["fmnist", "--cells", cells, "--data-dir", "data", *arguments])


def test_saved_progress_continues_in_another_checkout_as_if_never_stopped(tmp_path, monkeypatch, capsys):
    import torch
    for name in ("OMP_NUM_THREADS", "DATASET_CACHE", "TMPDIR"):
        monkeypatch.setenv(name, python_env(tmp_path)[name])
    two_epochs = [a.replace("--epochs 1", "--epochs 2") for a in TOY]
    whole = _checkout(tmp_path, "whole")
    assert _drive_in(monkeypatch, whole, *two_epochs) == 0

    first = _checkout(tmp_path, "first")   # stopped after the first of two epochs
    cell = reproduce.select_cells(reproduce.table_cells("fmnist"), "cohen:0.25")[0]
    scale = reproduce.Scale(shlex.split(two_epochs[1]), 100, 2500, 2000)
    commands = reproduce.cell_commands("fmnist", cell, scale, "logs", "test")
    train = commands["train"][1:]
    # a finished training whose log.txt was lost (a checkpoint copied alone) gets it back from the checkpoint
    log = whole / "logs" / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "1" / "log.txt"
    written = log.read_text()
    log.unlink()
    subprocess.run([sys.executable, *train], cwd=whole, check=True, capture_output=True)
    assert log.read_text() == written
    train[len(train) - 1 - train[::-1].index("--epochs") + 1] = "1"
    subprocess.run([sys.executable, *train], cwd=first, check=True, capture_output=True)
    capsys.readouterr()
    lock = reproduce.hold(str(first / "test" / "reproduce" / "fmnist"), cell)   # a driver runs the cell
    assert _drive_in(monkeypatch, first, "--save-progress", *two_epochs) == 1
    assert "cohen:0.25" in capsys.readouterr().err and not (first / "data" / "progress").exists()
    lock.close()
    assert _drive_in(monkeypatch, first, "--save-progress", *two_epochs) == 0
    assert "saved logs/fmnist/cohen/noise_0.25/lenet/1/checkpoint.pth.tar" in capsys.readouterr().out
    saved = first / "data" / "progress" / "logs" / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "1"
    assert sorted(os.listdir(saved)) == ["checkpoint.pth.tar", "log.txt"]
    # work of its own is never replaced by saved work
    assert reproduce.restore_progress(str(first / "data"), commands, root=str(first)) == []
    # a checkout with none of the cell's files (it never ran the cell) leaves the cell's saved work alone
    idle = tmp_path / "idle"
    idle.mkdir()
    assert reproduce.save_progress(str(first / "data"), commands, root=str(idle)) == []
    assert sorted(os.listdir(saved)) == ["checkpoint.pth.tar", "log.txt"]

    second = _checkout(tmp_path, "second")   # a fresh clone with the committed data folder only
    shutil.copytree(first / "data", second / "data")
    assert _drive_in(monkeypatch, second, *two_epochs) == 0
    assert "continues the work saved" in capsys.readouterr().out
    assert not (second / "data" / "progress").exists()   # kept: its saved work is gone
    kept, reference = (torch.load(root / "data" / "noise_0.25" / "cohen" / "checkpoint.pth.tar", weights_only=True)
                       for root in (second, whole))
    assert kept["epoch"] == reference["epoch"] == 2
    assert all(torch.equal(kept["state_dict"][k], reference["state_dict"][k]) for k in reference["state_dict"])
    rows = [(root / "data" / "noise_0.25" / "cohen" / "log.txt").read_text().splitlines() for root in (second, whole)]
    assert [r.split("\t")[2:] for r in rows[0]] == [r.split("\t")[2:] for r in rows[1]]   # all but the time


def test_a_training_resumed_with_changed_arguments_keeps_its_record(tmp_path, monkeypatch, capsys):
    """``resume_overrides.txt`` travels with the saved work and is kept with the cell (and in cell.json)."""
    for name in ("OMP_NUM_THREADS", "DATASET_CACHE", "TMPDIR"):
        monkeypatch.setenv(name, python_env(tmp_path)[name])
    two_epochs = [a.replace("--epochs 1", "--epochs 2") for a in TOY]
    first = _checkout(tmp_path, "first")
    cell = reproduce.select_cells(reproduce.table_cells("fmnist"), "cohen:0.25")[0]
    scale = reproduce.Scale(shlex.split(two_epochs[1]), 100, 2500, 2000)
    train = reproduce.cell_commands("fmnist", cell, scale, "logs", "test")["train"][1:]
    epochs = len(train) - 1 - train[::-1].index("--epochs") + 1
    one_epoch_at_another_rate = train[:epochs] + ["1"] + train[epochs + 1:] + ["--lr", "0.02"]
    subprocess.run([sys.executable, *one_epoch_at_another_rate], cwd=first, check=True, capture_output=True)
    subprocess.run([sys.executable, *train, "--resume", "--resume-changed-args"], cwd=first, check=True,
                   capture_output=True)
    capsys.readouterr()
    assert _drive_in(monkeypatch, first, "--save-progress", *two_epochs) == 0
    saved = first / "data" / "progress" / "logs" / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "1"
    assert sorted(os.listdir(saved)) == ["checkpoint.pth.tar", "log.txt", "resume_overrides.txt"]

    second = _checkout(tmp_path, "second")
    shutil.copytree(first / "data", second / "data")
    assert _drive_in(monkeypatch, second, *two_epochs) == 0
    kept = second / "data" / "noise_0.25" / "cohen"
    lines = (kept / "resume_overrides.txt").read_text().splitlines()
    assert len(lines) == 1 and "after epoch 0" in lines[0] and "lr: 0.02 -> 0.01" in lines[0]
    assert json.loads((kept / "cell.json").read_text())["resume_overrides"] == lines


def test_saved_smoothed_prediction_continues_in_another_checkout(tmp_path, monkeypatch, capsys):
    """A smoothed prediction stopped part way keeps, through --save-progress, the frequencies of its rows.

    They live in the .npy once a run has merged its journal; without it the next checkout has rows
    whose frequencies are missing and cannot go on.
    """
    for name in ("OMP_NUM_THREADS", "DATASET_CACHE", "TMPDIR"):
        monkeypatch.setenv(name, python_env(tmp_path)[name])
    whole = _checkout(tmp_path, "whole")
    assert _drive_in(monkeypatch, whole, *TOY, cells="pretrain") == 0

    first = _checkout(tmp_path, "first")   # trained, and the smoothed prediction stopped after 60 images
    cell = reproduce.select_cells(reproduce.table_cells("fmnist"), "pretrain")[0]
    commands = reproduce.cell_commands("fmnist", cell, reproduce.Scale(shlex.split(TOY[1]), smooth_n=8,
                                                                       smooth_max=128, smooth_compile=False), "logs", "test")
    subprocess.run([sys.executable, *commands["train"][1:]], cwd=first, check=True, capture_output=True)
    partial = commands["smooth_prediction"][1:]
    partial[partial.index("--max") + 1] = "60"
    subprocess.run([sys.executable, *partial], cwd=first, check=True, capture_output=True)
    capsys.readouterr()
    assert _drive_in(monkeypatch, first, "--save-progress", *TOY, cells="pretrain") == 0
    saved = first / "data" / "progress" / "test" / "smooth_prediction" / "fmnist" / "cohen" / "0"
    assert {"noise_train_0.25.tsv", "model_conf_0.25_train.npy", "model_conf_0.25_train.covered.npy"} <= set(
        os.listdir(saved))

    second = _checkout(tmp_path, "second")
    shutil.copytree(first / "data", second / "data")
    assert _drive_in(monkeypatch, second, *TOY, cells="pretrain") == 0
    assert "continues the work saved" in capsys.readouterr().out
    arrays = [np.load(gzip.open(root / "data" / "pretrain" / "model_conf_0.25_train.npy.gz"))
              for root in (second, whole)]
    assert np.array_equal(arrays[0], arrays[1]) and not np.all(arrays[0][:128] == 0.1)


def test_procs_shard_the_evaluation_steps_only(tmp_path):
    result = driver("fmnist", "--dry-run", "--cells", "pretrain consistency:0.5", "--procs", "2",
                    *toy_paths(tmp_path)[:2])
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    sharded = [line for line in steps if "-m torch.distributed.run --standalone --nproc_per_node=2 --" in line]
    assert len(steps) == 5 and len(sharded) == 3
    assert all("code/train_" not in line for line in sharded)
    assert {line.split(" -- ")[1].split()[0] for line in sharded} == {"code/smooth_prediction.py", "code/certify.py"}


# --------------------------------------------------------------------------- the comparison

def _write_tsv(path, rows, sequential=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime" + ("\tsamples" if sequential else "")
    lines = [header] + ["\t".join(map(str, (i, 0, 0 if c else 1, r, c, "0:00:01") + ((500,) if sequential else ())))
                        for i, r, c in rows]
    text = "\n".join(lines) + "\n"
    with (gzip.open(path, "wt") if path.endswith(".gz") else open(path, "w")) as handle:
        handle.write(text)


def _write_log(path, accuracy):
    text = "epoch\ttime\tlr\ttrain loss\ttrain acc\ttestloss\ttest acc\n" + f"0\t1.0\t0.01\t1.0\t50.0\t1.0\t{accuracy}\n"
    with (gzip.open(path, "wt") if path.endswith(".gz") else open(path, "w")) as handle:
        handle.write(text)


def _published(tmp_path):
    root = tmp_path / "published"
    # 20 images: radius 0.1 * i for even i (correct), wrong for odd i
    rows = [(i, round(0.1 * i, 3), 1 if i % 2 == 0 else 0) for i in range(20)]
    _write_tsv(str(root / "noise_0.25" / "cohen" / "noise_0.25.tsv.gz"), rows)
    _write_log(str(root / "noise_0.25" / "cohen" / "log.txt.gz"), 88.0)
    _write_tsv(str(root / "noise_0.25" / "cat-rs" / "noise_0.25.tsv.gz"), rows)
    return root


def _ours(tmp_path, fixed, sequential, accuracy=87.5):
    cell = tmp_path / "data" / "fmnist" / "noise_0.25" / "cohen"
    _write_tsv(str(cell / "certify.tsv.gz"), fixed)
    _write_tsv(str(cell / "certify_sequential.tsv.gz"), sequential, sequential=True)
    _write_log(str(cell / "log.txt"), accuracy)
    (cell / "cell.json").write_text("{}")
    return tmp_path / "data" / "fmnist"


def test_compare_pairs_the_same_images_and_says_not_run(tmp_path):
    published = _published(tmp_path)
    # ours on images 0, 4, 8, 12, 16 (published radii 0, 0.4, 0.8, 1.2, 1.6; all correct): ours adds 0.02 to each
    fixed = [(i, round(0.1 * i + 0.02, 3), 1) for i in (0, 4, 8, 12, 16)]
    sequential = [(i, 0.1 * i, i % 2 == 0 and 1 or 0) for i in range(0, 20, 2)]   # = published on even images
    data = _ours(tmp_path, fixed, sequential)
    cell = comparison.compare_cell(str(data), str(published), "0.25", "cohen")
    ours_acr, paper_acr, diff, low, high, images = cell.acr
    assert images == 5
    assert ours_acr == pytest.approx(np.mean([0.02, 0.42, 0.82, 1.22, 1.62]))
    assert paper_acr == pytest.approx(0.8)   # the published ACR on these 5 images, not on all 20
    assert diff == pytest.approx(0.02) and low == pytest.approx(0.02) and high == pytest.approx(0.02)
    # certified accuracy at 0.25: of the 10 even images (radii 0, 0.2, ..., 1.8), 0.4 ... 1.8 -> 8 of 10
    assert cell.accuracy[0][0] == pytest.approx(80.0) and cell.accuracy[1][0] == pytest.approx(80.0)
    assert cell.test_accuracy == (87.5, 88.0)
    assert cell.checks() == []

    out = comparison.compare(str(data), str(published), None, "python code/analyze.py compare data/fmnist P")
    text = open(out).read()
    assert "| Gaussian | 0.820 / 0.800 | +0.020 [+0.020, +0.020] |" in text
    assert "| CAT-RS | not run |" in text and "| yes |" in text
    assert os.path.exists(data / "noise_0.25.png")
    assert "Sequential scheme" not in text   # no settings record: nothing to say

    # the radii rule of each cell's sequential file is stated, so that cells of two rules are not read as one
    (data / "noise_0.25" / "cohen" / "certify_sequential.tsv.meta.json").write_text(
        json.dumps({"settings": {"sequential_scheme": "radii: rule A; ACR: rule B"}}))
    text = open(comparison.compare(str(data), str(published), None, "compare")).read()
    assert "## Sequential scheme of the certified accuracies\n\n- Gaussian 0.25: radii mode: rule A\n" in text
    assert "resumed with changed arguments" not in text

    # a training resumed with changed arguments is not the settings table's command alone: the report says so
    (data / "noise_0.25" / "cohen" / "cell.json").write_text(json.dumps({"resume_overrides": [
        "2026-01-02 03:04:05 UTC\tresumed after epoch 43 with --resume-changed-args\tbf16: False -> True"]}))
    text = open(comparison.compare(str(data), str(published), None, "compare")).read()
    assert ("## Trainings resumed with changed arguments\n" in text and "- Gaussian 0.25: resumed after epoch 43, "
            "bf16: False -> True (`--resume-changed-args`, 2026-01-02 03:04:05 UTC)\n" in text)


def test_compare_interval_and_verdict_on_a_cell_that_misses(tmp_path):
    published = _published(tmp_path)
    fixed = [(0, 0.5, 1), (2, 0.0, 0), (4, 0.4, 1)]   # differences +0.5, -0.2, 0.0
    data = _ours(tmp_path, fixed, [(0, 0.0, 0), (2, 0.3, 1)], accuracy=80.0)
    cell = comparison.compare_cell(str(data), str(published), "0.25", "cohen")
    d = np.array([0.5, -0.2, 0.0])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)   # t(0.975, 2)
    assert cell.acr[2:5] == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    missed = cell.checks()
    assert any(m.startswith("ACR off by") for m in missed) and any(m.startswith("test accuracy off by -8.0")
                                                                     for m in missed)


def test_compare_command_errors_in_one_line(tmp_path):
    published = _published(tmp_path)
    data = _ours(tmp_path, [(21, 0.5, 1)], [(0, 0.5, 1)])   # image 21 is not in the published file
    env = python_env(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, os.path.join(REPO, "code", "analyze.py"), "compare", *a],
                                    capture_output=True, text=True, env=env, timeout=120)
    result = run(str(data), str(published))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "image 21" in result.stderr
    assert not os.path.exists(data / "README.md")
    result = run(str(data), str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "noise_SIGMA" in result.stderr
