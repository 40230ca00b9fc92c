"""What the training runs log and see, as the published runs did: the train-loss column of each
method, SmoothMix's run folder, and the CIFAR augmentation of ``--data-on-device yes``."""
import types

import numpy as np
import pytest
import torch

import train_consistency
import train_macer
import train_smoothmix
import train_stab
from architectures import get_architecture
from test_datasets_architectures import write_cifar10
import fast_path
from fast_path import TensorLoader
from train_utils import TrainingContext, build_parser, make_loaders, train_epoch


# --------------------------------------------------------------------------- logged train loss

def _logged_train_loss(module, options, seed=0):
    """One epoch of ``module.METHOD`` at learning rate 0 (the model never changes) on fixed random data."""
    args = build_parser(module.METHOD).parse_args(["fmnist", "lenet", "--lr", "1e-9", "--print-freq", "1000"]
                                                   + options)
    torch.manual_seed(123)
    model = get_architecture("lenet", "fmnist", "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = TrainingContext(args=args, model=model, optimizer=optimizer, device=torch.device("cpu"),
                          dist=types.SimpleNamespace(is_main=False, enabled=False))
    generator = torch.Generator().manual_seed(7)
    loader = [(torch.rand(32, 1, 28, 28, generator=generator), torch.randint(0, 10, (32,), generator=generator))
              for _ in range(2)]
    model.train()
    torch.manual_seed(seed)
    loss, _ = train_epoch(module.METHOD, ctx, loader, 40)
    return loss, loader, model


def test_stability_logs_the_cross_entropy_term():
    plain, loader, model = _logged_train_loss(train_stab, ["--lbd", "0", "--noise", "0.5"])
    regularised, _, _ = _logged_train_loss(train_stab, ["--lbd", "10", "--noise", "0.5"])
    with torch.no_grad():
        expected = np.mean([torch.nn.functional.cross_entropy(model(x), y).item() for x, y in loader])
    assert regularised == pytest.approx(plain, rel=1e-6) == pytest.approx(expected, rel=1e-5)


def test_consistency_logs_the_cross_entropy_term():
    options = ["--num-noise-vec", "2", "--noise", "0.5"]
    plain, _, _ = _logged_train_loss(train_consistency, options + ["--lbd", "0", "--eta", "0"])
    regularised, _, _ = _logged_train_loss(train_consistency, options + ["--lbd", "20", "--eta", "1"])
    assert regularised == pytest.approx(plain, rel=1e-6)


def test_macer_logs_the_classification_loss_per_example():
    options = ["--num-noise-vec", "4", "--noise", "0.25", "--beta", "16", "--margin", "8"]
    plain, loader, model = _logged_train_loss(train_macer, options + ["--lbd", "0"])
    robust, _, _ = _logged_train_loss(train_macer, options + ["--lbd", "16"])
    assert robust == pytest.approx(plain, rel=1e-6)
    # per example: close to the noiseless cross-entropy of an untrained model, not a sum over the batch
    with torch.no_grad():
        clean = np.mean([torch.nn.functional.cross_entropy(model(x), y).item() for x, y in loader])
    assert plain == pytest.approx(clean, rel=0.2)


@pytest.mark.parametrize("options,folder", [
    ([], "smix_1.0_8_m0/"),
    (["--maxnorm_s", "0"], "smix_1.0_8_m0/"),
    (["--maxnorm", "0"], "smix_1.0_8_m0/"),
    (["--maxnorm_s", "0.5", "--maxnorm", "2"], "smix_1.0_8_m0_ms0.5_max2.0/"),
])
def test_smoothmix_folder_tests_truthiness_as_published(options, folder):
    args = build_parser(train_smoothmix.METHOD).parse_args(["fmnist", "lenet"] + options)
    assert train_smoothmix.method_path(args).startswith(folder)


# --------------------------------------------------------------------------- CIFAR augmentation on the device

def _coded_image():
    """A 3 x 32 x 32 image whose pixel (r, c) holds a code of (r, c) in every channel, all values > 0."""
    rows, columns = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return ((rows * 32 + columns + 1).float() / 1025.0).expand(3, 32, 32).clone()


def _decode(crops):
    """The (row shift, column shift, flipped) of each crop of ``_coded_image``, read at its centre."""
    codes = (crops[:, 0, 16, 16:18] * 1025.0).round().long() - 1
    flipped = codes[:, 1] < codes[:, 0]
    rows, columns = codes[:, 0] // 32, codes[:, 0] % 32
    return rows - 16, torch.where(flipped, columns - 15, columns - 16), flipped


def test_crop_flip_is_torchvision_random_crop_then_flip():
    from torchvision.transforms import functional as TF
    images = torch.rand(5, 3, 32, 32)
    shifts = torch.tensor([[-4, 4], [0, 0], [3, -2], [4, -4], [-1, 1]])
    flips = torch.tensor([False, True, True, False, True])
    out = fast_path.crop_flip(images, shifts, flips, 4)
    for image, (dy, dx), flip, got in zip(images, shifts.tolist(), flips.tolist(), out):
        expected = TF.crop(TF.pad(image, 4), 4 + dy, 4 + dx, 32, 32)
        if flip:
            expected = TF.hflip(expected)
        assert torch.equal(got, expected)
    row, column, flipped = _decode(fast_path.crop_flip(_coded_image().expand(5, 3, 32, 32), shifts, flips, 4))
    assert row.tolist() == shifts[:, 0].tolist() and column.tolist() == shifts[:, 1].tolist()
    assert flipped.tolist() == flips.tolist()


def test_device_augmentation_is_fresh_every_epoch_and_uniform():
    n = 200
    dataset = [(_coded_image(), i) for i in range(n)]
    loader = TensorLoader(dataset, 64, True, torch.device("cpu"), torch.Generator().manual_seed(0),
                          augment="crop_flip")
    epochs = []
    for _ in range(20):
        shift_of = {}
        for images, labels in loader:
            row, column, flipped = _decode(images)
            for index, r, c, f in zip(labels.tolist(), row.tolist(), column.tolist(), flipped.tolist()):
                shift_of[index] = (r, c, f)
        assert sorted(shift_of) == list(range(n))
        epochs.append(shift_of)
    # two epochs give the same image different crops
    assert sum(epochs[0][i] != epochs[1][i] for i in range(n)) > n // 2
    draws = [draw for epoch in epochs for draw in epoch.values()]
    assert {(r, c) for r, c, _ in draws} == {(r, c) for r in range(-4, 5) for c in range(-4, 5)}
    assert np.mean([f for _, _, f in draws]) == pytest.approx(0.5, abs=0.04)
    counts = np.bincount([(r + 4) * 9 + (c + 4) for r, c, _ in draws], minlength=81)
    assert counts.min() > 0.5 * len(draws) / 81 and counts.max() < 1.5 * len(draws) / 81


def test_cifar_data_on_device_stores_plain_images_and_augments_each_epoch(tmp_path, monkeypatch):
    contents = write_cifar10(tmp_path, n_train_per_batch=8)
    monkeypatch.setenv("DATASET_CACHE", str(tmp_path))
    import train_cohen
    args = build_parser(train_cohen.METHOD).parse_args(["cifar10", "cifar_resnet20", "--data-on-device", "yes",
                                                        "--batch", "40"])
    args.seed = 0
    dist = types.SimpleNamespace(rank=0, world_size=1, enabled=False)
    train_loader, _ = make_loaders(args, train_cohen.METHOD, torch.device("cpu"), dist,
                                   torch.Generator().manual_seed(0))
    stored = np.concatenate([contents[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(train_loader.tensors[0], torch.from_numpy(stored).float() / 255)  # not a frozen crop
    first, second = _augmentations(train_loader), _augmentations(train_loader)
    assert sorted(first) == sorted(second) == list(range(40))  # every image once per epoch
    assert sum(first[i] != second[i] for i in first) > 20      # and most get another crop or flip


def _augmentations(loader):
    """{stored image index: (row shift, column shift, flipped)} for one epoch, found by exact match."""
    stored = loader.tensors[0]
    n = len(stored)
    choices = [(dy, dx, flip) for dy in range(-4, 5) for dx in range(-4, 5) for flip in (False, True)]
    candidates = torch.stack([fast_path.crop_flip(stored, torch.tensor([[dy, dx]] * n), torch.tensor([flip] * n), 4)
                              for dy, dx, flip in choices]).flatten(2)  # [choices, n, pixels]
    found = {}
    for images, _ in loader:
        for image in images:
            hits = (candidates == image.flatten()).all(2).nonzero().tolist()
            assert len(hits) == 1, "each crop is one shifted, possibly flipped window of one stored image"
            choice, index = hits[0]
            found[index] = choices[choice]
    return found
