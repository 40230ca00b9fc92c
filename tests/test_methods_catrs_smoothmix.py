"""SmoothMix (train_smoothmix.py) and CAT-RS (train_catrs.py): attacks, losses, command lines, runs, learning."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CODE, REPO, python_env

import train_catrs
import train_cohen
import train_smoothmix
from architectures import get_architecture
from checkpoints import load_base_classifier, load_checkpoint
from core import Smooth
from datasets import coverage_path, get_dataset
from attacks import KL_PGD, SmoothMix_PGD, kl_div_per_example, restandardize
from train_catrs import acceptance_probability, attack_radius, catrs_loss, sample_num_accepted
from train_smoothmix import smoothmix_loss, warmup_factor
from train_utils import attack_mode, build_parser, chunk_minibatches

FMNIST_TRAIN_SIZE = 60000


@pytest.fixture(autouse=True)
def data_cache(monkeypatch):
    monkeypatch.setenv("DATASET_CACHE", os.path.join(REPO, "dataset_cache"))


def small_setup(seed=0, batch=6, m=3, sigma=0.25):
    """A randomly initialised LeNet (eval, frozen by the caller), images in [0, 1], soft targets, noises."""
    torch.manual_seed(seed)
    model = get_architecture("lenet", "fmnist", "cpu")
    inputs = torch.rand(batch, 1, 28, 28)
    inputs[0] = 0.0  # an all-black and an all-white image exercise the [0, 1] clipping
    inputs[1] = 1.0
    pi = torch.distributions.Dirichlet(torch.ones(10)).sample((batch,))
    noises = [torch.randn_like(inputs) * sigma for _ in range(m)]
    return model, inputs, pi, noises


def norms(x):
    return x.flatten(1).norm(dim=1)


def uniform_prediction(path, rows=FMNIST_TRAIN_SIZE, classes=10):
    """A smoothed prediction of 1/K everywhere, with a coverage file that says every row was computed."""
    np.save(path, np.full((rows, classes), 1.0 / classes, dtype=np.float32))
    np.save(coverage_path(str(path)), np.ones(rows, dtype=bool))
    return str(path)


# --------------------------------------------------------------------------- KL-PGD (CAT-RS)

def test_restandardize_matches_closed_form():
    torch.manual_seed(1)
    noise = torch.randn(5, 1, 6, 6) * 0.7 + torch.linspace(-0.3, 0.4, 5).view(5, 1, 1, 1)
    mean0 = torch.tensor([0.1, -0.2, 0.0, 0.05, 0.3]).view(5, 1, 1, 1)
    rms0 = torch.tensor([0.5, 0.25, 1.0, 0.3, 0.6]).view(5, 1, 1, 1)
    out = restandardize(noise, mean0, rms0)
    for i in range(5):
        values = noise[i].flatten().tolist()
        d = len(values)
        mu = sum(values) / d
        r = math.sqrt(sum(v * v for v in values) / d)
        expected = [mean0[i].item() + rms0[i].item() * (v - mu) / r for v in values]
        assert out[i].flatten().tolist() == pytest.approx(expected, abs=1e-5)
        # the pixel mean is restored exactly
        assert out[i].mean().item() == pytest.approx(mean0[i].item(), abs=1e-6)


def test_chunk_minibatches_splits_consecutively_and_drops_the_remainder():
    x, y = torch.arange(11), torch.arange(11) * 10
    chunks = list(chunk_minibatches((x, y), 3))
    assert [c[0].tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [c[1].tolist() for c in chunks] == [[0, 10, 20], [30, 40, 50], [60, 70, 80]]
    assert list(chunk_minibatches((x[:2], y[:2]), 3)) == []


def test_kl_div_per_example_matches_definition():
    logits = torch.tensor([[1.0, -0.5, 2.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[0.2, 0.0, 0.8], [0.5, 0.25, 0.25]])
    got = kl_div_per_example(logits, target).tolist()
    for row, (lr, tr) in enumerate(zip(logits.tolist(), target.tolist())):
        z = sum(math.exp(v) for v in lr)
        expected = sum(t * math.log(t / (math.exp(v) / z)) for t, v in zip(tr, lr) if t > 0)
        assert got[row] == pytest.approx(expected, rel=1e-5)


def test_kl_pgd_keeps_mean_and_rms_raises_kl_and_stays_in_ball():
    model, inputs, pi, noises = small_setup()
    m, eps, steps = len(noises), 1.0, 4
    with attack_mode(model):
        attacked = KL_PGD(steps, max_norm=eps).attack(model, inputs, pi, noises)
        start, end = torch.cat(noises), torch.cat(attacked)
        assert end.shape == start.shape and len(attacked) == m

        def mean_kl(noise):
            kl = kl_div_per_example(model(inputs.repeat(m, 1, 1, 1) + noise), pi.repeat(m, 1))
            return kl.view(m, -1).mean(0)
        before, after = mean_kl(start), mean_kl(end)
    assert torch.all(after > before), (before, after)
    # each noise sample keeps its pixel mean and (up to O(mean^2 / rms^2) ~ 1/784) its root mean square
    assert torch.allclose(end.flatten(1).mean(1), start.flatten(1).mean(1), atol=1e-6)
    rms_start, rms_end = start.flatten(1).pow(2).mean(1).sqrt(), end.flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(rms_end, rms_start, rtol=2e-3)
    # the change is clipped to eps before re-standardisation, which moves it by a hair;
    # the steps (2 eps / T each) would otherwise carry it up to 2 eps
    change = norms(end - start)
    assert change.max().item() <= eps * 1.01
    assert change.min().item() >= 0.9 * eps


def test_kl_pgd_radius_scales_the_change():
    model, inputs, pi, noises = small_setup(seed=3)
    with attack_mode(model):
        small = torch.cat(KL_PGD(2, max_norm=0.25).attack(model, inputs, pi, noises))
        unchanged = torch.cat(KL_PGD(0, max_norm=0.25).attack(model, inputs, pi, noises))
    start = torch.cat(noises)
    assert norms(small - start).max().item() <= 0.25 * 1.01
    assert norms(small - start).min().item() >= 0.2
    assert torch.equal(unchanged, start)


def test_attack_radius_and_lr_multiplier():
    args = build_parser(train_catrs.METHOD).parse_args(["fmnist", "lenet", "--eps", "128", "--warmup", "3",
                                                        "--lr_drop", "5", "--gamma", "0.2"])
    assert [attack_radius(args, e) for e in (0, 2, 3, 10)] == [0.5, 0.5, 1.0, 1.0]
    assert [train_catrs.lr_multiplier(args, e) for e in (0, 4, 5, 9)] == [1.0, 1.0, 0.2, 0.2]


# --------------------------------------------------------------------------- CAT-RS loss and K

def hand_catrs(logits_clean, logits_adv, targets, pi, ks, lbd):
    """Independent computation with explicit loops over examples and copies."""
    m, b, k = len(logits_clean), len(targets), len(pi[0])

    def log_softmax(row):
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        return [v - log_z for v in row]

    total, lows = 0.0, []
    for i in range(b):
        ces = sorted(-log_softmax(logits_clean[j][i])[targets[i]] for j in range(m))
        low = sum(ces[:ks[i]]) / m
        kls = []
        for j in range(m):
            logp = log_softmax(logits_adv[j][i])
            kls.append(sum(pi[i][c] * (math.log(pi[i][c]) - logp[c]) for c in range(k) if pi[i][c] > 0))
        high = max(kls)
        total += low + (lbd * high if ks[i] == m else 0.0)
        lows.append(low)
    return total / b, lows


def test_catrs_loss_matches_hand_computation():
    torch.manual_seed(4)
    m, b, k, lbd = 3, 5, 4, 0.7
    logits_clean = torch.randn(m, b, k) * 2
    logits_adv = torch.randn(m, b, k) * 2
    targets = torch.tensor([0, 3, 1, 2, 1])
    pi = torch.tensor([[0.7, 0.1, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0],
                       [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
    ks = torch.tensor([1, 3, 2, 3, 3])  # K < m and K == m
    loss, low = catrs_loss(logits_clean, logits_adv, targets, pi, ks, lbd)
    expected, expected_low = hand_catrs(logits_clean.tolist(), logits_adv.tolist(), targets.tolist(),
                                        pi.tolist(), ks.tolist(), lbd)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert low.tolist() == pytest.approx(expected_low, rel=1e-5)
    # lists of m copies give the same loss
    loss_list, _ = catrs_loss(list(logits_clean), list(logits_adv), targets, pi, ks, lbd)
    assert loss_list.item() == pytest.approx(loss.item(), rel=1e-6)
    # with every K < m the high-confidence term is off: lbd does not matter
    few = torch.tensor([1, 2, 2, 1, 2])
    assert catrs_loss(logits_clean, logits_adv, targets, pi, few, 0.0)[0].item() == pytest.approx(
        catrs_loss(logits_clean, logits_adv, targets, pi, few, 50.0)[0].item())


def test_acceptance_probability_is_vote_share_or_pi():
    # m = 4 copies, b = 3 examples, K = 3 classes; argmax per copy chosen by hand
    winners = [[0, 1, 2], [0, 1, 1], [1, 1, 2], [0, 2, 2]]  # winners[j][i]
    logits = torch.full((4, 3, 3), -1.0)
    for j in range(4):
        for i in range(3):
            logits[j, i, winners[j][i]] = 5.0
    targets = torch.tensor([0, 1, 0])
    pi = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]])
    votes = acceptance_probability(logits, targets, pi, confidence_mask=False)
    assert votes.tolist() == pytest.approx([3 / 4, 3 / 4, 0.0])
    confidence = acceptance_probability(logits, targets, pi, confidence_mask=True)
    assert confidence.tolist() == pytest.approx([0.6, 0.7, 0.05])


def test_binomial_k_sampling():
    torch.manual_seed(5)
    m = 4
    assert torch.all(sample_num_accepted(torch.ones(1000), m) == m)
    assert torch.all(sample_num_accepted(torch.zeros(1000), m) == 1)  # K = 0 clamped to 1
    n = 40000
    k = sample_num_accepted(torch.full((n,), 0.5), m)
    # P(K = k) for Binomial(4, 1/2) with K = 0 folded into K = 1: 2/16, 6/16, 4/16, 1/16
    frequencies = torch.bincount(k, minlength=m + 1).double() / n
    expected = [0.0, 5 / 16, 6 / 16, 4 / 16, 1 / 16]
    for observed, p in zip(frequencies.tolist(), expected):
        assert abs(observed - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12


# --------------------------------------------------------------------------- SmoothMix

def test_smoothmix_attack_stays_in_its_balls():
    model, inputs, _, noises = small_setup(seed=6, m=2)
    labels = torch.randint(0, 10, (inputs.shape[0],))
    with attack_mode(model):
        init, adv = SmoothMix_PGD(steps=5, mix_step=3, alpha=0.5, maxnorm_s=0.3, maxnorm=0.8).attack(
            model, inputs, labels, noises)
        for x in (init, adv):
            assert x.min().item() >= 0.0 and x.max().item() <= 1.0
        assert norms(init - inputs).max().item() <= 0.3 + 1e-5
        assert norms(adv - inputs).max().item() <= 0.8 + 1e-5
        assert norms(adv - inputs)[2:].min().item() >= 0.75  # the ball is reached, not undershot
        # default maxnorm_s = alpha * mix_step; mix_step 0 keeps init = x
        attacker = SmoothMix_PGD(steps=3, mix_step=2, alpha=0.2)
        assert attacker.maxnorm_s == pytest.approx(0.4)
        init, _ = attacker.attack(model, inputs, labels, noises)
        assert norms(init - inputs).max().item() <= 0.4 + 1e-5
        init, adv = SmoothMix_PGD(steps=2, mix_step=0, alpha=0.5).attack(model, inputs, labels, noises)
        assert torch.equal(init, inputs) and not torch.equal(adv, inputs)


def test_smoothmix_step_is_raw_l2_and_ascends():
    model, _, _, noises = small_setup(seed=7, m=2)
    inputs = torch.full((6, 1, 28, 28), 0.5)  # far from the box: no clipping
    labels = torch.arange(6)
    with attack_mode(model):
        _, adv = SmoothMix_PGD(steps=1, mix_step=0, alpha=0.05).attack(model, inputs, labels, noises)

        def smoothed_ce(x):
            probs = torch.stack([F.softmax(model(x + e), dim=1) for e in noises]).mean(0)
            return -probs.gather(1, labels.view(-1, 1)).log().squeeze(1)
        assert torch.all(smoothed_ce(adv) > smoothed_ce(inputs))
    assert norms(adv - inputs).tolist() == pytest.approx([0.05] * 6, rel=1e-4)


def test_smoothmix_loss_matches_hand_computation():
    torch.manual_seed(8)
    m, b, k, weight = 2, 3, 3, 0.6
    logits_clean = torch.randn(m, b, k) * 2
    logits_mix = torch.randn(m, b, k) * 2
    targets = torch.tensor([0, 1, 2])
    logits_clean[:, 0, 0] += 10.0  # example 0: pbar's top class is its label
    logits_clean[:, 1, 0] += 10.0  # example 1: it is not
    lam = torch.tensor([0.1, 0.4, 0.25])
    got = smoothmix_loss(logits_clean, logits_mix, targets, lam, weight).item()

    def softmax(row):
        exps = [math.exp(v - max(row)) for v in row]
        return [e / sum(exps) for e in exps]
    lc, lm, y = logits_clean.tolist(), logits_mix.tolist(), targets.tolist()
    ce = sum(-math.log(softmax(lc[j][i])[y[i]]) for j in range(m) for i in range(b)) / (m * b)
    mix_total = 0.0
    for i in range(b):
        pbar = [sum(softmax(lc[j][i])[c] for j in range(m)) / m for c in range(k)]
        if max(range(k), key=lambda c: pbar[c]) != y[i]:
            continue
        target = [(1 - lam[i].item()) * pbar[c] + lam[i].item() / k for c in range(k)]
        for j in range(m):
            p = softmax(lm[j][i])
            mix_total += sum(t * (math.log(t) - math.log(q)) for t, q in zip(target, p))
    expected = ce + weight * mix_total / (m * b)
    assert got == pytest.approx(expected, rel=1e-5)


def test_warmup_factor():
    assert [warmup_factor(e, 10) for e in (0, 4, 9, 20)] == pytest.approx([0.1, 0.5, 1.0, 1.0])


# --------------------------------------------------------------------------- command lines and run folders

FAST = ["--epochs", "1", "--train-subset", "64", "--test-subset", "64", "--workers", "0"]
SMOOTHMIX_CIFAR = ("cifar10 cifar_resnet110 --lr 0.1 --lr_step_size 50 --epochs 150 --noise 0.5 --num-noise-vec 2 "
                   "--num-steps 4 --alpha 1.0 --mix_step 1 --eta 5.0 --id 0")
CATRS_CIFAR = ("cifar10 cifar_resnet110 --lr 0.1 --lr_step_size 50 --epochs 150 --num-noise-vec 4 --noise 0.25 "
               "--id 0 --eps 256.0 --num-steps 4 --lbd 0.5")
CATRS_IMAGENET = ("imagenet resnet50 --lr 0.1 --lr_step_size 30 --epochs 90 --batch 256 --num_noise_vec 2 --noise 1.0 "
                  "--id 0 --eps 256.0 --num-steps 1 --lbd 2.0 --lr_drop 85 --warmup 80 --confidence_mask")


def on_fmnist(command):
    words = command.split()
    return ["fmnist", "lenet"] + words[2:]


def run_folders(logdir):
    found = []
    for root, _, files in os.walk(logdir):
        if "log.txt" in files:
            found.append(os.path.relpath(root, logdir))
    return found


def test_published_smoothmix_command_names_its_folder(tmp_path):
    train_smoothmix.main(on_fmnist(SMOOTHMIX_CIFAR) + FAST + ["--logdir", str(tmp_path)])
    assert run_folders(tmp_path) == ["fmnist/smix_1.0_4_m1/eta_5.0/num_2/noise_0.5/lenet/0"]


def test_smoothmix_folder_names_optional_parts():
    parser = build_parser(train_smoothmix.METHOD)
    args = parser.parse_args(["fmnist", "lenet", "--noise", "0.25"])
    assert (args.epochs, args.lr_step_size, args.warmup) == (150, 50, 10)
    assert train_smoothmix.METHOD.method_path(args) == "smix_1.0_8_m0/eta_1.0/num_1/noise_0.25"
    args = parser.parse_args(["fmnist", "lenet", "--noise", "0.25", "--maxnorm_s", "0.5", "--maxnorm", "2"])
    assert train_smoothmix.METHOD.method_path(args) == "smix_1.0_8_m0_ms0.5_max2.0/eta_1.0/num_1/noise_0.25"
    args = parser.parse_args(["fmnist", "lenet", "--noise", "0.25", "--maxnorm_s", "1", "--mix_step", "2"])
    assert train_smoothmix.METHOD.method_path(args) == "smix_1.0_8_m2_ms1.0/eta_1.0/num_1/noise_0.25"
    assert train_smoothmix.base_maxnorm_s(args) == 1.0      # given, not alpha * mix_step
    args = parser.parse_args(["fmnist", "lenet", "--noise", "1.0", "--maxnorm", "4", "--alpha", "2", "--eta", "5"])
    assert train_smoothmix.METHOD.method_path(args) == "smix_2.0_8_m0_max4.0/eta_5.0/num_1/noise_1.0"


def test_published_catrs_command_names_its_folder(tmp_path):
    prediction = uniform_prediction(tmp_path / "pi.npy")
    logdir = tmp_path / "logs"
    train_catrs.main(on_fmnist(CATRS_CIFAR) + FAST + ["--logdir", str(logdir), "--smooth-prediction", prediction])
    assert run_folders(logdir) == ["fmnist/catrs/adv_256.0_4/lbd_0.5/num_4/noise_0.25/lenet/0"]


def test_catrs_defaults_and_published_default_epsilon():
    args = build_parser(train_catrs.METHOD).parse_args(["fmnist", "lenet", "--noise", "0.25"])
    assert (args.num_noise_vec, args.num_steps, args.lbd, args.confidence_mask) == (4, 4, 1.0, False)
    assert (args.lr_drop, args.warmup, args.epochs, args.lr_step_size) == (10000, 10000, 90, 30)
    # the published default is the int 256, so the default folder reads adv_256_4
    assert train_catrs.METHOD.method_path(args) == "catrs/adv_256_4/lbd_1.0/num_4/noise_0.25"
    assert train_catrs.METHOD.train_split(args) == "train_t0.25"


def test_published_imagenet_catrs_command_parses(capsys):
    parser = build_parser(train_catrs.METHOD)
    args = parser.parse_args(CATRS_IMAGENET.split())
    assert (args.dataset, args.arch, args.batch, args.epochs) == ("imagenet", "resnet50", 256, 90)
    assert args.lr_step_size == 30
    assert (args.num_noise_vec, args.noise_sd, args.epsilon, args.num_steps, args.lbd) == (2, 1.0, 256.0, 1, 2.0)
    assert (args.lr_drop, args.warmup, args.confidence_mask, args.id) == (85, 80, True, 0)
    assert train_catrs.METHOD.method_path(args) == "catrs/adv_256.0_1/lbd_2.0/num_2/noise_1.0"
    assert train_catrs.METHOD.train_split(args) == "train_t1.0"
    assert [attack_radius(args, e) for e in (79, 80)] == [1.0, 2.0]
    assert [train_catrs.METHOD.lr_multiplier(args, e) for e in (84, 85)] == [1.0, 0.1]


@pytest.mark.parametrize("problem", ["missing", "rows", "classes", "subset-sized"])
def test_catrs_refuses_bad_smoothed_prediction(tmp_path, capsys, problem):
    path = tmp_path / "pi.npy"
    if problem == "rows":
        uniform_prediction(path, rows=FMNIST_TRAIN_SIZE - 1)
    elif problem == "classes":
        uniform_prediction(path, classes=9)
    elif problem == "subset-sized":  # rows are indexed by dataset position: a subset still needs all of them
        uniform_prediction(path, rows=256)
    logdir = tmp_path / "logs"
    with pytest.raises(SystemExit) as exit_info:
        train_catrs.main(["fmnist", "lenet", "--noise", "0.25", "--epochs", "1", "--train-subset", "256",
                          "--logdir", str(logdir), "--smooth-prediction", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert str(path) in err and "train_cohen.py" in err and "smooth_prediction.py" in err
    assert not logdir.exists()


@pytest.mark.parametrize("coverage", ["file", "published"])
def test_catrs_refuses_a_smoothed_prediction_that_lacks_images_it_uses(tmp_path, capsys, coverage):
    """smooth_prediction.py --max 100 pads the other rows with 1/K: training on them must not start."""
    path = tmp_path / "pi.npy"
    prediction = np.full((FMNIST_TRAIN_SIZE, 10), 0.1)
    prediction[:100] = np.random.default_rng(0).dirichlet(np.ones(10), 100)
    np.save(path, prediction)
    if coverage == "file":
        np.save(tmp_path / "pi.covered.npy", np.arange(FMNIST_TRAIN_SIZE) < 100)
    logdir = tmp_path / "logs"
    command = ["fmnist", "lenet", "--noise", "0.25", "--epochs", "1", "--test-subset", "64", "--workers", "0",
               "--num-noise-vec", "1", "--num-steps", "1", "--logdir", str(logdir), "--smooth-prediction", str(path)]
    for subset in ([], ["--train-subset", "101"]):
        with pytest.raises(SystemExit) as exit_info:
            train_catrs.main(command + subset)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err
        lacking = FMNIST_TRAIN_SIZE - 100 if not subset else 1
        assert f"lacks {lacking} of the {100 + lacking} training images" in err and "first: 100" in err
        assert "--train-subset 100" in err and "smooth_prediction.py" in err
        assert ("1/K" in err) == (coverage == "published")
        assert not logdir.exists()
    # the covered images alone are a valid run
    train_catrs.main(command + ["--train-subset", "64"])
    assert logdir.exists()


def test_catrs_default_prediction_path_is_the_sigma_025_gaussian_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_catrs.main(["fmnist", "lenet", "--noise", "0.5", "--epochs", "1", "--logdir", "logs"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "test/smooth_prediction/fmnist/cohen/0/model_conf_0.25_train.npy" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- one epoch each

def read_log(folder):
    with open(os.path.join(folder, "log.txt")) as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "epoch\ttime\tlr\ttrain loss\ttrain acc\ttestloss\ttest acc"
    return [line.split("\t") for line in lines[1:]]


ONE_EPOCH = ["--epochs", "1", "--train-subset", "256", "--test-subset", "128", "--batch", "64", "--workers", "0",
             "--id", "0", "--lr", "0.01"]


def test_smoothmix_one_epoch(tmp_path):
    train_smoothmix.main(["fmnist", "lenet", "--noise", "0.25", "--num-noise-vec", "2", "--num-steps", "2",
                          "--mix_step", "1", "--logdir", str(tmp_path)] + ONE_EPOCH)
    folder = tmp_path / "fmnist/smix_1.0_2_m1/eta_1.0/num_2/noise_0.25/lenet/0"
    rows = read_log(folder)
    assert len(rows) == 1 and rows[0][0] == "0"
    assert math.isfinite(float(rows[0][3])) and float(rows[0][3]) > 0
    assert float(rows[0][4]) == 0.0  # the published SmoothMix log writes 0.0 for train accuracy
    checkpoint = load_checkpoint(str(folder / "checkpoint.pth.tar"))
    assert checkpoint["epoch"] == 1 and checkpoint["arch"] == "lenet"


def test_catrs_one_epoch_script(tmp_path):
    prediction = uniform_prediction(tmp_path / "pi.npy")
    logdir = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, os.path.join(CODE, "train_catrs.py"), "fmnist", "lenet", "--noise", "0.25",
         "--num_noise_vec", "2", "--eps", "128", "--num-steps", "2", "--lr_drop", "0", "--warmup", "0",
         "--confidence_mask", "--smooth-prediction", prediction, "--logdir", str(logdir)] + ONE_EPOCH,
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    folder = logdir / "fmnist/catrs/adv_128.0_2/lbd_1.0/num_2/noise_0.25/lenet/0"
    rows = read_log(folder)
    assert len(rows) == 1
    assert float(rows[0][2]) == pytest.approx(0.001)  # --lr_drop 0: lr 0.01 times gamma from the start
    assert math.isfinite(float(rows[0][3])) and float(rows[0][3]) > 0
    assert 0.0 <= float(rows[0][4]) <= 100.0
    checkpoint = load_checkpoint(str(folder / "checkpoint.pth.tar"))
    assert checkpoint["epoch"] == 1 and checkpoint["arch"] == "lenet"
    assert os.path.isfile(folder / "code" / "train_catrs.py")


# --------------------------------------------------------------------------- they learn

def test_gaussian_and_catrs_learn(tmp_path):
    """Gaussian training, its smoothed prediction, then CAT-RS: both well above chance (10%) under noise."""
    n, sigma = 1000, 0.25
    common = ["fmnist", "lenet", "--noise", str(sigma), "--epochs", "3", "--train-subset", str(n),
              "--test-subset", "500", "--workers", "0", "--id", "0", "--lr", "0.05", "--seed", "1",
              "--logdir", str(tmp_path / "logs")]
    train_cohen.main(common + ["--batch", "32"])
    gaussian = tmp_path / "logs/fmnist/cohen/noise_0.25/lenet/0"
    model = load_base_classifier(str(gaussian / "checkpoint.pth.tar"), "fmnist", "cpu")
    train_set = get_dataset("fmnist", "train")
    images = torch.stack([train_set[i][0] for i in range(n)])
    labels = np.array([train_set[i][1] for i in range(n)])
    samples = 16
    counts = Smooth(model, 10, sigma, images_per_batch=64).sample_counts_many(images, samples, samples)
    prediction = np.full((FMNIST_TRAIN_SIZE, 10), 0.1, dtype=np.float32)
    prediction[:n] = counts / samples
    assert prediction[np.arange(n), labels].mean() > 0.4  # the Gaussian model's smoothed confidence
    np.save(tmp_path / "pi.npy", prediction)
    train_catrs.main(common + ["--batch", "64", "--num-noise-vec", "2", "--eps", "256.0", "--num-steps", "1",
                               "--smooth-prediction", str(tmp_path / "pi.npy")])
    catrs = tmp_path / "logs/fmnist/catrs/adv_256.0_1/lbd_1.0/num_2/noise_0.25/lenet/0"
    for folder in (gaussian, catrs):
        rows = read_log(folder)
        assert len(rows) == 3
        assert float(rows[-1][6]) > 50.0, (folder, rows)
