"""Tests of the baseline training methods: stability training, SmoothAdv (PGD, DDN),
MACER and consistency regularisation (code/train_stab.py, attacks.py,
train_salman.py, train_macer.py, consistency.py, train_consistency.py).

* every loss is compared with an independent float64 NumPy computation of its
  formula on a small case, and every attack with its defining properties (and,
  for one step on a linear model, with its closed-form direction);
* the published command lines parse and name their run folders exactly (on
  Fashion-MNIST / LeNet, one epoch on 8 examples);
* each script trains one epoch on a small Fashion-MNIST subset and writes a
  finite loss and a checkpoint; bad input ends with one ``error:`` line.
"""
import argparse
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

import attacks
import consistency
import train_consistency
import train_macer
import train_salman
import train_stab
from train_utils import CHECKPOINT_NAME, LOG_HEADER, parse_args


# --------------------------------------------------------------------------- helpers

def softmax_np(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def linear_model(weight, bias):
    """f(x) = W flatten(x) + b, with the given float64 arrays (stored as float32)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(weight, dtype=torch.float32))
        model[1].bias.copy_(torch.tensor(bias, dtype=torch.float32))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def linear_problem(seed=0, b=3, k=4, shape=(1, 4, 4)):
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    weight = rng.normal(size=(k, d))
    bias = rng.normal(size=k) * 0.1
    x = rng.uniform(0.3, 0.7, size=(b, *shape))
    y = rng.integers(0, k, size=b)
    return weight, bias, x, y


def unit_rows(g):
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def smoothed_nll_gradient(weight, bias, x, y, noises):
    """d/dx of -log(mean_j softmax(W (x + e_j) + b)[y]) for one example; noises: (m, D)."""
    p = softmax_np((x[None, :] + noises) @ weight.T + bias)          # (m, K)
    onehot = np.eye(weight.shape[0])[y]
    pbar_y = p[:, y].mean()
    return -(1 / pbar_y) * np.mean([p[j, y] * weight.T @ (onehot - p[j]) for j in range(len(p))], axis=0)


def l2(t):
    return t.reshape(t.shape[0], -1).norm(dim=1)


def copy_major(per_example):
    """Noise (or any tensor) given per example and copy, (b, m, ...), in the layout of the code: (m * b, ...),
    row j * b + i holding copy j of example i. A NumPy array stays one, a tensor stays one."""
    b, m = per_example.shape[:2]
    swapped = per_example.swapaxes(0, 1) if isinstance(per_example, np.ndarray) else per_example.transpose(0, 1)
    return swapped.reshape(m * b, *per_example.shape[2:])


def repeat_copies(x, m):
    """m copies of the examples x (b, ...), copy-major: (m * b, ...)."""
    return x.repeat(m, *([1] * (x.dim() - 1)))


# --------------------------------------------------------------------------- stability training

def test_stability_loss_matches_formula_and_keeps_clean_gradient():
    rng = np.random.default_rng(1)
    clean, noisy = rng.normal(size=(5, 4)) * 2, rng.normal(size=(5, 4)) * 2
    y = rng.integers(0, 4, size=5)
    lbd = 2.0
    p_clean, p_noisy = softmax_np(clean), softmax_np(noisy)
    ce = -np.mean(np.log(p_clean[np.arange(5), y]))
    stab = np.mean(-(p_clean * np.log(p_noisy)).sum(1))
    clean_t = torch.tensor(clean, dtype=torch.float32, requires_grad=True)
    loss = train_stab.stability_loss(clean_t, torch.tensor(noisy, dtype=torch.float32), torch.tensor(y), lbd)
    assert loss.item() == pytest.approx(ce + lbd * stab, rel=1e-5)
    # The clean logits are not detached: the stability term adds its gradient to the clean side.
    loss.backward()
    ce_only = torch.tensor(clean, dtype=torch.float32, requires_grad=True)
    F.cross_entropy(ce_only, torch.tensor(y)).backward()
    assert not torch.allclose(clean_t.grad, ce_only.grad, atol=1e-4)


# --------------------------------------------------------------------------- PGD

def test_pgd_one_step_follows_normalised_gradient_single_copy():
    weight, bias, x, y = linear_problem(seed=2)
    model, eps = linear_model(weight, bias), 0.1
    adv = attacks.PGD_L2(steps=1, max_norm=eps).attack(model, torch.tensor(x, dtype=torch.float32),
                                                       torch.tensor(y))
    flat = x.reshape(len(x), -1)
    grads = np.stack([weight.T @ (softmax_np(flat[i] @ weight.T + bias) - np.eye(4)[y[i]]) for i in range(len(x))])
    expected = flat + eps * unit_rows(grads)        # step 2 eps, then renormed to eps; no clipping here
    np.testing.assert_allclose(adv.reshape(len(x), -1).numpy(), expected, atol=2e-5)


def test_pgd_one_step_multi_noise_uses_smoothed_nll_and_shares_the_perturbation():
    weight, bias, x, y = linear_problem(seed=3)
    m, eps, b = 3, 0.1, len(x)
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(b, m, 1, 4, 4)) * 0.25      # noise[i, j]: copy j of example i
    model = linear_model(weight, bias)
    inputs = repeat_copies(torch.tensor(x, dtype=torch.float32), m)
    adv = attacks.PGD_L2(steps=1, max_norm=eps).attack(model, inputs, torch.tensor(y),
                                                       noise=torch.tensor(copy_major(noise), dtype=torch.float32),
                                                       num_noise_vectors=m)
    assert adv.shape == inputs.shape
    flat, noise_flat = x.reshape(b, -1), noise.reshape(b, m, -1)
    grads = np.stack([smoothed_nll_gradient(weight, bias, flat[i], y[i], noise_flat[i]) for i in range(b)])
    expected = flat + eps * unit_rows(grads)
    got = adv.reshape(m, b, -1).numpy()
    for j in range(m):   # every copy carries the same perturbation
        np.testing.assert_allclose(got[j], expected, atol=2e-5)


def test_pgd_gradient_free_direction():
    weight, bias, x, y = linear_problem(seed=5)
    m, eps, b = 4, 0.1, len(x)
    noise = np.random.default_rng(6).normal(size=(b, m, 1, 4, 4)) * 0.5    # noise[i, j]: copy j of example i
    model = linear_model(weight, bias)
    adv = attacks.PGD_L2(steps=1, max_norm=eps).attack(
        model, repeat_copies(torch.tensor(x, dtype=torch.float32), m), torch.tensor(y),
        noise=torch.tensor(copy_major(noise), dtype=torch.float32), num_noise_vectors=m, no_grad=True)
    flat, noise_flat = x.reshape(b, -1), noise.reshape(b, m, -1)
    direction = np.stack([
        np.mean([-softmax_np((flat[i] + noise_flat[i, j]) @ weight.T + bias)[y[i]] * noise_flat[i, j]
                 for j in range(m)], axis=0) for i in range(b)])
    expected = flat + eps * unit_rows(direction)
    got = adv.reshape(m, b, -1).numpy()
    for j in range(m):
        np.testing.assert_allclose(got[j], expected, atol=2e-5)


def test_pgd_stays_in_ball_and_box_and_replaces_zero_gradient():
    rng = np.random.default_rng(7)
    weight, bias = rng.normal(size=(4, 16)) * 3, np.zeros(4)
    x = rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], size=(6, 1, 4, 4))   # many pixels at the box edges
    y = rng.integers(0, 4, size=6)
    m, eps = 2, 0.8
    inputs = repeat_copies(torch.tensor(x, dtype=torch.float32), m)
    noise = torch.randn_like(inputs) * 0.25
    adv = attacks.PGD_L2(steps=5, max_norm=eps).attack(linear_model(weight, bias), inputs, torch.tensor(y),
                                                       noise=noise, num_noise_vectors=m)
    delta = adv - inputs
    assert adv.min() >= 0 and adv.max() <= 1
    assert (l2(delta) <= eps + 1e-5).all() and (l2(delta) > 0.1).all()
    assert torch.equal(delta[:6], delta[6:])
    # A constant model has zero gradient: the attack still moves, along a random direction.
    torch.manual_seed(0)
    flat = attacks.PGD_L2(steps=1, max_norm=0.1).attack(linear_model(np.zeros((4, 16)), np.zeros(4)),
                                                        torch.full((2, 1, 4, 4), 0.5), torch.tensor([0, 1]))
    moved = l2(flat - 0.5)
    assert torch.isfinite(flat).all()
    np.testing.assert_allclose(moved.numpy(), [0.1, 0.1], atol=1e-5)


# --------------------------------------------------------------------------- DDN

# Rounding each of 16 components to the nearest 1/255 adds at most sqrt(16) / (2 * 255) to the L2 norm.
GRID_SLACK = 4 / (2 * 255) + 1e-5


def _on_grid(t):
    scaled = t.double() * 255
    return torch.allclose(scaled, scaled.round(), atol=1e-3)


def test_ddn_keeps_smallest_misclassifying_perturbation_on_the_grid():
    rng = np.random.default_rng(8)
    weight, bias = rng.normal(size=(3, 16)), np.zeros(3)
    x = rng.integers(60, 196, size=(8, 1, 4, 4)) / 255.0
    logits = x.reshape(8, -1) @ weight.T
    y = logits.argmax(1)
    y[0] = (y[0] + 1) % 3          # example 0 is misclassified without any perturbation
    eps = 0.6
    inputs = torch.tensor(x, dtype=torch.float32)
    adv = attacks.DDN(steps=20, gamma=0.05, init_norm=0.3, max_norm=eps).attack(
        linear_model(weight, bias), inputs, torch.tensor(y))
    delta = adv - inputs
    assert adv.min() >= 0 and adv.max() <= 1
    assert (l2(delta) <= eps + GRID_SLACK).all()
    assert _on_grid(adv)
    assert l2(delta)[0] == 0                       # the smallest misclassifying perturbation of example 0
    assert (l2(delta)[1:] > 0).sum() >= 4          # the others were pushed across the boundary


def test_ddn_multi_noise_shares_perturbation_and_respects_radius():
    rng = np.random.default_rng(9)
    weight, bias = rng.normal(size=(3, 16)), np.zeros(3)
    x = rng.integers(0, 256, size=(5, 1, 4, 4)) / 255.0
    y = (x.reshape(5, -1) @ weight.T).argmax(1)
    m, eps = 3, 0.25
    inputs = repeat_copies(torch.tensor(x, dtype=torch.float32), m)
    noise = torch.randn_like(inputs) * 0.1
    adv = attacks.DDN(steps=10, init_norm=0.25, max_norm=eps).attack(
        linear_model(weight, bias), inputs, torch.tensor(y), noise=noise, num_noise_vectors=m)
    delta = adv - inputs
    assert adv.shape == inputs.shape
    assert adv.min() >= 0 and adv.max() <= 1
    assert (l2(delta) <= eps + GRID_SLACK).all() and (l2(delta) > 0).any()
    assert _on_grid(adv)
    per_copy = delta.reshape(m, 5, -1)
    assert torch.equal(per_copy[0], per_copy[1]) and torch.equal(per_copy[0], per_copy[2])


def saturated_linear_model(weight, scale):
    """f(x) = scale * W flatten(x): softmax is exactly one-hot in float32 wherever the top logit leads by
    more than about 104 / scale, and there the gradient of a correctly classified example is exactly 0."""
    return linear_model(weight * scale, np.zeros(weight.shape[0]))


def ddn_by_formula(model, inputs, labels, noise, m, steps, gamma, init_norm, max_norm, levels=256):
    """DDN on the smoothed soft classifier written from its definition (Rony et al. 2019 as adapted by
    SmoothAdv): d <- d - lr_i * u with u the normalised gradient of -loss (a standard normal draw where
    that gradient is all zero), lr_i = 0.01 + 0.99 (1 + cos(pi (i + 1) / T)) / 2, budget times 1 -/+ gamma,
    d rescaled to the budget, x + d rounded to the nearest level and clipped; the smallest misclassifying
    d, renormed to max_norm and rounded to the nearest level, is returned for every copy. Written on its own
    row order, copy j of example i in row i * m + j (the test hands the code the same values copy-major)."""
    clean, b, scale = inputs[::m], labels.shape[0], levels - 1
    d = torch.zeros_like(clean)
    budget = torch.full((b,), float(init_norm))
    worst = l2(torch.max(clean, 1 - clean))
    best_l2, best = worst.clone(), torch.zeros_like(clean)
    zero_gradients = 0
    for i in range(steps):
        lr = 0.01 + 0.99 * (1 + math.cos(math.pi * (i + 1) / steps)) / 2
        d.requires_grad_(True)
        logits = model(inputs + d.repeat_interleave(m, 0) + noise)
        if m == 1:
            loss, prediction = F.cross_entropy(logits, labels, reduction="sum"), logits.argmax(1)
        else:
            mean_p = F.softmax(logits, 1).reshape(b, m, -1).mean(1)
            loss = F.nll_loss(torch.log(mean_p.clamp(min=1e-20)), labels)
            prediction = logits.argmax(1).reshape(b, m).mode(1).values
        g, = torch.autograd.grad(-loss, [d])
        d = d.detach()
        fooled = prediction != labels
        smaller = fooled & (l2(d) < best_l2)
        best_l2[smaller], best[smaller] = l2(d)[smaller], d[smaller]
        g_norm = l2(g)
        u = g / g_norm.view(-1, 1, 1, 1)
        if (g_norm == 0).any():
            u[g_norm == 0] = torch.randn_like(u[g_norm == 0])
            zero_gradients += int((g_norm == 0).sum())
        d = d - lr * u
        budget = torch.min(budget * (1 - (2 * fooled.float() - 1) * gamma), worst)
        d = d * (budget / l2(d)).view(-1, 1, 1, 1)
        d = (torch.round((clean + d) * scale) / scale).clamp(0, 1) - clean
    renormed = best.renorm(p=2, dim=0, maxnorm=max_norm)
    return inputs + (torch.round(renormed * scale) / scale).repeat_interleave(m, 0), renormed, zero_gradients


@pytest.mark.parametrize("m", [1, 4])
def test_ddn_equals_its_formula_with_round_to_nearest_and_random_zero_gradients(m):
    """Seeded DDN equals the formula on the same inputs and noise; the case is chosen so that rounding the
    renormed perturbation to the nearest level differs from rounding it towards zero, and some examples
    (saturated and correct) have an all-zero gradient, so the standard normal replacement is exercised."""
    rng = np.random.default_rng(20 + m)
    b, eps = 8, 0.3
    weight = rng.normal(size=(3, 16))
    x = torch.tensor(rng.integers(40, 216, size=(b, 1, 4, 4)) / 255.0, dtype=torch.float32)
    model = saturated_linear_model(weight, scale=30.0)
    y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 3                      # two examples misclassified from the start
    inputs = x.repeat_interleave(m, 0)
    noise = torch.tensor(rng.normal(size=(b * m, 1, 4, 4)) * 0.05, dtype=torch.float32)
    options = dict(steps=10, gamma=0.05, init_norm=1.0, max_norm=eps)
    torch.manual_seed(5)
    got = attacks.DDN(**options).attack(model, repeat_copies(x, m), y,
                                        noise=copy_major(noise.reshape(b, m, 1, 4, 4)), num_noise_vectors=m)
    torch.manual_seed(5)
    expected, renormed, zero_gradients = ddn_by_formula(model, inputs, y, noise, m, **options)
    torch.testing.assert_close(got, copy_major(expected.reshape(b, m, 1, 4, 4)), atol=1e-6, rtol=0)
    towards_zero = torch.sign(renormed) * torch.floor(renormed.abs() * 255 + 1e-4) / 255
    nearest = torch.round(renormed * 255) / 255
    assert (nearest - towards_zero).abs().max() > 1e-3     # the two roundings differ on this case
    assert zero_gradients > 0 and (l2(got - repeat_copies(x, m)) > 0).sum() >= 3


def test_pgd_zero_gradient_steps_along_an_unnormalised_standard_normal_draw():
    """A constant model has zero gradient everywhere: each step is d <- renorm(clip(x + d - s z) - x, eps)
    with s = 2 eps / T and z ~ N(0, I) as drawn (not rescaled to unit length), as the published rule."""
    x = torch.full((2, 1, 4, 4), 0.5)
    eps, steps = 0.5, 20
    constant = linear_model(np.zeros((4, 16)), np.arange(4.0))
    torch.manual_seed(3)
    got = attacks.PGD_L2(steps=steps, max_norm=eps).attack(constant, x, torch.tensor([0, 1]))
    torch.manual_seed(3)
    d = torch.zeros_like(x)
    for _ in range(steps):
        d = ((x + d - 2 * eps / steps * torch.randn_like(d)).clamp(0, 1) - x).renorm(p=2, dim=0, maxnorm=eps)
    torch.testing.assert_close(got, x + d, atol=1e-6, rtol=0)
    # One long step (s = 20, no renorm at radius 10): the clip alone bounds the move along -z.
    torch.manual_seed(3)
    one = attacks.PGD_L2(steps=1, max_norm=10.0).attack(constant, x, torch.tensor([0, 1]))
    torch.manual_seed(3)
    z = torch.randn_like(x)
    torch.testing.assert_close(one, (x - 20.0 * z).clamp(0, 1), atol=1e-6, rtol=0)


def test_normalize_per_example_replaces_only_zero_rows_by_a_plain_normal_draw():
    grad = torch.zeros(3, 1, 2, 2)
    grad[1] = 3.0
    torch.manual_seed(9)
    out = attacks.normalize_per_example(grad, random_if_zero=True)
    torch.manual_seed(9)
    draws = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(out[[0, 2]], draws)
    torch.testing.assert_close(out[1], torch.full((1, 2, 2), 0.5))


def test_warmup_epsilon():
    assert attacks.warmup_epsilon(1.0, 0, 10) == pytest.approx(0.1)
    assert attacks.warmup_epsilon(1.0, 4, 10) == pytest.approx(0.5)
    assert attacks.warmup_epsilon(1.0, 30, 10) == 1.0
    assert attacks.warmup_epsilon(0.25, 0, 1) == 0.25


# --------------------------------------------------------------------------- SmoothAdv_PGD (consistency)

def test_smoothadv_pgd_one_step_copy_major_direction():
    weight, bias, x, y = linear_problem(seed=10)
    m, eps, b = 3, 0.1, len(x)
    noises = [np.random.default_rng(11 + j).normal(size=(b, 1, 4, 4)) * 0.25 for j in range(m)]
    adv = attacks.SmoothAdv_PGD(steps=1, max_norm=eps).attack(
        linear_model(weight, bias), torch.tensor(x, dtype=torch.float32), torch.tensor(y),
        noises=[torch.tensor(n, dtype=torch.float32) for n in noises])
    flat = x.reshape(b, -1)
    grads = np.stack([smoothed_nll_gradient(weight, bias, flat[i], y[i],
                                            np.stack([n.reshape(b, -1)[i] for n in noises])) for i in range(b)])
    np.testing.assert_allclose(adv.reshape(b, -1).numpy(), flat + eps * unit_rows(grads), atol=2e-5)


def test_smoothadv_pgd_stays_in_ball_and_box():
    rng = np.random.default_rng(12)
    weight = rng.normal(size=(4, 16)) * 3
    x = torch.tensor(rng.choice([0.0, 0.01, 0.5, 0.99, 1.0], size=(6, 1, 4, 4)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, size=6))
    eps = 0.7
    adv = attacks.SmoothAdv_PGD(steps=4, max_norm=eps).attack(
        linear_model(weight, np.zeros(4)), x, y, noises=[torch.randn_like(x) * 0.25 for _ in range(2)])
    assert adv.min() >= 0 and adv.max() <= 1
    assert (l2(adv - x) <= eps + 1e-5).all() and (l2(adv - x) > 0.1).all()


# --------------------------------------------------------------------------- MACER

def macer_by_hand(z, y, beta, margin, sigma, lbd):
    """z: (B, m, K) float64."""
    batch = len(y)
    cl = sum(-math.log(softmax_np(z[i]).mean(0)[y[i]] + 1e-10) for i in range(batch))
    rl, kept = 0.0, []
    for i in range(batch):
        q = softmax_np(beta * z[i]).mean(0)
        order = np.argsort(-q)
        if order[0] != y[i]:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            d = norm.ppf(q[order[1]]) - norm.ppf(q[order[0]])
        if np.isfinite(d) and abs(d) <= margin:
            rl += d + margin
            kept.append(i)
    rl *= sigma / 2
    return (cl + lbd * rl) / batch, kept


MACER_LOGITS = np.array([
    [[0.4, 0.1, 0.0], [0.3, 0.2, 0.0], [0.5, 0.0, 0.1]],       # correct, small gap: kept
    [[0.4, 0.1, 0.0], [0.3, 0.2, 0.0], [0.5, 0.0, 0.1]],       # label 1 is not the top class: dropped
    [[500., 0.0, 0.0], [500., 0.0, 0.0], [500., 0.0, 0.0]],    # q = (1, 0, 0): infinite gap, dropped
    [[5.0, 0.0, 0.0], [5.0, 0.2, 0.0], [5.0, 0.0, 0.1]],       # correct, gap about -7.6
    [[0.0, 0.6, 0.2], [0.1, 0.3, 0.2], [0.0, 0.4, 0.5]],       # correct (class 1), kept
])
MACER_LABELS = np.array([0, 1, 0, 0, 1])


@pytest.mark.parametrize("margin, expected_kept", [(1.0, [0, 4]), (8.0, [0, 3, 4])])
def test_macer_loss_matches_hand_computation(margin, expected_kept):
    beta, sigma, lbd = 2.0, 0.5, 3.0
    expected, kept = macer_by_hand(MACER_LOGITS, MACER_LABELS, beta, margin, sigma, lbd)
    assert kept == expected_kept
    logits = torch.tensor(copy_major(MACER_LOGITS), dtype=torch.float32, requires_grad=True)
    loss, classification = train_macer.macer_loss(logits, torch.tensor(MACER_LABELS), 3, beta, margin, sigma, lbd)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # Without the robustness term only the classification loss remains.
    cl_only, _ = macer_by_hand(MACER_LOGITS, MACER_LABELS, beta, margin, sigma, 0.0)
    loss0, classification0 = train_macer.macer_loss(logits, torch.tensor(MACER_LABELS), 3, beta, margin, sigma, 0.0)
    assert loss0.item() == pytest.approx(cl_only, rel=1e-5)
    # the part logged as the train loss is the classification loss, whatever the weight of the robustness term
    assert classification.item() == classification0.item() == pytest.approx(cl_only, rel=1e-5)


def _plain_context(model):
    """A ``TrainingContext`` on the CPU without autocast, channels-last or an optimizer (for a loss alone)."""
    from types import SimpleNamespace
    from train_utils import TrainingContext
    return TrainingContext(args=SimpleNamespace(bf16=False, cuda_graphs=False), model=model, optimizer=None,
                           device=torch.device("cpu"), dist=SimpleNamespace(is_main=False, enabled=False))


def _permute_copies(noise, seed):
    """noise (b, m, ...) with the copies of each example in another order, independently per example."""
    rng = np.random.default_rng(seed)
    return np.stack([noise[i, rng.permutation(noise.shape[1])] for i in range(noise.shape[0])])


def macer_loss_on_noise(weight, bias, x, y, noise, **options):
    """``macer_loss`` of a linear model at x_i + noise[i, j], the noise handed over in the code's layout."""
    b, m = noise.shape[:2]
    inputs = repeat_copies(torch.tensor(x), m) + torch.tensor(copy_major(noise))
    logits = inputs.reshape(m * b, -1) @ torch.tensor(weight).T + torch.tensor(bias)
    return train_macer.macer_loss(logits, torch.tensor(y), m, **options)[0].item()


def test_macer_loss_gradient_stays_finite_when_examples_are_dropped_from_the_robustness_term():
    """Examples left out of the hinge (here a wrong top class, and a top-2 share of 0) give no infinite or
    undefined quantile to the backward pass: the gradient is finite, while the kept examples do add a hinge."""
    m = 2
    z = torch.tensor([[2.0, 0.5, 0.1], [0.3, 1.0, 0.2], [40.0, -40.0, -40.0], [0.2, 0.1, 0.9]]).repeat(m, 1)
    y = torch.tensor([0, 0, 0, 2])
    losses = []
    for lbd in (3.0, 0.0):
        logits = z.clone().requires_grad_()
        loss, classification = train_macer.macer_loss(logits, y, m, beta=1.0, margin=8.0, sigma=0.5, lbd=lbd)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        losses.append(loss.item() - classification.item())
    assert losses[0] > 0 and losses[1] == 0


def test_macer_loss_per_example_equals_the_formula_on_given_noise_whatever_the_order_of_the_copies():
    """Per-example noise values e_ij (example i, copy j) for a linear model: MACER's loss of each example alone
    and of the batch equal the formula on z_ij = W (x_i + e_ij) + b, and are unchanged when the copies of
    each example are reordered (the loss is symmetric in j; a reduction that mixed examples would not be);
    macer_loss computes in float32."""
    weight, bias, x, y = linear_problem(seed=30, b=4, k=3, shape=(1, 2, 2))
    m = 3
    noise = np.random.default_rng(31).normal(size=(4, m, 1, 2, 2)) * 0.5
    options = dict(beta=2.0, margin=8.0, sigma=0.5, lbd=3.0)
    z = np.einsum("bmd,kd->bmk", (x[:, None] + noise).reshape(4, m, -1), weight) + bias
    expected_each = [macer_by_hand(z[i:i + 1], y[i:i + 1], **options)[0] for i in range(4)]
    expected, kept = macer_by_hand(z, y, **options)
    assert len(kept) >= 1 and expected == pytest.approx(np.mean(expected_each), rel=1e-12)
    for i in range(4):
        got = macer_loss_on_noise(weight, bias, x[i:i + 1], y[i:i + 1], noise[i:i + 1], **options)
        assert got == pytest.approx(expected_each[i], rel=1e-5)
    assert macer_loss_on_noise(weight, bias, x, y, noise, **options) == pytest.approx(expected, rel=1e-5)
    assert macer_loss_on_noise(weight, bias, x, y, _permute_copies(noise, 32), **options) == \
        pytest.approx(expected, rel=1e-5)


def smoothadv_loss_by_hand(weight, bias, x, y, noise, eps):
    """SmoothAdv's loss after one PGD step on a linear model (no clipping on this case), per example:
    d_i = eps * g_i / |g_i| with g_i the gradient of -log(mean_j softmax(W (x_i + e_ij) + b)[y_i]);
    loss_i = mean_j CE(W (x_i + d_i + e_ij) + b, y_i)."""
    b, m = noise.shape[:2]
    flat, noise_flat = x.reshape(b, -1), noise.reshape(b, m, -1)
    losses = []
    for i in range(b):
        g = smoothed_nll_gradient(weight, bias, flat[i], y[i], noise_flat[i])
        adv = flat[i] + eps * g / np.linalg.norm(g)
        p = softmax_np((adv[None] + noise_flat[i]) @ weight.T + bias)
        losses.append(-np.log(p[:, y[i]]).mean())
    return np.array(losses)


def smoothadv_loss_on_noise(weight, bias, x, y, noise, eps):
    b, m = noise.shape[:2]
    model = linear_model(weight, bias)
    loss, logged, _ = train_salman.smoothadv_loss(
        _plain_context(model), attacks.PGD_L2(steps=1, max_norm=eps),
        repeat_copies(torch.tensor(x, dtype=torch.float32), m), torch.tensor(y),
        torch.tensor(copy_major(noise), dtype=torch.float32), m)
    assert logged is loss
    return loss.item()


def test_smoothadv_loss_per_example_equals_the_formula_on_given_noise_whatever_the_order_of_the_copies():
    """SmoothAdv with one PGD step on a linear model and per-example noise e_ij: the loss of each example
    alone and of the batch equal the formula (PGD on the mean softmax over the copies, then CE of the
    adversarial copies), and do not change when the copies of each example are reordered."""
    weight, bias, x, y = linear_problem(seed=33)
    m, eps, b = 3, 0.1, len(x)
    noise = np.random.default_rng(34).normal(size=(b, m, 1, 4, 4)) * 0.25
    expected = smoothadv_loss_by_hand(weight, bias, x, y, noise, eps)
    for i in range(b):
        got = smoothadv_loss_on_noise(weight, bias, x[i:i + 1], y[i:i + 1], noise[i:i + 1], eps)
        assert got == pytest.approx(expected[i], rel=1e-5)
    assert smoothadv_loss_on_noise(weight, bias, x, y, noise, eps) == pytest.approx(expected.mean(), rel=1e-5)
    assert smoothadv_loss_on_noise(weight, bias, x, y, _permute_copies(noise, 35), eps) == \
        pytest.approx(expected.mean(), rel=1e-5)


# --------------------------------------------------------------------------- consistency

def consistency_by_hand(logits, lbd, eta):
    p = [softmax_np(z) for z in logits]
    pbar = sum(p) / len(p)
    kl = sum((pbar * (np.log(pbar) - np.log(pj))).sum(1) for pj in p) / len(p)
    ent = -(pbar * np.log(pbar)).sum(1)
    return (lbd * kl + eta * ent).mean()


def test_consistency_loss_matches_hand_computation():
    rng = np.random.default_rng(13)
    logits = [rng.normal(size=(4, 5)) * 2 for _ in range(3)]
    got = consistency.consistency_loss([torch.tensor(z, dtype=torch.float32) for z in logits], 7.0, eta=0.3)
    assert got.item() == pytest.approx(consistency_by_hand(logits, 7.0, 0.3), rel=1e-5)


def test_consistency_loss_of_identical_copies_is_entropy_only():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = softmax_np(z.numpy())
    expected = 0.5 * np.mean(-(p * np.log(p)).sum(1))
    assert consistency.consistency_loss([z, z.clone()], 10.0, eta=0.5).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- published command lines

SMALL = ["--epochs", "1", "--train-subset", "8", "--test-subset", "8", "--workers", "0"]

PUBLISHED = [
    (train_stab, "--lr 0.1 --lr_step_size 50 --epochs 150 --noise 0.25 --lbd 2.0 --id 0",
     "stab/lbd_2.0/noise_0.25"),
    (train_salman, "--lr 0.1 --lr_step_size 50 --epochs 150 --noise 0.25 --attack PGD --epsilon 256.0 "
                   "--num-steps 10 --warmup 10 --num-noise-vec 4 --id 0",
     "salman/pgd_256.0_10_10/num_4/noise_0.25"),
    (train_macer, "--lr 0.1 --lr_step_size 50 --epochs 150 --noise 1.0 --num-noise-vec 16 --beta 16.0 "
                  "--margin 8.0 --lbd 12.0 --deferred --id 0",
     "macer_deferred50/num_16/lbd_12.0/gamma_8.0/beta_16.0/noise_1.0"),
    (train_consistency, "--lr 0.1 --lr_step_size 50 --epochs 150 --noise 0.25 --num-noise-vec 2 --lbd 20 --id 0",
     "consistency/cohen/num_2/lbd_20.0/eta_0.5/noise_0.25"),
    # variants: defaults, the --eps alias, an integer epsilon, adversarial consistency training
    (train_salman, "--noise 0.5 --eps 256 --id 0", "salman/ddn_256.0_10_1_256.0_0.05/num_1/noise_0.5"),
    (train_salman, "--noise 0.25 --id 3", "salman/ddn_64.0_10_1_256.0_0.05/num_1/noise_0.25"),
    (train_macer, "--noise 0.25 --id 0", "macer/num_16/lbd_16.0/gamma_8.0/beta_16.0/noise_0.25"),
    (train_consistency, "--noise 0.5 --num-noise-vec 2 --adv-training --lbd 10 --eta 0.5 --id 1",
     "consistency/salman_512.0_4_10/num_2/lbd_10.0/eta_0.5/noise_0.5"),
    (train_consistency, "--noise 0.5 --adv-training --eps 256 --num-steps 2 --warmup 5 --id 1",
     "consistency/salman_256.0_2_5/num_1/lbd_10.0/eta_0.5/noise_0.5"),
]


@pytest.mark.parametrize("module, options, path", PUBLISHED)
def test_published_command_lines_name_their_run_folder(tmp_path, module, options, path):
    argv = ["fmnist", "lenet", *options.split(), *SMALL, "--logdir", str(tmp_path)]
    module.main(argv)
    run_id = options.split("--id ")[1].split()[0]
    folder = tmp_path / "fmnist" / path / "lenet" / run_id
    assert (folder / "log.txt").read_text().splitlines()[0] == LOG_HEADER
    found = [root for root, _, files in os.walk(tmp_path) if "log.txt" in files]
    assert found == [str(folder)]


@pytest.mark.parametrize("module, options, path", PUBLISHED)
def test_published_command_lines_parse_to_their_run_folder(module, options, path):
    """The run folders of the command lines above from the parsed options alone (no training: quick)."""
    args = parse_args(module.METHOD, ["fmnist", "lenet", *options.split()])
    assert module.METHOD.method_path(args) == path


@pytest.mark.parametrize("options, refused", [
    ("--attack PGD --num-noise-vec 2 --no-grad-attack --batch 2", None),
    ("--attack PGD --num-noise-vec 4 --batch 4", None),
    ("--num-noise-vec 3 --batch 8", None),
    ("--attack PGD --num-noise-vec 1 --no-grad-attack", "--no-grad-attack needs --attack PGD and --num-noise-vec "
                                                        "of 2 or more"),
    ("--num-noise-vec 2 --no-grad-attack", "--no-grad-attack needs --attack PGD and --num-noise-vec of 2 or more"),
    ("--attack PGD --num-noise-vec 5 --batch 4", "--num-noise-vec 5 exceeds --batch 4; each batch is split into "
                                                 "that many mini-batches"),
])
def test_smoothadv_and_consistency_accept_the_options_they_can_run(options, refused):
    """--no-grad-attack needs PGD and m >= 2; m may equal the batch (mini-batches of one example), not exceed it."""
    args = parse_args(train_salman.METHOD, ["fmnist", "lenet", *options.split()])
    if refused is None:
        train_salman.check_arguments(args)
    else:
        with pytest.raises(train_salman.UserError) as error:
            train_salman.check_arguments(args)
        assert str(error.value) == refused
    if "--no-grad-attack" not in options:
        consistency = parse_args(train_consistency.METHOD,
                                 ["fmnist", "lenet", *options.replace("--attack PGD", "").split(), "--noise", "0.25"])
        if refused is None:
            assert train_consistency.METHOD.method_path(consistency).startswith("consistency/cohen/num_")
        else:
            with pytest.raises(train_consistency.UserError, match=f"^{refused}$"):
                train_consistency.METHOD.method_path(consistency)


def test_smoothadv_random_start_reads_the_published_spellings():
    spellings = ["True", "yes", "1", " TRUE ", "False", "no", "0", "NO"]
    assert [train_salman.str_to_bool(t) for t in spellings] == [True] * 4 + [False] * 4
    with pytest.raises(argparse.ArgumentTypeError, match="^'maybe' is not a boolean: write True or False$"):
        train_salman.str_to_bool("maybe")


def test_published_options_parse_to_their_values():
    args = parse_args(train_salman.METHOD, "fmnist lenet --noise 0.25 --eps 256 --num-steps 4 --warmup 10 "
                                           "--random-start False --attack PGD --num-noise-vec 4".split())
    assert (args.noise_sd, args.epsilon, args.num_steps, args.warmup, args.random_start, args.attack,
            args.num_noise_vec) == (0.25, 256.0, 4, 10, False, "PGD", 4)
    assert parse_args(train_salman.METHOD, ["fmnist", "lenet"]).random_start is True
    args = parse_args(train_macer.METHOD, ["fmnist", "lenet"])
    assert (args.batch, args.num_noise_vec, args.beta, args.lbd, args.margin, args.deferred) == \
        (64, 16, 16.0, 16.0, 8.0, False)
    args = parse_args(train_consistency.METHOD, ["fmnist", "lenet"])
    assert (args.epochs, args.lr_step_size, args.num_noise_vec, args.lbd, args.eta, args.adv_training,
            args.epsilon, args.num_steps, args.warmup) == (150, 50, 1, 10.0, 0.5, False, 512.0, 4, 10)
    assert parse_args(train_stab.METHOD, ["fmnist", "lenet"]).lbd == 2.0


@pytest.mark.parametrize("module, options, message", [
    (train_salman, "--no-grad-attack --num-noise-vec 2", "--no-grad-attack"),
    (train_salman, "--random-start maybe", "--random-start"),
    (train_salman, "--num-noise-vec 8 --batch 4", "--num-noise-vec"),
    (train_consistency, "--num-noise-vec 8 --batch 4", "--num-noise-vec"),
    (train_macer, "--beta 0", "--beta"),
])
def test_bad_options_fail_with_one_line(tmp_path, capsys, module, options, message):
    with pytest.raises(SystemExit) as exc:
        module.main(["fmnist", "lenet", *options.split(), *SMALL, "--logdir", str(tmp_path / "logs")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------- one epoch each

EPOCH = ["--epochs", "1", "--train-subset", "256", "--test-subset", "128", "--batch", "64", "--workers", "0",
         "--noise", "0.25", "--seed", "3", "--id", "0", "--print-freq", "100"]


@pytest.mark.parametrize("module, options", [
    (train_stab, ""),
    (train_salman, "--num-steps 2"),
    (train_salman, "--attack PGD --num-noise-vec 2 --no-grad-attack --num-steps 2"),
    (train_macer, "--num-noise-vec 4"),
    (train_consistency, "--num-noise-vec 2 --adv-training --num-steps 2"),
])
def test_one_epoch_writes_finite_loss_and_checkpoint(tmp_path, module, options):
    module.main(["fmnist", "lenet", *EPOCH, *options.split(), "--logdir", str(tmp_path)])
    folder = next(root for root, _, files in os.walk(tmp_path) if "log.txt" in files)
    rows = open(os.path.join(folder, "log.txt")).read().splitlines()
    assert rows[0] == LOG_HEADER and len(rows) == 2
    values = [float(v) for v in rows[1].split("\t")]
    assert values[0] == 0 and math.isfinite(values[3]) and values[3] > 0
    if module is train_macer:
        assert values[4] == 0.0
    checkpoint = torch.load(os.path.join(folder, CHECKPOINT_NAME), weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["arch"] == "lenet"
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_seeded_runs_are_reproducible(tmp_path):
    argv = ["fmnist", "lenet", "--epochs", "1", "--train-subset", "64", "--test-subset", "16", "--batch", "32",
            "--workers", "0", "--noise", "0.25", "--seed", "5", "--num-noise-vec", "2", "--adv-training",
            "--num-steps", "1"]
    states = []
    for run in ("a", "b"):
        train_consistency.main(argv + ["--logdir", str(tmp_path / run), "--id", "0"])
        folder = next(root for root, _, files in os.walk(tmp_path / run) if CHECKPOINT_NAME in files)
        states.append(torch.load(os.path.join(folder, CHECKPOINT_NAME), weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
