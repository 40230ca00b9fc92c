"""Base classifier architectures: ``get_architecture(arch, dataset)``.

Every model is ``Sequential(normalize, net)``, so it takes images in [0, 1]
and the Gaussian noise of randomized smoothing lives in pixel space. The
state-dict keys match the published checkpoints: ``1.<...>`` for every net,
``1.module.<...>`` for ResNet-50 (which the published code wrapped in
``DataParallel``; a plain wrapper with a ``module`` attribute keeps those keys
without needing a GPU).
"""
import torch
from torch import nn
from torchvision.models import resnet50

from archs.cifar_resnet import resnet as resnet_cifar
from archs.lenet import LeNet
from common import UserError
from datasets import get_input_layer, get_num_classes

ARCHITECTURES = ["lenet", "cifar_resnet20", "cifar_resnet110", "cifar100_resnet110", "resnet50"]

# Which datasets each architecture was built for (input size, channels, classes).
ARCH_DATASETS = {
    "lenet": ("mnist", "fmnist"),
    "cifar_resnet20": ("cifar10",),
    "cifar_resnet110": ("cifar10",),
    "cifar100_resnet110": ("cifar100",),
    "resnet50": ("imagenet",),
}


class ArchitectureError(UserError):
    """An unknown architecture, or one that does not fit the dataset."""


class ModuleWrapper(nn.Module):
    """Holds a net as ``.module`` so its keys read ``module.<...>`` like DataParallel's."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def check_architecture(arch: str, dataset: str):
    if arch not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    if dataset not in ARCH_DATASETS[arch]:
        raise ArchitectureError(f"architecture '{arch}' does not fit dataset '{dataset}'; it is for "
                                f"{' or '.join(ARCH_DATASETS[arch])}")


def get_architecture(arch: str, dataset: str, device=None, input_layer: str = "normalize") -> nn.Module:
    """Return ``Sequential(normalize, net)`` on ``device`` (default: CUDA if available).

    ``input_layer``: the first layer, ``normalize`` (this project's, the published CAT-RS one) or another
    of ``datasets.INPUT_LAYERS`` for models released with it (SmoothAdv's ``center``, MACER's ``none``).
    """
    check_architecture(arch, dataset)
    if arch == "lenet":
        net = LeNet(num_classes=get_num_classes(dataset))
    elif arch == "cifar_resnet20":
        net = resnet_cifar(depth=20, num_classes=10)
    elif arch == "cifar_resnet110":
        net = resnet_cifar(depth=110, num_classes=10)
    elif arch == "cifar100_resnet110":
        net = resnet_cifar(depth=110, num_classes=100)
    else:
        net = ModuleWrapper(resnet50(weights=None))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return nn.Sequential(get_input_layer(dataset, input_layer), net).to(device)
