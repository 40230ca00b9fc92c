"""Consistency regularisation of smoothed classifiers (Jeong and Shin, NeurIPS 2020).

J. Jeong and J. Shin, "Consistency Regularization for Certified Robustness of
Smoothed Classifiers".

For the m logits tensors of the noisy copies of a batch, p_j = softmax(logits_j)
and pbar = (1/m) sum_j p_j, per example:

* ``default``: lbd * (1/m) sum_j KL(pbar || p_j) + eta * Ent(pbar)
* ``xent``:    lbd * ((1/m) sum_j KL(pbar || p_j) + Ent(pbar))
* ``kl``:      lbd * (1/m) sum_j KL(pbar || p_j)
* ``mse``:     lbd * ||p_2 - p_1||^2 (the first two copies)

with Ent(q) = -sum_c q_c log(clamp(q_c, 1e-20)); the loss is the mean over
the examples.
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from train_utils import kl_div_per_example

LOSSES = ("default", "xent", "kl", "mse")


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``probs``: -sum q log(clamp(q, 1e-20))."""
    return -(probs * torch.log(probs.clamp(min=1e-20))).sum(1)


def consistency_loss(logits: Sequence[torch.Tensor], lbd: float, eta: float = 0.5,
                     loss: str = "default") -> torch.Tensor:
    """The consistency regulariser of a list of m logits tensors of shape (b, K) (module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown consistency loss '{loss}'; choose one of {', '.join(LOSSES)}")
    logits = [logit.float() for logit in logits]
    m = len(logits)
    probs = [F.softmax(logit, dim=1) for logit in logits]
    if loss == "mse":
        if m < 2:
            raise ValueError("the 'mse' consistency loss needs at least two noise copies")
        return (lbd * ((probs[1] - probs[0]) ** 2).sum(1)).mean()
    mean_probs = sum(probs) / m
    kl = sum(kl_div_per_example(logit, mean_probs) for logit in logits) / m
    if loss == "kl":
        per_example = lbd * kl
    elif loss == "xent":
        per_example = lbd * (kl + entropy(mean_probs))
    else:
        per_example = lbd * kl + eta * entropy(mean_probs)
    return per_example.mean()
