"""Statistical soundness of CERTIFY and PREDICT, through certify.py and predict.py.

With a linear two-class base classifier f(x) = [w.x + b > 0], the smoothed
classifier is known in closed form: under x + e, e ~ N(0, sigma^2 I),
w.(x + e) + b ~ N(s, sigma^2 |w|^2) with s = w.x + b, so

    P[f(x + e) = 1] = Phi(s / (sigma |w|)),

g(x) = [s > 0] (g = f), and the largest ball around x on which g is constant
has radius t = |s| / |w|, the distance to the hyperplane. Then
pA = Phi(t / sigma), and CERTIFY's radius sigma * PhiInv(pA_lower) exceeds t
exactly when the Clopper-Pearson bound exceeds pA.

For points at known signed distances t the test computes, from the binomial
distribution and the textbook Clopper-Pearson bound (the alpha-quantile of
Beta(k, N - k + 1)), the exact probability that a certificate is wrong (a
wrong class, or a radius above t) and the exact mean of the printed radius,
and compares them with what ``certify.main`` writes when its model and data
set are replaced by the linear classifier and the synthetic points (the rest
is the real path: options, seeded sampling, bound, radius, TSV).
Soundness: the number of wrong certificates must not exceed what alpha allows
(one-sided binomial test at level 1e-3). Accuracy of the implementation: the
count of wrong certificates and the mean radius must match their exact
expectations within a few standard deviations.
"""
import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm

import certify
import eval_utils
import predict
from core import Smooth
from noise_streams import noise_generator

W = torch.tensor([3.0, -4.0, 0.0, 12.0])   # |w| = 13
B = 0.5
DISTANCES = [0.0, 0.05, 0.15, 0.3, 0.6]


class Linear(torch.nn.Module):
    """Logits (-s, s) with s = w.x + b: class 1 exactly when w.x + b > 0."""

    def forward(self, x):
        s = x.flatten(1) @ W.to(x.dtype) + B
        return torch.stack([-s, s], dim=1)


def points(repeats, seed=0):
    """Images [1 x 1 x 4] at signed distance t from the hyperplane, label [t > 0]; and the t's."""
    rng = np.random.default_rng(seed)
    unit = (W / W.norm()).double().numpy()
    on_plane = -B * unit / float(W.norm())
    images, distances = [], []
    for _ in range(repeats):
        for t in DISTANCES:
            for sign in ((1.0,) if t == 0 else (1.0, -1.0)):
                along = rng.normal(size=4)
                along -= along.dot(unit) * unit   # a random point of the hyperplane...
                x = on_plane + along + sign * t * unit   # ...moved by t along the normal
                images.append(torch.tensor(x, dtype=torch.float32).view(1, 1, 4))
                distances.append(sign * t)
    labels = [int(t > 0) for t in distances]
    return list(zip(images, labels)), np.array(distances)


def printed(radius):
    return np.array([float(f"{r:.3}") for r in radius])


def exact_certify(t, sigma, n0, n, alpha, tolerance):
    """(P[wrong certificate], E[printed radius], Var[printed radius]) for one point at signed distance t."""
    p1 = norm.cdf(t / sigma)                        # P[f(x + e) = 1]
    truth = int(t > 0) if t != 0 else None          # g(x); none on the hyperplane
    p_select1 = binom.sf(n0 // 2, n0, p1)           # class 1 selected iff more than half of the N0 votes
    k = np.arange(n + 1)
    lower = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    radius = np.where(lower >= 0.5, sigma * norm.ppf(np.clip(lower, 0.5, 1)), 0.0)
    shown = printed(radius)
    wrong = prob = mean = second = 0.0
    for c, p_select, p_c in ((1, p_select1, p1), (0, 1 - p_select1, 1 - p1)):
        pmf = binom.pmf(k, n, p_c)
        certified = lower >= 0.5
        bad = certified & ((truth != c) | (shown > abs(t) + tolerance))
        wrong += p_select * pmf[bad].sum()
        mean += p_select * (pmf * shown).sum()
        second += p_select * (pmf * shown ** 2).sum()
        prob += p_select
    assert abs(prob - 1) < 1e-12
    return wrong, mean, second - mean ** 2


def wrong_certificates(predictions, radii, distances, tolerance):
    truth = (distances > 0).astype(int)
    certified = predictions != -1
    on_plane = distances == 0
    return certified & (on_plane | (predictions != truth) | (radii > np.abs(distances) + tolerance))


def check_against_exact(predictions, radii, distances, sigma, n0, n, alpha):
    tolerance = 1e-9
    exact = np.array([exact_certify(t, sigma, n0, n, alpha, tolerance) for t in distances])
    wrong = wrong_certificates(predictions, radii, distances, tolerance)
    # soundness: at most alpha of the certificates are wrong (one-sided binomial test, level 1e-3)
    assert binom.sf(wrong.sum() - 1, len(wrong), alpha) > 1e-3, (wrong.sum(), len(wrong))
    # the number of wrong certificates is what the exact computation expects
    mu, sd = exact[:, 0].sum(), np.sqrt((exact[:, 0] * (1 - exact[:, 0])).sum())
    assert abs(wrong.sum() - mu) <= 4 * sd + 1, (wrong.sum(), mu, sd)
    # the mean radius is what the exact computation expects
    mean, sd_mean = exact[:, 1].mean(), np.sqrt(exact[:, 2].sum()) / len(distances)
    assert abs(radii.mean() - mean) <= 4.5 * sd_mean, (radii.mean(), mean, sd_mean)
    # no radius is far below the truth: N samples pin pA down to a few sqrt(pA (1 - pA) / N)
    far = np.abs(distances) >= sigma   # pA >= 0.84: the N0 votes select the right class
    p_a = norm.cdf(np.abs(distances[far]) / sigma)
    slack = sigma * (norm.ppf(p_a) - norm.ppf(np.maximum(p_a - 6 * np.sqrt(p_a * (1 - p_a) / n), 0.5)))
    assert np.all(radii[far] >= np.abs(distances[far]) - slack - 0.005)
    # on the hyperplane certify abstains in the vast majority of cases
    assert np.mean(predictions[distances == 0] == -1) >= 0.8


@pytest.fixture
def linear_script(monkeypatch, tmp_path):
    """Make certify.py / predict.py evaluate the linear classifier on the synthetic points.

    Returns the points, their distances to the hyperplane, and a checkpoint file to name on the
    command line (its content is recorded in the output's settings; the model comes from ``Linear``).
    """
    data, distances = points(repeats=50)
    monkeypatch.setattr(eval_utils, "get_dataset", lambda dataset, split, *a, **k: data)
    monkeypatch.setattr(eval_utils, "load_base_classifier", lambda path, dataset, device, **_: Linear().to(device))
    checkpoint = tmp_path / "linear.pth.tar"
    torch.save({"arch": "linear", "state_dict": Linear().state_dict()}, checkpoint)
    return data, distances, str(checkpoint)


def read_columns(path, *columns):
    with open(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        rows = [line.rstrip("\n").split("\t") for line in handle]
    return [np.array([float(row[header.index(c)]) for row in rows]) for c in columns]


def test_certify_script_is_sound_on_a_linear_classifier(linear_script, tmp_path):
    data, distances, checkpoint = linear_script
    sigma, n0, n, alpha = 0.25, 100, 1000, 0.05
    out = tmp_path / "certify.tsv"
    certify.main(["fmnist", checkpoint, str(sigma), str(out), f"--N0={n0}", f"--N={n}", f"--alpha={alpha}",
                  "--batch=1000", "--seed=3"])
    idx, predictions, radii = read_columns(out, "idx", "predict", "radius")
    assert list(idx) == list(range(len(data)))
    check_against_exact(predictions.astype(int), radii, distances, sigma, n0, n, alpha)


def test_predict_script_abstains_on_the_hyperplane(linear_script, tmp_path):
    data, distances, checkpoint = linear_script
    sigma, n, alpha = 0.25, 400, 0.05
    out = tmp_path / "predict.tsv"
    predict.main(["fmnist", checkpoint, str(sigma), str(out), f"--N={n}", f"--alpha={alpha}", "--seed=4",
                  "--batch=400"])
    predictions, = read_columns(out, "predict")
    truth = (distances > 0).astype(int)
    # on the hyperplane a prediction is an error; PREDICT makes one with probability at most alpha
    on_plane = distances == 0
    errors = int(np.sum(predictions[on_plane] != -1))
    assert binom.sf(errors - 1, on_plane.sum(), alpha) > 1e-3
    assert np.mean(predictions[on_plane] == -1) >= 0.8
    # elsewhere a non-abstaining prediction is g(x) but with probability alpha, and far points are predicted
    off = ~on_plane
    wrong = int(np.sum((predictions[off] != -1) & (predictions[off] != truth[off])))
    assert binom.sf(wrong - 1, off.sum(), alpha) > 1e-3
    far = np.abs(distances) >= 0.3
    assert np.mean(predictions[far] == truth[far]) >= 0.95


def test_smooth_certify_is_sound_on_a_linear_classifier():
    """The same check on core.Smooth directly, with other parameters."""
    sigma, n0, n, alpha = 0.5, 50, 500, 0.02
    data, distances = points(repeats=40, seed=1)
    smooth = Smooth(Linear(), 2, sigma, images_per_batch=8)
    xs = torch.stack([x for x, _ in data])
    generators = [noise_generator(7, i, "cpu") for i in range(len(data))]
    results = smooth.certify_many(xs, n0, n, alpha, 500, generators)
    predictions = np.array([c for c, _ in results])
    radii = printed([r for _, r in results])
    check_against_exact(predictions, radii, distances, sigma, n0, n, alpha)
