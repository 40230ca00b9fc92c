"""CAT-RS: confidence-aware training of smoothed classifiers (Jeong, Kim and Shin,
"Confidence-aware Training of Smoothed Classifiers for Certified Robustness", AAAI 2023).

Chunked: each loader batch of the ``train_t{sigma}`` split, whose items carry
pi (the smoothed prediction of a pretrained Gaussian model, see
smooth_prediction.py), is split into m = --num-noise-vec mini-batches of B // m
examples, one SGD step each. Per mini-batch, with m noises e_j:

* logits0_j = f(x + e_j) in train mode; t = (1/m) sum_j onehot(argmax logits0_j);
* K ~ Binomial(m, w), clamped to >= 1, with w = t[y] (pi[y] with
  --confidence_mask); L_low = (1/m) * the sum of the K smallest CE(logits0_j, y);
* ``attacks.KL_PGD`` moves the noises (each copy within L2 eps of where it started,
  keeping the pixel mean and root mean square of each noise sample) to raise
  (1/m) sum_j KL(pi || p(x + e_j)); L_high = max_j KL(pi || p(x + e'_j));
* loss = mean(L_low + lbd * [K == m] * L_high).

From epoch --warmup on the attack radius doubles; from epoch --lr_drop on the
learning rate is gamma times the step schedule's (``train_utils.lr_factor``, the
rate the published runs used in each epoch). The published code multiplied the
rate by gamma at the start of epoch --lr_drop only, and its scheduler undid that
after one epoch; this is the intent. The train loss logged is mean L_low; the
train accuracy is measured on the attacked copies.
Run folder: logs/{dataset}/catrs/adv_{epsilon}_{num_steps}/lbd_{lbd}/num_{m}/noise_{sigma}/{arch}/{id}/.
"""
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from attacks import KL_PGD, add_noises, kl_div_per_example
from common import nonnegative_float, nonnegative_int, positive_int
from method import Method, accuracy, attack_mode, noise_copies
from train_utils import train_main

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- the loss

def _stack(logits: Logits) -> torch.Tensor:
    """m copies as one [m x b x K] tensor (from a list of [b x K] or a stacked tensor)."""
    if isinstance(logits, torch.Tensor):
        return logits.float()
    return torch.stack(list(logits)).float()


def acceptance_probability(logits_clean: Logits, targets: torch.Tensor, pi: torch.Tensor,
                           confidence_mask: bool = False) -> torch.Tensor:
    """w = t[y], t = (1/m) sum_j onehot(argmax logits0_j); or pi[y] with ``confidence_mask``."""
    if confidence_mask:
        return pi.float().gather(1, targets.view(-1, 1)).squeeze(1)
    logits = _stack(logits_clean)
    votes = F.one_hot(logits.argmax(2), logits.shape[2]).float().mean(0)
    return votes.gather(1, targets.view(-1, 1)).squeeze(1)


def sample_num_accepted(w: torch.Tensor, m: int) -> torch.Tensor:
    """K ~ Binomial(m, w) per example, clamped to >= 1 (a long tensor [b])."""
    probs = w.detach().float().clamp(0, 1)
    # torch.binomial is what Binomial(m, probs).sample() calls; the count is made on the device, since
    # copying the number m there would make the host wait for the device (and cannot be put in a CUDA graph)
    draws = torch.binomial(torch.full_like(probs, float(m)), probs)
    return draws.long().clamp(min=1)


def catrs_loss(logits_clean: Logits, logits_adv: Logits, targets: torch.Tensor, pi: torch.Tensor,
               num_accepted: torch.Tensor, lbd: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The CAT-RS loss of one mini-batch and its low-confidence part per example.

    ``logits_clean`` (on the Gaussian noises) and ``logits_adv`` (on the attacked
    ones): m copies, [m x b x K] or a list of m [b x K]; ``num_accepted``: K per
    example. Returns (mean(L_low + lbd * [K == m] * L_high), L_low [b]).
    """
    clean, adv = _stack(logits_clean), _stack(logits_adv)
    m, b, k = clean.shape
    cross_entropy = F.cross_entropy(clean.reshape(m * b, k), targets.repeat(m), reduction="none").view(m, b).t()
    smallest_first, _ = cross_entropy.sort(dim=1)
    kept = torch.arange(m, device=clean.device).view(1, m) < num_accepted.view(b, 1)
    loss_low = (smallest_first * kept).sum(1) / m
    kl = kl_div_per_example(adv.reshape(m * b, k), pi.repeat(m, 1)).view(m, b)
    loss_high = kl.max(0).values
    all_accepted = (num_accepted == m).float()
    return (loss_low + lbd * all_accepted * loss_high).mean(), loss_low


# --------------------------------------------------------------------------- the method

def attack_radius(args, epoch: int) -> float:
    """The L2 radius of the noise attack in epoch ``epoch``: epsilon / 256, doubled from --warmup on."""
    radius = args.epsilon / 256.0
    return 2.0 * radius if epoch >= args.warmup else radius


def lr_multiplier(args, epoch: int) -> float:
    """gamma from epoch --lr_drop on (on top of the step schedule)."""
    return args.gamma if epoch >= args.lr_drop else 1.0


def add_arguments(parser):
    group = parser.add_argument_group("CAT-RS")
    group.add_argument("--num-noise-vec", "--num_noise_vec", dest="num_noise_vec", default=4, type=positive_int,
                       help="number of noise samples per example (m)")
    # the published default is the int 256, so the default run folder reads adv_256_...
    group.add_argument("--epsilon", default=256, type=nonnegative_float,
                       help="L2 radius of the noise attack in 1/256 units (--eps works too)")
    group.add_argument("--num-steps", dest="num_steps", default=4, type=nonnegative_int,
                       help="number of attack steps (T)")
    group.add_argument("--lbd", default=1.0, type=nonnegative_float, help="weight of L_high")
    group.add_argument("--confidence_mask", action="store_true",
                       help="sample K with pi[y] (the Gaussian model's confidence) instead of t[y]")
    group.add_argument("--lr_drop", default=10000, type=nonnegative_int,
                       help="from this epoch on, multiply the learning rate by gamma")
    group.add_argument("--warmup", default=10000, type=nonnegative_int,
                       help="from this epoch on, double the attack radius")


def method_path(args) -> str:
    return (f"catrs/adv_{args.epsilon}_{args.num_steps}/lbd_{args.lbd}/num_{args.num_noise_vec}/"
            f"noise_{args.noise_sd}")


def train_split(args) -> str:
    return f"train_t{args.noise_sd}"


def batch_loss(ctx, epoch: int, inputs: torch.Tensor, targets: torch.Tensor, pi: torch.Tensor):
    """(the CAT-RS loss, mean L_low, accuracy on the attacked copies); ``pi``: [b x K]."""
    args = ctx.args
    m, b = args.num_noise_vec, inputs.shape[0]
    pi = pi.float()
    noises = [torch.randn_like(inputs) * args.noise_sd for _ in range(m)]
    with ctx.autocast():
        logits_clean = ctx.model(add_noises(inputs, noises))
    logits_clean = logits_clean.view(m, b, -1)
    num_accepted = sample_num_accepted(acceptance_probability(logits_clean, targets, pi, args.confidence_mask), m)
    attacker = KL_PGD(steps=args.num_steps, max_norm=attack_radius(args, epoch))
    with attack_mode(ctx.base_model) as model, ctx.autocast():
        attacked = attacker.attack(model, inputs, pi, noises)
    with ctx.autocast():
        logits_adv = ctx.model(add_noises(inputs, attacked))
    loss, loss_low = catrs_loss(logits_clean, logits_adv.view(m, b, -1), targets, pi, num_accepted, args.lbd)
    return loss, loss_low.mean(), accuracy(logits_adv, targets.repeat(m))


METHOD = Method(description="CAT-RS: confidence-aware training of smoothed classifiers (Jeong et al., AAAI 2023)",
                method_path=method_path, batch_loss=batch_loss, add_arguments=add_arguments, train_split=train_split,
                lr_multiplier=lr_multiplier, minibatches=noise_copies, supports_cuda_graphs=True)


def main(argv=None):
    train_main(METHOD, argv)


if __name__ == "__main__":
    main()
