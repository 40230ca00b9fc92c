"""The attack classes built as the published training scripts build them.

The call sites are those of the published code: CAT-RS's ``train_catrs.py`` builds
``KL_PGD(steps=..., device=device, max_norm=...)`` and attacks with ``noises=``; the SmoothAdv
training script (``train_salman.py``) that uses ``third_party/smoothadv.py`` builds
``PGD_L2(steps=..., device=device, max_norm=...)`` and
``DDN(steps=..., device=device, max_norm=..., init_norm=..., gamma=...)``, sets ``max_norm`` and
``init_norm`` to a NumPy scalar at each epoch, and attacks with ``noise=``, ``num_noise_vectors=``
and ``no_grad=``. Each must run and give what the project's own construction gives (``device`` and
``random_start`` change nothing), and the positional order must be the published one.
"""
import numpy as np
import torch

from architectures import get_architecture
from attacks import DDN, KL_PGD, PGD_L2
from train_utils import attack_mode

DEVICE = torch.device("cpu")


def setup(seed=0, batch=4):
    torch.manual_seed(seed)
    model = get_architecture("lenet", "fmnist", "cpu")
    inputs = torch.rand(batch, 1, 28, 28)
    labels = torch.randint(0, 10, (batch,))
    return model, inputs, labels


def run(attacker, model, *args, **kwargs):
    torch.manual_seed(1)
    with attack_mode(model):
        return attacker.attack(model, *args, **kwargs)


def norms(x):
    return x.flatten(1).norm(dim=1)


def test_kl_pgd_as_train_catrs_builds_it():
    model, inputs, _ = setup()
    pi = torch.softmax(torch.randn(inputs.shape[0], 10), dim=1)
    noises = [torch.randn_like(inputs) * 0.25 for _ in range(2)]
    eps = 0.5
    published = run(KL_PGD(steps=2, device=DEVICE, max_norm=eps), model, inputs, pi, noises=noises)
    positional = run(KL_PGD(2, True, eps, DEVICE), model, inputs, pi, noises=noises)
    ours = run(KL_PGD(steps=2, max_norm=eps), model, inputs, pi, noises=noises)
    for got in (published, positional):
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, ours))
    change = norms(torch.cat(ours) - torch.cat(noises))
    assert change.min() > 0 and change.max() <= eps * 1.01


def test_pgd_l2_as_train_salman_builds_it():
    model, inputs, labels = setup()
    noise = torch.randn_like(inputs) * 0.25
    attacker = PGD_L2(steps=3, device=DEVICE, max_norm=1.0)
    attacker.max_norm = np.min([0.5, 1 * 0.5 / 2])  # the published warm-up sets a NumPy scalar
    published = run(attacker, model, inputs, labels, noise=noise, num_noise_vectors=1, no_grad=False)
    positional = run(PGD_L2(3, False, 0.25, DEVICE), model, inputs, labels, noise=noise)
    ours = run(PGD_L2(steps=3, max_norm=0.25), model, inputs, labels, noise=noise)
    assert torch.equal(published, ours) and torch.equal(positional, ours)
    change = norms(ours - inputs)
    assert change.min() > 0 and change.max() <= 0.25 * (1 + 1e-5)


def test_ddn_as_train_salman_builds_it():
    model, inputs, labels = setup()
    noise = torch.randn_like(inputs) * 0.25
    attacker = DDN(steps=3, device=DEVICE, max_norm=1.0, init_norm=1.0, gamma=0.05)
    attacker.max_norm = np.min([0.5, 1 * 0.5 / 2])
    attacker.init_norm = np.min([0.5, 1 * 0.5 / 2])
    published = run(attacker, model, inputs, labels, noise=noise, num_noise_vectors=1, no_grad=False)
    positional = run(DDN(3, 0.05, 0.25, True, 256, 0.25, DEVICE, None), model, inputs, labels, noise=noise)
    ours = run(DDN(steps=3, gamma=0.05, init_norm=0.25, max_norm=0.25), model, inputs, labels, noise=noise)
    assert torch.equal(published, ours) and torch.equal(positional, ours)
    # quantised to 1/255 after the renorm: at most sqrt(784) / 510 above the radius
    assert norms(ours - inputs).max() <= 0.25 + 28 / 510
