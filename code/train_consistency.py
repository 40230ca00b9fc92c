"""Consistency regularisation training (Jeong and Shin, NeurIPS 2020).

J. Jeong and J. Shin, "Consistency Regularization for Certified Robustness of
Smoothed Classifiers".

Chunked: each loader batch is split into m = ``--num-noise-vec``
consecutive mini-batches of b examples, one SGD step each. The copies are
concatenated copy-major, [x + e_1; ...; x + e_m] (``attacks.add_noises``);
the loss is the mean cross-entropy over all copies plus
``consistency.consistency_loss``. With
``--adv-training``, x is first replaced by a SmoothAdv PGD adversary
(Salman et al., NeurIPS 2019) against the same noises, its radius growing
linearly over the first ``--warmup`` epochs.

The train loss logged is the mean cross-entropy term alone, as published.

Run folder: logs/{dataset}/consistency/cohen/num_{m}/lbd_{lbd}/eta_{eta}/noise_{s}/{arch}/{id}/
or .../consistency/salman_{eps}_{steps}_{warmup}/..., eps as typed (1/256 units).
"""
import torch
import torch.nn.functional as F

from attacks import SmoothAdv_PGD, add_noises, warmup_epsilon
from common import UserError, nonnegative_float, positive_float, positive_int
from consistency import consistency_loss
from method import Method, accuracy, attack_mode, noise_copies
from train_utils import train_main


def add_arguments(parser):
    group = parser.add_argument_group("consistency regularisation")
    group.add_argument("--num-noise-vec", default=1, type=positive_int,
                       help="noise copies per example (m); each batch is split into m mini-batches")
    group.add_argument("--lbd", default=10.0, type=nonnegative_float, help="weight of the KL consistency term")
    group.add_argument("--eta", default=0.5, type=nonnegative_float, help="weight of the entropy term")
    group.add_argument("--adv-training", action="store_true", help="train on SmoothAdv PGD adversaries")
    group.add_argument("--epsilon", default=512.0, type=positive_float,
                       help="L2 radius of the attack in 1/256 units (256 means 1.0); --eps works too")
    group.add_argument("--num-steps", default=4, type=positive_int, help="number of attack steps")
    group.add_argument("--warmup", default=10, type=positive_int,
                       help="epochs over which the radius grows linearly to --epsilon")


def method_path(args) -> str:
    if args.num_noise_vec > args.batch:
        raise UserError(f"--num-noise-vec {args.num_noise_vec} exceeds --batch {args.batch}; "
                        "each batch is split into that many mini-batches")
    base = f"salman_{args.epsilon}_{args.num_steps}_{args.warmup}" if args.adv_training else "cohen"
    return f"consistency/{base}/num_{args.num_noise_vec}/lbd_{args.lbd}/eta_{args.eta}/noise_{args.noise_sd}"


def batch_loss(ctx, epoch: int, inputs: torch.Tensor, targets: torch.Tensor):
    """(cross-entropy plus the consistency term, the cross-entropy as published, accuracy on the copies)."""
    args = ctx.args
    m = args.num_noise_vec
    noises = [torch.randn_like(inputs) * args.noise_sd for _ in range(m)]
    if args.adv_training:
        attacker = SmoothAdv_PGD(steps=args.num_steps,
                                 max_norm=warmup_epsilon(args.epsilon / 256.0, epoch, args.warmup))
        with attack_mode(ctx.base_model), ctx.autocast():
            inputs = attacker.attack(ctx.base_model, inputs, targets, noises=noises)
    targets_all = targets.repeat(m)
    with ctx.autocast():
        logits = ctx.model(ctx.memory_format(add_noises(inputs, noises)))
    logits = logits.float()
    cross_entropy = F.cross_entropy(logits, targets_all)
    loss = cross_entropy + consistency_loss(logits.chunk(m), args.lbd, args.eta)
    return loss, cross_entropy, accuracy(logits, targets_all)


METHOD = Method(description="Consistency regularisation (Jeong and Shin 2020)", method_path=method_path,
                batch_loss=batch_loss, add_arguments=add_arguments, defaults={"epochs": 150, "lr_step_size": 50},
                minibatches=noise_copies)


def main(argv=None):
    train_main(METHOD, argv)


if __name__ == "__main__":
    main()
