"""What a checkpoint says about how to use its model: its first layer, the sigma it was trained at, its format.

Input layer
    A model is ``Sequential(first layer, net)`` and the first layer keeps no
    tensors in ``state_dict``, so a checkpoint loads into a model with any first
    layer, silently. Released models were trained with three
    (``datasets.INPUT_LAYERS``): ``normalize``, (x - mean) / sd (Cohen et al.,
    Stability, Consistency, SmoothMix, CAT-RS and this project); ``center``,
    x - mean (SmoothAdv); ``none``, the identity (MACER). ``input_layer``
    decides which one a checkpoint gets:

    * a checkpoint of this project records it (key ``input_layer``; one
      written before that key existed stores ``args`` and used ``normalize``):
      that one, and a contradicting ``--input-layer`` is refused;
    * a MACER release (``{'net', 'epoch'}``, read by ``from_macer``):
      ``none``;
    * any other checkpoint of the published format: ``--input-layer`` when
      given; otherwise ``normalize``, with a note saying so, and refused when
      its path is laid out like SmoothAdv's released models
      (``.../PGD_4steps/...``), which need ``center``. On MNIST-sized data the
      three layers are the same (mean 0, sd 1) and nothing is said.

Training sigma
    ``training_sigma``: the ``noise_sd`` recorded in the checkpoint's
    arguments (this project's checkpoints), else the ``noise_{s}`` folder of
    its path (the layout of every released model folder); ``sigma_warning``
    says, in one line, when a run smooths with another sigma.
"""
import math
import os
import re
from typing import List, Optional, Tuple

from common import UserError
from datasets import INPUT_LAYERS, input_layers_differ

DEFAULT_INPUT_LAYER = "normalize"
#: The key of this project's checkpoints that records the first layer.
INPUT_LAYER_KEY = "input_layer"

INPUT_LAYER_HELP = {
    "normalize": "(x - mean) / sd: Cohen et al., Stability, Consistency, SmoothMix, CAT-RS, this project",
    "center": "x - mean: SmoothAdv's released models",
    "none": "the identity: MACER's released models",
}

# A folder of SmoothAdv's released models: pretrained_models/{dataset}/PGD_4steps/eps_64/..., DDN_2steps, PGD_1step
_SMOOTHADV_FOLDER = re.compile(r"(PGD|DDN)_\d+steps?(_.*)?")
_NOISE_FOLDER = re.compile(r"noise_(\d+(?:\.\d*)?|\.\d+)")

#: The architecture of a MACER release per data set (MACER's code has one per data set).
MACER_ARCHITECTURES = {"mnist": "lenet", "fmnist": "lenet", "cifar10": "cifar_resnet110",
                       "cifar100": "cifar100_resnet110", "imagenet": "resnet50"}


def add_input_layer_argument(parser, default: Optional[str] = None):
    """``--input-layer``; ``default`` None: what the checkpoint records, else ``normalize`` (``input_layer``)."""
    choices = "; ".join(f"{name}: {text}" for name, text in INPUT_LAYER_HELP.items())
    when_absent = (f"what the checkpoint records, else {DEFAULT_INPUT_LAYER}" if default is None
                   else f"{default}; recorded in the checkpoint")
    parser.add_argument("--input-layer", choices=INPUT_LAYERS, default=default,
                        help=f"the model's first layer ({choices}); default: {when_absent}")


def is_macer_release(checkpoint) -> bool:
    """A checkpoint written by MACER's published code: ``{'net': state_dict, 'epoch': ...}``."""
    return isinstance(checkpoint, dict) and "net" in checkpoint and "state_dict" not in checkpoint


def from_macer(checkpoint: dict, dataset: str) -> dict:
    """A MACER release as the training checkpoint of this project it is: same weights, no input layer.

    MACER's nets are those of Cohen et al. without a first layer, so their keys lack the
    ``1.`` of ``Sequential(layer, net)`` (and ResNet-50 the ``module.`` of DataParallel).
    """
    arch = MACER_ARCHITECTURES[dataset]
    prefix = "1.module." if arch == "resnet50" else "1."
    state = {prefix + (key[len("module."):] if key.startswith("module.") else key): value
             for key, value in checkpoint["net"].items()}
    return {"epoch": checkpoint.get("epoch"), "arch": arch, "state_dict": state, INPUT_LAYER_KEY: "none"}


def _folders(path: str) -> List[str]:
    return os.path.normpath(os.path.dirname(os.path.abspath(path))).split(os.sep)


def recorded_input_layer(checkpoint: dict, path: str) -> Optional[str]:
    """The first layer the checkpoint tells (this project's, a MACER release's), None for the published format."""
    recorded = checkpoint.get(INPUT_LAYER_KEY)
    if recorded is None and isinstance(checkpoint.get("args"), dict):
        recorded = DEFAULT_INPUT_LAYER   # this project's checkpoints before the key: always normalize
    if recorded is not None and recorded not in INPUT_LAYERS:
        raise UserError(f"checkpoint '{path}' records the input layer '{recorded}', which this code does not "
                        f"know ({', '.join(INPUT_LAYERS)}); update the code")
    return recorded


def input_layer(checkpoint: dict, path: str, dataset: str,
                requested: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(the first layer of the checkpoint's model, a note to print or None); ``UserError`` when it cannot be told.

    ``requested``: ``--input-layer``, None when not given. See the module's docstring for the rules.
    """
    recorded = recorded_input_layer(checkpoint, path)
    if recorded is not None:
        if requested is not None and requested != recorded:
            raise UserError(f"checkpoint '{path}' was trained with the input layer '{recorded}', not "
                            f"--input-layer {requested}; drop --input-layer")
        return recorded, None
    if requested is not None:
        return requested, None
    if not input_layers_differ(dataset):
        return DEFAULT_INPUT_LAYER, None
    smoothadv = next((f for f in _folders(path) if _SMOOTHADV_FOLDER.fullmatch(f)), None)
    if smoothadv is not None:
        raise UserError(f"checkpoint '{path}' looks like a SmoothAdv release (folder '{smoothadv}'), whose models "
                        "subtract the mean without dividing by the sd: add --input-layer center (or --input-layer "
                        "normalize if it is not one)")
    return DEFAULT_INPUT_LAYER, (f"note: checkpoint '{path}' does not record its input layer; using "
                                 f"{DEFAULT_INPUT_LAYER} ({INPUT_LAYER_HELP['normalize']}); SmoothAdv's models need "
                                 "--input-layer center, MACER's --input-layer none")


def training_sigma(checkpoint: dict, path: str) -> Tuple[Optional[float], str]:
    """(the sigma the model was trained with, where that was read) or (None, '') when nothing tells."""
    args = checkpoint.get("args")
    if isinstance(args, dict) and isinstance(args.get("noise_sd"), (int, float)):
        return float(args["noise_sd"]), "the noise_sd recorded in it"
    for folder in reversed(_folders(path)):
        match = _NOISE_FOLDER.fullmatch(folder)
        if match:
            return float(match.group(1)), f"its folder '{folder}'"
    return None, ""


def sigma_warning(checkpoint: dict, path: str, sigma: float) -> Optional[str]:
    """One warning line when ``sigma`` is not the sigma the checkpoint's model was trained with; None otherwise."""
    trained, source = training_sigma(checkpoint, path)
    if trained is None or math.isclose(trained, sigma, rel_tol=1e-9, abs_tol=1e-12):
        return None
    return (f"warning: sigma {sigma:g} is not the sigma {trained:g} the model of '{path}' was trained with "
            f"({source}); its certificates are valid for sigma {sigma:g}, give {trained:g} to evaluate the model "
            "as trained")


def usage(checkpoint: dict, path: str, dataset: str, requested_layer: Optional[str],
          sigma: float) -> Tuple[str, List[str]]:
    """(the first layer to build, the lines to print: a note on the layer, a warning on sigma) for a run of the
    checkpoint loaded from ``path`` (``checkpoints.load_checkpoint`` with the data set)."""
    layer, note = input_layer(checkpoint, path, dataset, requested_layer)
    warning = sigma_warning(checkpoint, path, sigma)
    return layer, [line for line in (note, warning) if line]
