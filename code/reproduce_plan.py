"""The cells of a paper table and the commands that make each (``reproduce.py`` runs them).

A cell is one method at one sigma, trained with the settings of
``scripts/published_settings.tsv`` and ``--seed 0``, then certified twice:

* fixed-N CERTIFY (Cohen et al. 2019; N0 = 100, N = 100,000, alpha = 0.001)
  on every 100th test image, for the ACR compared image by image with the
  published results;
* sequential radii mode (``--sequential --radii 0.25 0.5 0.75 1.0 1.5 2.0``,
  at most 100,000 samples) on every 10th test image, for the certified
  accuracy at those radii on 1,000 images.

The ``pretrain`` cell is the sigma = 0.25 Gaussian model whose smoothed
prediction on the training set (N = 10,000) CAT-RS reads at every sigma; a
CAT-RS cell selects it too. A cell's commands identify it: ``cell.json``
records them, and a kept cell made with others is refused.
"""
import fnmatch
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

from common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = os.path.join(REPO, "scripts", "published_settings.tsv")
ARCHITECTURE = {"mnist": "lenet", "fmnist": "lenet", "cifar10": "cifar_resnet110",
                "cifar100": "cifar100_resnet110", "imagenet": "resnet50"}
RADII = ["0.25", "0.5", "0.75", "1.0", "1.5", "2.0"]
# Cheapest first, so that a session's CPU finishes whole cells; the pretrain comes before CAT-RS, which reads it.
METHOD_ORDER = ["cohen", "stab", "consistency", "macer", "salman", "smoothmix", "pretrain", "catrs"]


class ReproduceError(UserError):
    """A problem with the request or the data folder; the message says what to do."""


@dataclass
class Cell:
    method: str          # a training script's suffix, or "pretrain"
    sigma: str           # as written in the settings, e.g. "0.25"
    run_id: str
    options: List[str]   # schedule and method options

    @property
    def name(self) -> str:
        return "pretrain" if self.method == "pretrain" else f"{self.method}:{self.sigma}"

    @property
    def script(self) -> str:
        return "train_cohen.py" if self.method == "pretrain" else f"train_{self.method}.py"


# --------------------------------------------------------------------------- which cells

def table_cells(dataset: str, settings_path: str = SETTINGS) -> List[Cell]:
    """Every training run of ``dataset`` in the settings table, cheapest first."""
    source = "cifar10" if dataset == "cifar100" else dataset
    cells = []
    with open(settings_path) as handle:
        for line in handle:
            if line.startswith("#") or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if fields[0] == source:
                cells.append(Cell(fields[1], fields[2], fields[3], shlex.split(fields[4])))
    if not cells:
        raise ReproduceError(f"no published settings for data set '{dataset}' in {settings_path}")
    return sorted(cells, key=lambda c: (METHOD_ORDER.index(c.method), float(c.sigma)))


def select_cells(cells: List[Cell], patterns: Optional[str]) -> List[Cell]:
    """The cells matching ``patterns`` ("method:sigma" globs, or "pretrain"), with the pretrain CAT-RS needs."""
    if not patterns or not patterns.split():
        chosen = set(c.name for c in cells)
    else:
        chosen = set()
        for pattern in patterns.split():
            matched = [c.name for c in cells if fnmatch.fnmatchcase(c.name, pattern)]
            if not matched:
                names = " ".join(c.name for c in cells)
                raise ReproduceError(f"cell pattern '{pattern}' matches no cell; the cells are: {names}")
            chosen.update(matched)
    if any(name.startswith("catrs:") for name in chosen):
        chosen.add("pretrain")
    return [c for c in cells if c.name in chosen]


# --------------------------------------------------------------------------- the commands of a cell

@dataclass
class Scale:
    """What the driver runs beyond the settings table; the defaults are the paper's."""
    train_args: List[str]
    n: int = 100_000
    fixed_skip: int = 100
    sequential_skip: int = 10
    max_images: int = -1
    smooth_n: int = 10_000
    smooth_max: int = -1
    # torch.compile of the smoothed prediction's model: the same predictions as eager float32 (0 of 340,000
    # noisy LeNet samples differed) at less cost per sample; off for toy runs, where compiling dominates
    smooth_compile: bool = True


def run_folder(dataset: str, cell: Cell, logdir: str, train_argv: List[str]) -> str:
    """Where the cell's training script writes (its ``--logdir``/dataset/method path/arch/id)."""
    if os.path.join(REPO, "code") not in sys.path:
        sys.path.insert(0, os.path.join(REPO, "code"))
    import importlib
    import train_utils
    module = importlib.import_module(cell.script[:-3])
    args = train_utils.parse_args(module.METHOD, train_argv)
    return train_utils.run_folder(args, module.METHOD.method_path(args))


def cell_commands(dataset: str, cell: Cell, scale: Scale, logdir: str, outdir: str) -> Dict[str, List[str]]:
    """The cell's steps as command lines (``python`` standing for the interpreter), keyed by step name."""
    arch = ARCHITECTURE[dataset]
    train = [dataset, arch, *cell.options, "--noise", cell.sigma, "--id", cell.run_id, "--seed", "0",
             "--logdir", logdir, *scale.train_args]
    prediction = os.path.join(outdir, "smooth_prediction", dataset, "cohen", "0", "model_conf_0.25_train.npy")
    if cell.method == "catrs" and os.path.normpath(outdir) != "test":   # else train_catrs.py reads it by default
        train += ["--smooth-prediction", prediction]
    folder = run_folder(dataset, cell, logdir, train)
    checkpoint = os.path.join(folder, "checkpoint.pth.tar")
    commands = {"train": ["python", f"code/{cell.script}", *train, "--resume"]}
    if cell.method == "pretrain":
        out = os.path.join(outdir, "smooth_prediction", dataset, "cohen", cell.run_id, f"noise_train_{cell.sigma}.tsv")
        commands["smooth_prediction"] = ["python", "code/smooth_prediction.py", dataset, checkpoint, cell.sigma, out,
                                         f"--N={scale.smooth_n}", "--skip=1", "--split=train", "--seed", "0",
                                         "--max", str(scale.smooth_max)] + (["--compile"] if scale.smooth_compile else [])
        return commands
    # test/certify/{dataset}/{method path without noise_s}/{id}/, as scripts/certify_all.sh names it
    method_dir = os.path.dirname(os.path.relpath(os.path.dirname(os.path.dirname(folder)), os.path.join(logdir, dataset)))
    base = os.path.join(outdir, "certify", dataset, method_dir, cell.run_id, f"noise_{cell.sigma}")
    common = ["python", "code/certify.py", dataset, checkpoint, cell.sigma]
    commands["certify"] = [*common, f"{base}_skip{scale.fixed_skip}.tsv", "--N0", "100", "--N", str(scale.n),
                           "--alpha", "0.001", "--skip", str(scale.fixed_skip), "--max", str(scale.max_images),
                           "--seed", "0"]
    commands["sequential"] = [*common, f"{base}_sequential_skip{scale.sequential_skip}.tsv", "--sequential",
                              "--radii", *RADII, "--N0", "100", "--N-max", str(scale.n), "--alpha", "0.001",
                              "--skip", str(scale.sequential_skip), "--max", str(scale.max_images), "--seed", "0"]
    return commands


def output_of(command: List[str]) -> str:
    """The output file of a certify / smooth_prediction command (its fourth positional argument)."""
    return command[5]


def train_folder(commands: Dict[str, List[str]]) -> str:
    """The run folder of the cell's training (the folder of the checkpoint its evaluation steps read)."""
    step = "certify" if "certify" in commands else "smooth_prediction"
    return os.path.dirname(commands[step][3])


def smooth_prediction_array_paths(tsv: str, sigma: str) -> List[str]:
    """The ``.npy`` of a smoothed prediction's frequencies and its coverage, next to its TSV."""
    folder = os.path.dirname(tsv)
    return [os.path.join(folder, f"model_conf_{sigma}_train{suffix}") for suffix in (".npy", ".covered.npy")]


def smooth_prediction_arrays(tsv: str, sigma: str) -> List[str]:
    return [path for path in smooth_prediction_array_paths(tsv, sigma) if os.path.exists(path)]
