"""The CPU fast paths of training keep the published values.

* LeNet's first convolution computes its input gradient with a matrix
  product and ``F.fold`` (``archs.lenet._SingleChannelConv2d``): the same
  gradients as the built-in convolution;
* ``--channels-last`` is on by default on a CPU, and ``--channels-last`` alone
  still means yes;
* the noisy test pass gives the batch-size weighted mean loss and accuracy;
* ``--compile`` compiles a ResNet block by block, keeps the checkpoint's
  parameter names, and trains.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_macer
import train_utils
from architectures import get_architecture
from archs.lenet import LeNet, _SingleChannelConv2d
from conftest import REPO, python_env
from fast_path import compile_model, use_channels_last


def test_single_channel_conv_gradients_match_finite_differences():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SingleChannelConv2d.apply, (x, weight, bias))


@pytest.mark.parametrize("channels_last", [False, True])
def test_lenet_input_and_weight_gradients_equal_the_builtin_convolution(channels_last):
    torch.manual_seed(1)
    model = LeNet()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand(6, 1, 28, 28, requires_grad=True)

    def builtin(inputs):      # LeNet's forward with the built-in first convolution
        h = F.max_pool2d(F.relu(model.conv1(inputs)), 2, 2)
        h = F.max_pool2d(F.relu(model.conv2(h)), 2, 2)
        return model.fc2(F.relu(model.fc1(torch.flatten(h, 1))))

    targets = torch.arange(6) % 10
    fast = torch.autograd.grad(F.cross_entropy(model(x), targets), [x, *model.parameters()])
    slow = torch.autograd.grad(F.cross_entropy(builtin(x), targets), [x, *model.parameters()])
    for got, expected in zip(fast, slow):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert fast[0].abs().sum() > 0


def test_channels_last_defaults_to_cpu_and_keeps_the_bare_flag():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last("auto", cpu, False) is True
    assert use_channels_last("auto", cuda, False) is False and use_channels_last("auto", cuda, True) is True
    assert use_channels_last("no", cpu, False) is False and use_channels_last("yes", cuda, False) is True
    assert use_channels_last(False, cpu, False) is False
    parser = train_utils.build_parser(train_macer.METHOD)
    assert parser.parse_args(["fmnist", "lenet", "--channels-last"]).channels_last == "yes"
    assert parser.parse_args(["fmnist", "lenet"]).channels_last == "auto"
    assert parser.parse_args(["fmnist", "lenet", "--channels-last", "no"]).channels_last == "no"


def test_noisy_test_pass_is_the_weighted_mean_over_batches():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(7, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]

    class Args:
        bf16 = False
        channels_last = False
    ctx = train_utils.TrainingContext(args=Args(), model=model, optimizer=None, device=torch.device("cpu"), dist=None)
    torch.manual_seed(4)
    loss, acc = train_utils.test(ctx, batches, 0.0)
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())


# --------------------------------------------------------------------------- bench_train.py --published

def _bench_train():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_train.py")
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAKE_DATASETS = '''
def get_dataset(dataset, split):
    return list(range(60000 if split != "test" else 10000))
'''

# Stands in for a published training script: reads its data through datasets.get_dataset (as the
# published scripts do, imported by name) and logs the number of examples it got as the epoch time.
FAKE_TRAIN = '''
import os, sys
from datasets import get_dataset
run_id = sys.argv[sys.argv.index("--id") + 1]
train, test = get_dataset("fmnist", "train"), get_dataset("fmnist", "test")
folder = os.path.join("logs", "fmnist", "cohen", "noise_0.5", "lenet", run_id)
os.makedirs(folder)
with open(os.path.join(folder, "log.txt"), "w") as handle:
    handle.write("epoch\\ttime\\tlr\\ttrain loss\\ttrain acc\\ttestloss\\ttest acc\\n")
    handle.write("0\\t%d.%04d\\t0.01\\t1.0\\t0.0\\t1.0\\t0.0\\n" % (len(train), len(test)))
'''


def test_bench_published_runs_the_scripts_on_the_subsets(tmp_path, monkeypatch):
    bench = _bench_train()
    code = tmp_path / "published" / "code"
    code.mkdir(parents=True)
    (code / "datasets.py").write_text(FAKE_DATASETS)
    (code / "train_cohen.py").write_text(FAKE_TRAIN)
    cache = tmp_path / "cache"
    (cache / "FashionMNIST").mkdir(parents=True)
    monkeypatch.setenv("DATASET_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    pi = tmp_path / "pi.npy"
    np.save(pi, np.ones((3, 10), dtype=np.float32) / 10)
    root = bench.prepare_published(bench.published_code_dir(str(tmp_path / "published")), str(work), str(pi))
    assert (work / "published" / "test" / "smooth_prediction" / "fmnist" / "0" / "model_conf_0.25_train.npy").exists()
    assert os.path.realpath(os.path.join(root, "dataset_cache", "FMNIST_Targeted")) == str(cache / "FashionMNIST")

    class Args:
        threads, timeout, train_subset, test_subset = 1, 120, 300, 7
    seconds = bench.run_published("train_cohen.py", ["--noise_sd", "0.5"], Args(), root, 5)
    assert seconds == pytest.approx(300.0007)


def test_bench_published_refuses_a_folder_without_the_scripts(tmp_path, capsys):
    bench = _bench_train()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--published", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "train_cohen.py" in err[0]


def test_compile_is_regional_for_resnets_and_whole_for_lenet():
    resnet = get_architecture("cifar_resnet20", "cifar10", "cpu")
    names = list(resnet.state_dict())
    compiled = compile_model(resnet)
    # 3 stages of 3 BasicBlocks; the blocks share their code, so they compile once per shape and mode
    assert len(compiled) == 9 and {type(m).__name__ for m in compiled} == {"BasicBlock"}
    assert list(resnet.state_dict()) == names        # in place: a checkpoint keeps the published keys
    lenet = get_architecture("lenet", "fmnist", "cpu")
    assert compile_model(lenet) == [lenet]


def test_compiled_training_run_writes_a_loadable_checkpoint(tmp_path):
    args = ["fmnist", "lenet", "--lr", "0.01", "--epochs", "1", "--noise", "0.25", "--id", "0", "--seed", "0",
            "--train-subset", "256", "--test-subset", "128", "--batch", "64", "--workers", "0", "--compile",
            "--logdir", str(tmp_path)]
    result = subprocess.run([sys.executable, os.path.join(REPO, "code", "train_cohen.py")] + args,
                            env=python_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "fmnist" / "cohen" / "noise_0.25" / "lenet" / "0"
    checkpoint = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    get_architecture("lenet", "fmnist", "cpu").load_state_dict(checkpoint["state_dict"])   # strict: same keys
    assert checkpoint["args"]["compile"] is True
    assert np.isfinite(float((folder / "log.txt").read_text().splitlines()[1].split("\t")[3]))
