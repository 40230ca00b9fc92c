"""Conventions every script keeps: defaults in --help, a word when N is too small, batches that split evenly
over torchrun processes, and one writer per output."""
import argparse
import importlib
import math
import os
import subprocess
import sys

import pytest

from conftest import CODE, python_env
from test_eval_scripts import CERTIFY_FAST, call, rows, save_lenet

import certify  # noqa: E402
import predict  # noqa: E402
import train_cohen  # noqa: E402
import train_utils  # noqa: E402
from binomial import cp_lower, smallest_certifying_n, smallest_predicting_n, two_sided_binomial_pvalue  # noqa: E402

SCRIPTS = ["certify", "predict", "certify_c", "smooth_prediction", "analyze", "reproduce", "train_cohen", "train_stab",
           "train_salman", "train_macer", "train_consistency", "train_smoothmix", "train_catrs"]


def parser_of(name):
    module = importlib.import_module(name)
    if name.startswith("train_"):
        return train_utils.build_parser(module.METHOD)
    return module.build_parser()


# --------------------------------------------------------------------------- --help

@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_every_default(name):
    parser = parser_of(name)
    formatter = parser._get_formatter()
    shown = 0
    for action in parser._actions:
        default = action.default
        if (not action.option_strings or action.nargs == 0 or default is None or default is False
                or default is argparse.SUPPRESS or default == ""):
            continue
        text = formatter._expand_help(action)
        assert str(default) in text or "default" in (action.help or ""), f"{name} {action.option_strings}: {text!r}"
        shown += str(default) in text
    if name in ("certify", "predict", "train_cohen"):   # the defaults users ask for: N, N0, alpha, lr, epochs
        help_text = " ".join(parser.format_help().split())
        for default in (["(default: 100000)", "(default: 0.001)"] if name != "train_cohen"
                        else ["(default: 0.1)", "(default: 90)"]):
            assert default in help_text, (name, default)
        assert shown >= 4


# --------------------------------------------------------------------------- N too small for alpha

@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.1, 1e-6, 0.3, 2.0 ** -4, 2.0 ** -10])
def test_smallest_n_is_the_closed_form(alpha):
    """N of N samples of one class: CERTIFY's lower bound is alpha^(1/N), PREDICT's p-value 2^(1 - N).

    At alpha = 2^-k both reach their threshold exactly (bound 1/2 at N = k, p-value alpha at N = k + 1),
    where CERTIFY certifies (radius 0) and PREDICT predicts: N is k and k + 1, not one more.
    """
    certify_n, predict_n = smallest_certifying_n(alpha), smallest_predicting_n(alpha)
    assert certify_n == math.ceil(math.log2(1 / alpha))
    assert predict_n == math.ceil(math.log2(2 / alpha))
    assert cp_lower(certify_n, certify_n, alpha) >= 0.5 > cp_lower(certify_n - 1, certify_n - 1, alpha)
    assert two_sided_binomial_pvalue(predict_n, predict_n) <= alpha < two_sided_binomial_pvalue(predict_n - 1,
                                                                                                predict_n - 1)


def warnings_of(err):
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("script, too_few, enough", [(certify, 9, 10), (predict, 10, 11)])
def test_too_few_samples_are_warned_and_abstain(script, too_few, enough, tmp_path, capsys):
    """locuslab/smoothing #8: PREDICT with n = 10 at alpha = 0.001 abstains on every image without a word."""
    checkpoint = save_lenet(tmp_path / "checkpoint.pth.tar")
    extra = ["--N0", "10"] if script is certify else []
    capsys.readouterr()
    out = tmp_path / "few.tsv"
    assert call(script, ["fmnist", checkpoint, 0.25, out, "--max", 3, "--N", too_few, "--alpha", 0.001,
                         "--seed", 0] + extra) == 0
    warning = warnings_of(capsys.readouterr().err)
    assert len(warning) == 1 and f"--N {too_few} cannot" in warning[0], warning
    assert f"the smallest N that can {script.__name__} at this alpha is {enough}" in warning[0]
    assert {row[2] for row in rows(out)[1]} == {"-1"}, "every image abstains"
    assert call(script, ["fmnist", checkpoint, 0.25, tmp_path / "enough.tsv", "--max", 1, "--N", enough,
                         "--alpha", 0.001, "--seed", 0] + extra) == 0
    assert warnings_of(capsys.readouterr().err) == []


# --------------------------------------------------------------------------- batches over torchrun processes

def test_batch_that_does_not_split_over_processes_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exit_info:
        train_cohen.main(["fmnist", "lenet", "--batch", "256", "--epochs", "1", "--id", "0",
                          "--logdir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch 256 does not split evenly over 3 processes" in err[0], err
    assert "(255 or 258)" in err[0]
    assert os.listdir(tmp_path) == []
    train_utils.check_batch_split(256, 4)   # what divides is accepted
    with pytest.raises(train_utils.UserError, match=r"multiple of 4 \(4\)"):
        train_utils.check_batch_split(2, 4)


# --------------------------------------------------------------------------- one writer per output

HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from output_lock import OutputLock
lock = OutputLock(sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of an output (as a running certify.py does); stopped after the test."""
    processes = []

    def hold(output):
        process = subprocess.Popen([sys.executable, "-c", HOLD, CODE, str(output)], stdout=subprocess.PIPE,
                                   text=True, env=python_env())
        processes.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield hold
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(holder, tmp_path, capsys):
    checkpoint = save_lenet(tmp_path / "checkpoint.pth.tar")
    out = tmp_path / "out" / "c.tsv"
    argv = ["fmnist", checkpoint, 0.25, out, "--max", 2] + CERTIFY_FAST
    process = holder(out)
    capsys.readouterr()
    assert call(certify, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "being written by another run" in err[0], err
    assert f"pid {process.pid} " in err[0]
    assert sorted(os.listdir(tmp_path / "out")) == ["c.tsv.lock"], "the refused run wrote nothing"
    process.kill()   # the holder dies without releasing: the next run takes its lock over
    process.wait()
    assert call(certify, argv) == 0
    assert len(rows(out)[1]) == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["c.tsv", "c.tsv.meta.json"], "the lock is gone after the run"


def test_second_training_run_on_a_run_folder_is_refused(holder, tmp_path, capsys):
    folder = tmp_path / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "0"
    folder.mkdir(parents=True)
    process = holder(folder / "checkpoint.pth.tar")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_cohen.main(["fmnist", "lenet", "--noise", "0.25", "--epochs", "1", "--id", "0", "--logdir",
                          str(tmp_path), "--train-subset", "64", "--test-subset", "64", "--batch", "64",
                          "--workers", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "being written by another run" in err[0] and f"pid {process.pid} " in err[0], err
    assert sorted(os.listdir(folder)) == ["checkpoint.pth.tar.lock"]
