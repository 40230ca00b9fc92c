"""Other people's checkpoints load with the first layer they were trained with, or are refused in one line.

The expected logits are computed here from the papers' definitions of the first layers, not by the
code under test: SmoothAdv's released models subtract the mean (no division by the sd), the
published CAT-RS code (and Cohen et al., Consistency, SmoothMix) divides by the sd too, MACER's
nets take the pixels as they are. A small CIFAR ResNet with random weights (in eval mode) stands
for the released nets; the data are random CIFAR-sized images, so no data set is needed. Also
checked: the sigma a checkpoint was trained with against the sigma asked for.
"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO  # noqa: F401  (puts code/ on the path)
from test_eval_scripts import CERTIFY_FAST, FAST, call, make_mnist_c, rows, save_lenet

import certify  # noqa: E402
import certify_c  # noqa: E402
import checkpoint_info  # noqa: E402
import predict  # noqa: E402
from architectures import get_architecture  # noqa: E402
from checkpoints import load_base_classifier, load_checkpoint  # noqa: E402
from common import UserError  # noqa: E402

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_SD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def net():
    """A CIFAR ResNet-20 without a first layer, random weights and batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    model = get_architecture("cifar_resnet20", "cifar10", "cpu")[1]
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def published_checkpoint(net, path):
    """What the published code saves: ``Sequential(first layer, net)`` with no first-layer tensors."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"1." + key: value for key, value in net.state_dict().items()}
    torch.save({"epoch": 150, "arch": "cifar_resnet20", "state_dict": state, "optimizer": {}}, path)
    return str(path)


def usage(path, dataset="cifar10"):
    """What a run says about the checkpoint at sigma 0.25, with no --input-layer."""
    return checkpoint_info.usage(load_checkpoint(path, dataset=dataset), path, dataset, None, 0.25)


def logits(path, images, **options):
    with torch.no_grad():
        return load_base_classifier(path, "cifar10", "cpu", **options)(images)


def test_smoothadv_checkpoint_gives_its_logits_with_center(net, images, tmp_path):
    path = published_checkpoint(net, tmp_path / "pretrained_models/cifar10/PGD_2steps/eps_64/cifar10/resnet110"
                                                "/noise_0.25/checkpoint.pth.tar")
    with torch.no_grad():
        published = net(images - CIFAR10_MEAN)   # SmoothAdv: InputCenterLayer, then the net
        divided = net((images - CIFAR10_MEAN) / CIFAR10_SD)
    assert torch.allclose(logits(path, images, input_layer="center"), published, atol=1e-5)
    assert not torch.allclose(divided, published, atol=1e-2), "the two layers must differ for the test to mean much"
    # the default is not silently wrong: this release is recognised by its folder and refused in one line
    with pytest.raises(UserError, match="SmoothAdv release.*--input-layer center"):
        load_base_classifier(path, "cifar10", "cpu")
    # the same file elsewhere: loaded with the published CAT-RS layer, and the run says so
    moved = published_checkpoint(net, tmp_path / "elsewhere" / "checkpoint.pth.tar")
    layer, lines = usage(moved)
    assert layer == "normalize" and len(lines) == 1 and "does not record its input layer" in lines[0]
    assert "--input-layer center" in lines[0]


def test_catrs_checkpoint_gives_its_logits_by_default(net, images, tmp_path):
    path = published_checkpoint(net, tmp_path / "logs/cifar10/catrs/adv_256.0_4/lbd_0.5/num_4/noise_0.25/"
                                                "cifar_resnet20/0/checkpoint.pth.tar")
    with torch.no_grad():
        published = net((images - CIFAR10_MEAN) / CIFAR10_SD)
    assert torch.allclose(logits(path, images), published, atol=1e-5)
    assert torch.allclose(logits(path, images, input_layer="normalize"), published, atol=1e-5)


def test_macer_release_loads_without_a_first_layer(images, tmp_path):
    torch.manual_seed(2)
    net = get_architecture("cifar_resnet110", "cifar10", "cpu")[1].eval()   # MACER's CIFAR-10 net
    path = tmp_path / "macer" / "440.pth"
    path.parent.mkdir()
    torch.save({"net": net.state_dict(), "epoch": 440}, path)   # MACER's main.py: the bare net's keys
    with torch.no_grad():
        published = net(images)
    assert torch.allclose(logits(str(path), images), published, atol=1e-5)
    with pytest.raises(UserError, match="trained with the input layer 'none'"):
        load_base_classifier(str(path), "cifar10", "cpu", input_layer="normalize")


def test_recorded_input_layer_wins_and_a_contradiction_is_refused(net, images, tmp_path):
    path = tmp_path / "ours.pth.tar"
    state = {"1." + key: value for key, value in net.state_dict().items()}
    torch.save({"epoch": 1, "arch": "cifar_resnet20", "state_dict": state, "input_layer": "center"}, path)
    with torch.no_grad():
        published = net(images - CIFAR10_MEAN)
    assert torch.allclose(logits(str(path), images), published, atol=1e-5)
    with pytest.raises(UserError, match="drop --input-layer"):
        load_base_classifier(str(path), "cifar10", "cpu", input_layer="normalize")
    # a checkpoint of this project from before the record (it stores its arguments) used normalize
    torch.save({"epoch": 1, "arch": "cifar_resnet20", "state_dict": state, "args": {"noise_sd": 0.25}}, path)
    assert usage(str(path)) == ("normalize", [])


def test_certify_c_records_the_input_layer_and_refuses_a_smoothadv_release(net, tmp_path, capsys):
    folder = tmp_path / "pretrained_models/cifar10/DDN_4steps/eps_255/cifar10/resnet110/noise_0.25"
    ckpt = published_checkpoint(net, folder / "checkpoint.pth.tar")
    base = tmp_path / "CIFAR-10-C"
    base.mkdir()
    np.save(base / "fog.npy", np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    np.save(base / "labels.npy", np.array([3, 8]))
    prefix = str(tmp_path / "res") + "/"
    argv = [ckpt, prefix, "--base-c-path", base, "--N", 16, "--N0", 8, "--batch", 16, "--seed", 0]
    capsys.readouterr()
    assert call(certify_c, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--input-layer center" in err[0], err
    assert not os.path.exists(prefix), "nothing written"
    assert call(certify_c, argv + ["--input-layer", "center"]) == 0
    with open(prefix + "fog.tsv.meta.json") as handle:
        assert json.load(handle)["settings"]["input_layer"] == "center"
    assert len(rows(prefix + "fog.tsv")[1]) == 2


# --------------------------------------------------------------------------- sigma

@pytest.fixture(scope="module")
def lenet_at_half(tmp_path_factory):
    """A LeNet checkpoint of this project trained (so it says) at sigma 0.5."""
    path = tmp_path_factory.mktemp("model") / "checkpoint.pth.tar"
    save_lenet(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"] = {"noise_sd": 0.5, "arch": "lenet"}
    torch.save(checkpoint, path)
    return str(path)


def warnings_of(err):
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("script", [certify, predict])
def test_sigma_other_than_the_training_sigma_is_warned(script, lenet_at_half, tmp_path, capsys):
    options = CERTIFY_FAST if script is certify else FAST
    capsys.readouterr()
    assert call(script, ["fmnist", lenet_at_half, 0.25, tmp_path / "a.tsv", "--max", 1] + options) == 0
    warning = warnings_of(capsys.readouterr().err)
    assert len(warning) == 1 and "sigma 0.25" in warning[0] and "trained with" in warning[0] and "0.5" in warning[0]
    assert call(script, ["fmnist", lenet_at_half, 0.5, tmp_path / "b.tsv", "--max", 1] + options) == 0
    assert warnings_of(capsys.readouterr().err) == []


def test_sigma_is_read_from_a_released_folder_when_not_recorded(tmp_path, capsys):
    path = tmp_path / "models" / "noise_1.00" / "checkpoint.pth.tar"
    path.parent.mkdir(parents=True)
    save_lenet(path)   # the published format: no arguments
    capsys.readouterr()
    assert call(certify, ["fmnist", path, 0.25, tmp_path / "c.tsv", "--max", 1] + CERTIFY_FAST) == 0
    warning = warnings_of(capsys.readouterr().err)
    assert len(warning) == 1 and "folder 'noise_1.00'" in warning[0]


def test_certify_c_says_which_sigma_it_uses(lenet_at_half, tmp_path, capsys):
    base = tmp_path / "mnist_c"
    make_mnist_c(base, ["identity"], images_per_corruption=1)
    argv = [lenet_at_half, str(tmp_path / "out") + "/", "--base_c_path", base, "--corruptions", "identity",
            "--N", 16, "--N0", 8, "--batch", 16]
    capsys.readouterr()
    assert call(certify_c, argv) == 0
    err = capsys.readouterr().err
    assert "sigma 0.25 (the published default" in err
    assert len(warnings_of(err)) == 1 and "trained with" in warnings_of(err)[0]
    assert call(certify_c, argv + ["--sigma", "0.5", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "published default" not in err and warnings_of(err) == []
