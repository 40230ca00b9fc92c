"""Stability training (Li, Chen, Wang and Carin, NeurIPS 2019).

B. Li, C. Chen, W. Wang and L. Carin, "Certified Adversarial Robustness with
Additive Noise" (stability training as the base-classifier objective).

One SGD step per batch on
    CE(f(x), y) + lbd * mean_i [ -sum_c softmax(f(x_i))_c * log_softmax(f(x_i + s e_i))_c ],
e ~ N(0, I). The clean logits are not detached, so the consistency term also
moves the clean prediction. As published, the train loss logged is the
cross-entropy term CE(f(x), y) alone, and the train accuracy is measured on the
noisy logits.
Run folder: logs/{dataset}/stab/lbd_{lbd}/noise_{s}/{arch}/{id}/.
"""
import torch
import torch.nn.functional as F

from common import nonnegative_float
from method import Method, accuracy
from train_utils import train_main


def stability_loss(clean_logits: torch.Tensor, noisy_logits: torch.Tensor, targets: torch.Tensor,
                   lbd: float) -> torch.Tensor:
    """CE(clean, y) + lbd * mean cross-entropy from softmax(clean) to the noisy prediction (a 0-d tensor)."""
    clean_logits, noisy_logits = clean_logits.float(), noisy_logits.float()
    stability = -(F.softmax(clean_logits, dim=1) * F.log_softmax(noisy_logits, dim=1)).sum(1).mean()
    return F.cross_entropy(clean_logits, targets) + lbd * stability


def add_arguments(parser):
    group = parser.add_argument_group("stability training")
    group.add_argument("--lbd", default=2.0, type=nonnegative_float, help="weight of the stability term")


def method_path(args) -> str:
    return f"stab/lbd_{args.lbd}/noise_{args.noise_sd}"


def batch_loss(ctx, epoch: int, inputs: torch.Tensor, targets: torch.Tensor):
    """(stability loss, CE(f(x), y) as published, accuracy on the noisy inputs)."""
    noise = torch.randn_like(inputs) * ctx.args.noise_sd
    with ctx.autocast():
        clean = ctx.model(inputs)
        noisy = ctx.model(inputs + noise)
    loss = stability_loss(clean, noisy, targets, ctx.args.lbd)
    return loss, F.cross_entropy(clean.detach().float(), targets), accuracy(noisy, targets)


METHOD = Method(description="Stability training (Li et al. 2019)", method_path=method_path, batch_loss=batch_loss,
                add_arguments=add_arguments)


def main(argv=None):
    train_main(METHOD, argv)


if __name__ == "__main__":
    main()
