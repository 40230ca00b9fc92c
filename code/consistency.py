"""Consistency regularisation of smoothed classifiers (Jeong and Shin, NeurIPS 2020).

J. Jeong and J. Shin, "Consistency Regularization for Certified Robustness of
Smoothed Classifiers".

For the m logits tensors of the noisy copies of a batch, p_j = softmax(logits_j)
and pbar = (1/m) sum_j p_j, per example

    lbd * (1/m) sum_j KL(pbar || p_j) + eta * Ent(pbar),

with Ent(q) = -sum_c q_c log(clamp(q_c, 1e-20)); the loss is the mean over
the examples.
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from attacks import kl_div_per_example


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``probs`` (n, K): -sum q log(clamp(q, 1e-20)), a tensor (n,)."""
    return -(probs * torch.log(probs.clamp(min=1e-20))).sum(1)


def consistency_loss(logits: Sequence[torch.Tensor], lbd: float, eta: float = 0.5) -> torch.Tensor:
    """The consistency regulariser (module docstring) of m logits tensors of shape (b, K): a 0-d tensor."""
    logits = [logit.float() for logit in logits]
    m = len(logits)
    probs = [F.softmax(logit, dim=1) for logit in logits]
    mean_probs = sum(probs) / m
    kl = sum(kl_div_per_example(logit, mean_probs) for logit in logits) / m
    return (lbd * kl + eta * entropy(mean_probs)).mean()
