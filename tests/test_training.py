"""The shared training loop: published command lines, run folders, exact resume, bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, python_env

import train_cohen
from train_utils import LOG_HEADER, build_parser

SMALL = ["--train-subset", "512", "--test-subset", "128", "--batch", "64", "--workers", "0", "--print-freq", "1000"]


def run_script(script, args, cwd=REPO, **kwargs):
    return subprocess.run([sys.executable, os.path.join(REPO, "code", script)] + args, cwd=cwd,
                          env=python_env(), capture_output=True, text=True, **kwargs)


def published(line):
    """A SPEC section 7 command line moved to Fashion-MNIST / LeNet, as the published README says."""
    return line.replace("cifar10 cifar_resnet110", "fmnist lenet").split()


def test_published_gaussian_command_names_its_run_folder(tmp_path):
    args = published("cifar10 cifar_resnet110 --lr 0.1 --lr_step_size 50 --epochs 150 --noise 0.25 --id 0")
    parsed = build_parser(train_cohen.METHOD).parse_args(args)
    assert (parsed.noise_sd, parsed.lr, parsed.lr_step_size, parsed.epochs, parsed.id) == (0.25, 0.1, 50, 150, 0)
    result = run_script("train_cohen.py", args + ["--epochs", "0", "--logdir", str(tmp_path)] + SMALL)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "0"
    assert (folder / "log.txt").read_text() == LOG_HEADER + "\n"
    assert (folder / "code" / "train_cohen.py").is_file()


def test_common_defaults_match_published():
    parsed = build_parser(train_cohen.METHOD).parse_args(["fmnist", "lenet"])
    assert (parsed.workers, parsed.epochs, parsed.batch, parsed.lr, parsed.lr_step_size, parsed.gamma,
            parsed.momentum, parsed.weight_decay, parsed.noise_sd, parsed.print_freq) == \
        (4, 90, 256, 0.1, 30, 0.1, 0.9, 1e-4, 0.0, 10)
    parsed = build_parser(train_cohen.METHOD).parse_args(["fmnist", "lenet", "--learning-rate", "0.5", "--wd", "0"])
    assert parsed.lr == 0.5 and parsed.weight_decay == 0.0


def test_one_epoch_writes_log_checkpoint_and_schedule(tmp_path):
    args = ["fmnist", "lenet", "--lr", "0.01", "--epochs", "3", "--lr_step_size", "2", "--gamma", "0.5",
            "--noise", "0.5", "--id", "7", "--seed", "3", "--logdir", str(tmp_path)] + SMALL
    result = run_script("train_cohen.py", args)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "fmnist" / "cohen" / "noise_0.5" / "lenet" / "7"
    rows = (folder / "log.txt").read_text().splitlines()
    assert rows[0] == LOG_HEADER and [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2"]
    assert [float(r.split("\t")[2]) for r in rows[1:]] == [0.01, 0.01, 0.005]  # StepLR(2, 0.5)
    checkpoint = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["arch"] == "lenet"
    assert set(checkpoint) >= {"epoch", "arch", "state_dict", "optimizer"}
    assert all(k.startswith("1.") for k in checkpoint["state_dict"])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(folder))


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_sigkill_and_resume_gives_identical_weights(tmp_path):
    common = ["fmnist", "lenet", "--lr", "0.01", "--epochs", "4", "--noise", "0.25", "--seed", "11",
              "--logdir", str(tmp_path)] + SMALL
    reference = run_script("train_cohen.py", common + ["--id", "1"])
    assert reference.returncode == 0, reference.stderr

    folder = tmp_path / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "2"
    log = folder / "log.txt"
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "code", "train_cohen.py")] + common +
                               ["--id", "2"], cwd=REPO, env=python_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_rows = len(log.read_text().splitlines()) - 1
    assert 1 <= killed_rows < 4, "the run should have been killed part-way"

    resumed = run_script("train_cohen.py", common + ["--id", "2", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    rows = log.read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    reference_rows = (tmp_path / "fmnist/cohen/noise_0.25/lenet/1/log.txt").read_text().splitlines()
    # every column but the epoch time is identical
    strip = lambda r: [c for i, c in enumerate(r.split("\t")) if i != 1]
    assert [strip(r) for r in rows] == [strip(r) for r in reference_rows]
    a, b = _weights(folder / "checkpoint.pth.tar"), _weights(tmp_path / "fmnist/cohen/noise_0.25/lenet/1/checkpoint.pth.tar")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    train_cohen.main(["fmnist", "lenet", "--epochs", "0", "--id", "3", "--resume", "--logdir", str(tmp_path)] + SMALL)
    out = capsys.readouterr().out
    assert "no checkpoint" in out and "starting a fresh run" in out


@pytest.mark.parametrize("args,words", [
    (["fmnist", "lenet", "--noise", "-0.5"], "out of range"),
    (["fmnist", "lenet", "--batch", "0"], "out of range"),
    (["fmnist", "lenet", "--lr", "-1"], "out of range"),
    (["svhn", "lenet"], "invalid choice"),
    (["fmnist", "vgg16"], "invalid choice"),
    (["fmnist", "cifar_resnet110"], "does not fit dataset"),
    (["fmnist", "lenet", "--pretrained-model", "/nonexistent/checkpoint.pth.tar"], "not found"),
])
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exit_info:
        train_cohen.main(args + ["--epochs", "1", "--id", "0", "--logdir", str(tmp_path)] + SMALL)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_existing_run_is_not_overwritten_without_resume(tmp_path, capsys):
    args = ["fmnist", "lenet", "--epochs", "1", "--id", "4", "--seed", "0", "--logdir", str(tmp_path)] + SMALL
    train_cohen.main(args)
    checkpoint = tmp_path / "fmnist/cohen/noise_0.0/lenet/4/checkpoint.pth.tar"
    before = checkpoint.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train_cohen.main(args)
    assert exit_info.value.code == 2 and "--resume" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before


def test_torchrun_two_processes_train_with_ddp(tmp_path):
    """torchrun with gloo on CPU: one run folder, checkpoint keys as without DDP, one RNG state per process."""
    args = ["fmnist", "lenet", "--lr", "0.01", "--epochs", "1", "--noise", "0.25", "--id", "0", "--seed", "1",
            "--logdir", str(tmp_path)] + SMALL
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(REPO, "code", "train_cohen.py")] + args,
                            cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "0"
    rows = (folder / "log.txt").read_text().splitlines()
    assert len(rows) == 2
    checkpoint = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    assert list(checkpoint["state_dict"]) == ["1.conv1.weight", "1.conv1.bias", "1.conv2.weight", "1.conv2.bias",
                                              "1.fc1.weight", "1.fc1.bias", "1.fc2.weight", "1.fc2.bias"]
    assert len(checkpoint["rng"]) == 2
