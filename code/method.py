"""What a training method is written against: ``Method``, the ``TrainingContext`` its loss gets, and helpers.

A ``train_*.py`` script describes its method with a ``Method`` (the loss of one mini-batch, its options,
its run folder) and hands it to ``train_utils.train_main``, which runs everything else. Its
``batch_loss`` gets a ``TrainingContext`` (model, optimizer, device, options), runs attacks under
``attack_mode``, reports ``accuracy`` and, when it splits the loader batch, is called once per
``chunk_minibatches`` mini-batch of ``noise_copies`` (m) copies.
"""
import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
from torch.nn.parallel import DistributedDataParallel

from distributed import Distributed
from fast_path import GraphedStep


def noise_copies(args) -> int:
    """``--num-noise-vec`` (m): the chunked methods split each loader batch into m mini-batches."""
    return args.num_noise_vec


@dataclass
class Method:
    """A training method: the loss of one mini-batch, its options and its run folder.

    ``batch_loss(ctx, epoch, *tensors) -> (objective, logged loss, accuracy)`` is the method: the loss
    of one mini-batch in the 0-based ``epoch``, whose tensors are the items of a loader batch on the
    device (images [b x C x H x W] in [0, 1], labels [b], and for the ``train_t{sigma}`` split the
    smoothed prediction pi [b x K]). ``objective`` is the 0-d tensor SGD minimises, ``logged`` the 0-d
    tensor log.txt averages as the train loss, ``accuracy`` the train accuracy in % (0-d tensor) or None
    when ``measures_train_accuracy`` is False (as published: log.txt's column then holds 0.0 and the
    console says "n/a"). The model is in train mode (attacks switch it with ``attack_mode``). A
    ``batch_loss`` that reads nothing back to the host lets the host run ahead of the device, and can
    be replayed from a CUDA graph.

    ``method_path(args)`` names the run folder below ``{logdir}/{dataset}/``; ``add_arguments(parser)``
    adds the method's options and ``defaults`` overrides common defaults (e.g. ``{"epochs": 150}``);
    ``train_split(args)`` names the training split; ``lr_multiplier(args, epoch)`` scales the step
    schedule's learning rate. ``minibatches(args)``: each loader batch is split into that many
    consecutive mini-batches, one SGD step each (``chunk_minibatches``). ``logged_per_example(args)``:
    how many times each example of a mini-batch counts in the epoch's averages.
    ``supports_cuda_graphs``: a GPU has run the method's graphed step (``--cuda-graphs``).
    """
    description: str
    method_path: Callable
    batch_loss: Callable
    add_arguments: Callable = lambda parser: None
    defaults: Dict = field(default_factory=dict)
    train_split: Callable = lambda args: "train"
    lr_multiplier: Callable = lambda args, epoch: 1.0
    minibatches: Callable = lambda args: 1
    logged_per_example: Callable = lambda args: 1
    measures_train_accuracy: bool = True
    supports_cuda_graphs: bool = False


# --------------------------------------------------------------------------- meters

class AverageMeter:
    """Running average of a quantity.

    ``update`` takes a number or a tensor; tensors are summed where they are
    (on a GPU, reading a value every step would make the host wait for the
    device each step), and ``avg`` reads the sum once.
    """

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n=1):
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        self.sum = self.sum + value * n
        self.count += n

    @property
    def avg(self) -> float:
        return float(self.sum) / max(self.count, 1)


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``output`` logits in percent, as a 0-d tensor on their device (no host read)."""
    with torch.no_grad():
        return 100.0 * (output.argmax(1) == target).float().mean()


# --------------------------------------------------------------------------- context given to methods

@dataclass
class TrainingContext:
    """What a method's ``batch_loss`` uses: the model (DDP-wrapped under torchrun), optimizer, device, options."""
    args: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    dist: Distributed
    channels_last: bool = False   # ``--channels-last`` resolved for this device (``use_channels_last``)

    @property
    def base_model(self) -> torch.nn.Module:
        """The unwrapped model: attacks run on it so DDP sees no extra forward passes."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def autocast(self):
        if self.args.bf16:
            # a graph cannot keep autocast's cache of cast weights between replays
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                  cache_enabled=not self.args.cuda_graphs)
        return contextlib.nullcontext()

    def graphed(self, step: Callable) -> Callable:
        """``step`` replayed from CUDA graphs with ``--cuda-graphs`` (see ``GraphedStep``), else ``step``."""
        return GraphedStep(step) if self.args.cuda_graphs else step

    def memory_format(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the model's memory format: channels-last for an image batch where that is in use."""
        if self.channels_last and tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def to_device(self, *tensors):
        return tuple(self.memory_format(t.to(self.device, non_blocking=True)) for t in tensors)

    def step(self, loss: torch.Tensor):
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def log_batch(self, epoch: int, i: int, num_batches: int, loss: AverageMeter, acc: AverageMeter,
                  started: float):
        if self.dist.is_main and (i % self.args.print_freq == 0 or i == num_batches - 1):
            # a method that does not measure its train accuracy leaves ``acc`` empty
            acc_text = f"{acc.avg:.3f}" if acc.count else "n/a"
            print(f"Epoch: [{epoch}][{i}/{num_batches}]\tTime {time.time() - started:.1f}s\t"
                  f"Loss {loss.avg:.4f}\tAcc@1 {acc_text}", flush=True)


@contextlib.contextmanager
def attack_mode(model: torch.nn.Module):
    """Eval mode with frozen parameters for an attack; restores train mode and grads after."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


# --------------------------------------------------------------------------- the mini-batches

def chunk_minibatches(tensors, num: int):
    """Split a loader batch (a sequence of tensors) into ``num`` consecutive mini-batches of len // num examples.

    The chunked methods take one SGD step per mini-batch. With ``num`` 1 the
    batch itself is the one mini-batch; otherwise the remainder of the
    division is dropped, as in the published code, and a batch smaller than
    ``num`` yields nothing.
    """
    if num == 1:
        yield tuple(tensors)
        return
    size = tensors[0].shape[0] // num
    if size == 0:
        return
    for i in range(num):
        yield tuple(t[i * size:(i + 1) * size] for t in tensors)
