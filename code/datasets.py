"""Datasets, their published transforms and normalisation.

Datasets: ``mnist``, ``fmnist``, ``cifar10``, ``cifar100`` (read from
``./dataset_cache`` or ``$DATASET_CACHE``) and ``imagenet`` (from
``$IMAGENET_DIR`` with ``train/`` and ``val/`` ImageFolders).

Splits: ``train``, ``test`` and, for CAT-RS, ``train_t{sigma}``: the training
set whose items are ``(image, label, pi)``, ``pi`` being the smoothed prediction
(class frequencies under Gaussian noise) of a pretrained Gaussian model at that
image, written by ``smooth_prediction.py``.

Normalisation is the first layer of every model (``get_normalize_layer``; other
released models' first layers: ``get_input_layer``), so images stay in [0, 1]
and Gaussian noise is added in pixel space.
"""
import gzip
import os
import pickle
import shutil
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from common import UserError

DATASETS = ["mnist", "fmnist", "cifar10", "cifar100", "imagenet"]

NUM_CLASSES = {"mnist": 10, "fmnist": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}
INPUT_SHAPE = {"mnist": (1, 28, 28), "fmnist": (1, 28, 28), "cifar10": (3, 32, 32),
               "cifar100": (3, 32, 32), "imagenet": (3, 224, 224)}

_CIFAR10_MEAN, _CIFAR10_STDDEV = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
_CIFAR100_MEAN, _CIFAR100_STDDEV = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]
_IMAGENET_MEAN, _IMAGENET_STDDEV = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

IMAGENET_LOC_ENV = "IMAGENET_DIR"
DATASET_CACHE_ENV = "DATASET_CACHE"
# Where Debian's ``dataset-fashion-mnist`` package puts the original IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# CAT-RS reads the sigma = 0.25 Gaussian model's smoothed prediction for every sigma.
DEFAULT_SMOOTH_PREDICTION = "test/smooth_prediction/{dataset}/cohen/0/model_conf_0.25_train.npy"

_IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


class DatasetError(UserError):
    """A dataset that cannot be read; the message says where to put it."""


def dataset_root() -> str:
    return os.environ.get(DATASET_CACHE_ENV, "./dataset_cache")


def get_num_classes(dataset: str) -> int:
    _check_name(dataset)
    return NUM_CLASSES[dataset]


def get_input_shape(dataset: str):
    _check_name(dataset)
    return INPUT_SHAPE[dataset]


def _check_name(dataset: str):
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")


def parse_split(split: str):
    """'train' / 'test' -> (split, None); 'train_t0.25' -> ('train', 0.25)."""
    if split in ("train", "test"):
        return split, None
    if split.startswith("train_t"):
        try:
            return "train", float(split[len("train_t"):])
        except ValueError:
            pass
    raise DatasetError(f"unknown split '{split}'; use train, test or train_t{{sigma}}")


def get_dataset(dataset: str, split: str, smooth_prediction: Optional[str] = None,
                root: Optional[str] = None, augment: bool = True) -> Dataset:
    """Return the dataset split.

    ``augment=False`` reads training images with the test transform (no random
    crop or flip), so that index i is the same image on every read.

    ``train_t{sigma}`` attaches the smoothed prediction read from
    ``smooth_prediction`` (default: ``DEFAULT_SMOOTH_PREDICTION``) to the
    training set; it must have one row per training image and one column per
    class. Call ``check_covers`` on it with the number of images a run uses.
    """
    _check_name(dataset)
    base_split, targeted_sigma = parse_split(split)
    root = root or dataset_root()
    path = smooth_prediction or DEFAULT_SMOOTH_PREDICTION.format(dataset=dataset)
    if targeted_sigma is not None and not os.path.isfile(path):
        load_smooth_prediction(path, 0, 0)  # fail before reading a (possibly large) data set
    if dataset == "imagenet":
        data = _imagenet(base_split, augment)
    elif dataset in ("cifar10", "cifar100"):
        data = _cifar(root, base_split, augment, hundred=(dataset == "cifar100"))
    elif dataset == "mnist":
        data = _mnist_like(datasets.MNIST, root, base_split)
    else:
        data = _mnist_like(datasets.FashionMNIST, root, base_split)
    if targeted_sigma is None:
        return data
    prediction = load_smooth_prediction(path, len(data), NUM_CLASSES[dataset])
    return WithSmoothPrediction(data, prediction, path, load_coverage(path, prediction))


class WithSmoothPrediction(Dataset):
    """Items ``(image, label, pi)``: ``pi`` is row ``index`` of the prediction array.

    Wrapping (rather than subclassing the torchvision class, as the published
    code did) leaves the folder the images are read from unchanged.
    ``path`` and ``covered`` (see ``load_coverage``) serve ``check_covers``.
    """

    def __init__(self, data: Dataset, smooth_prediction: np.ndarray, path: str = "",
                 covered: Optional[np.ndarray] = None):
        self.data = data
        self.smooth_prediction = torch.from_numpy(np.ascontiguousarray(smooth_prediction, dtype=np.float32))
        self.path = path
        if covered is None:
            covered = ~np.all(smooth_prediction == smooth_prediction.dtype.type(1.0 / smooth_prediction.shape[1]),
                              axis=1)
        self.covered = covered

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image, label = self.data[index]
        return image, label, self.smooth_prediction[index]

    def check_covers(self, count: int):
        """Raise ``DatasetError`` unless pi was computed for each of the first ``count`` images."""
        missing = np.flatnonzero(~self.covered[:count])
        if len(missing) == 0:
            return
        covered_prefix = int(np.argmin(self.covered)) if not self.covered.all() else len(self.covered)
        subset = f", or train on the covered images with --train-subset {covered_prefix}" if covered_prefix else ""
        raise DatasetError(f"smoothed prediction '{self.path}' lacks {len(missing)} of the {count} training images "
                           f"this run uses (first: {missing[0]}; {coverage_source(self.path)}); finish it with "
                           f"smooth_prediction.py --split train (same command, without --max){subset}")


def coverage_path(path: str) -> str:
    """The coverage file of a smoothed prediction ``X.npy``: ``X.covered.npy``, a bool per row, True if computed."""
    return (path[:-4] if path.endswith(".npy") else path) + ".covered.npy"


def coverage_source(path: str) -> str:
    if os.path.isfile(coverage_path(path)):
        return f"see '{coverage_path(path)}'"
    return (f"no '{os.path.basename(coverage_path(path))}' next to it, so rows of exactly 1/K, the value of rows "
            "never computed, count as missing")


def load_coverage(path: str, array: np.ndarray) -> np.ndarray:
    """Which rows of the smoothed prediction ``array`` (read from ``path``) were computed.

    From the coverage file that smooth_prediction.py writes next to it. A file
    without one (made by the published code, which pads every row it did not
    compute with exactly 1/K): every row but those equal to 1/K in every
    entry. A computed row equals that only if all K classes got exactly N/K
    of the N samples, which essentially never happens; refusing such a row
    costs a re-run, accepting padding would train silently on uniform targets.
    """
    mask_path = coverage_path(path)
    if not os.path.isfile(mask_path):
        return ~np.all(array == array.dtype.type(1.0 / array.shape[1]), axis=1)
    try:
        mask = np.load(mask_path, allow_pickle=False)
    except Exception as exc:
        raise DatasetError(f"coverage file '{mask_path}' is not a readable .npy file ({exc}); remove it and run "
                           "smooth_prediction.py again (same command) to rewrite it")
    if mask.dtype != np.bool_ or mask.shape != (array.shape[0],):
        raise DatasetError(f"coverage file '{mask_path}' holds {mask.dtype} of shape {tuple(mask.shape)}, not one "
                           f"bool per row of '{path}' ({array.shape[0]}); remove it and run smooth_prediction.py "
                           "again (same command) to rewrite it")
    return mask


def load_smooth_prediction(path: str, num_examples: int, num_classes: int) -> np.ndarray:
    how = ("produce it with train_cohen.py (sigma 0.25, --id 0) and then smooth_prediction.py "
           "--split=train (see EXPERIMENTS.md), or pass --smooth-prediction PATH")
    if not os.path.isfile(path):
        raise DatasetError(f"smoothed prediction '{path}' not found; {how}")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # a truncated or foreign file
        raise DatasetError(f"smoothed prediction '{path}' is not a readable .npy file ({exc}); {how}")
    if array.shape != (num_examples, num_classes):
        raise DatasetError(f"smoothed prediction '{path}' has shape {tuple(array.shape)} but the training "
                           f"set needs ({num_examples}, {num_classes}); {how}")
    return array


# --------------------------------------------------------------------------- loaders

def _imagenet(split: str, augment: bool) -> Dataset:
    if IMAGENET_LOC_ENV not in os.environ:
        raise DatasetError(f"environment variable {IMAGENET_LOC_ENV} is not set; set it to the folder "
                           "holding the ImageNet train/ and val/ ImageFolders")
    subdir = os.path.join(os.environ[IMAGENET_LOC_ENV], "train" if split == "train" else "val")
    if not os.path.isdir(subdir):
        raise DatasetError(f"ImageNet folder '{subdir}' not found; ${IMAGENET_LOC_ENV} must hold "
                           "train/ and val/ ImageFolders (one sub-folder per class)")
    if split == "train" and augment:
        transform = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor()])
    else:
        transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    return datasets.ImageFolder(subdir, transform)


def _cifar(root: str, split: str, augment: bool, hundred: bool) -> Dataset:
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    name = "CIFAR-100" if hundred else "CIFAR-10"
    if not os.path.isdir(folder):
        raise DatasetError(f"{name} not found: extract the python version from "
                           f"https://www.cs.toronto.edu/~kriz/cifar.html into '{folder}', or set ${DATASET_CACHE_ENV}")
    if split == "train" and augment:
        transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor()])
    else:
        transform = transforms.ToTensor()
    return CIFAR(folder, split, hundred, transform)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: a data file never runs code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class CIFAR(Dataset):
    """CIFAR-10/100 read from the python-pickle batches of the official archive.

    CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` with ``labels``;
    CIFAR-100: ``train`` and ``test`` with ``fine_labels``. Each batch holds
    ``data``, uint8 of shape (n, 3072) in channel-major order.
    """

    def __init__(self, folder: str, split: str, hundred: bool, transform=None):
        if hundred:
            files, key = (["train"] if split == "train" else ["test"]), "fine_labels"
        else:
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            key = "labels"
        images, labels = [], []
        for name in files:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as handle:
                    batch = _ArrayUnpickler(handle, encoding="latin1").load()
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(label) for label in batch[key])
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
                raise DatasetError(f"CIFAR batch '{path}' is missing or damaged ({type(exc).__name__}); "
                                   "extract the python version of the archive there again")
        self.data = np.concatenate(images).transpose(0, 2, 3, 1)  # to HWC, as PIL expects
        self.targets = labels
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _mnist_like(cls, root: str, split: str) -> Dataset:
    raw = os.path.join(root, cls.__name__, "raw")
    missing = [name for name in _IDX_FILES if not os.path.isfile(os.path.join(raw, name))]
    if missing and cls is datasets.FashionMNIST and os.path.isdir(DEBIAN_FASHION_MNIST):
        _decompress_idx(DEBIAN_FASHION_MNIST, raw)
        missing = [name for name in _IDX_FILES if not os.path.isfile(os.path.join(raw, name))]
    if missing:
        hint = ("`apt-get install dataset-fashion-mnist`, or " if cls is datasets.FashionMNIST else "")
        raise DatasetError(f"{cls.__name__} not found: {hint}put the decompressed IDX files "
                           f"({', '.join(_IDX_FILES)}) into '{raw}'")
    return cls(root, train=(split == "train"), download=False, transform=transforms.ToTensor())


def _decompress_idx(source: str, raw: str):
    """Decompress the ``*.gz`` IDX files of ``source`` into ``raw`` (atomically per file)."""
    os.makedirs(raw, exist_ok=True)
    for name in _IDX_FILES:
        src, dst = os.path.join(source, name + ".gz"), os.path.join(raw, name)
        if os.path.isfile(src) and not os.path.isfile(dst):
            tmp = f"{dst}.tmp{os.getpid()}"
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, dst)


# --------------------------------------------------------------------------- normalisation

_STATISTICS = {"cifar10": (_CIFAR10_MEAN, _CIFAR10_STDDEV), "cifar100": (_CIFAR100_MEAN, _CIFAR100_STDDEV),
               "imagenet": (_IMAGENET_MEAN, _IMAGENET_STDDEV)}

#: The first layers a released model may have been trained with (``get_input_layer``): ``normalize``
#: (x - mean) / sd, as Cohen et al., Stability, Consistency, SmoothMix, CAT-RS and this project;
#: ``center`` x - mean, as SmoothAdv's released models; ``none`` the identity, as MACER's.
INPUT_LAYERS = ("normalize", "center", "none")


def get_normalize_layer(dataset: str) -> torch.nn.Module:
    """The model's first layer: identity for MNIST-like data, per-channel otherwise."""
    return get_input_layer(dataset, "normalize")


def get_input_layer(dataset: str, kind: str = "normalize") -> torch.nn.Module:
    """The first layer ``kind`` (one of ``INPUT_LAYERS``) for ``dataset``; MNIST-like data have mean 0 and sd 1."""
    _check_name(dataset)
    if kind not in INPUT_LAYERS:
        raise ValueError(f"unknown input layer '{kind}'; choose one of {', '.join(INPUT_LAYERS)}")
    if kind == "none" or dataset not in _STATISTICS:
        return NormalizeLayer(None, None)
    means, sds = _STATISTICS[dataset]
    return NormalizeLayer(means, sds if kind == "normalize" else None)


def input_layers_differ(dataset: str) -> bool:
    """Whether the kinds of ``INPUT_LAYERS`` compute different things on ``dataset`` (not on MNIST-like data)."""
    _check_name(dataset)
    return dataset in _STATISTICS


class NormalizeLayer(torch.nn.Module):
    """(x - mean) / sd per channel; x - mean when ``sds`` is None; the identity when ``means`` is None.

    The statistics are non-persistent buffers: they follow ``.to(device)`` but
    stay out of ``state_dict``, so checkpoints keep the published key layout.
    """

    def __init__(self, means, sds):
        super().__init__()
        self.identity = means is None
        self.centre_only = sds is None
        if not self.identity:
            self.register_buffer("means", torch.tensor(means).view(1, -1, 1, 1), persistent=False)
        if not self.identity and not self.centre_only:
            self.register_buffer("sds", torch.tensor(sds).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        if self.identity:
            return x
        if self.centre_only:
            return x - self.means.to(x.dtype)
        return (x - self.means.to(x.dtype)) / self.sds.to(x.dtype)
