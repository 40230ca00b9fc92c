"""MACER: certified-radius maximisation (Zhai et al., ICLR 2020).

R. Zhai, C. Dan, D. He, H. Zhang, B. Gong, P. Ravikumar, C.-J. Hsieh and
L. Wang, "MACER: Attack-free and Scalable Robust Training via Maximizing
Certified Radius".

One SGD step per loader batch of B examples, each with m noisy copies
(copy-major: [x + e_1; ...; x + e_m], the layout of ``attacks.py``).
``macer_loss`` gives the objective (cl + lbd * rl) / B: cl the summed NLL of
the mean softmax over the copies, rl the hinge on the soft certified radius of
the examples whose soft smoothed prediction (softmax of beta * z) is correct.
With ``--deferred`` the robustness term is off (lbd = 0) while epoch <=
lr_step_size, as published: the robustness loss starts in epoch
lr_step_size + 1, the first epoch at the decayed learning rate. The train loss
logged is the classification loss per example (cl / B), as published; the
train accuracy is not measured (the log's column holds 0.0).

Run folder: logs/{dataset}/macer[_deferred{lr_step_size}]/num_{m}/lbd_{lbd}/gamma_{margin}/beta_{beta}/noise_{s}/{arch}/{id}/.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from attacks import repeat_copies
from common import nonnegative_float, positive_float, positive_int
from method import Method
from train_utils import train_main


def _standard_normal_quantile(p: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(p)


def macer_loss(logits: torch.Tensor, targets: torch.Tensor, m: int, beta: float, margin: float, sigma: float,
               lbd: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """MACER's objective (cl + lbd * rl) / B and its classification part cl / B (0-d tensors).

    ``logits``: shape (m * B, K), copy-major (row j * B + i is copy j of
    example i); ``targets``: shape (B,).
    cl = sum_i -log(mean_j softmax(z_ij)[y_i] + 1e-10).
    q_i = mean_j softmax(beta * z_ij); q1 >= q2 its two largest values; only
    examples whose top class is y_i count; d = PhiInv(q2) - PhiInv(q1) is kept
    where finite with |d| <= margin; rl = (sigma / 2) * sum(d + margin).
    """
    batch = targets.shape[0]
    z = logits.float().reshape(m, batch, -1)
    mean_probs = F.softmax(z, dim=2).mean(0)
    classification = F.nll_loss(torch.log(mean_probs + 1e-10), targets, reduction="sum")

    soft = F.softmax(beta * z, dim=2).mean(0)
    top2, top2_index = soft.topk(2, dim=1)
    q1, q2 = top2[:, 0], top2[:, 1]
    with torch.no_grad():
        gap = _standard_normal_quantile(q2) - _standard_normal_quantile(q1)
        keep = (top2_index[:, 0] == targets) & torch.isfinite(gap) & (gap.abs() <= margin)
    # Recomputed with the dropped entries set to 1/2 (a finite quantile, then masked out), so that no
    # infinite quantile enters the backward pass; masks rather than indexing keep the host from waiting
    # for the device to count the kept entries.
    half = torch.full_like(q1, 0.5)
    kept_gap = _standard_normal_quantile(torch.where(keep, q2, half)) - \
        _standard_normal_quantile(torch.where(keep, q1, half))
    robustness = torch.where(keep, kept_gap + margin, torch.zeros_like(kept_gap)).sum() * sigma / 2
    return (classification + lbd * robustness) / batch, classification / batch


def add_arguments(parser):
    group = parser.add_argument_group("MACER")
    group.add_argument("--num-noise-vec", default=16, type=positive_int, help="noise copies per example (m)")
    group.add_argument("--beta", default=16.0, type=positive_float, help="inverse temperature of the soft classifier")
    group.add_argument("--lbd", default=16.0, type=nonnegative_float, help="weight of the robustness loss")
    group.add_argument("--margin", default=8.0, type=positive_float, help="hinge margin (gamma) on the radius gap")
    group.add_argument("--deferred", action="store_true",
                       help="no robustness loss while epoch <= --lr_step_size")


def method_path(args) -> str:
    prefix = f"macer_deferred{args.lr_step_size}" if args.deferred else "macer"
    return (f"{prefix}/num_{args.num_noise_vec}/lbd_{args.lbd}/gamma_{args.margin}/beta_{args.beta}"
            f"/noise_{args.noise_sd}")


def robustness_weight(args, epoch: int) -> float:
    """lbd, or 0 with --deferred while epoch <= lr_step_size (the published condition)."""
    return 0.0 if args.deferred and epoch <= args.lr_step_size else args.lbd


def batch_loss(ctx, epoch: int, inputs: torch.Tensor, targets: torch.Tensor):
    """(MACER's objective, cl / B as published, None: the train accuracy is not measured)."""
    args = ctx.args
    m = args.num_noise_vec
    copies = ctx.memory_format(repeat_copies(inputs, m))
    noisy = copies + torch.randn_like(copies) * args.noise_sd
    with ctx.autocast():
        outputs = ctx.model(noisy)
    loss, classification = macer_loss(outputs, targets, m, args.beta, args.margin, args.noise_sd,
                                      robustness_weight(args, epoch))
    return loss, classification, None


METHOD = Method(description="MACER: maximising the certified radius (Zhai et al. 2020)",
                method_path=method_path, batch_loss=batch_loss, add_arguments=add_arguments, defaults={"batch": 64},
                measures_train_accuracy=False)


def main(argv=None):
    train_main(METHOD, argv)


if __name__ == "__main__":
    main()
