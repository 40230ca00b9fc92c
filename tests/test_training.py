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
from architectures import get_architecture
from train_utils import LOG_HEADER, build_parser

SMALL = ["--train-subset", "512", "--test-subset", "128", "--batch", "64", "--workers", "0", "--print-freq", "1000"]


def run_script(script, args, cwd=REPO, **kwargs):
    return subprocess.run([sys.executable, os.path.join(REPO, "code", script)] + args, cwd=cwd,
                          env=python_env(), capture_output=True, text=True, **kwargs)


def published(line):
    """A published CIFAR-10 command line moved to Fashion-MNIST / LeNet, as the published README says."""
    return line.replace("cifar10 cifar_resnet110", "fmnist lenet").split()


def test_published_gaussian_command_names_its_run_folder(tmp_path):
    args = published("cifar10 cifar_resnet110 --lr 0.1 --lr_step_size 50 --epochs 150 --noise 0.25 --id 0")
    parsed = build_parser(train_cohen.METHOD).parse_args(args)
    assert (parsed.noise_sd, parsed.lr, parsed.lr_step_size, parsed.epochs, parsed.id) == (0.25, 0.1, 50, 150, 0)
    result = run_script("train_cohen.py", args + ["--epochs", "1", "--logdir", str(tmp_path)] + SMALL)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "0"
    assert (folder / "log.txt").read_text().splitlines()[0] == LOG_HEADER
    assert (folder / "code" / "train_cohen.py").is_file()


def test_common_defaults_match_published():
    parsed = build_parser(train_cohen.METHOD).parse_args(["fmnist", "lenet"])
    assert (parsed.workers, parsed.epochs, parsed.batch, parsed.lr, parsed.lr_step_size, parsed.gamma,
            parsed.momentum, parsed.weight_decay, parsed.noise_sd, parsed.print_freq) == \
        (4, 90, 256, 0.1, 30, 0.1, 0.9, 1e-4, 0.0, 10)
    parsed = build_parser(train_cohen.METHOD).parse_args(["fmnist", "lenet", "--learning-rate", "0.5", "--wd", "0"])
    assert parsed.lr == 0.5 and parsed.weight_decay == 0.0


def test_one_epoch_writes_log_checkpoint_and_schedule(tmp_path):
    args = ["fmnist", "lenet", "--lr", "0.01", "--epochs", "3", "--lr_step_size", "1", "--gamma", "0.5",
            "--noise", "0.5", "--id", "7", "--seed", "3", "--logdir", str(tmp_path)] + SMALL
    result = run_script("train_cohen.py", args)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "fmnist" / "cohen" / "noise_0.5" / "lenet" / "7"
    rows = (folder / "log.txt").read_text().splitlines()
    assert rows[0] == LOG_HEADER and [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2"]
    # the published StepLR(1, 0.5) stepped with step(epoch) after each epoch: the first drop is before epoch 2
    assert [float(r.split("\t")[2]) for r in rows[1:]] == [0.01, 0.01, 0.005]
    checkpoint = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["arch"] == "lenet"
    assert set(checkpoint) >= {"epoch", "arch", "state_dict", "optimizer"}
    assert all(k.startswith("1.") for k in checkpoint["state_dict"])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(folder))
    # one console line per epoch with the noisy test accuracy and loss, as in log.txt
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    for line, row in zip(epoch_lines, rows[1:]):
        test_loss, test_acc = (float(v) for v in row.split("\t")[5:7])
        assert "noisy test acc" in line and "noisy test loss" in line
        assert float(line.split("noisy test acc ")[1].split()[0]) == pytest.approx(test_acc, abs=0.06)
        assert float(line.split("noisy test loss ")[1].split()[0]) == pytest.approx(test_loss, rel=0.01)
    # TensorBoard (a requirement) reads the run folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy/test")] == [0, 1, 2]


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("numerics", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_sigkill_and_resume_gives_identical_weights(tmp_path, numerics):
    # step 1: the learning rate drops twice within the run, so the resume must restore the schedule too;
    # bfloat16 autocast too, which the reproduction's CAT-RS cells train with across sessions
    common = ["fmnist", "lenet", "--lr", "0.01", "--epochs", "4", "--lr_step_size", "1", "--noise", "0.25", "--seed", "11",
              "--logdir", str(tmp_path)] + SMALL + numerics
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
    train_cohen.main(["fmnist", "lenet", "--epochs", "1", "--id", "3", "--resume", "--logdir", str(tmp_path)] + SMALL)
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
    (["fmnist", "lenet", "--epochs", "0"], "--epochs 0 trains nothing"),
    (["imagenet", "resnet50", "--data-on-device", "yes"], "--data-on-device yes is not available for imagenet"),
    (["fmnist", "lenet", "--cuda-graphs"], "--cuda-graphs is not available for this method"),
])
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exit_info:
        train_cohen.main(["--epochs", "1"] + args + ["--id", "0", "--logdir", str(tmp_path)] + SMALL)
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


def test_torchrun_two_processes_train_with_ddp_as_one_process_does(tmp_path):
    """torchrun with gloo on CPU: one run folder, checkpoint keys as without DDP, one RNG state per process, and
    the weights of one process at the same global batch after 8 SGD steps (within float rounding).

    Each process takes every other example of the epoch's order (drawn alike by both), so the two halves of
    a step make up the one-process batch of that step; with the gradients averaged the steps are the same.
    Without noise (each process draws its own), nothing else differs. Not splitting the data would double
    the steps; not averaging the gradients would step rank 0 on its half alone.
    """
    args = ["fmnist", "lenet", "--lr", "0.05", "--epochs", "2", "--noise", "0.0", "--id", "0", "--seed", "1",
            "--train-subset", "256", "--test-subset", "64", "--batch", "64", "--workers", "0", "--print-freq", "1000"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(REPO, "code", "train_cohen.py")] + args + ["--logdir", str(tmp_path / "two")],
                            cwd=REPO, env=python_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    train_cohen.main(args + ["--logdir", str(tmp_path / "one")])
    folder = tmp_path / "two" / "fmnist" / "cohen" / "noise_0.0" / "lenet" / "0"
    rows = (folder / "log.txt").read_text().splitlines()
    assert len(rows) == 3
    checkpoint = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    assert list(checkpoint["state_dict"]) == ["1.conv1.weight", "1.conv1.bias", "1.conv2.weight", "1.conv2.bias",
                                              "1.fc1.weight", "1.fc1.bias", "1.fc2.weight", "1.fc2.bias"]
    assert len(checkpoint["rng"]) == 2
    alone = torch.load(tmp_path / "one" / "fmnist" / "cohen" / "noise_0.0" / "lenet" / "0" / "checkpoint.pth.tar",
                       weights_only=True)
    torch.manual_seed(1)
    initial = get_architecture("lenet", "fmnist", "cpu").state_dict()   # the weights --seed 1 starts from
    for key, value in alone["state_dict"].items():
        two = checkpoint["state_dict"][key]
        moved = (value - initial[key]).abs().max().item()
        assert moved > 1e-3, key
        assert (two - value).abs().max().item() <= 1e-3 * moved + 1e-6, key   # float32 sums in other orders
    # the logged train loss is the mean over both halves
    assert rows[1].split("\t")[3] == (tmp_path / "one" / "fmnist" / "cohen" / "noise_0.0" / "lenet" / "0" /
                                      "log.txt").read_text().splitlines()[1].split("\t")[3]


# --------------------------------------------------------------------------- learning-rate schedule

@pytest.mark.parametrize("step,gamma", [(1, 0.5), (2, 0.1), (3, 0.5), (50, 0.1)])
def test_schedule_is_the_rate_the_published_runs_used(step, gamma):
    """The published loop: StepLR(step, gamma), train epoch e, then scheduler.step(e)."""
    from train_utils import lr_factor
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=gamma)
    used = []
    with pytest.warns(UserWarning):  # the epoch argument of step() is deprecated, but it is what was run
        for epoch in range(160):
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step(epoch)
    assert [0.1 * lr_factor(e, step, gamma) for e in range(160)] == pytest.approx(used, rel=1e-12)
    first_drop = next(e for e in range(160) if used[e] < 0.1)
    assert first_drop == step + 1


def test_macer_deferred_robustness_starts_with_the_first_drop():
    import train_macer
    from train_utils import lr_schedule
    for step in (1, 2, 30, 50):
        args = build_parser(train_macer.METHOD).parse_args(
            ["fmnist", "lenet", "--deferred", "--lbd", "6", "--lr_step_size", str(step)])
        schedule = lr_schedule(train_macer.METHOD, args)
        first_drop = next(e for e in range(200) if schedule(e) < 1)
        first_robust = next(e for e in range(200) if train_macer.robustness_weight(args, e) > 0)
        assert first_robust == first_drop == step + 1
        assert train_macer.robustness_weight(args, first_robust) == 6.0


def test_catrs_lr_drop_multiplies_the_schedule_from_that_epoch_on():
    import train_catrs
    from train_utils import lr_schedule
    args = build_parser(train_catrs.METHOD).parse_args(
        ["fmnist", "lenet", "--lr_step_size", "2", "--gamma", "0.5", "--lr_drop", "2"])
    schedule = lr_schedule(train_catrs.METHOD, args)
    # step schedule 1, 1, 1, 0.5, 0.5, 0.25; times gamma from epoch 2 on (published: at epoch 2 only)
    assert [schedule(e) for e in range(6)] == [1, 1, 0.5, 0.25, 0.25, 0.125]


# --------------------------------------------------------------------------- resume checks its arguments

def _train_args(tmp_path, *extra):
    return (["fmnist", "lenet", "--lr", "0.01", "--noise", "0.25", "--id", "5", "--seed", "2",
             "--logdir", str(tmp_path)] + SMALL + list(extra))


def test_resume_with_changed_arguments_stops_before_any_work(tmp_path, capsys):
    train_cohen.main(_train_args(tmp_path, "--epochs", "1"))
    folder = tmp_path / "fmnist/cohen/noise_0.25/lenet/5"
    checkpoint, log = folder / "checkpoint.pth.tar", folder / "log.txt"
    before = (checkpoint.read_bytes(), log.read_text(), sorted(os.listdir(folder)))
    capsys.readouterr()

    # the case of the report: a changed learning rate and training subset must not continue silently
    with pytest.raises(SystemExit) as exit_info:
        train_cohen.main(_train_args(tmp_path, "--epochs", "2", "--resume", "--lr", "0.05", "--train-subset", "400"))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "lr: 0.01 -> 0.05" in lines[0] and "train_subset: 512 -> 400" in lines[0]
    assert "--resume-changed-args" in lines[0] and "epochs:" not in lines[0]
    assert "resuming" not in captured.out
    assert (checkpoint.read_bytes(), log.read_text(), sorted(os.listdir(folder))) == before

    # the free options (--epochs, --workers, --print-freq) may change without a word
    train_cohen.main(_train_args(tmp_path, "--epochs", "2", "--resume", "--print-freq", "3"))
    assert "resuming" in capsys.readouterr().out
    assert not (folder / "resume_overrides.txt").exists()

    # with the flag the run continues with the new values, and the override is recorded in the run folder
    train_cohen.main(_train_args(tmp_path, "--epochs", "3", "--resume", "--lr", "0.05", "--resume-changed-args"))
    captured = capsys.readouterr()
    assert "lr: 0.01 -> 0.05" in captured.err
    overrides = (folder / "resume_overrides.txt").read_text().splitlines()
    assert len(overrides) == 1 and "after epoch 1" in overrides[0] and "lr: 0.01 -> 0.05" in overrides[0]
    rows = log.read_text().splitlines()
    assert rows[0] == LOG_HEADER and [float(r.split("\t")[2]) for r in rows[1:]] == [0.01, 0.01, 0.05]
    assert torch.load(checkpoint, weights_only=True)["args"]["lr"] == 0.05


def test_resume_of_a_checkpoint_without_arguments_needs_the_flag(tmp_path, capsys):
    train_cohen.main(_train_args(tmp_path, "--epochs", "1"))
    path = tmp_path / "fmnist/cohen/noise_0.25/lenet/5/checkpoint.pth.tar"
    published_style = {k: v for k, v in torch.load(path, weights_only=True).items()
                       if k in ("epoch", "arch", "state_dict", "optimizer")}
    torch.save(published_style, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_cohen.main(_train_args(tmp_path, "--epochs", "2", "--resume"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stores no arguments" in err[0] and "--resume-changed-args" in err[0]
    train_cohen.main(_train_args(tmp_path, "--epochs", "2", "--resume", "--resume-changed-args"))
    assert "stores no arguments" in (path.parent / "resume_overrides.txt").read_text()
    assert torch.load(path, weights_only=True)["epoch"] == 2


def test_resume_of_a_complete_run_says_so(tmp_path, capsys):
    train_cohen.main(_train_args(tmp_path, "--epochs", "1"))
    folder = tmp_path / "fmnist/cohen/noise_0.25/lenet/5"
    before = ((folder / "checkpoint.pth.tar").read_bytes(), (folder / "log.txt").read_text())
    capsys.readouterr()
    train_cohen.main(_train_args(tmp_path, "--epochs", "1", "--resume"))  # returns: exit status 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"already complete: 1 epochs, {folder / 'checkpoint.pth.tar'}"]
    assert ((folder / "checkpoint.pth.tar").read_bytes(), (folder / "log.txt").read_text()) == before


# --------------------------------------------------------------------------- console of methods without train accuracy

@pytest.mark.parametrize("script,options", [
    ("train_macer.py", ["--num-noise-vec", "2"]),
    ("train_smoothmix.py", ["--num-noise-vec", "2", "--num-steps", "1"]),
])
def test_methods_without_train_accuracy_say_n_a(tmp_path, script, options):
    args = ["fmnist", "lenet", "--epochs", "1", "--noise", "0.25", "--id", "0", "--seed", "0",
            "--logdir", str(tmp_path), "--train-subset", "128", "--test-subset", "64", "--batch", "64",
            "--workers", "0", "--print-freq", "1"] + options
    result = run_script(script, args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum("does not measure its train accuracy" in line for line in lines) == 1
    assert all("Acc@1 n/a" in line for line in lines if line.startswith("Epoch: ["))
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 1 and "train acc n/a" in epoch_lines[0] and "noisy test acc" in epoch_lines[0]
    log = next(tmp_path.rglob("log.txt")).read_text().splitlines()
    assert float(log[1].split("\t")[4]) == 0.0  # the published column


def test_data_order_does_not_reuse_the_numbers_that_drew_the_initial_weights(monkeypatch, tmp_path):
    """The loader's generator has a stream of its own: the first epoch's order is not the global stream's."""
    import train_utils
    seen = {}
    make_loaders = train_utils.make_loaders

    def spy(args, method, device, dist, generator):
        seen["loader"] = generator.get_state()
        return make_loaders(args, method, device, dist, generator)

    monkeypatch.setattr(train_utils, "make_loaders", spy)
    train_cohen.main(["fmnist", "lenet", "--epochs", "1", "--seed", "5", "--train-subset", "64", "--test-subset", "64",
                      "--batch", "32", "--logdir", str(tmp_path), "--id", "0", "--workers", "0"])
    same_as_weights = torch.Generator().manual_seed(5).get_state()
    assert not torch.equal(seen["loader"], same_as_weights)
    assert torch.equal(seen["loader"], torch.Generator().manual_seed(train_utils.loader_seed(5)).get_state())
    assert train_utils.loader_seed(5) != train_utils.loader_seed(6)
