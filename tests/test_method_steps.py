"""The training step of every method, wired end to end: ``batch_loss`` against an independent computation.

The losses of test_methods_baselines.py and test_methods_catrs_smoothmix.py are
checked as formulas; here the step that feeds them is. Each ``batch_loss`` runs
on a linear model f(x) = W flatten(x) + b that records the input of every
forward pass and whether it ran in train mode (the attacks run in eval mode,
``train_utils.attack_mode``). From those inputs the test reads the noise the
step drew; it then recomputes, with its own float64 NumPy code, the points the
step should have trained on (calling the attack classes, which have their own
tests, on that same noise) and the loss, and compares. A step that feeds a
loss the wrong logits, draws fresh noise for its attack, forgets the warmup of
a radius or weight, or scales its noise wrongly fails here.
"""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import binom

import train_catrs
import train_cohen
import train_consistency
import train_macer
import train_salman
import train_smoothmix
import train_stab
from attacks import DDN, KL_PGD, PGD_L2, SmoothAdv_PGD, SmoothMix_PGD
from test_methods_baselines import consistency_by_hand, macer_by_hand
from train_utils import TrainingContext, build_parser, train_epoch

SHAPE = (1, 4, 4)
CLASSES = 4


# --------------------------------------------------------------------------- helpers

class RecordingLinear(torch.nn.Module):
    """f(x) = W flatten(x) + b; ``calls`` holds (train mode?, input) of every forward pass."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
            self.linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))
        self.calls = []
        self.recording = True

    def forward(self, x):
        if self.recording:
            self.calls.append((self.training, x.detach().clone()))
        return self.linear(x.flatten(1))

    def numpy(self):
        """(W, b) in float64, exactly the float32 values the model uses."""
        return self.linear.weight.detach().double().numpy(), self.linear.bias.detach().double().numpy()

    def train_calls(self):
        return [x for training, x in self.calls if training]

    def attack_calls(self):
        return [x for training, x in self.calls if not training]


class Unrecorded:
    """The same model for the test's own attack runs: eval mode, frozen, not recorded."""

    def __init__(self, model: RecordingLinear):
        self.model = model

    def __enter__(self):
        self.model.recording = False
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc):
        self.model.recording = True
        self.model.train()
        for p in self.model.parameters():
            p.requires_grad_(True)


def problem(seed, b, shape=SHAPE, k=CLASSES, scale=1.0):
    """A recording linear model in train mode, images in [0.3, 0.7], labels half of which f(x) predicts."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    weight = rng.normal(size=(k, d)) * scale
    bias = rng.normal(size=k) * 0.1
    model = RecordingLinear(weight, bias).train()
    x = torch.tensor(rng.uniform(0.3, 0.7, size=(b, *shape)), dtype=torch.float32)
    predicted = (x.double().flatten(1).numpy() @ weight.T + bias).argmax(1)
    y = np.where(np.arange(b) % 2 == 0, predicted, rng.integers(0, k, size=b))
    return model, x, torch.tensor(y)


def context(model, method, options, batch=None):
    """A ``TrainingContext`` on the CPU with the method's options parsed as its script parses them."""
    argv = ["fmnist", "lenet", *options.split()] + (["--batch", str(batch)] if batch else [])
    args = build_parser(method).parse_args(argv)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return TrainingContext(args=args, model=model, optimizer=optimizer, device=torch.device("cpu"),
                           dist=SimpleNamespace(is_main=False, enabled=False, rank=0, world_size=1))


def copies_of(inputs: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """A forward pass's input (m * b, ...) copy-major, minus x: the m noise tensors (m, b, D), float64."""
    b = x.shape[0]
    m = inputs.shape[0] // b
    assert inputs.shape[0] == m * b
    return (inputs.double().reshape(m, b, -1) - x.double().reshape(1, b, -1)).numpy()


def as_noises(noise: np.ndarray, x: torch.Tensor):
    """(m, b, D) float64 -> the list of m float32 tensors shaped like x that the attacks take."""
    return [torch.tensor(n, dtype=torch.float32).view_as(x) for n in noise]


def logits(weight, bias, points):
    """W p + b for points (..., D) float64."""
    return points @ weight.T + bias


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def cross_entropy(z, y):
    """-log softmax(z)[y] for z (..., b, K), y (b,)."""
    return -np.take_along_axis(log_softmax(z), np.broadcast_to(y[..., None], z.shape[:-1] + (1,)), -1)[..., 0]


def kl(target, z):
    """KL(target || softmax(z)) along the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(target > 0, target * (np.log(np.where(target > 0, target, 1)) - log_softmax(z)), 0.0)
    return terms.sum(-1)


# --------------------------------------------------------------------------- CAT-RS

def catrs_by_hand(weight, bias, x, y, pi, clean_noise, adv_noise, ks, lbd):
    """CAT-RS from its definition (train_catrs docstring): the loss, mean L_low, the train accuracy (on the attacked
    copies), the vote share t[y], max_j KL(pi || f(x + e'_j)) per example, and the accuracy on the clean copies."""
    m = clean_noise.shape[0]
    flat = x.double().flatten(1).numpy()
    y, pi = y.numpy(), pi.double().numpy()
    z_clean = logits(weight, bias, flat[None] + clean_noise)     # (m, b, K)
    z_adv = logits(weight, bias, flat[None] + adv_noise)
    ce = cross_entropy(z_clean, y)                                 # (m, b)
    low = np.array([np.sort(ce[:, i])[:ks[i]].sum() / m for i in range(len(y))])
    high = kl(pi[None], z_adv).max(0)                              # max_j KL(pi || f(x + e'_j))
    loss = np.mean(low + lbd * (np.asarray(ks) == m) * high)
    accuracy = 100.0 * np.mean(z_adv.argmax(-1) == y[None])
    votes = np.mean(z_clean.argmax(-1) == y[None], axis=0)
    return SimpleNamespace(loss=loss, low=low.mean(), accuracy=accuracy, votes=votes, high=high,
                           clean_accuracy=100.0 * votes.mean())


CATRS_OPTIONS = "--noise 0.5 --num-noise-vec 3 --eps 128 --num-steps 2 --lbd 0.7 --warmup 5"


def catrs_case(seed=3, b=6):
    model, x, y = problem(seed, b)
    pi = torch.distributions.Dirichlet(torch.ones(CLASSES)).sample((b,))
    return model, x, y, pi


def force_k(monkeypatch, ks):
    """Make ``batch_loss`` use K = ``ks``; record the (w, m) it asked K for."""
    asked = []

    def forced(w, m):
        asked.append((w.detach().clone(), m))
        return torch.tensor(ks, dtype=torch.long)
    monkeypatch.setattr(train_catrs, "sample_num_accepted", forced)
    return asked


@pytest.mark.parametrize("epoch, radius", [(4, 0.5), (5, 1.0)])   # eps 128/256, doubled from --warmup 5 on
@pytest.mark.parametrize("confidence_mask", [False, True])
def test_catrs_step_trains_on_kl_pgd_of_its_own_noise_and_equals_the_loss_by_hand(monkeypatch, epoch, radius,
                                                                               confidence_mask):
    """The clean pass at x + e_j, the attacked pass at x + e'_j with e'_j = KL_PGD of those e_j at the epoch's
    radius, K drawn from Binomial(m, w) with w = t[y] (pi[y] with --confidence_mask), and the loss of the
    step equal to the CAT-RS loss computed by hand on those points with that K."""
    torch.manual_seed(1)
    model, x, y, pi = catrs_case()
    m = 3
    ks = [3, 1, 3, 2, 3, 3]    # K = m for most examples, K < m for two
    asked = force_k(monkeypatch, ks)
    options = CATRS_OPTIONS + (" --confidence_mask" if confidence_mask else "")
    ctx = context(model, train_catrs.METHOD, options)
    loss, logged, accuracy = train_catrs.batch_loss(ctx, epoch, x, y, pi)

    clean_pass, adv_pass = model.train_calls()
    assert len(model.attack_calls()) == 2                        # --num-steps 2
    noise = copies_of(clean_pass, x)
    with Unrecorded(model) as plain:
        attacked = KL_PGD(steps=2, max_norm=radius).attack(plain, x, pi, as_noises(noise, x))
    expected_adv = np.stack([(x + e).double().flatten(1).numpy() for e in attacked])
    assert np.allclose(adv_pass.double().flatten(1).numpy().reshape(m, len(x), -1), expected_adv, atol=1e-6)
    adv_noise = expected_adv - x.double().flatten(1).numpy()[None]

    weight, bias = model.numpy()
    expected = catrs_by_hand(weight, bias, x, y, pi, noise, adv_noise, ks, 0.7)
    assert loss.item() == pytest.approx(expected.loss, rel=1e-5)
    assert logged.item() == pytest.approx(expected.low, rel=1e-5)
    assert accuracy.item() == pytest.approx(expected.accuracy)
    votes = expected.votes
    (w, asked_m), = asked
    assert asked_m == m
    w_expected = pi.double().numpy()[np.arange(len(y)), y.numpy()] if confidence_mask else votes
    assert w.double().numpy() == pytest.approx(w_expected, abs=1e-6)
    # the case is not degenerate: the attack moved the noise and changed the accuracy, the votes differ
    assert np.abs(adv_noise - noise).max() > 0.1 and len(set(votes.tolist())) > 1
    assert expected.accuracy != expected.clean_accuracy


def test_catrs_high_confidence_term_is_lbd_times_the_mean_worst_kl_of_the_attacked_noise(monkeypatch):
    """K = m forced: loss(lbd) - loss(0) = lbd * mean_i max_j KL(pi_i || f(x_i + e'_ij)) on the same noise."""
    m, b = 3, 6
    model, x, y, pi = catrs_case(seed=2, b=b)
    force_k(monkeypatch, [m] * b)
    losses = {}
    for lbd in (0.0, 2.5):
        torch.manual_seed(3)      # the same noise for both
        model.calls.clear()
        ctx = context(model, train_catrs.METHOD, f"--noise 0.5 --num-noise-vec {m} --eps 256 --num-steps 3 --lbd {lbd}")
        losses[lbd] = train_catrs.batch_loss(ctx, 0, x, y, pi)[0].item()
    noise = copies_of(model.train_calls()[0], x)
    with Unrecorded(model) as plain:
        attacked = KL_PGD(steps=3, max_norm=1.0).attack(plain, x, pi, as_noises(noise, x))
    adv_noise = np.stack([e.double().flatten(1).numpy() for e in attacked])
    weight, bias = model.numpy()
    worst = catrs_by_hand(weight, bias, x, y, pi, noise, adv_noise, [m] * b, 1.0).high
    assert losses[2.5] - losses[0.0] == pytest.approx(2.5 * worst.mean(), rel=1e-4)
    # on the Gaussian noise itself the term would differ: the attack raised it
    clean_worst = catrs_by_hand(weight, bias, x, y, pi, noise, noise, [m] * b, 1.0).high
    assert worst.mean() > clean_worst.mean() * 1.05


def test_vote_share_of_a_label_no_copy_predicts_is_zero_even_for_the_last_class():
    """t = (1/m) sum_j onehot(argmax logits_j) has one entry per class, also for classes no copy predicts."""
    logits = torch.zeros(2, 3, 4)
    logits[0, :, 0] = logits[1, :2, 1] = logits[1, 2, 0] = 5.0     # the copies predict classes 0 and 1 only
    votes = train_catrs.acceptance_probability(logits, torch.tensor([3, 1, 0]), torch.zeros(3, 4))
    assert votes.tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("w, m", [(0.2, 3), (0.7, 4), (0.55, 1)])
def test_sample_num_accepted_is_binomial_m_w_with_zero_counted_as_one(w, m):
    """P(K = k) = Binomial(m, w) pmf for k >= 2 and pmf(0) + pmf(1) at k = 1 (w away from 1/2, where w and 1 - w
    would give the same law)."""
    torch.manual_seed(6)
    n = 20000
    ks = train_catrs.sample_num_accepted(torch.full((n,), w), m)
    frequencies = np.bincount(ks.numpy(), minlength=m + 1) / n
    expected = binom.pmf(np.arange(m + 1), m, w)
    expected[1] += expected[0]
    expected[0] = 0.0
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(frequencies - expected) <= 5 * se + 1e-12), (frequencies, expected)


def test_catrs_takes_m_sgd_steps_per_loader_batch_on_consecutive_chunks():
    """A loader batch of B = m b + r examples: m SGD steps, step j on examples j b .. (j + 1) b - 1 (the r last
    dropped), each changing the weights."""
    m, b, r = 3, 4, 2
    model, x, y = problem(7, m * b + r)
    pi = torch.distributions.Dirichlet(torch.ones(CLASSES)).sample((m * b + r,))
    ctx = context(model, train_catrs.METHOD, f"--noise 0.25 --num-noise-vec {m} --num-steps 1", batch=m * b + r)
    weights = [model.linear.weight.detach().clone()]
    ctx.optimizer.register_step_post_hook(lambda *a: weights.append(model.linear.weight.detach().clone()))
    seen = []
    method = dataclasses.replace(train_catrs.METHOD,
                                 batch_loss=lambda c, e, *t: seen.append(t) or train_catrs.batch_loss(c, e, *t))
    train_epoch(method, ctx, [(x, y, pi), (x[:m * b], y[:m * b], pi[:m * b])], 0)
    assert len(weights) == 1 + 2 * m and len(seen) == 2 * m
    assert all(not torch.equal(before, after) for before, after in zip(weights, weights[1:]))
    for j, (inputs, labels, confidences) in enumerate(seen[:m]):
        rows = slice(j * b, (j + 1) * b)
        assert torch.equal(inputs, x[rows]) and torch.equal(labels, y[rows]) and torch.equal(confidences, pi[rows])
    # each step's clean pass holds the m noisy copies of its b examples
    clean_passes = model.train_calls()[0::2]
    assert [len(p) for p in clean_passes] == [m * b] * (2 * m)


# --------------------------------------------------------------------------- SmoothMix

def smoothmix_by_hand(weight, bias, init, mixed, y, noise, lam, weight_factor):
    """SmoothMix's loss (train_smoothmix docstring) at the given init, mixed points and noise (m, b, D)."""
    y = y.numpy()
    z_init = logits(weight, bias, init[None] + noise)     # (m, b, K)
    z_mix = logits(weight, bias, mixed[None] + noise)
    ce = cross_entropy(z_init, y).mean()
    probs = np.exp(log_softmax(z_init))
    pbar = probs.mean(0)
    k = z_init.shape[-1]
    target = (1 - lam[:, None]) * pbar + lam[:, None] / k
    correct = (pbar.argmax(1) == y).astype(float)
    return ce + weight_factor * np.mean(correct[None] * kl(target[None], z_mix)), correct


@pytest.mark.parametrize("epoch, warmup_factor, maxnorm", [(1, 0.5, None), (5, 1.0, None), (5, 1.0, 0.4)])
def test_smoothmix_step_mixes_init_and_adversary_and_weights_the_mixup_term(epoch, warmup_factor, maxnorm):
    """init and adv from SmoothMix_PGD on the step's own noise (maxnorm_s = w_e alpha mix_step, the adversary
    within --maxnorm if given), the mixed points (1 - lam) init + lam adv with lam in [0, 1/2], and the loss
    CE + eta w_e mean([pbar top = y] KL) by hand."""
    torch.manual_seed(8)
    b, m, alpha, eta = 8, 2, 0.3, 2.0
    model, x, y = problem(9, b)
    ctx = context(model, train_smoothmix.METHOD,
                  f"--noise 0.4 --num-noise-vec {m} --num-steps 3 --mix_step 1 --alpha {alpha} --eta {eta} --warmup 4"
                  + (f" --maxnorm {maxnorm}" if maxnorm else ""))
    loss, logged, accuracy = train_smoothmix.batch_loss(ctx, epoch, x, y)
    assert logged is loss and accuracy is None
    attack_passes = model.attack_calls()
    assert len(attack_passes) == 3
    noise = copies_of(attack_passes[0], x)        # the attack starts at adv = x
    with Unrecorded(model) as plain:
        init, adv = SmoothMix_PGD(steps=3, mix_step=1, alpha=alpha, maxnorm_s=warmup_factor * alpha,
                                  maxnorm=maxnorm).attack(plain, x, y, as_noises(noise, x))
    if maxnorm:      # the bound binds: three steps of alpha reach beyond it
        assert (adv - x).flatten(1).norm(dim=1).max().item() == pytest.approx(maxnorm, rel=1e-4)
    init_pass, mix_pass = model.train_calls()
    init_np, adv_np = init.double().flatten(1).numpy(), adv.double().flatten(1).numpy()
    assert np.allclose(copies_of(init_pass, init), noise, atol=1e-6)
    mixed_copies = mix_pass.double().flatten(1).numpy().reshape(m, b, -1) - noise
    mixed = mixed_copies[0]
    assert np.allclose(mixed_copies, mixed[None], atol=1e-6)      # one mixed point per example, every copy
    direction = adv_np - init_np
    lam = ((mixed - init_np) * direction).sum(1) / (direction ** 2).sum(1)
    assert np.allclose(mixed, (1 - lam[:, None]) * init_np + lam[:, None] * adv_np, atol=1e-5)
    assert np.all((lam >= 0) & (lam <= 0.5))
    # the clean end moved (mix_step 1) but stayed inside its warmed-up ball
    moved = np.linalg.norm(init_np - x.double().flatten(1).numpy(), axis=1)
    assert np.all(moved <= warmup_factor * alpha + 1e-5) and moved.max() > 0.9 * warmup_factor * alpha
    weight, bias = model.numpy()
    expected, correct = smoothmix_by_hand(weight, bias, init_np, mixed, y, noise, lam, eta * warmup_factor)
    assert 0 < correct.sum() < b                                # both cases of the mask occur
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_smoothmix_mixing_weights_are_uniform_on_zero_to_one_half():
    torch.manual_seed(10)
    b = 400
    model, x, y = problem(11, b, scale=0.3)
    ctx = context(model, train_smoothmix.METHOD, "--noise 0.25 --num-steps 1 --alpha 0.5")
    train_smoothmix.batch_loss(ctx, 20, x, y)
    noise = copies_of(model.attack_calls()[0], x)[0]
    init_pass, mix_pass = model.train_calls()
    init = init_pass.double().flatten(1).numpy() - noise
    mixed = mix_pass.double().flatten(1).numpy() - noise
    with Unrecorded(model) as plain:
        _, adv = SmoothMix_PGD(steps=1, mix_step=0, alpha=0.5).attack(plain, x, y, as_noises(noise[None], x))
    direction = adv.double().flatten(1).numpy() - init
    lam = ((mixed - init) * direction).sum(1) / (direction ** 2).sum(1)
    assert lam.min() >= -1e-5 and lam.max() <= 0.5 + 1e-5
    assert lam.max() > 0.45 and lam.min() < 0.05
    assert abs(lam.mean() - 0.25) < 4 * 0.5 / np.sqrt(12 * b)


# --------------------------------------------------------------------------- the noise of every step

NOISE_CASES = [
    (train_cohen, "", 0),
    (train_stab, "", 1),               # the second forward pass (the first is the clean one)
    (train_salman, "--attack PGD --num-noise-vec 2 --num-steps 1", 0),
    (train_salman, "--num-noise-vec 2 --num-steps 1", 0),
    (train_macer, "--num-noise-vec 3", 0),
    (train_consistency, "--num-noise-vec 2", 0),
    (train_consistency, "--num-noise-vec 2 --adv-training --num-steps 1", 0),
    (train_smoothmix, "--num-noise-vec 2 --num-steps 1", 0),
    (train_catrs, "--num-noise-vec 2 --num-steps 1", 0),
]


@pytest.mark.parametrize("sigma", [0.12, 0.5])
@pytest.mark.parametrize("module, options, call", NOISE_CASES, ids=lambda v: getattr(v, "__name__", None))
def test_every_step_adds_gaussian_noise_of_standard_deviation_sigma(module, options, call, sigma):
    """The first noisy forward pass of the step is x + e: e has mean 0 and standard deviation sigma (within 6 %,
    5 standard errors on 2,048 values per copy), and the m copies of an example have their own noise."""
    torch.manual_seed(12)
    b = 8
    model, x, y = problem(13, b, shape=(1, 16, 16), scale=0.1)
    ctx = context(model, module.METHOD, f"--noise {sigma} {options}")
    tensors = (x, y)
    if module is train_catrs:
        tensors += (torch.full((b, CLASSES), 1.0 / CLASSES),)
    module.batch_loss(ctx, 0, *tensors)
    if module is train_stab:
        assert torch.equal(model.calls[0][1], x)              # stability's clean pass has no noise
    noise = copies_of(model.calls[call][1], x)                # (m, b, D)
    values = noise.ravel()
    assert abs(values.std() / sigma - 1) < 0.06, values.std()
    assert abs(values.mean()) < 5 * sigma / np.sqrt(values.size)
    m = noise.shape[0]
    expected_m = getattr(ctx.args, "num_noise_vec", 1)
    assert m == expected_m
    for j in range(1, m):
        assert abs(np.corrcoef(noise[0].ravel(), noise[j].ravel())[0, 1]) < 0.1


# --------------------------------------------------------------------------- what the baselines add to the CE

def test_gaussian_step_is_the_cross_entropy_at_its_noisy_inputs():
    torch.manual_seed(22)
    model, x, y = problem(23, 8)
    loss, logged, accuracy = train_cohen.batch_loss(context(model, train_cohen.METHOD, "--noise 0.5"), 0, x, y)
    noisy_pass, = model.train_calls()
    weight, bias = model.numpy()
    z = logits(weight, bias, x.double().flatten(1).numpy() + copies_of(noisy_pass, x)[0])
    assert logged is loss and loss.item() == pytest.approx(cross_entropy(z, y.numpy()).mean(), rel=1e-5)
    assert accuracy.item() == pytest.approx(100.0 * np.mean(z.argmax(1) == y.numpy()))


def test_stability_step_adds_lbd_times_the_clean_to_noisy_cross_entropy():
    torch.manual_seed(14)
    model, x, y = problem(15, 8)
    ctx = context(model, train_stab.METHOD, "--noise 0.3 --lbd 1.5")
    loss, logged, accuracy = train_stab.batch_loss(ctx, 0, x, y)
    clean_pass, noisy_pass = model.train_calls()
    assert torch.equal(clean_pass, x)
    noise = copies_of(noisy_pass, x)[0]
    weight, bias = model.numpy()
    flat = x.double().flatten(1).numpy()
    z_clean, z_noisy = logits(weight, bias, flat), logits(weight, bias, flat + noise)
    ce = cross_entropy(z_clean, y.numpy()).mean()
    added = np.mean(-(np.exp(log_softmax(z_clean)) * log_softmax(z_noisy)).sum(1))
    assert loss.item() - logged.item() == pytest.approx(1.5 * added, rel=1e-5)
    assert logged.item() == pytest.approx(ce, rel=1e-6)
    assert accuracy.item() == pytest.approx(100.0 * np.mean(z_noisy.argmax(1) == y.numpy()))


@pytest.mark.parametrize("epoch, deferred, weight_used", [(0, False, 3.0), (2, True, 0.0), (3, True, 3.0)])
def test_macer_step_adds_lbd_times_the_radius_hinge_of_its_noisy_copies(epoch, deferred, weight_used):
    """(cl + lbd rl) / B on z_ij = f(x_i + e_ij), with --deferred's lbd = 0 while epoch <= --lr_step_size (2)."""
    torch.manual_seed(16)
    m, b = 4, 6
    model, x, y = problem(17, b, scale=0.5)
    options = f"--noise 0.5 --num-noise-vec {m} --lbd 3 --beta 2 --margin 8 --lr_step_size 2"
    ctx = context(model, train_macer.METHOD, options + (" --deferred" if deferred else ""))
    loss, logged, accuracy = train_macer.batch_loss(ctx, epoch, x, y)
    assert accuracy is None
    noisy_pass, = model.train_calls()
    noise = copies_of(noisy_pass, x)
    weight, bias = model.numpy()
    z = logits(weight, bias, x.double().flatten(1).numpy()[None] + noise).transpose(1, 0, 2)   # (b, m, K)
    expected, kept = macer_by_hand(z, y.numpy(), beta=2.0, margin=8.0, sigma=0.5, lbd=weight_used)
    classification, _ = macer_by_hand(z, y.numpy(), beta=2.0, margin=8.0, sigma=0.5, lbd=0.0)
    assert len(kept) >= 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logged.item() == pytest.approx(classification, rel=1e-5)
    if weight_used:
        assert loss.item() - logged.item() > 0.01


@pytest.mark.parametrize("adv_training", [False, True])
def test_consistency_step_adds_the_consistency_term_of_its_copies(adv_training):
    """CE over the copies at x + e_j (x the SmoothAdv PGD adversary of the step's noise with --adv-training, at
    the warmed-up radius) plus lbd mean_j KL(pbar || p_j) + eta Ent(pbar), by hand."""
    torch.manual_seed(18)
    m, b, epoch = 3, 6, 1
    model, x, y = problem(19, b)
    options = f"--noise 0.25 --num-noise-vec {m} --lbd 5 --eta 0.3"
    if adv_training:
        options += " --adv-training --epsilon 128 --num-steps 2 --warmup 4"
    ctx = context(model, train_consistency.METHOD, options)
    loss, logged, accuracy = train_consistency.batch_loss(ctx, epoch, x, y)
    training_pass, = model.train_calls()
    if adv_training:
        noise = copies_of(model.attack_calls()[0], x)
        radius = min(0.5, (epoch + 1) * 0.5 / 4)
        with Unrecorded(model) as plain:
            point = SmoothAdv_PGD(steps=2, max_norm=radius).attack(plain, x, y, noises=as_noises(noise, x))
        assert np.allclose(copies_of(training_pass, point), noise, atol=1e-6)
        moved = (point - x).flatten(1).norm(dim=1)
        assert moved.max().item() == pytest.approx(radius, rel=1e-4)
    else:
        assert model.attack_calls() == []
        point = x
        noise = copies_of(training_pass, x)
    weight, bias = model.numpy()
    z = logits(weight, bias, point.double().flatten(1).numpy()[None] + noise)     # (m, b, K)
    ce = cross_entropy(z, y.numpy()).mean()
    assert logged.item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() - logged.item() == pytest.approx(consistency_by_hand(list(z), 5.0, 0.3), rel=1e-5)
    assert accuracy.item() == pytest.approx(100.0 * np.mean(z.argmax(-1) == y.numpy()[None]))


@pytest.mark.parametrize("attack, epsilon, option", [("PGD", 64, ""), ("DDN", 256, ""),
                                                     ("DDN", 256, "--gamma-DDN 0.2"), ("PGD", 64, "--no-grad-attack")])
def test_smoothadv_step_trains_on_the_attack_of_its_own_noise_at_the_warmed_up_radius(attack, epsilon, option):
    """The training pass is at x + d + e_j, d the attack (PGD or DDN at radius eps * (epoch + 1) / warmup) on the
    step's own noise; the loss is the cross-entropy there, above the cross-entropy at x + e_j. (DDN keeps the
    smallest d that misclassifies, so its radius is larger here, for some examples to be misclassified.)"""
    torch.manual_seed(20)
    m, b, epoch = 2, 6, 1
    model, x, y = problem(21, b)
    ctx = context(model, train_salman.METHOD,
                  f"--noise 0.3 --attack {attack} --epsilon {epsilon} --num-steps 3 --warmup 4 --num-noise-vec {m} "
                  + option)
    loss, logged, accuracy = train_salman.batch_loss(ctx, epoch, x, y)
    assert logged is loss
    radius = epsilon / 256 * (epoch + 1) / 4
    copies = x.repeat(m, 1, 1, 1)
    noise = torch.tensor(copies_of(model.attack_calls()[0], x), dtype=torch.float32).reshape(copies.shape)
    attacker = PGD_L2(steps=3, max_norm=radius) if attack == "PGD" else \
        DDN(steps=3, gamma=0.2 if "gamma" in option else 0.05, init_norm=radius, max_norm=radius)
    with Unrecorded(model) as plain:
        attacked = attacker.attack(plain, copies, y, noise=noise, num_noise_vectors=m, no_grad="no-grad" in option)
    training_pass, = model.train_calls()
    assert torch.allclose(training_pass, attacked + noise, atol=1e-6)
    d = (attacked - copies)[:b].flatten(1).norm(dim=1)
    # (DDN rounds x + d to 1/255 steps: up to sqrt(16) / 510 beyond the radius)
    assert d.max().item() > 0.5 * radius and d.max().item() <= radius + 0.01
    weight, bias = model.numpy()
    y_all = y.repeat(m).numpy()
    ce = cross_entropy(logits(weight, bias, (attacked + noise).double().flatten(1).numpy()), y_all).mean()
    ce_gaussian = cross_entropy(logits(weight, bias, (copies + noise).double().flatten(1).numpy()), y_all).mean()
    assert loss.item() == pytest.approx(ce, rel=1e-5)
    assert ce > ce_gaussian
