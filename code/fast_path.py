"""The training fast path: data held on the device, channels-last, CUDA graphs and ``--compile``.

None of it changes what a method computes; each changes how fast a step runs, and some change the
float rounding or, with CUDA graphs, which random numbers are drawn (from the same distribution).
``train_utils`` calls these pieces; a method's step needs none of them.

* ``TensorLoader``: batches of a data set held as tensors on the device (``--data-on-device``), with
  CIFAR's random crop and flip drawn there (``crop_flip``).
* ``use_channels_last``: resolves ``--channels-last``.
* ``GraphedStep``: a training step replayed from a CUDA graph (``--cuda-graphs``).
* ``compile_model``: regional ``torch.compile`` of the residual blocks (``--compile``).
"""
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common import UserError

# Data sets whose training augmentation (random crop and flip) ``TensorLoader`` draws on the device.
ON_DEVICE_AUGMENTED = ("cifar10", "cifar100")
# Data sets held on the device with ``--data-on-device auto``.
ON_DEVICE_BY_DEFAULT = ("mnist", "fmnist")


def add_fast_path_arguments(parser):
    """The options of the fast path, in their own group of ``parser``."""
    fast = parser.add_argument_group("fast path (off by default where it changes numerics)")
    fast.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward passes")
    fast.add_argument("--channels-last", nargs="?", const="yes", choices=["auto", "yes", "no"], default="auto",
                      help="channels-last memory format for the model and its inputs (same formulas, other "
                           "float rounding); auto: on a CPU (where oneDNN's channels-last kernels are faster) "
                           "and with --bf16")
    fast.add_argument("--cuda-graphs", action="store_true",
                      help="replay each training step from a CUDA graph (CAT-RS; one CUDA device): it removes "
                           "the launch cost of a small network's many short kernels; the random draws differ "
                           "from an eager run's (same distribution)")
    fast.add_argument("--compile", action="store_true",
                      help="run the model through torch.compile: each residual block (the whole model if it has "
                           "none) becomes a few fused kernels; the first steps of each batch shape and mode "
                           "compile; other float rounding. With a small network on a GPU, pair it with "
                           "--cuda-graphs")
    fast.add_argument("--data-on-device", choices=["auto", "yes", "no"], default="auto",
                      help="keep the whole data set on the device (CIFAR: random crop and flip drawn on the "
                           "device every epoch; not for imagenet); auto: for mnist and fmnist")


def check_data_on_device(args):
    """``--data-on-device yes`` works where the training augmentation can run on the device."""
    if args.data_on_device == "yes" and args.dataset == "imagenet":
        raise UserError("--data-on-device yes is not available for imagenet (its random resized crop runs "
                        "in the loader, and the data set does not fit a device); use --data-on-device no or auto")


def data_on_device(args) -> bool:
    """Whether ``--data-on-device`` (auto / yes / no) holds this run's data on the device."""
    return args.data_on_device == "yes" or (args.data_on_device == "auto" and args.dataset in ON_DEVICE_BY_DEFAULT)


def check_cuda_graphs(args, supported: bool, device: torch.device, distributed: bool):
    """``--cuda-graphs`` needs a method whose graphed step a GPU has run, one process and a CUDA device."""
    if not args.cuda_graphs:
        return
    if not supported:
        raise UserError("--cuda-graphs is not available for this method (CAT-RS only); leave it out")
    if device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device, and this run is on {device.type}; leave it out")
    if distributed:
        raise UserError("--cuda-graphs runs in one process; leave it out under torchrun")


# --------------------------------------------------------------------------- data on the device

class TensorLoader:
    """Batches of a data set held as tensors on the device (no per-batch host copies).

    Iterating yields one tuple of tensors per batch, one per item of the data set's examples.
    Shuffling draws ``torch.randperm`` from its own generator, whose state goes
    into checkpoints; under torchrun each process takes every K-th example.

    ``augment="crop_flip"`` (CIFAR training) gives each image of every epoch a
    fresh random crop and flip, as torchvision's ``RandomCrop(32, padding=4)``
    then ``RandomHorizontalFlip()``: a shift drawn uniformly from [-4, 4]^2
    (zero padding) and a flip with probability 1/2, per image. The draws come
    from the same checkpointed generator, right after the epoch's order, so a
    resumed run sees the same crops; they are applied on the device, batch by
    batch.
    """

    PAD = 4

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, device, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1, augment: Optional[str] = None):
        if augment not in (None, "crop_flip"):
            raise ValueError(f"unknown augmentation {augment!r}")
        items = [dataset[i] for i in range(len(dataset))]
        self.tensors = [torch.stack([torch.as_tensor(item[j]) for item in items]).to(device)
                        for j in range(len(items[0]))]
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator
        self.rank, self.world_size = rank, world_size
        self.augment = augment

    def _indices(self):
        n = self.tensors[0].shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        return order[self.rank::self.world_size]

    def __len__(self):
        n = len(range(self.rank, self.tensors[0].shape[0], self.world_size))
        return (n + self.batch_size - 1) // self.batch_size

    def _draw_crop_flip(self):
        """Per position of the epoch's order (all processes): row and column shift in [-4, 4], flip or not."""
        n = self.tensors[0].shape[0]
        shifts = torch.randint(-self.PAD, self.PAD + 1, (n, 2), generator=self.generator)
        flips = torch.rand(n, generator=self.generator) < 0.5
        return shifts[self.rank::self.world_size], flips[self.rank::self.world_size]

    def __iter__(self):
        device = self.tensors[0].device
        order = self._indices().to(device)
        if self.augment:
            shifts, flips = (t.to(device) for t in self._draw_crop_flip())
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            batch = tuple(t[index] for t in self.tensors)
            if self.augment:
                chunk = slice(start, start + self.batch_size)
                batch = (crop_flip(batch[0], shifts[chunk], flips[chunk], self.PAD),) + batch[1:]
            yield batch


def crop_flip(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image [n, C, H, W] zero-padded by ``pad``, cropped back to H x W at offset ``pad + shift``, then
    mirrored left-right where ``flips``: torchvision's RandomCrop(padding=pad) and RandomHorizontalFlip with
    the random choices given. ``shifts`` [n, 2] holds (row, column) shifts in [-pad, pad]."""
    n, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (pad + shifts[:, 0]).view(n, 1) + torch.arange(height, device=images.device).view(1, height)
    columns = torch.arange(width, device=images.device).view(1, width)
    columns = torch.where(flips.view(n, 1), width - 1 - columns, columns)
    columns = (pad + shifts[:, 1]).view(n, 1) + columns
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channels = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows.view(n, 1, height, 1), columns.view(n, 1, 1, width)]


# --------------------------------------------------------------------------- memory format

def use_channels_last(choice, device: torch.device, bf16: bool) -> bool:
    """Resolve ``--channels-last`` (auto / yes / no; a bool passes through, as in old checkpoints' args)."""
    if isinstance(choice, bool):
        return choice
    if choice == "auto":
        return device.type == "cpu" or bf16
    return choice == "yes"


# --------------------------------------------------------------------------- CUDA graphs

class GraphedStep:
    """A training step, ``step(*tensors) -> tuple of tensors``, replayed from a CUDA graph.

    ``step`` is one whole SGD step on one mini-batch (forward passes, attack,
    loss, optimizer step) that reads nothing back to the host and returns
    detached tensors. For each input
    shape, its first ``WARMUP`` calls run eagerly on a side stream (real
    steps: they let cuDNN, the allocator and the optimizer's state settle, as
    capture requires), the next call is captured into a graph and replayed,
    and every later call copies its tensors into the graph's inputs and
    replays it: the same kernels on the same memory, launched with one call.
    Each call is exactly one step, eager or replayed. Replays advance the CUDA
    generator as eager steps do, but draw other numbers (same distribution).
    The learning rate and other optimizer settings are fixed at capture, so a
    ``GraphedStep`` serves one epoch. The outputs returned are copies.
    """

    WARMUP = 3

    def __init__(self, step: Callable):
        self.step = step
        self.graphs: Dict[tuple, tuple] = {}
        self.eager_calls: Dict[tuple, int] = {}
        self.side_stream = torch.cuda.Stream()

    def __call__(self, *inputs: torch.Tensor):
        key = tuple((t.shape, t.dtype, t.stride()) for t in inputs)
        if key not in self.graphs:
            calls = self.eager_calls.get(key, 0)
            if calls < self.WARMUP:
                self.eager_calls[key] = calls + 1
                self.side_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side_stream):
                    outputs = self.step(*inputs)
                torch.cuda.current_stream().wait_stream(self.side_stream)
                return outputs
            static_inputs = tuple(t.clone() for t in inputs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_outputs = self.step(*static_inputs)
            self.graphs[key] = (graph, static_inputs, static_outputs)
        graph, static_inputs, static_outputs = self.graphs[key]
        for static, given in zip(static_inputs, inputs):
            static.copy_(given)
        graph.replay()
        return tuple(t.clone() for t in static_outputs)


# --------------------------------------------------------------------------- torch.compile

# Residual blocks (ours and torchvision's): ``--compile`` compiles each of these instead of the whole model.
COMPILED_BLOCKS = ("BasicBlock", "Bottleneck")


def compile_model(model: torch.nn.Module) -> List[torch.nn.Module]:
    """Compile ``model`` in place for ``--compile``; returns the modules compiled.

    Each residual block is compiled on its own (regional compilation): the
    blocks of a ResNet share their code, so one compilation per block shape
    and mode serves them all, in seconds rather than the minutes of the whole
    unrolled network, and the fusion that pays (batch norm, ReLU and the
    residual sum of a block in one pass) lies inside a block. A model without
    such blocks is compiled whole. ``Module.compile`` keeps the parameter
    names, so checkpoints are unchanged. Shapes stay static (``dynamic=False``:
    the last, smaller batch of an epoch gets its own kernels, and the full
    batches keep theirs), and the recompile limit is raised to cover each
    block shape in train, attack (eval) and test mode at two batch sizes.
    """
    import torch._dynamo
    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed between torch versions
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 64))
    compiled = [module for module in model.modules() if type(module).__name__ in COMPILED_BLOCKS] or [model]
    for module in compiled:
        module.compile(dynamic=False)
    return compiled
