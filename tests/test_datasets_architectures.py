"""Data loaders on small files in the real on-disk formats, and architectures' key layout."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import architectures
import datasets
from architectures import ARCHITECTURES, get_architecture
from checkpoints import load_base_classifier
from common import UserError


# --------------------------------------------------------------------------- synthetic files

def write_cifar10(root, n_train_per_batch=4, n_test=5):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": n_train_per_batch for i in range(1, 6)}
    batches["test_batch"] = n_test
    contents = {}
    for name, n in batches.items():
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, handle, protocol=2)
        contents[name] = (data, labels)
    return contents


def write_cifar100(root, n_train=6, n_test=3):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    contents = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100, size=n)]
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, handle, protocol=2)
        contents[name] = (data, labels)
    return contents


def write_idx(raw, prefix, images, labels):
    raw.mkdir(parents=True, exist_ok=True)
    with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, len(images), 28, 28))
        handle.write(images.astype(np.uint8).tobytes())
    with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as handle:
        handle.write(struct.pack(">II", 2049, len(labels)))
        handle.write(np.asarray(labels, dtype=np.uint8).tobytes())


# --------------------------------------------------------------------------- CIFAR

def test_cifar10_reads_python_batches(tmp_path):
    contents = write_cifar10(tmp_path)
    train = datasets.get_dataset("cifar10", "train", root=str(tmp_path))
    test = datasets.get_dataset("cifar10", "test", root=str(tmp_path))
    assert len(train) == 20 and len(test) == 5
    data, labels = contents["test_batch"]
    image, label = test[2]
    assert label == labels[2]
    expected = torch.from_numpy(data[2].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(image, expected)
    # training images get random crop + flip but keep shape and range
    image, label = train[7]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert label == contents["data_batch_2"][1][3]


def test_cifar_train_without_augmentation_is_the_stored_image(tmp_path):
    contents = write_cifar10(tmp_path)
    train = datasets.get_dataset("cifar10", "train", root=str(tmp_path), augment=False)
    data, _ = contents["data_batch_3"]
    expected = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(train[9][0], expected) and torch.equal(train[9][0], train[9][0])


def test_cifar100_reads_fine_labels(tmp_path):
    contents = write_cifar100(tmp_path)
    test = datasets.get_dataset("cifar100", "test", root=str(tmp_path))
    assert len(test) == 3
    assert [test[i][1] for i in range(3)] == contents["test"][1]
    assert datasets.get_num_classes("cifar100") == 100


def test_cifar_refuses_code_in_pickle(tmp_path):
    write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({"data": Evil(), "labels": []}, handle)
    with pytest.raises(datasets.DatasetError, match="damaged"):
        datasets.get_dataset("cifar10", "test", root=str(tmp_path))


def test_missing_datasets_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path / "nowhere"))
    for name, where in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                        ("mnist", "MNIST/raw"), ("fmnist", "FashionMNIST/raw")):
        with pytest.raises(datasets.DatasetError, match=where):
            datasets.get_dataset(name, "test", root=str(tmp_path))
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    with pytest.raises(datasets.DatasetError, match="IMAGENET_DIR"):
        datasets.get_dataset("imagenet", "test")
    with pytest.raises(datasets.DatasetError, match="unknown dataset"):
        datasets.get_dataset("svhn", "test")


# --------------------------------------------------------------------------- MNIST-like

@pytest.mark.parametrize("name,cls_folder", [("mnist", "MNIST"), ("fmnist", "FashionMNIST")])
def test_mnist_like_reads_idx(tmp_path, monkeypatch, name, cls_folder):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path / "nowhere"))
    rng = np.random.default_rng(2)
    raw = tmp_path / cls_folder / "raw"
    train_images = rng.integers(0, 256, size=(7, 28, 28))
    write_idx(raw, "train", train_images, [1, 2, 3, 4, 5, 6, 7])
    write_idx(raw, "t10k", rng.integers(0, 256, size=(3, 28, 28)), [9, 8, 7])
    train = datasets.get_dataset(name, "train", root=str(tmp_path))
    test = datasets.get_dataset(name, "test", root=str(tmp_path))
    assert len(train) == 7 and len(test) == 3
    image, label = train[4]
    assert label == 5 and image.shape == (1, 28, 28)
    assert torch.allclose(image[0], torch.from_numpy(train_images[4]).float() / 255)


def test_fmnist_from_debian_gzip_files(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    staging = tmp_path / "staging"
    rng = np.random.default_rng(3)
    write_idx(staging, "train", rng.integers(0, 256, size=(4, 28, 28)), [0, 1, 2, 3])
    write_idx(staging, "t10k", rng.integers(0, 256, size=(2, 28, 28)), [4, 5])
    debian.mkdir()
    for path in staging.iterdir():
        with open(path, "rb") as src, gzip.open(debian / (path.name + ".gz"), "wb") as dst:
            dst.write(src.read())
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(debian))
    root = tmp_path / "cache"
    test = datasets.get_dataset("fmnist", "test", root=str(root))
    assert [test[i][1] for i in range(2)] == [4, 5]
    assert (root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_targeted_split_attaches_smooth_prediction_without_moving_data(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path / "nowhere"))
    raw = tmp_path / "FashionMNIST" / "raw"
    rng = np.random.default_rng(4)
    write_idx(raw, "train", rng.integers(0, 256, size=(5, 28, 28)), [0, 1, 2, 3, 4])
    write_idx(raw, "t10k", rng.integers(0, 256, size=(1, 28, 28)), [0])
    pi = rng.dirichlet(np.ones(10), size=5).astype(np.float32)
    np.save(tmp_path / "pi.npy", pi)
    data = datasets.get_dataset("fmnist", "train_t0.5", smooth_prediction=str(tmp_path / "pi.npy"),
                                root=str(tmp_path))
    image, label, row = data[3]
    assert label == 3 and torch.allclose(row, torch.from_numpy(pi[3]))
    assert sorted(os.listdir(tmp_path)) == ["FashionMNIST", "pi.npy"]  # nothing re-downloaded elsewhere
    np.save(tmp_path / "bad.npy", pi[:4])
    with pytest.raises(datasets.DatasetError, match=r"bad\.npy.*shape \(4, 10\).*\(5, 10\)"):
        datasets.get_dataset("fmnist", "train_t0.5", smooth_prediction=str(tmp_path / "bad.npy"), root=str(tmp_path))
    with pytest.raises(datasets.DatasetError, match="smooth_prediction.py"):
        datasets.get_dataset("fmnist", "train_t0.5", smooth_prediction=str(tmp_path / "none.npy"), root=str(tmp_path))


def test_default_smooth_prediction_path():
    assert datasets.DEFAULT_SMOOTH_PREDICTION.format(dataset="cifar10") == \
        "test/smooth_prediction/cifar10/cohen/0/model_conf_0.25_train.npy"


# --------------------------------------------------------------------------- ImageNet

def test_imagenet_image_folders(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, size=(300, 260, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    val = datasets.get_dataset("imagenet", "test")
    train = datasets.get_dataset("imagenet", "train")
    assert len(val) == 4 and len(train) == 4
    assert val[0][0].shape == (3, 224, 224) and train[3][0].shape == (3, 224, 224)
    assert [val[i][1] for i in range(4)] == [0, 0, 1, 1]


# --------------------------------------------------------------------------- normalisation & architectures

def test_normalize_layer_has_no_state_and_normalises():
    layer = datasets.get_normalize_layer("cifar10")
    assert len(layer.state_dict()) == 0
    x = torch.rand(2, 3, 4, 4)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    sd = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    assert torch.allclose(layer(x), (x - mean) / sd)
    assert torch.equal(datasets.get_normalize_layer("fmnist")(x), x)


EXPECTED_KEYS = {
    "lenet": ("fmnist", 8, ["1.conv1.weight", "1.conv1.bias", "1.conv2.weight", "1.conv2.bias",
                            "1.fc1.weight", "1.fc1.bias", "1.fc2.weight", "1.fc2.bias"]),
    "cifar_resnet20": ("cifar10", None, ["1.conv1.weight", "1.bn1.weight", "1.layer1.0.conv1.weight",
                                         "1.layer2.0.downsample.0.weight", "1.layer2.0.downsample.1.running_mean",
                                         "1.layer3.2.bn2.num_batches_tracked", "1.fc.weight", "1.fc.bias"]),
    "cifar_resnet110": ("cifar10", None, ["1.layer1.17.conv2.weight", "1.layer3.17.bn2.bias", "1.fc.weight"]),
    "cifar100_resnet110": ("cifar100", None, ["1.layer3.17.bn2.bias", "1.fc.weight"]),
    "resnet50": ("imagenet", None, ["1.module.conv1.weight", "1.module.layer4.2.bn3.running_var",
                                    "1.module.fc.weight"]),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_state_dict_layout(arch):
    dataset, count, keys = EXPECTED_KEYS[arch]
    model = get_architecture(arch, dataset, "cpu")
    state = model.state_dict()
    for key in keys:
        assert key in state, key
    assert all(k.startswith("1.module." if arch == "resnet50" else "1.") for k in state)
    if count is not None:
        assert list(state) == keys
    c, h, w = datasets.get_input_shape(dataset)
    if arch != "resnet50":  # keep the test fast; ResNet-50's forward is torchvision's
        with torch.no_grad():
            out = model.eval()(torch.rand(2, c, h, w))
        assert out.shape == (2, datasets.get_num_classes(dataset))


def test_cifar_resnet_depth_and_init():
    net = get_architecture("cifar_resnet110", "cifar10", "cpu")[1]
    assert len(net.layer1) == len(net.layer2) == len(net.layer3) == 18
    conv = net.layer2[3].conv1
    expected_sd = (2.0 / (3 * 3 * conv.out_channels)) ** 0.5
    assert abs(conv.weight.std().item() - expected_sd) / expected_sd < 0.05
    assert torch.all(net.layer2[3].bn1.weight == 1) and torch.all(net.layer2[3].bn1.bias == 0)
    assert net.fc.in_features == 64


def test_published_checkpoint_format_loads(tmp_path):
    """A checkpoint as the published code wrote it ({epoch, arch, state_dict, optimizer}) loads unchanged."""
    model = get_architecture("lenet", "fmnist", "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "lenet", "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict()}, path)
    loaded = load_base_classifier(str(path), "fmnist", "cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert not loaded.training


def test_mismatched_and_unsafe_checkpoints_refused(tmp_path):
    resnet = get_architecture("cifar_resnet20", "cifar10", "cpu")
    torch.save({"epoch": 1, "arch": "cifar_resnet20", "state_dict": resnet.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(UserError, match="does not fit dataset 'fmnist'"):
        load_base_classifier(str(tmp_path / "c.pth"), "fmnist", "cpu")
    torch.save({"epoch": 1, "arch": "lenet", "state_dict": resnet.state_dict()}, tmp_path / "m.pth")
    with pytest.raises(UserError, match="does not match architecture 'lenet'"):
        load_base_classifier(str(tmp_path / "m.pth"), "fmnist", "cpu")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo executed > " + str(tmp_path / "pwned"),))

    torch.save({"arch": "lenet", "state_dict": {}, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="unsafe unpickling"):
        load_base_classifier(str(tmp_path / "evil.pth"), "fmnist", "cpu")
    assert not (tmp_path / "pwned").exists()
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_base_classifier(str(tmp_path / "cut.pth"), "cifar10", "cpu")
    with pytest.raises(UserError, match="not found"):
        load_base_classifier(str(tmp_path / "none.pth"), "cifar10", "cpu")


def test_architecture_dataset_mismatch():
    with pytest.raises(architectures.ArchitectureError, match="does not fit"):
        get_architecture("lenet", "cifar10", "cpu")
    with pytest.raises(architectures.ArchitectureError, match="unknown architecture"):
        get_architecture("vgg", "cifar10", "cpu")
