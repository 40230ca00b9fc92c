"""The training loop every ``train_*.py`` shares (SPEC section 3).

A training script describes its method with a ``Method``: its options, its
run-folder path and its ``train`` function (one epoch). ``train_main``
does everything else: the common options, the data, the model, SGD with the
step schedule, noisy test accuracy after every epoch, ``log.txt``,
TensorBoard, a copy of ``code/`` in the run folder, and checkpoints.

Checkpoints hold the published keys (``epoch``, ``arch``, ``state_dict``,
``optimizer``) plus what an exact resume needs: the scheduler, every random
number generator state (Python, NumPy, torch CPU and CUDA, the data order)
of every process, the arguments and the rows of ``log.txt``. They are
written atomically. ``--resume`` continues from the last completed epoch;
on CPU with ``--seed`` the final weights equal those of an uninterrupted run.

Under ``torchrun --nproc_per_node K`` the model is wrapped in
DistributedDataParallel, each process takes ``--batch / K`` examples of
every batch, and only rank 0 writes logs and checkpoints (whose keys are
those of the unwrapped model).
"""
import contextlib
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from architectures import ARCHITECTURES, check_architecture, get_architecture
from common import (ArgumentParser, Distributed, UserError, atomic_save, load_checkpoint, replace_atomic,
                    nonnegative_float, nonnegative_int, positive_float, positive_int, run_cli)
from datasets import DATASETS, get_dataset, get_num_classes

CODE_DIR = os.path.dirname(os.path.abspath(__file__))
LOG_HEADER = "epoch\ttime\tlr\ttrain loss\ttrain acc\ttestloss\ttest acc"
CHECKPOINT_NAME = "checkpoint.pth.tar"


@dataclass
class Method:
    """What a training script adds to the shared loop.

    ``train(ctx, loader, epoch) -> (mean train loss, train accuracy in %)`` runs one epoch.
    ``defaults`` overrides common defaults (e.g. ``{"epochs": 150}``);
    ``train_split(args)`` names the training split; ``lr_multiplier(args, epoch)``
    scales the step schedule's learning rate.
    """
    description: str
    method_path: Callable
    train: Callable
    add_arguments: Callable = lambda parser: None
    defaults: Dict = field(default_factory=dict)
    train_split: Callable = lambda args: "train"
    lr_multiplier: Callable = lambda args, epoch: 1.0


# --------------------------------------------------------------------------- options

def build_parser(method: Method) -> ArgumentParser:
    parser = ArgumentParser(description=method.description)
    parser.add_argument("dataset", type=str, choices=DATASETS)
    parser.add_argument("arch", type=str, choices=ARCHITECTURES)
    parser.add_argument("--workers", default=4, type=nonnegative_int, metavar="N",
                        help="number of data loading workers")
    parser.add_argument("--epochs", default=90, type=nonnegative_int, metavar="N", help="number of total epochs")
    parser.add_argument("--batch", default=256, type=positive_int, metavar="N", help="batch size (all processes)")
    parser.add_argument("--lr", "--learning-rate", dest="lr", default=0.1, type=positive_float,
                        help="initial learning rate")
    parser.add_argument("--lr_step_size", type=positive_int, default=30,
                        help="epochs between learning-rate decays by gamma")
    parser.add_argument("--gamma", type=positive_float, default=0.1, help="learning-rate decay factor")
    parser.add_argument("--momentum", default=0.9, type=nonnegative_float, help="SGD momentum")
    parser.add_argument("--weight-decay", "--wd", dest="weight_decay", default=1e-4, type=nonnegative_float,
                        help="weight decay")
    parser.add_argument("--noise_sd", default=0.0, type=nonnegative_float,
                        help="standard deviation of the Gaussian noise (sigma); --noise works too")
    parser.add_argument("--print-freq", default=10, type=positive_int, help="print every N batches")
    parser.add_argument("--id", default=None, type=int, help="experiment id (random below 10000 if absent)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run folder from its last completed epoch")
    parser.add_argument("--pretrained-model", type=str, default="", help="start from this checkpoint's weights")
    parser.add_argument("--seed", type=int, default=None, help="random seed (reproducible runs)")
    parser.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                        help="use only the first N training examples")
    parser.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                        help="use only the first N test examples")
    parser.add_argument("--smooth-prediction", type=str, default=None, metavar="PATH",
                        help="smoothed prediction .npy for the train_t{sigma} split")
    parser.add_argument("--logdir", type=str, default="logs", help="where run folders go")
    fast = parser.add_argument_group("fast path (off by default where it changes numerics)")
    fast.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward passes")
    fast.add_argument("--channels-last", nargs="?", const="yes", choices=["auto", "yes", "no"], default="auto",
                      help="channels-last memory format for the model and its inputs (same formulas, other "
                           "float rounding); auto: on a CPU (oneDNN's channels-last kernels run a LeNet "
                           "forward and backward pass about 1.6x as fast) and with --bf16")
    fast.add_argument("--data-on-device", choices=["auto", "yes", "no"], default="auto",
                      help="keep the whole (MNIST-sized) data set on the device; auto: for mnist and fmnist")
    method.add_arguments(parser)
    parser.set_defaults(**method.defaults)
    return parser


def run_folder(args, method_path: str) -> str:
    return os.path.join(args.logdir, args.dataset, method_path, args.arch, str(args.id))


# --------------------------------------------------------------------------- data

class TensorLoader:
    """Batches of a data set held as tensors on the device (no per-batch host copies).

    Shuffling draws ``torch.randperm`` from its own generator, whose state goes
    into checkpoints; under torchrun each process takes every K-th example.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, device, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1):
        items = [dataset[i] for i in range(len(dataset))]
        self.tensors = [torch.stack([torch.as_tensor(item[j]) for item in items]).to(device)
                        for j in range(len(items[0]))]
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator
        self.rank, self.world_size = rank, world_size

    def _indices(self):
        n = self.tensors[0].shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        return order[self.rank::self.world_size]

    def __len__(self):
        n = len(range(self.rank, self.tensors[0].shape[0], self.world_size))
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = self._indices().to(self.tensors[0].device)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield tuple(t[index] for t in self.tensors)


def make_loaders(args, method: Method, device, dist: Distributed, generator: torch.Generator):
    train_split = method.train_split(args)
    train_data = get_dataset(args.dataset, train_split, smooth_prediction=args.smooth_prediction)
    test_data = get_dataset(args.dataset, "test")
    if args.train_subset:
        train_data = Subset(train_data, range(min(args.train_subset, len(train_data))))
    if args.test_subset:
        test_data = Subset(test_data, range(min(args.test_subset, len(test_data))))
    per_process = max(1, args.batch // dist.world_size)
    on_device = args.data_on_device == "yes" or (args.data_on_device == "auto" and args.dataset in ("mnist", "fmnist"))
    if on_device:
        train_loader = TensorLoader(train_data, per_process, True, device, generator, dist.rank, dist.world_size)
        test_loader = TensorLoader(test_data, per_process, False, device, generator)
        return train_loader, test_loader
    pin = device.type == "cuda"
    sampler = DistributedSampler(train_data, seed=args.seed or 0) if dist.enabled else None
    train_loader = DataLoader(train_data, batch_size=per_process, shuffle=sampler is None, sampler=sampler,
                              num_workers=args.workers, pin_memory=pin, generator=generator,
                              persistent_workers=False)
    test_loader = DataLoader(test_data, batch_size=per_process, shuffle=False, num_workers=args.workers,
                             pin_memory=pin)
    return train_loader, test_loader


# --------------------------------------------------------------------------- meters

class AverageMeter:
    """Running average of a quantity."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n=1):
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy of ``output`` logits in percent."""
    with torch.no_grad():
        return 100.0 * (output.argmax(1) == target).float().mean().item()


# --------------------------------------------------------------------------- context given to methods

@dataclass
class TrainingContext:
    """What a method's ``train`` uses: the model (DDP-wrapped under torchrun), optimizer, device, options."""
    args: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    num_classes: int
    dist: Distributed
    writer: object = None

    @property
    def base_model(self) -> torch.nn.Module:
        """The unwrapped model: attacks run on it so DDP sees no extra forward passes."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def autocast(self):
        if self.args.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, *tensors):
        moved = tuple(t.to(self.device, non_blocking=True) for t in tensors)
        if self.args.channels_last:
            moved = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in moved)
        return moved

    def step(self, loss: torch.Tensor):
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def log_batch(self, epoch: int, i: int, num_batches: int, loss: AverageMeter, acc: AverageMeter,
                  started: float):
        if self.dist.is_main and (i % self.args.print_freq == 0 or i == num_batches - 1):
            print(f"Epoch: [{epoch}][{i}/{num_batches}]\tTime {time.time() - started:.1f}s\t"
                  f"Loss {loss.avg:.4f}\tAcc@1 {acc.avg:.3f}", flush=True)


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


def use_channels_last(choice, device: torch.device, bf16: bool) -> bool:
    """Resolve ``--channels-last`` (auto / yes / no; a bool passes through, as in old checkpoints' args)."""
    if isinstance(choice, bool):
        return choice
    if choice == "auto":
        return device.type == "cpu" or bf16
    return choice == "yes"


def test(ctx: TrainingContext, loader, noise_sd: float):
    """Mean cross-entropy and accuracy (%) on ``loader`` under N(0, noise_sd^2) noise.

    Sums stay on the device (one host read at the end) and the passes run in
    inference mode; the values are those of the per-batch averages weighted
    by batch size.
    """
    model = ctx.base_model
    model.eval()
    loss_sum, correct, count = None, None, 0
    with torch.inference_mode():
        for batch in loader:
            inputs, targets = ctx.to_device(batch[0], batch[1])
            inputs = inputs + torch.randn_like(inputs) * noise_sd
            with ctx.autocast():
                outputs = model(inputs).float()
            batch_loss = F.cross_entropy(outputs, targets, reduction="sum")
            batch_correct = (outputs.argmax(1) == targets).sum()
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
            count += inputs.size(0)
    if count == 0:
        return 0.0, 0.0
    return loss_sum.item() / count, 100.0 * correct.item() / count


# --------------------------------------------------------------------------- random states

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(loader_generator: torch.Generator) -> dict:
    numpy_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loader_generator: torch.Generator):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    loader_generator.set_state(state["loader"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def gather_rng_states(dist: Distributed, loader_generator: torch.Generator) -> List[dict]:
    """The random states of every process (rank order), for the checkpoint."""
    mine = rng_state(loader_generator)
    if not dist.enabled:
        return [mine]
    states = [None] * dist.world_size
    torch.distributed.all_gather_object(states, mine)
    return states


# --------------------------------------------------------------------------- log.txt

def write_log(path: str, rows: List[str]):
    """Rewrite ``log.txt`` atomically from the header and the rows of completed epochs."""
    replace_atomic(path, lambda handle: handle.write("".join(line + "\n" for line in [LOG_HEADER] + rows)))


def format_log_row(epoch, seconds, lr, train_loss, train_acc, test_loss, test_acc) -> str:
    return "{}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{:.3}".format(
        epoch, seconds, lr, train_loss, train_acc, test_loss, test_acc)


# --------------------------------------------------------------------------- the loop

def parse_args(method: Method, argv=None):
    parser = build_parser(method)
    args = parser.parse_args(argv)
    if args.id is None:
        args.id = random.randint(0, 9999)
    try:
        check_architecture(args.arch, args.dataset)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def train_main(method: Method, argv=None):
    """Parse the options and train; bad input ends with one line and exit status 2."""
    run_cli(lambda: _train(method, parse_args(method, argv)))


def _train(method: Method, args):
    dist = Distributed()
    device = dist.device
    folder = run_folder(args, method.method_path(args))
    checkpoint_path = os.path.join(folder, CHECKPOINT_NAME)
    log_path = os.path.join(folder, "log.txt")

    checkpoint = None
    if os.path.exists(checkpoint_path):
        if not args.resume:
            raise UserError(f"run folder '{folder}' already holds a checkpoint; add --resume to continue it, "
                            "or choose another --id")
        checkpoint = load_checkpoint(checkpoint_path)
    elif args.resume and dist.is_main:
        print(f"--resume: no checkpoint in '{folder}', starting a fresh run", flush=True)
    if args.seed is None:
        args.seed = checkpoint["args"]["seed"] if checkpoint and "args" in checkpoint else random.randint(0, 2 ** 31)
    seed_everything(args.seed + dist.rank)
    loader_generator = torch.Generator()
    loader_generator.manual_seed(args.seed)

    train_loader, test_loader = make_loaders(args, method, device, dist, loader_generator)
    model = get_architecture(args.arch, args.dataset, device)
    if args.pretrained_model:
        pretrained = load_checkpoint(args.pretrained_model, map_location=device)
        if pretrained["arch"] != args.arch:
            raise UserError(f"--pretrained-model '{args.pretrained_model}' is a {pretrained['arch']}, not a {args.arch}")
        model.load_state_dict(pretrained["state_dict"])
    args.channels_last = use_channels_last(args.channels_last, device, args.bf16)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: args.gamma ** (epoch // args.lr_step_size) * method.lr_multiplier(args, epoch))

    start_epoch, log_rows = 0, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if "scheduler" in checkpoint:
            scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch = int(checkpoint["epoch"])
        log_rows = list(checkpoint.get("log", []))
        states = checkpoint.get("rng")
        if states:
            set_rng_state(states[dist.rank] if dist.rank < len(states) else states[0], loader_generator)
        if dist.is_main:
            print(f"resuming '{folder}' after epoch {start_epoch - 1}", flush=True)

    if dist.enabled:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp_model = model

    writer = None
    if dist.is_main:
        os.makedirs(folder, exist_ok=True)
        shutil.copytree(CODE_DIR, os.path.join(folder, "code"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "dataset_cache"))
        write_log(log_path, log_rows)
        writer = _summary_writer(folder, start_epoch)
    ctx = TrainingContext(args=args, model=ddp_model, optimizer=optimizer, device=device,
                          num_classes=get_num_classes(args.dataset), dist=dist, writer=writer)

    for epoch in range(start_epoch, args.epochs):
        if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        before = time.time()
        ddp_model.train()
        train_loss, train_acc = method.train(ctx, train_loader, epoch)
        train_loss, train_acc = dist.mean(train_loss, train_acc)
        test_loss, test_acc = test(ctx, test_loader, args.noise_sd)
        after = time.time()
        scheduler.step()
        rngs = gather_rng_states(dist, loader_generator)
        if not dist.is_main:
            continue
        if not np.isfinite(train_loss):
            print(f"warning: train loss is {train_loss} in epoch {epoch}", file=sys.stderr)
        log_rows.append(format_log_row(epoch, after - before, lr, train_loss, train_acc, test_loss, test_acc))
        atomic_save({"epoch": epoch + 1, "arch": args.arch, "state_dict": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rngs, "args": vars(args), "log": log_rows}, checkpoint_path)
        write_log(log_path, log_rows)
        if writer is not None:
            for name, value in (("loss/train", train_loss), ("loss/test", test_loss), ("accuracy/train", train_acc),
                                ("accuracy/test", test_acc), ("learning_rate", lr), ("time/epoch", after - before)):
                writer.add_scalar(name, value, epoch)
            writer.flush()
    if writer is not None:
        writer.close()
    if dist.is_main:
        print(f"run folder: {folder}", flush=True)
    dist.barrier()
    dist.close()


def _summary_writer(folder: str, start_epoch: int):
    """TensorBoard writer; on resume, events at or after ``start_epoch`` are dropped."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(folder, purge_step=start_epoch if start_epoch > 0 else None)


# --------------------------------------------------------------------------- shared loss pieces

def kl_div_per_example(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) for each row, with 0 log 0 = 0: a tensor [batch]."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target_probs.float(), reduction="none").sum(1)


def chunk_minibatches(tensors, num: int):
    """Split a loader batch (a sequence of tensors) into ``num`` consecutive mini-batches of len // num examples.

    The chunked methods take one SGD step per mini-batch (SPEC 4). The remainder
    of the division is dropped, as in the published code; a batch smaller than
    ``num`` yields nothing.
    """
    size = tensors[0].shape[0] // num
    if size == 0:
        return
    for i in range(num):
        yield tuple(t[i * size:(i + 1) * size] for t in tensors)
