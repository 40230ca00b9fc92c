"""The attacks of adversarial smoothed training, and the noise helpers they share with the losses.

* ``PGD_L2`` and ``DDN``: the attacks of SmoothAdv (Salman, Li, Razenshteyn, Zhang, Zhang, Bubeck and
  Yang, "Provably Robust Deep Learning via Adversarially Trained Smoothed Classifiers", NeurIPS 2019).
  DDN is the decoupled direction and norm attack of Rony, Hafemann, Oliveira, Ben Ayed, Sabourin and
  Granger ("Decoupling Direction and Norm for Efficient Gradient-Based L2 Adversarial Attacks and
  Defenses", CVPR 2019).
* ``SmoothAdv_PGD``: SmoothAdv's PGD attack as consistency regularisation uses it (Jeong and Shin,
  "Consistency Regularization for Certified Robustness of Smoothed Classifiers", NeurIPS 2020).
* ``SmoothMix_PGD``: the adversary of SmoothMix (Jeong, Park, Kim, Lee, Kim and Shin, "SmoothMix:
  Training Confidence-calibrated Smoothed Classifiers for Certified Robustness", NeurIPS 2021).
* ``KL_PGD``: the adversary on the noise of CAT-RS (Jeong, Kim and Shin, "Confidence-aware Training of
  Smoothed Classifiers for Certified Robustness", AAAI 2023).

One layout of the m noisy copies of b examples serves every method, copy-major, (m * b, ...): copy after
copy, [x + e_1; ...; x + e_m], row j * b + i holding copy j of example i (``add_noises``, or
``x.repeat(m, 1, ...)`` plus one noise tensor of that shape); every reduction over the copies of an
example is a ``reshape(m, b, ...)`` and a reduction over dimension 0.

* ``PGD_L2`` and ``DDN`` take ``inputs`` (m * b, ...) in it, ``labels`` (b,) and one ``noise`` tensor
  shaped like ``inputs``, and return ``inputs + d`` with one perturbation d per example shared by its
  copies.
* ``SmoothAdv_PGD``, ``SmoothMix_PGD`` and ``KL_PGD`` take ``inputs`` (b, ...), ``labels`` (b,) or soft
  targets (b, K), and a list of m noise tensors shaped like ``inputs``.

All attacks expect pixels in [0, 1] and a model in eval mode with frozen parameters
(``method.attack_mode``); logits are read in float32, so the forward passes may run under bf16
autocast.

The constructors of ``PGD_L2``, ``DDN`` and ``KL_PGD`` take the published arguments, in the published
order, so that code written against the published repositories runs: ``random_start`` and ``device``
(and DDN's ``callback``) are accepted and ignored. The published attacks store ``random_start`` without
reading it (they start at zero perturbation, or at the given noises, as these do), and every tensor
here is made on the inputs' device, which is what the published ``device`` had to name anyway.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["PGD_L2", "DDN", "SmoothAdv_PGD", "SmoothMix_PGD", "KL_PGD", "add_noises", "kl_div_per_example",
           "log_mean_softmax", "smoothed_nll", "normalize_per_example", "project_l2", "repeat_copies",
           "warmup_epsilon"]


# --------------------------------------------------------------------------- shared pieces

def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a (b,) tensor to broadcast over the examples of ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def l2_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example (row of the first dimension)."""
    return x.reshape(x.shape[0], -1).norm(p=2, dim=1)


def normalize_per_example(grad: torch.Tensor, stabilizer: float = 0.0, random_if_zero: bool = False):
    """Divide each example's gradient by its L2 norm (+ ``stabilizer``).

    With ``random_if_zero`` (SmoothAdv's rule) an all-zero gradient is replaced
    by a plain standard normal draw, not rescaled to unit length (one
    ``torch.randn_like`` of the zero rows from torch's global generator), so
    the step along it is ``|z|`` times longer and the attack's projection
    then brings it back; rows with a non-zero gradient are unit vectors.
    """
    norms = l2_norms(grad)
    out = grad / per_example(norms + stabilizer, grad)
    if random_if_zero:
        zero = norms == 0
        if zero.any():
            out[zero] = torch.randn_like(out[zero])
    return out


def check_unit_interval(inputs: torch.Tensor, who: str):
    """Refuse inputs outside [0, 1] (the attacks clip to that box).

    On a CPU this raises ValueError at once. On a GPU the check is queued on the
    device (``torch._assert_async``), so the host does not wait for it every
    step; a violation stops the run with the same message at the next
    synchronisation.
    """
    message = f"{who}: input values must lie in [0, 1]"
    inside = (inputs.min() >= 0) & (inputs.max() <= 1)
    if inputs.device.type == "cpu":
        if not bool(inside):
            raise ValueError(message)
    else:
        torch._assert_async(inside, message)


def project_l2(delta: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each example of ``delta`` whose L2 norm exceeds ``max_norm`` back onto that sphere."""
    return delta.renorm(p=2, dim=0, maxnorm=max_norm)


def add_noises(inputs: torch.Tensor, noises: Sequence[torch.Tensor]) -> torch.Tensor:
    """The noisy copies of ``inputs`` (b, ...) under m noise tensors, copy-major: [x + e_1; ...; x + e_m]."""
    return torch.cat([inputs + noise for noise in noises], dim=0)


def kl_div_per_example(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) of each row of ``logits`` (n, K), with 0 log 0 = 0: a tensor (n,)."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target_probs.float(), reduction="none").sum(1)


def log_mean_softmax(logits: torch.Tensor, num_copies: int) -> torch.Tensor:
    """log(clamp(mean over the copies of softmax(logits), 1e-20)), shape (b, K).

    ``logits`` has shape (m * b, K), copy-major (row j * b + i is copy j of example i).
    """
    probs = F.softmax(logits.float(), dim=1)
    return torch.log(probs.reshape(num_copies, -1, probs.shape[1]).mean(0).clamp(min=1e-20))


def smoothed_nll(logits: torch.Tensor, labels: torch.Tensor, num_copies: int):
    """NLL of the mean softmax over the copies, averaged over the examples (SmoothAdv's attack loss)."""
    return F.nll_loss(log_mean_softmax(logits, num_copies), labels)


def warmup_epsilon(epsilon: float, epoch: int, warmup: int) -> float:
    """The attack radius in epoch ``epoch`` (0-based): min(eps, (epoch + 1) * eps / warmup)."""
    return min(epsilon, (epoch + 1) * epsilon / warmup)


def repeat_copies(x: torch.Tensor, num_copies: int) -> torch.Tensor:
    """``num_copies`` copies of ``x`` (b, ...) stacked copy-major: (m * b, ...), row j * b + i = x[i]."""
    return x if num_copies == 1 else x.repeat(num_copies, *([1] * (x.dim() - 1)))


def _check_layout(inputs: torch.Tensor, labels: torch.Tensor, num_copies: int):
    if inputs.shape[0] != labels.shape[0] * num_copies:
        raise ValueError(f"inputs must hold {num_copies} copies, copy after copy, of the {labels.shape[0]} "
                         f"examples (got {inputs.shape[0]} rows)")


# --------------------------------------------------------------------------- SmoothAdv

class PGD_L2:
    """L2 projected gradient ascent on the smoothed soft classifier (SmoothAdv).

    d = 0; ``steps`` times: normalised gradient of the attack loss w.r.t. d,
    d += 2 * max_norm / steps along it, clip x + d to [0, 1], renorm d to
    L2 <= max_norm. Where the gradient is all zero the step is
    -2 * max_norm / steps * z with z ~ N(0, I) not normalised (the published
    rule: the draw replaces the normalised gradient of the loss being
    descended, -CE), so the clip and the renorm decide its length. The loss is the summed
    cross-entropy for one copy and the NLL of the mean softmax over the copies
    otherwise. ``no_grad`` (m > 1) replaces the gradient by
    mean_j(-p_y(x + d + e_j) * e_j), which needs no backward pass.
    ``attack`` returns ``inputs + d`` (copy-major, module docstring).
    ``random_start`` and ``device`` are the published arguments, ignored (module docstring).
    """

    def __init__(self, steps: int, random_start: bool = True, max_norm: Optional[float] = None,
                 device=None):
        self.steps = steps
        self.max_norm = max_norm

    def attack(self, model, inputs: torch.Tensor, labels: torch.Tensor, noise: Optional[torch.Tensor] = None,
               num_noise_vectors: int = 1, no_grad: bool = False) -> torch.Tensor:
        m = num_noise_vectors
        _check_layout(inputs, labels, m)
        if self.max_norm is None:
            raise ValueError("PGD_L2 needs max_norm (the L2 radius of the attack)")
        if no_grad and m > 1 and noise is None:
            raise ValueError("the gradient-free attack needs the noise tensor")
        inputs = inputs.detach()
        clean = inputs[:labels.shape[0]]
        noise = torch.zeros_like(inputs) if noise is None else noise.detach()
        step = 2 * self.max_norm / self.steps
        delta = torch.zeros_like(clean)
        for _ in range(self.steps):
            if no_grad and m > 1:
                # The published gradient-free step adds its (random where zero) direction.
                direction = self._gradient_free_direction(model, inputs, labels, noise, delta, m)
                delta = delta.add(normalize_per_example(direction, random_if_zero=True), alpha=step)
            else:
                # A descent step on -loss, as the published SGD step on the attack loss.
                descent = normalize_per_example(-self._gradient(model, inputs, labels, noise, delta, m),
                                                random_if_zero=True)
                delta = delta.add(descent, alpha=-step)
            delta = (clean + delta).clamp(0, 1) - clean
            delta = project_l2(delta, self.max_norm)
        return inputs + repeat_copies(delta, m)

    @staticmethod
    def _gradient(model, inputs, labels, noise, delta, m):
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs + repeat_copies(delta, m) + noise).float()
            if m == 1:
                loss = F.cross_entropy(logits, labels, reduction="sum")
            else:
                loss = smoothed_nll(logits, labels, m)
            grad, = torch.autograd.grad(loss, [delta])
        return grad

    @staticmethod
    def _gradient_free_direction(model, inputs, labels, noise, delta, m):
        with torch.no_grad():
            logits = model(inputs + repeat_copies(delta, m) + noise).float()
            p_y = F.softmax(logits, dim=1).gather(1, labels.repeat(m).unsqueeze(1)).squeeze(1)
            weighted = -per_example(p_y, noise) * noise
            return weighted.reshape(m, -1, *noise.shape[1:]).mean(0)


class DDN:
    """Decoupled direction and norm attack (Rony et al. 2019) on the smoothed soft classifier (SmoothAdv).

    Each example keeps a norm budget (``init_norm`` at first). Step i of T:
    record d if the (noisy, majority over copies) prediction is already wrong
    and d is the smallest such so far; move d along the normalised ascent
    gradient with learning rate 0.01 + 0.99 * (1 + cos(pi (i + 1) / T)) / 2
    (cosine annealing towards 0.01, as the reference's scheduler stepped
    before each update); multiply the budget by 1 - gamma if the example was
    misclassified, else by 1 + gamma, capped by the largest L2 distance
    possible inside [0, 1]; rescale d to the budget; round x + d to
    ``levels`` levels and clip to [0, 1].

    Where the gradient is all zero the update uses a plain standard normal
    draw z in place of the normalised gradient of the loss being descended
    (d -= lr * z), and the rescaling to the budget follows, as published.

    The smallest misclassifying d is returned (zero for an example never
    misclassified, as in the reference). With ``max_norm`` it is renormed to
    L2 <= ``max_norm`` and, with ``quantize``, each component rounded to the
    nearest multiple of 1 / (levels - 1), as the published attack does: x + d
    stays on the grid and inside [0, 1] when x is on the grid, and the L2 norm
    may exceed ``max_norm`` by at most sqrt(#pixels) / (2 (levels - 1)).

    ``device`` and ``callback`` (a progress display) are the published arguments, ignored (module
    docstring).
    """

    def __init__(self, steps: int, gamma: float = 0.05, init_norm: float = 1.0, quantize: bool = True,
                 levels: int = 256, max_norm: Optional[float] = None, device=None, callback=None):
        self.steps = steps
        self.gamma = gamma
        self.init_norm = init_norm
        self.quantize = quantize
        self.levels = levels
        self.max_norm = max_norm

    def _learning_rate(self, i: int) -> float:
        return 0.01 + (1.0 - 0.01) * (1 + math.cos(math.pi * (i + 1) / self.steps)) / 2

    def attack(self, model, inputs: torch.Tensor, labels: torch.Tensor, noise: Optional[torch.Tensor] = None,
               num_noise_vectors: int = 1, no_grad: bool = False) -> torch.Tensor:
        m = num_noise_vectors
        _check_layout(inputs, labels, m)
        if no_grad and m > 1:
            raise ValueError("DDN has no gradient-free variant; use PGD_L2 with no_grad")
        inputs = inputs.detach()
        clean = inputs[:labels.shape[0]]
        noise = torch.zeros_like(inputs) if noise is None else noise.detach()
        scale = self.levels - 1

        delta = torch.zeros_like(clean)
        budget = torch.full((clean.shape[0],), float(self.init_norm), device=clean.device)
        worst_norm = l2_norms(torch.max(clean, 1 - clean))
        best_l2 = worst_norm.clone()
        best_delta = torch.zeros_like(clean)
        for i in range(self.steps):
            delta = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs + repeat_copies(delta, m) + noise).float()
                if m == 1:
                    loss = F.cross_entropy(logits, labels, reduction="sum")
                    predictions = logits.argmax(1)
                else:
                    loss = smoothed_nll(logits, labels, m)
                    predictions = logits.argmax(1).reshape(m, -1).mode(0).values
                grad, = torch.autograd.grad(loss, [delta])
            delta = delta.detach()

            fooled = predictions != labels
            l2 = l2_norms(delta)
            better = fooled & (l2 < best_l2)
            best_l2 = torch.where(better, l2, best_l2)
            best_delta[better] = delta[better]

            # Descent on -loss with the published SGD update d <- d - lr * direction.
            delta = delta.add(normalize_per_example(-grad, random_if_zero=True), alpha=-self._learning_rate(i))
            budget = budget * (1 - (2 * fooled.float() - 1) * self.gamma)
            budget = torch.min(budget, worst_norm)
            delta = delta * per_example(budget / l2_norms(delta).clamp(min=1e-12), delta)
            adversarial = clean + delta
            if self.quantize:
                adversarial = torch.round(adversarial * scale) / scale
            delta = adversarial.clamp(0, 1) - clean

        if self.max_norm is not None:
            best_delta = project_l2(best_delta, self.max_norm)
            if self.quantize:
                best_delta = torch.round(best_delta * scale) / scale
        return inputs + repeat_copies(best_delta, m)


class SmoothAdv_PGD:
    """SmoothAdv's PGD with one noise tensor per copy (the attack of consistency training).

    ``steps`` times: loss = NLL of the mean softmax of f(adv + e_j) over the
    copies, adv += 2 * max_norm / steps * g / (|g| + 1e-8), project adv - x onto
    the L2 ball of radius ``max_norm``, clip adv to [0, 1]. Starts at adv = x.
    ``attack`` returns adv, shaped like ``inputs``.
    """

    def __init__(self, steps: int, max_norm: float = 1.0):
        self.steps = steps
        self.max_norm = max_norm

    def attack(self, model, inputs: torch.Tensor, labels: torch.Tensor,
               noises: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        inputs = inputs.detach()
        noises = [torch.zeros_like(inputs)] if not noises else [n.detach() for n in noises]
        m = len(noises)
        step = 2 * self.max_norm / self.steps
        adv = inputs
        for _ in range(self.steps):
            adv = adv.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(add_noises(adv, noises)).float()
                loss = smoothed_nll(logits, labels, m)
                grad, = torch.autograd.grad(loss, [adv])
            adv = adv.detach() + step * normalize_per_example(grad, stabilizer=1e-8)
            adv = (inputs + project_l2(adv - inputs, self.max_norm)).clamp(0, 1)
        return adv.detach()


# --------------------------------------------------------------------------- SmoothMix

class SmoothMix_PGD:
    """The SmoothMix adversary: raw L2 steps of length ``alpha`` on the smoothed cross-entropy.

    Each step moves adv from x along the normalised gradient of
    -sum_i log(mean_j p(adv_i + e_j)[y_i]). ``attack`` returns ``(init, adv)``,
    both shaped like ``inputs``: ``adv`` after ``steps`` steps (each projected
    onto the L2 ball ``maxnorm`` around x when given, then clipped to [0, 1]);
    ``init`` the iterate before step ``mix_step`` (x itself when ``mix_step``
    is 0 or at least ``steps``), projected onto the ball ``maxnorm_s``
    (default ``alpha * mix_step``) around x and clipped.
    """

    def __init__(self, steps: int, mix_step: int, alpha: float, maxnorm_s: Optional[float] = None,
                 maxnorm: Optional[float] = None):
        self.steps = steps
        self.mix_step = mix_step
        self.alpha = alpha
        self.maxnorm = maxnorm
        self.maxnorm_s = alpha * mix_step if maxnorm_s is None else maxnorm_s

    @staticmethod
    def _project(x: torch.Tensor, center: torch.Tensor, maxnorm: Optional[float]) -> torch.Tensor:
        if maxnorm is not None:
            x = center + project_l2(x - center, maxnorm)
        return x.clamp(0, 1).detach()

    def attack(self, model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
               noises: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        check_unit_interval(inputs, "SmoothMix_PGD")
        if noises is None:
            noises = [torch.zeros_like(inputs)]
        m = len(noises)
        inputs = inputs.detach()
        adv, init = inputs, inputs
        for step in range(self.steps):
            if step == self.mix_step:
                init = adv
            adv = adv.detach().requires_grad_()
            log_probs = log_mean_softmax(model(add_noises(adv, noises)), m)
            loss = F.nll_loss(log_probs, labels, reduction="sum")
            grad = torch.autograd.grad(loss, [adv])[0]
            adv = self._project(adv.detach() + self.alpha * normalize_per_example(grad, 1e-8), inputs,
                                self.maxnorm)
        return self._project(init, inputs, self.maxnorm_s), adv.detach()


# --------------------------------------------------------------------------- CAT-RS

def pixel_mean(noise: torch.Tensor) -> torch.Tensor:
    """Mean over the pixels of each sample: [n] -> broadcastable [n x 1 x ...]."""
    return per_example(noise.flatten(1).mean(1), noise)


def pixel_rms(noise: torch.Tensor) -> torch.Tensor:
    """Root mean square (not centred) over the pixels of each sample, broadcastable."""
    return per_example(noise.flatten(1).pow(2).mean(1).sqrt(), noise)


def restandardize(noise: torch.Tensor, mean0: torch.Tensor, rms0: torch.Tensor) -> torch.Tensor:
    """e <- mean0 + rms0 * (e - mu) / r, mu and r the current pixel mean and root mean square.

    The pixel mean becomes exactly ``mean0``; since r is not centred, the root
    mean square becomes sqrt(mean0^2 + rms0^2 (1 - mu^2 / r^2)), which differs
    from ``rms0`` only by terms of order (mean / rms)^2 (about 1/d for Gaussian
    noise over d pixels).
    """
    return mean0 + rms0 * (noise - pixel_mean(noise)) / pixel_rms(noise).clamp_min(1e-12)


class KL_PGD:
    """The CAT-RS adversary on the noise: PGD on (1/m) sum_j KL(pi || p(x + e_j)).

    ``attack(model, inputs, labels, noises)`` takes the m noise tensors and
    returns the m attacked ones; ``labels`` are the soft targets pi [b x K].
    Each step: normalised gradient ascent (step 2 * max_norm / steps), the
    change from the starting noise clipped to L2 <= max_norm per sample, then
    each sample re-standardised to its starting pixel mean and root mean square.
    ``random_start`` and ``device`` are the published arguments, ignored (module docstring).
    """

    def __init__(self, steps: int, random_start: bool = True, max_norm: Optional[float] = None,
                 device=None):
        self.steps = steps
        self.max_norm = max_norm

    def attack(self, model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
               noises: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        check_unit_interval(inputs, "KL_PGD")
        if noises is None:
            raise ValueError("KL_PGD attacks noise samples: pass noises=[e_1, ..., e_m]")
        if self.steps == 0:
            return list(noises)
        if self.max_norm is None:
            raise ValueError("KL_PGD needs max_norm (the L2 radius of the attack)")
        m = len(noises)
        repeated = repeat_copies(inputs.detach(), m)
        targets = labels.detach().repeat(m, 1)
        start = torch.cat(noises, dim=0).detach()
        mean0, rms0 = pixel_mean(start), pixel_rms(start)
        step_size = 2 * self.max_norm / self.steps
        noise = start
        for _ in range(self.steps):
            noise = noise.detach().requires_grad_()
            kl = kl_div_per_example(model(repeated + noise), targets)
            loss = kl.view(m, -1).mean(0).sum()
            grad = torch.autograd.grad(loss, [noise])[0]
            noise = noise.detach() + step_size * normalize_per_example(grad, 1e-8)
            noise = start + project_l2(noise - start, self.max_norm)
            noise = restandardize(noise, mean0, rms0)
        return list(noise.detach().chunk(m, dim=0))
