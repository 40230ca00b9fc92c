"""SmoothAdv: adversarial training of smoothed classifiers (Salman et al., NeurIPS 2019).

H. Salman, G. Yang, J. Li, P. Zhang, H. Zhang, I. Razenshteyn and S. Bubeck,
"Provably Robust Deep Learning via Adversarially Trained Smoothed Classifiers".

Chunked: each loader batch of B examples is split into m =
``--num-noise-vec`` consecutive mini-batches of b = B // m examples, one SGD
step each. Each example is repeated m times (copy-major: [x; ...; x], the
layout of ``attacks.py``), each copy gets its own noise e_j ~ N(0, s^2 I), and
a PGD or DDN attack on the smoothed soft classifier finds one perturbation d
per example, shared by its copies. The loss is the cross-entropy at
x + d + e_j over all copies (``smoothadv_loss``). The attack radius grows
linearly over the first ``--warmup`` epochs; DDN starts from a norm equal to
that radius every epoch. The train loss and accuracy logged are those of all
copies (each mini-batch weighs b * m, as published).

Run folder: logs/{dataset}/salman/pgd_{eps}_{steps}_{warmup}/num_{m}/noise_{s}/{arch}/{id}/
or .../salman/ddn_{eps}_{steps}_{warmup}_{init_norm_DDN}_{gamma_DDN}/..., eps as typed
(in 1/256 units: ``--epsilon 256`` is an L2 radius of 1.0).
"""
import argparse

import torch
import torch.nn.functional as F

from attacks import DDN, PGD_L2, repeat_copies, warmup_epsilon
from common import UserError, positive_float, positive_int, probability
from method import Method, accuracy, attack_mode, noise_copies
from train_utils import train_main


def str_to_bool(text: str) -> bool:
    """'True' / 'False' (also yes/no, 1/0, any case) as a bool."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not a boolean: write True or False")


def add_arguments(parser):
    group = parser.add_argument_group("SmoothAdv")
    group.add_argument("--attack", default="DDN", choices=["DDN", "PGD"], help="attack used for training")
    group.add_argument("--epsilon", default=64.0, type=positive_float,
                       help="L2 radius of the attack in 1/256 units (256 means 1.0); --eps works too")
    group.add_argument("--num-steps", default=10, type=positive_int, help="number of attack steps")
    group.add_argument("--warmup", default=1, type=positive_int,
                       help="epochs over which the radius grows linearly to --epsilon")
    group.add_argument("--num-noise-vec", default=1, type=positive_int,
                       help="noise copies per example (m); each batch is split into m mini-batches")
    group.add_argument("--no-grad-attack", action="store_true",
                       help="PGD with m > 1: estimate the gradient from the noise, without backward passes")
    group.add_argument("--random-start", default=True, type=str_to_bool,
                       help="ignored, as in the published code (kept for its command lines): PGD starts "
                            "from d = 0")
    group.add_argument("--init-norm-DDN", default=256.0, type=positive_float,
                       help="DDN's initial norm in 1/256 units, as named in the run folder; training sets "
                            "the initial norm to the warmed-up radius each epoch, as published")
    group.add_argument("--gamma-DDN", default=0.05, type=probability, help="DDN's norm update factor")


def check_arguments(args):
    if args.no_grad_attack and (args.attack != "PGD" or args.num_noise_vec < 2):
        raise UserError("--no-grad-attack needs --attack PGD and --num-noise-vec of 2 or more")
    if args.num_noise_vec > args.batch:
        raise UserError(f"--num-noise-vec {args.num_noise_vec} exceeds --batch {args.batch}; "
                        "each batch is split into that many mini-batches")


def method_path(args) -> str:
    check_arguments(args)
    if args.attack == "PGD":
        attack = f"pgd_{args.epsilon}_{args.num_steps}_{args.warmup}"
    else:
        attack = f"ddn_{args.epsilon}_{args.num_steps}_{args.warmup}_{args.init_norm_DDN}_{args.gamma_DDN}"
    return f"salman/{attack}/num_{args.num_noise_vec}/noise_{args.noise_sd}"


def make_attacker(args, epoch: int):
    """The attack of epoch ``epoch``: PGD or DDN at the warmed-up radius."""
    radius = warmup_epsilon(args.epsilon / 256.0, epoch, args.warmup)
    if args.attack == "PGD":
        return PGD_L2(steps=args.num_steps, max_norm=radius)
    return DDN(steps=args.num_steps, gamma=args.gamma_DDN, init_norm=radius, max_norm=radius)


def smoothadv_loss(ctx, attacker, copies: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor, m: int,
                   no_grad: bool = False):
    """(cross-entropy over the attacked noisy copies, the same, accuracy on them).

    ``copies``: the m copies of the b examples, copy-major (m * b, ...); ``noise`` shaped like it (row
    j * b + i: e_j of example i); ``targets`` (b,). The loss is mean_{i, j} CE(f(x_i + d_i + e_ij), y_i),
    d_i the perturbation ``attacker`` finds for example i against its m noises.
    """
    with attack_mode(ctx.base_model), ctx.autocast():
        copies = attacker.attack(ctx.base_model, copies, targets, noise=noise, num_noise_vectors=m,
                                 no_grad=no_grad)
    targets_copies = targets.repeat(m)
    with ctx.autocast():
        outputs = ctx.model(copies + noise)
    loss = F.cross_entropy(outputs.float(), targets_copies)
    return loss, loss, accuracy(outputs, targets_copies)


def batch_loss(ctx, epoch: int, inputs: torch.Tensor, targets: torch.Tensor):
    """``smoothadv_loss`` on m copies of ``inputs`` under fresh noise, at the attack of epoch ``epoch``."""
    args = ctx.args
    m = args.num_noise_vec
    copies = ctx.memory_format(repeat_copies(inputs, m))
    noise = torch.randn_like(copies) * args.noise_sd
    return smoothadv_loss(ctx, make_attacker(args, epoch), copies, targets, noise, m, args.no_grad_attack)


METHOD = Method(description="SmoothAdv: adversarial training of smoothed classifiers (Salman et al. 2019)",
                method_path=method_path, batch_loss=batch_loss, add_arguments=add_arguments,
                minibatches=noise_copies, logged_per_example=noise_copies)


def main(argv=None):
    train_main(METHOD, argv)


if __name__ == "__main__":
    main()
