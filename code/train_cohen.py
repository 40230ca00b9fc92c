"""Gaussian data augmentation (Cohen, Rosenfeld and Kolter, "Certified Adversarial Robustness via
Randomized Smoothing", ICML 2019).

One SGD step per batch on cross-entropy at x + sigma * e, e ~ N(0, I).
Run folder: logs/{dataset}/cohen/noise_{sigma}/{arch}/{id}/.
"""
import torch
import torch.nn.functional as F

from method import Method, accuracy
from train_utils import train_main


def method_path(args) -> str:
    return f"cohen/noise_{args.noise_sd}"


def batch_loss(ctx, epoch: int, inputs: torch.Tensor, targets: torch.Tensor):
    """(cross-entropy at the noisy inputs, the same as the train loss, accuracy on the noisy inputs)."""
    noisy = inputs + torch.randn_like(inputs) * ctx.args.noise_sd
    with ctx.autocast():
        outputs = ctx.model(noisy)
    loss = F.cross_entropy(outputs.float(), targets)
    return loss, loss, accuracy(outputs, targets)


METHOD = Method(description="Gaussian data augmentation (Cohen et al. 2019)", method_path=method_path,
                batch_loss=batch_loss)


def main(argv=None):
    train_main(METHOD, argv)


if __name__ == "__main__":
    main()
