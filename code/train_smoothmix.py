"""SmoothMix (Jeong, Park, Kim, Lee, Kim and Shin, "SmoothMix: Training
Confidence-calibrated Smoothed Classifiers for Certified Robustness", NeurIPS 2021).

Chunked: each loader batch is split into m = --num-noise-vec mini-batches of
B // m examples, one SGD step each. Per mini-batch, with m noises e_j:

* ``attacks.SmoothMix_PGD`` walks adv from x with T raw L2 steps of length
  alpha up the smoothed cross-entropy -log(mean_j p(adv + e_j)[y]); ``init``
  is the point reached after ``mix_step`` steps, projected onto the L2 ball of
  radius maxnorm_s (default alpha * mix_step, times the warmup factor) around x;
* loss = mean_j CE(f(init + e_j), y)
  + eta * w_e * mean_j [argmax pbar = y] * KL(y_mix || p(x_mix + e_j)),
  pbar = mean_j p(init + e_j), x_mix = (1 - lam) init + lam adv,
  y_mix = (1 - lam) pbar + lam / K, lam ~ U(0, 1/2) per example,
  w_e = min(1, (epoch + 1) / warmup).

The train-accuracy column of log.txt is 0.0, as in the published log.
Run folder: logs/{dataset}/smix_{alpha}_{steps}_m{mix_step}[_ms{maxnorm_s}][_max{maxnorm}]/
eta_{eta}/num_{m}/noise_{sigma}/{arch}/{id}/; as published, a part is present only when its
value is given and non-zero.
"""
import torch
import torch.nn.functional as F

from attacks import SmoothMix_PGD, add_noises, kl_div_per_example, per_example
from common import nonnegative_float, nonnegative_int, positive_float, positive_int
from method import Method, attack_mode, noise_copies
from train_utils import train_main


# --------------------------------------------------------------------------- the loss

def mix(init: torch.Tensor, adv: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """x_mix = (1 - lam) init + lam adv, one lam per example."""
    lam = per_example(lam, init)
    return (1 - lam) * init + lam * adv


def smoothmix_loss(logits_clean: torch.Tensor, logits_mix: torch.Tensor, targets: torch.Tensor,
                   lam: torch.Tensor, weight: float) -> torch.Tensor:
    """The SmoothMix loss of one mini-batch.

    ``logits_clean``, ``logits_mix``: [m x b x K] (copy j of example i at [j, i]);
    ``lam``: [b]; ``weight`` = eta * w_e. pbar is not detached, so the mixed
    target also carries gradient, as in the published code.
    """
    m, b, k = logits_clean.shape
    logits_clean, logits_mix = logits_clean.float(), logits_mix.float()
    cross_entropy = F.cross_entropy(logits_clean.reshape(m * b, k), targets.repeat(m))
    mean_probs = F.softmax(logits_clean, dim=2).mean(0)
    lam = lam.view(-1, 1)
    mixed_targets = (1 - lam) * mean_probs + lam / k
    kl = kl_div_per_example(logits_mix.reshape(m * b, k), mixed_targets.repeat(m, 1)).view(m, b)
    correct = (mean_probs.argmax(1) == targets).float()
    return cross_entropy + weight * (correct * kl).mean()


# --------------------------------------------------------------------------- the method

def warmup_factor(epoch: int, warmup: int) -> float:
    """w_e = min(1, (epoch + 1) / warmup) for the 0-based ``epoch``."""
    return min(1.0, (epoch + 1) / warmup)


def base_maxnorm_s(args) -> float:
    return args.alpha * args.mix_step if args.maxnorm_s is None else args.maxnorm_s


def add_arguments(parser):
    group = parser.add_argument_group("SmoothMix")
    group.add_argument("--num-noise-vec", dest="num_noise_vec", default=1, type=positive_int,
                       help="number of noise samples per example (m)")
    group.add_argument("--alpha", default=1.0, type=positive_float,
                       help="L2 length of each attack step (raw, not in 1/256 units)")
    group.add_argument("--num-steps", dest="num_steps", default=8, type=nonnegative_int,
                       help="number of attack steps (T)")
    group.add_argument("--eta", default=1.0, type=nonnegative_float, help="weight of the mixup loss")
    group.add_argument("--mix_step", default=0, type=nonnegative_int,
                       help="which attack iterate is the clean end of the mixup (1: the one-step adversary)")
    group.add_argument("--maxnorm_s", default=None, type=nonnegative_float,
                       help="L2 radius around x for the clean end (default alpha * mix_step)")
    group.add_argument("--maxnorm", default=None, type=nonnegative_float,
                       help="L2 radius around x for the adversary (default: none)")
    group.add_argument("--warmup", default=10, type=positive_int,
                       help="epochs over which maxnorm_s and the mixup weight grow linearly")


def method_path(args) -> str:
    mode = f"smix_{args.alpha}_{args.num_steps}_m{args.mix_step}"
    # the published code tests truthiness: a value of 0 leaves its part out, as absence does
    if args.maxnorm_s:
        mode += f"_ms{args.maxnorm_s}"
    if args.maxnorm:
        mode += f"_max{args.maxnorm}"
    return f"{mode}/eta_{args.eta}/num_{args.num_noise_vec}/noise_{args.noise_sd}"


def batch_loss(ctx, epoch: int, inputs: torch.Tensor, targets: torch.Tensor):
    """(the SmoothMix loss, the same, None: the train accuracy is not measured, as published)."""
    args = ctx.args
    m, b = args.num_noise_vec, inputs.shape[0]
    w_e = warmup_factor(epoch, args.warmup)
    attacker = SmoothMix_PGD(steps=args.num_steps, mix_step=args.mix_step, alpha=args.alpha,
                             maxnorm_s=w_e * base_maxnorm_s(args), maxnorm=args.maxnorm)
    noises = [torch.randn_like(inputs) * args.noise_sd for _ in range(m)]
    with attack_mode(ctx.base_model) as model, ctx.autocast():
        init, adv = attacker.attack(model, inputs, targets, noises)
    with ctx.autocast():
        logits_clean = ctx.model(add_noises(init, noises))
    lam = torch.rand(b, device=inputs.device) / 2
    with ctx.autocast():
        logits_mix = ctx.model(add_noises(mix(init, adv, lam), noises))
    loss = smoothmix_loss(logits_clean.view(m, b, -1), logits_mix.view(m, b, -1), targets, lam, args.eta * w_e)
    return loss, loss, None


METHOD = Method(description="SmoothMix (Jeong et al., NeurIPS 2021)", method_path=method_path,
                batch_loss=batch_loss, add_arguments=add_arguments, defaults={"epochs": 150, "lr_step_size": 50},
                minibatches=noise_copies, measures_train_accuracy=False)


def main(argv=None):
    train_main(METHOD, argv)


if __name__ == "__main__":
    main()
