"""The sampling engine ``core.Smooth``: soundness of CERTIFY and PREDICT, the
Clopper-Pearson bound, the noise, reproducible sampling and the fast paths.

Soundness uses a base classifier whose smoothed classifier is known in closed
form: the two-class linear classifier f(x) = [w.x + b > 0]. Under
x + e, e ~ N(0, sigma^2 I), w.(x + e) + b ~ N(s, sigma^2 |w|^2) with
s = w.x + b, so f's top class has probability pA = Phi(|s| / (sigma |w|)),
g = f, and the largest L2 ball around x on which g is constant has radius
t = |s| / |w|. CERTIFY's radius sigma * PhiInv(pA_lower) exceeds t exactly
when the lower bound exceeds pA. The exact probability of that, and the exact
mean of the radius, follow from the binomial distribution of the count and
the textbook Clopper-Pearson bound (the alpha-quantile of Beta(k, n - k + 1)),
computed here without the code under test.
"""
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta, binom, kstest, norm
from torch import nn

import core
import noise_streams
from architectures import get_architecture
from conftest import REPO
from core import Smooth, chunk_sizes
from noise_streams import noise_generator

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]


# --------------------------------------------------------------------------- independent reference formulas

def cp_lower(k, n, alpha):
    """Textbook one-sided (1 - alpha) Clopper-Pearson lower bound: the alpha-quantile of Beta(k, n - k + 1)."""
    k = np.asarray(k, dtype=float)
    safe = np.maximum(k, 1)
    return np.where(k > 0, beta.ppf(alpha, safe, n - safe + 1), 0.0)


def certify_radius(k, n, alpha, sigma):
    """Radius CERTIFY reports for k top-class samples out of n (0 when it abstains)."""
    lower = cp_lower(k, n, alpha)
    return np.where(lower >= 0.5, sigma * norm.ppf(np.maximum(lower, 0.5)), 0.0)


def exact_certify_law(p, n, alpha, sigma):
    """(P[false certificate], E[radius], SD[radius]) when the top class has probability p."""
    k = np.arange(n + 1)
    pmf = binom.pmf(k, n, p)
    radius = certify_radius(k, n, alpha, sigma)
    false_rate = pmf[cp_lower(k, n, alpha) > p].sum()
    mean = (pmf * radius).sum()
    return false_rate, mean, math.sqrt(max((pmf * radius ** 2).sum() - mean ** 2, 0.0))


def two_sided_binomial_pvalue(n_a, n_b):
    """Two-sided p-value of n_a successes in n_a + n_b fair coin flips, by hand."""
    m, top = n_a + n_b, max(n_a, n_b)
    tail = sum(math.comb(m, j) for j in range(top, m + 1)) / 2 ** m
    return min(1.0, 2 * tail)


# --------------------------------------------------------------------------- base classifiers

W, B, SIGMA = (3.0, -4.0, 0.0), 0.5, 0.5
ON_PLANE = (0.5, 0.5, 0.0)   # 3 * 0.5 - 4 * 0.5 + 0.5 == 0 exactly


class LinearTwoClass(nn.Module):
    """f(x) = [w.x + b > 0] on vectors x, as the logits (-(w.x + b), w.x + b)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor(W))

    def forward(self, x):
        s = x @ self.w + B
        return torch.stack([-s, s], 1)


class Scripted(nn.Module):
    """Ignores its input: the i-th sample it is ever shown gets class ``sequence[i]``."""

    def __init__(self, sequence, num_classes):
        super().__init__()
        self.sequence, self.position, self.num_classes = list(sequence), 0, num_classes

    def forward(self, x):
        end = self.position + x.shape[0]
        assert end <= len(self.sequence), "the engine drew more samples than asked for"
        classes = torch.tensor(self.sequence[self.position:end], device=x.device)
        self.position = end
        return F.one_hot(classes, self.num_classes).float()


class PixelArgmax(nn.Module):
    """Logits are the first five input values: no arithmetic, so each sample's class is exact."""

    def forward(self, x):
        return x.flatten(1)[:, :5]


class Recorder(nn.Module):
    """Keeps every batch it is shown and answers class 0."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros(x.shape[0], 2, device=x.device)


def scripted_sequence(counts, seed=0):
    """A fixed shuffled sequence with counts[c] samples of class c."""
    sequence = np.concatenate([np.full(count, c) for c, count in enumerate(counts)])
    return np.random.default_rng(seed).permutation(sequence).tolist()


def linear_points(p_targets):
    """Points at signed distances sigma * PhiInv(p) from the hyperplane, alternating sides, and their truth."""
    w = np.array(W)
    points = [np.array(ON_PLANE) + (1 if j % 2 == 0 else -1) * SIGMA * norm.ppf(p) * w / np.linalg.norm(w)
              for j, p in enumerate(p_targets)]
    xs = torch.tensor(np.array(points), dtype=torch.float32)
    s = xs.double().numpy() @ w + B
    return xs, (s > 0).astype(int), np.abs(s) / np.linalg.norm(w)


# --------------------------------------------------------------------------- the bound

@pytest.mark.parametrize("k,n,alpha", [(1, 10, 0.05), (7, 10, 0.05), (10, 10, 0.001), (500, 1000, 0.001),
                                       (731, 1000, 0.05), (99990, 100000, 0.001), (55, 100, 0.2)])
def test_lower_confidence_bound_is_the_one_sided_clopper_pearson_bound(k, n, alpha):
    assert Smooth.lower_confidence_bound(k, n, alpha) == pytest.approx(beta.ppf(alpha, k, n - k + 1), abs=1e-10)


def test_lower_confidence_bound_edge_cases():
    assert Smooth.lower_confidence_bound(0, 50, 0.05) == pytest.approx(0.0, abs=1e-12)
    # all n samples in the top class: the bound solves p^n = alpha
    assert Smooth.lower_confidence_bound(100, 100, 0.01) == pytest.approx(0.01 ** (1 / 100), rel=1e-9)


# --------------------------------------------------------------------------- soundness on a linear classifier

P_TARGETS = (0.7, 0.8, 0.9)
RUNS, N0, N, ALPHA = 1000, 100, 1000, 0.05


@pytest.fixture(scope="module")
def linear_certificates():
    """RUNS independent CERTIFY runs at each point of P_TARGETS (one generator per run)."""
    xs, truth, distance = linear_points(P_TARGETS)
    repeated = xs.repeat_interleave(RUNS, 0)
    smooth = Smooth(LinearTwoClass(), 2, SIGMA, images_per_batch=64)
    generators = [noise_generator(2024, i, "cpu") for i in range(len(repeated))]
    results = smooth.certify_many(repeated, N0, N, ALPHA, N, generators)
    predictions = np.array([r[0] for r in results]).reshape(len(P_TARGETS), RUNS)
    radii = np.array([r[1] for r in results]).reshape(len(P_TARGETS), RUNS)
    return predictions, radii, truth, distance


def test_certify_false_certificates_are_rare(linear_certificates):
    """Wrong class or radius beyond the true one: at most alpha of the runs (one-sided binomial test)."""
    predictions, radii, truth, distance = linear_certificates
    false = (predictions != Smooth.ABSTAIN) & ((predictions != truth[:, None]) | (radii > distance[:, None] + 1e-9))
    total, runs = int(false.sum()), false.size
    assert binom.sf(total - 1, runs, ALPHA) > 1e-3, f"{total} false certificates in {runs} runs at alpha={ALPHA}"
    # ... and as often as the exact Clopper-Pearson law says (a bound at another level would be off)
    rates = np.array([exact_certify_law(norm.cdf(t / SIGMA), N, ALPHA, SIGMA)[0] for t in distance])
    expected, sd = RUNS * rates.sum(), math.sqrt((RUNS * rates * (1 - rates)).sum())
    assert abs(total - expected) <= 4 * sd + 1, f"{total} false certificates, expected {expected:.1f} +- {sd:.1f}"


def test_certify_radii_match_their_expected_value(linear_certificates):
    predictions, radii, truth, distance = linear_certificates
    assert (predictions == truth[:, None]).mean() > 0.99   # certifies, and the right class
    for row, t in zip(radii, distance):
        p_a = norm.cdf(t / SIGMA)
        _, mean, sd = exact_certify_law(p_a, N, ALPHA, SIGMA)
        assert abs(row.mean() - mean) <= 4 * sd / math.sqrt(RUNS), (p_a, row.mean(), mean)
        # the median count is within a few counts of N pA, so the median radius is the plug-in value
        expected_count = round(N * p_a)
        low, high = certify_radius([expected_count - 3, expected_count + 3], N, ALPHA, SIGMA)
        assert low <= np.median(row) <= high, (p_a, np.median(row), certify_radius(expected_count, N, ALPHA, SIGMA))


def test_certify_and_predict_abstain_on_the_decision_boundary():
    runs = 600
    xs = torch.tensor([ON_PLANE] * runs)
    smooth = Smooth(LinearTwoClass(), 2, SIGMA, images_per_batch=64)
    certified = smooth.certify_many(xs, N0, N, ALPHA, N, [noise_generator(7, i, "cpu") for i in range(runs)])
    predicted = smooth.predict_many(xs, N, ALPHA, N, [noise_generator(8, i, "cpu") for i in range(runs)])
    not_abstained_certify = sum(c != Smooth.ABSTAIN for c, _ in certified)
    not_abstained_predict = sum(c != Smooth.ABSTAIN for c in predicted)
    # each run answers with probability at most alpha
    assert binom.sf(not_abstained_certify - 1, runs, ALPHA) > 1e-3, not_abstained_certify
    assert binom.sf(not_abstained_predict - 1, runs, ALPHA) > 1e-3, not_abstained_predict
    assert all(r == 0.0 for c, r in certified if c == Smooth.ABSTAIN)


# --------------------------------------------------------------------------- PREDICT and CERTIFY on scripted counts

def test_two_sided_binomial_pvalue_is_scipy_binomtest_bit_for_bit():
    """PREDICT's test (fixed-N and sequential) is scipy's binomtest(k, n, 0.5), the published one, exactly."""
    from scipy.stats import binomtest
    grid = [(k, n) for n in range(1, 121) for k in range(n + 1)]
    grid += [(k, n) for n in (1000, 1001, 99999, 100000) for k in range(0, n + 1, max(1, n // 97))]
    grid += [(n // 2 - d, n) for n in (1001, 100000) for d in (0, 1, 2, 50)]
    k, n = np.array(grid).T
    expected = np.array([binomtest(int(a), int(b), p=0.5).pvalue for a, b in grid])
    assert np.array_equal(core.two_sided_binomial_pvalue(k, n), expected)
    assert np.array_equal(core.two_sided_binomial_pvalue(np.zeros(3), np.zeros(3)), np.ones(3))   # no trials
    import sequential
    assert sequential.two_sided_binomial_pvalue is core.two_sided_binomial_pvalue


@pytest.mark.parametrize("counts,alpha", [
    ([50, 50], 0.05),             # tie: p-value 1
    ([60, 40], 0.05),             # p = 0.057: abstain
    ([60, 40], 0.10),             # same counts, larger alpha: predict
    ([39, 61], 0.05),             # p = 0.035: predict class 1
    ([0, 45, 40, 15], 0.05),      # only the top two classes enter the test: abstain
    ([0, 60, 25, 15], 0.01),      # 60 of 85 (p = 0.0002): predict, though 60 of 100 would abstain
    ([0, 0, 100], 0.001),
    ([3, 30, 0, 0, 67], 0.001),
    ([0, 5], 0.0625),             # p = 2 / 2^5 = alpha exactly: the published rule abstains only above alpha
])
def test_predict_binomial_test_on_scripted_counts(counts, alpha):
    n = sum(counts)
    smooth = Smooth(Scripted(scripted_sequence(counts), len(counts)), len(counts), SIGMA)
    result = smooth.predict(torch.zeros(3), n, alpha, batch_size=30)
    top_two = sorted(counts, reverse=True)[:2]
    expected = Smooth.ABSTAIN if two_sided_binomial_pvalue(*top_two) > alpha else int(np.argmax(counts))
    assert result == expected
    assert smooth.base_classifier.position == n


def test_certify_on_scripted_counts_uses_selection_then_estimation_samples():
    n0, n, alpha = 10, 100, 0.01
    # selection: class 3; estimation: 90 of class 3
    sequence = [3] * n0 + scripted_sequence([0, 10, 0, 90])
    smooth = Smooth(Scripted(sequence, 4), 4, SIGMA)
    c_a, radius = smooth.certify(torch.zeros(3), n0, n, alpha, batch_size=32)
    assert c_a == 3 and radius == pytest.approx(SIGMA * norm.ppf(beta.ppf(alpha, 90, 11)), rel=1e-9)
    assert smooth.base_classifier.position == n0 + n
    # every estimation sample in the selected class: pA_lower = alpha^(1/n)
    smooth = Smooth(Scripted([2] * (n0 + n), 4), 4, SIGMA)
    assert smooth.certify(torch.zeros(3), n0, n, alpha, 32) == (2, pytest.approx(SIGMA * norm.ppf(alpha ** (1 / n))))
    # the class is chosen from the selection samples only, even when the estimation favours another
    smooth = Smooth(Scripted(scripted_sequence([0, 6, 0, 4]) + [3] * n, 4), 4, SIGMA)
    assert smooth.certify(torch.zeros(3), n0, n, alpha, 32) == (Smooth.ABSTAIN, 0.0)


def test_certify_abstains_exactly_below_one_half():
    n, alpha = 200, 0.001
    k_star = next(k for k in range(n + 1) if beta.ppf(alpha, k, n - k + 1) >= 0.5)
    for k, certified in [(k_star, True), (k_star - 1, False)]:
        smooth = Smooth(Scripted([1] * 5 + scripted_sequence([n - k, k]), 2), 2, SIGMA)
        c_a, radius = smooth.certify(torch.zeros(3), 5, n, alpha, 64)
        assert (c_a == 1) == certified and (radius > 0) == certified


def test_sample_counts_are_the_class_histogram():
    counts = [5, 0, 17, 333, 45]
    smooth = Smooth(Scripted(scripted_sequence(counts), 5), 5, SIGMA)
    assert smooth.sample_counts(torch.zeros(2), sum(counts), batch_size=64).tolist() == counts
    smooth = Smooth(Scripted(scripted_sequence(counts), 5), 5, SIGMA)
    assert smooth._sample_noise(torch.zeros(2), sum(counts), 1000).tolist() == counts


# --------------------------------------------------------------------------- the noise

def test_noise_is_x_plus_gaussian_with_sd_sigma_and_fresh_in_every_chunk():
    recorder = Recorder()
    smooth = Smooth(recorder, 2, 0.7)
    x = torch.rand(3, 8, 8)
    smooth.sample_counts(x, 3000, 1000, noise_generator(1, 0, "cpu"))
    noise = (torch.cat(recorder.seen) - x) / 0.7
    assert noise.shape == (3000, 3, 8, 8)
    z = noise.flatten().double()
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    assert kstest(z[:20000].numpy(), "norm").pvalue > 1e-4
    # no sample repeats another's noise (chunks and images draw fresh values)
    flat = noise.flatten(1)
    assert torch.unique(flat[:, 0]).numel() == 3000
    # consecutive samples, and the same pixel across samples, are uncorrelated
    for a, b in [(flat[:-1].flatten(), flat[1:].flatten()), (flat[:, :-1].flatten(), flat[:, 1:].flatten())]:
        correlation = torch.corrcoef(torch.stack([a, b]).double())[0, 1].item()
        assert abs(correlation) < 5 / math.sqrt(a.numel())


def test_forward_passes_take_at_most_forward_batch_samples():
    recorder = Recorder()
    smooth = Smooth(recorder, 2, 0.5, forward_batch=100, images_per_batch=2)
    smooth.sample_counts_many(torch.zeros(2, 3, 4, 4), 1000, 300)
    sizes = [batch.shape[0] for batch in recorder.seen]
    assert max(sizes) == 100 and sum(sizes) == 2000
    assert all(batch.is_contiguous(memory_format=torch.channels_last) for batch in recorder.seen)
    recorder = Recorder()
    Smooth(recorder, 2, 0.5).sample_counts(torch.zeros(1, 4, 4), 5000, 5000)
    assert max(batch.shape[0] for batch in recorder.seen) == core.CPU_FORWARD_BATCH_PER_THREAD * torch.get_num_threads()


def test_selection_and_estimation_noise_are_different_draws():
    recorder = Recorder()
    Smooth(recorder, 2, 0.5).certify(torch.zeros(1, 4, 4), 50, 50, 0.01, 50, noise_generator(3, 0, "cpu"))
    first, second = recorder.seen
    assert not torch.equal(first, second)


def test_certify_and_predict_draw_all_their_noise_from_the_generator_given():
    """Selection and estimation samples alike: the same generator gives the same noise whatever torch's global
    generator holds."""
    seen = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        recorder = Recorder()
        smooth = Smooth(recorder, 2, 0.5)
        smooth.certify(torch.zeros(1, 4, 4), 30, 40, 0.01, 50, noise_generator(3, 0, "cpu"))
        smooth.predict(torch.zeros(1, 4, 4), 20, 0.01, 50, noise_generator(4, 0, "cpu"))
        seen.append(recorder.seen)
    assert len(seen[0]) == 3 and all(torch.equal(a, b) for a, b in zip(*seen))


# --------------------------------------------------------------------------- reproducibility

def test_chunk_sizes_and_noise_generator():
    assert chunk_sizes(1000, 130) == [130] * 7 + [90]
    assert chunk_sizes(1000, 1000) == [1000]
    assert chunk_sizes(5, 10) == [5]
    a = torch.randn(5, generator=noise_generator(11, 3, "cpu"))
    assert torch.equal(a, torch.randn(5, generator=noise_generator(11, 3, "cpu")))
    assert not torch.equal(a, torch.randn(5, generator=noise_generator(11, 4, "cpu")))
    assert not torch.equal(a, torch.randn(5, generator=noise_generator(12, 3, "cpu")))


def test_former_noise_collision_is_gone():
    """With --seed 2, training images 1410 and 40185 drew byte-identical noise (32 bits of the seed kept)."""
    def former_seed(seed, index):
        state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
        return (int(state[0]) << 31) ^ int(state[1])

    former = [torch.randn(1000, generator=torch.Generator().manual_seed(former_seed(2, i))) for i in (1410, 40185)]
    assert torch.equal(*former)   # the collision this test is about
    now = [torch.randn(1000, generator=noise_generator(2, i, "cpu")) for i in (1410, 40185)]
    assert not torch.equal(*now)


def test_cpu_stream_is_mt19937_with_its_whole_state_from_the_seed_sequence():
    """The documented construction: numpy's MT19937 with the same 624-word key gives torch's CPU stream."""
    for seed, index, key in [(2, 1410, ()), (0, 0, ()), (2 ** 100 + 7, 123456789, (5, 2 ** 90))]:
        words = np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key + (index,))).random_raw(312)
        words = words.view(np.uint32).copy()
        words[0] = 0x80000000
        reference = np.random.MT19937()
        reference.state = {"bit_generator": "MT19937", "state": {"key": words, "pos": 624}}
        expected = reference.random_raw(64)[1::2] % 2 ** 31   # torch draws 64 bits, keeps the low 31 here
        drawn = torch.randint(0, 2 ** 31, (32,), generator=noise_generator(seed, index, "cpu", key))
        np.testing.assert_array_equal(drawn.numpy(), expected.astype(np.int64))


def test_a_key_changes_the_stream():
    base = torch.randn(64, generator=noise_generator(3, 7, "cpu"))
    assert torch.equal(base, torch.randn(64, generator=noise_generator(3, 7, "cpu", ())))
    assert not torch.equal(base, torch.randn(64, generator=noise_generator(3, 7, "cpu", (1,))))
    assert not torch.equal(torch.randn(64, generator=noise_generator(3, 7, "cpu", (1,))),
                           torch.randn(64, generator=noise_generator(3, 7, "cpu", (2,))))


def test_an_unknown_generator_state_layout_fails_loudly(monkeypatch):
    monkeypatch.setattr(noise_streams, "_cpu_state_template", None)
    monkeypatch.setattr(noise_streams, "_OFFSET_WORDS", 32)
    with pytest.raises(RuntimeError, match="layout"):
        noise_generator(0, 0, "cpu")


def first_values(pairs):
    """The first two normal draws of each (seed, idx) stream, as bytes."""
    return [torch.randn(2, generator=noise_generator(seed, idx, "cpu")).numpy().tobytes() for seed, idx in pairs]


def test_no_duplicate_stream_among_100k_pairs():
    """10 seeds x 10^4 images (the former 32-bit streams collided here with probability 0.69)."""
    pairs = [(seed, idx) for seed in range(10) for idx in range(10 ** 4)]
    assert len(set(first_values(pairs))) == len(pairs)


@pytest.mark.slow
def test_no_duplicate_stream_among_a_million_pairs():
    """5 seeds x 2 10^5 images: the former 32-bit streams gave about 116 duplicates here."""
    pairs = [(seed, idx) for seed in range(5) for idx in range(2 * 10 ** 5)]
    assert len(set(first_values(pairs))) == len(pairs)


def _generators(seed, indices, device):
    return [noise_generator(seed, i, device) for i in indices]


@pytest.mark.parametrize("device", DEVICES)
def test_counts_depend_only_on_seed_and_index(device):
    torch.manual_seed(0)
    xs = torch.rand(7, 3, 4, 4, device=device)
    num, batch = 1000, 130

    def counts(indices, **options):
        smooth = Smooth(PixelArgmax(), 5, 0.3, **options)
        return smooth.sample_counts_many(xs[indices], num, batch, _generators(5, indices, device))

    # reference: each image alone, one call per image
    alone = Smooth(PixelArgmax(), 5, 0.3)
    reference = np.stack([alone.sample_counts(xs[i], num, batch, noise_generator(5, i, device)) for i in range(7)])
    assert len({tuple(row) for row in reference}) == 7 and (reference > 0).sum() > 14   # varied counts
    everyone = list(range(7))
    for images_per_batch in (1, 3, 7):
        for forward_batch in (None, 17, 1000):
            result = counts(everyone, images_per_batch=images_per_batch, forward_batch=forward_batch)
            assert np.array_equal(result, reference), (images_per_batch, forward_batch)
    # other groupings: two calls, or the images in another order
    assert np.array_equal(np.concatenate([counts([0, 1], images_per_batch=2), counts([2, 3, 4, 5, 6],
                                                                                  images_per_batch=3)]), reference)
    order = [6, 2, 0, 5, 1, 4, 3]
    assert np.array_equal(counts(order, images_per_batch=4), reference[order])
    # same seed and index: same counts; another seed: other counts
    again = Smooth(PixelArgmax(), 5, 0.3).sample_counts_many(xs, num, batch, _generators(5, everyone, device))
    assert np.array_equal(again, reference)
    other = Smooth(PixelArgmax(), 5, 0.3).sample_counts_many(xs, num, batch, _generators(6, everyone, device))
    assert not np.array_equal(other, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_certify_many_equals_certify_per_image(device):
    torch.manual_seed(1)
    xs = torch.rand(4, 3, 4, 4, device=device) * 0.4
    xs[:2, 0, 0, 0] = 1.0   # class 0 clearly on top for two images
    smooth = Smooth(PixelArgmax(), 5, 0.3, images_per_batch=3)
    many = smooth.certify_many(xs, 50, 500, 0.01, 64, _generators(9, range(4), device))
    single = [smooth.certify(xs[i], 50, 500, 0.01, 64, noise_generator(9, i, device)) for i in range(4)]
    assert many == single
    assert any(c != Smooth.ABSTAIN for c, _ in many)
    predicted = smooth.predict_many(xs, 500, 0.01, 64, _generators(9, range(4), device))
    assert predicted == [smooth.predict(xs[i], 500, 0.01, 64, noise_generator(9, i, device)) for i in range(4)]


def test_lenet_counts_do_not_depend_on_grouping():
    torch.manual_seed(3)
    model = get_architecture("lenet", "fmnist", "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)   # varied classes under noise
    xs = torch.rand(5, 1, 28, 28)
    reference = np.stack([Smooth(model, 10, 1.0).sample_counts(xs[i], 600, 250, noise_generator(0, i, "cpu"))
                          for i in range(5)])
    assert (reference > 0).sum() >= 10
    for images_per_batch, forward_batch in [(1, 7), (2, None), (5, 333)]:
        smooth = Smooth(model, 10, 1.0, images_per_batch=images_per_batch, forward_batch=forward_batch)
        result = smooth.sample_counts_many(xs, 600, 250, _generators(0, range(5), "cpu"))
        # batch-size-dependent kernels may round differently; a flipped near-tie at most
        assert np.abs(result - reference).sum() <= 4, (images_per_batch, forward_batch)


# --------------------------------------------------------------------------- fast paths

def test_channels_last_keeps_the_models_values_and_parameters():
    torch.manual_seed(4)
    model = get_architecture("cifar_resnet20", "cifar10", "cpu").eval()
    params = list(model.parameters())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    Smooth(model, 10, 0.25)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert model[1].layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4)
    # a model with 3-D convolutions (5-D weights) and lazy parameters is left as it is
    lazy = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    assert Smooth(lazy, 3, 0.5).sample_counts(torch.rand(1, 4, 4, 4), 20, 8).sum() == 20


def test_bad_arguments():
    with pytest.raises(ValueError):
        Smooth(PixelArgmax(), 5, 0.0)
    with pytest.raises(ValueError):
        Smooth(PixelArgmax(), 5, 0.5, forward_batch=0)
    with pytest.raises(ValueError):
        Smooth(PixelArgmax(), 5, 0.5).sample_counts_many(torch.zeros(2, 5), 10, 5, [None])
    for num, batch_size in ((0, 5), (5, 0)):   # no samples, or batches of none
        with pytest.raises(ValueError):
            Smooth(PixelArgmax(), 5, 0.5).sample_counts(torch.zeros(5), num, batch_size)
    # the least valid settings: one sample, in batches (and forward passes) of one
    assert Smooth(PixelArgmax(), 5, 0.5, forward_batch=1).sample_counts(torch.zeros(5), 1, 1).sum() == 1
    assert Smooth.ABSTAIN == core.Smooth.ABSTAIN == -1


def test_sample_counts_many_checks_batches_fill_and_integer_counts(monkeypatch):
    """The groups of work items fill ``batch_size * images_per_batch`` exactly, never more; the
    counts are integers; one sample in batches of one is accepted, none or batches of none refused."""
    smooth = Smooth(PixelArgmax(), 5, 0.5, images_per_batch=2)
    for num, batch_size in ((0, 4), (4, 0)):
        with pytest.raises(ValueError):
            smooth.sample_counts_many(torch.zeros(2, 5), num, batch_size)
    assert smooth.sample_counts_many(torch.zeros(2, 5), 1, 1).sum(axis=1).tolist() == [1, 1]
    # three single-value images and no generators: one (None) stream per image, not per channel
    counts = smooth.sample_counts_many(torch.zeros(3, 1, 5), 3, 3)
    assert counts.dtype.kind == "i" and counts.sum(axis=1).tolist() == [3, 3, 3]
    totals = []
    original = Smooth._count_batch
    monkeypatch.setattr(Smooth, "_count_batch", lambda self, xs, batch, generators, counts_:
                        totals.append([size for _, size in batch]) or original(self, xs, batch, generators, counts_))
    # chunks of 4, 4 and 1 for each of two images, chunk-major, in groups of at most 2 x 4 samples
    smooth.sample_counts_many(torch.zeros(2, 5), 9, 4)
    assert totals == [[4, 4], [4, 4], [1, 1]]


@pytest.fixture(scope="module")
def trained_lenet():
    """A LeNet trained for a few seconds on noisy Fashion-MNIST, and 20 test images."""
    import os
    from datasets import get_dataset
    root = os.path.join(REPO, "dataset_cache")
    train, test = get_dataset("fmnist", "train", root=root), get_dataset("fmnist", "test", root=root)
    images = train.data[:8000].float().div(255).unsqueeze(1)
    labels = train.targets[:8000]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = get_architecture("lenet", "fmnist", "cpu").to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(150):
        index = torch.randint(0, len(images), (64,), generator=generator)
        noisy = images[index] + 0.25 * torch.randn(64, 1, 28, 28, generator=generator)
        loss = F.cross_entropy(model(noisy), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, test.data[:20].float().div(255).unsqueeze(1), test.targets[:20]


def _top_classes(model, xs, device, **options):
    import copy
    smooth = Smooth(copy.deepcopy(model).to(device), 10, 0.25, images_per_batch=20, **options)
    counts = smooth.sample_counts_many(xs.to(device), 64, 64, _generators(0, range(len(xs)), device))
    return counts.argmax(1)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_agrees_with_fp32_on_a_trained_lenet(trained_lenet, device):
    model, xs, labels = trained_lenet
    fp32 = _top_classes(model, xs, device)
    assert (fp32 == labels.numpy()).mean() >= 0.5 and len(set(fp32.tolist())) >= 4   # a real classifier
    bf16 = _top_classes(model, xs, device, bf16=True)
    assert (bf16 == fp32).sum() >= 17, (bf16, fp32)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_agrees_with_eager_on_a_trained_lenet(trained_lenet, device):
    if device == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on a CPU needs a C++ compiler, and none is installed")
    model, xs, _ = trained_lenet
    eager = _top_classes(model, xs, device)
    # a failure to compile is a failure (a regression of --compile), not a reason to skip
    compiled = _top_classes(model, xs, device, compile=True)
    assert (compiled == eager).sum() >= 19
