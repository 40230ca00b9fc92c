"""The training loop every ``train_*.py`` shares.

A training script describes its method with a ``Method`` (method.py: the loss
of one mini-batch, with its attack, its options and its run-folder path).
``train_main`` does everything else: the common options, the data, the model,
SGD with the step schedule, the epoch (meters, timing, console and device
moves; ``train_epoch``), noisy test accuracy after every epoch, ``log.txt``,
TensorBoard, a copy of ``code/`` in the run folder, and checkpoints. The fast
path (data on the device, channels-last, CUDA graphs, ``--compile``) lives in
``fast_path``.

Checkpoints hold the published keys (``epoch``, ``arch``, ``state_dict``,
``optimizer``) plus the scheduler, the rows of ``log.txt`` and what an exact
resume needs (resume.py: the random states, the arguments and their check).
They are written atomically. ``--resume`` continues from the last completed
epoch.

Under ``torchrun --nproc_per_node K`` the model is wrapped in
DistributedDataParallel, each process takes ``--batch / K`` examples of
every batch (a ``--batch`` that K does not divide is refused), and only
rank 0 writes logs and checkpoints (whose keys are those of the unwrapped
model). One run writes a run folder at a time (``output_lock``).

Checkpoints also record the model's first layer (``input_layer``, see
checkpoint_info.py) and store the paths among the arguments relative to the
repository root (``resume.stored_arguments``); a resume compares paths by
the file they name.
"""
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

import checkpoint_info
from architectures import ARCHITECTURES, check_architecture, get_architecture
from checkpoints import atomic_save, load_checkpoint
from common import (ArgumentParser, UserError, replace_atomic, nonnegative_float, nonnegative_int, positive_float,
                    positive_int, run_cli, RESUME_TRAINING)
from datasets import DATASETS, DEFAULT_SMOOTH_PREDICTION, WithSmoothPrediction, get_dataset
from distributed import Distributed
from fast_path import (ON_DEVICE_AUGMENTED, TensorLoader, add_fast_path_arguments, check_cuda_graphs,
                       check_data_on_device, compile_model, data_on_device, use_channels_last)
# the method-facing API and the resume state, re-exported under their earlier home
from method import (AverageMeter, Method, TrainingContext, accuracy, attack_mode,  # noqa: F401
                    chunk_minibatches, noise_copies)
from output_lock import OutputLock
from resume import (OVERRIDES_NAME, RESUME_FREE_ARGUMENTS, apply_optimizer_arguments, changed_arguments,  # noqa: F401
                    check_resume_arguments, gather_rng_states, loader_seed, record_overrides, seed_everything,
                    set_rng_state, stored_arguments)

CODE_DIR = os.path.dirname(os.path.abspath(__file__))
LOG_HEADER = "epoch\ttime\tlr\ttrain loss\ttrain acc\ttestloss\ttest acc"
CHECKPOINT_NAME = "checkpoint.pth.tar"


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
                        help="continue the run in the run folder from its last completed epoch; the arguments "
                             "must equal those stored in its checkpoint (a larger --epochs is fine)")
    parser.add_argument("--resume-changed-args", action="store_true",
                        help="with --resume: continue even though arguments that change the training differ "
                             "from the checkpoint's (recorded in the run folder's resume_overrides.txt)")
    parser.add_argument("--pretrained-model", type=str, default="", help="start from this checkpoint's weights")
    parser.add_argument("--seed", type=int, default=None, help="random seed (reproducible runs)")
    parser.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                        help="use only the first N training examples")
    parser.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                        help="use only the first N test examples")
    parser.add_argument("--smooth-prediction", type=str, default=None, metavar="PATH",
                        help="smoothed prediction .npy for the train_t{sigma} split (default: "
                             f"{DEFAULT_SMOOTH_PREDICTION})")
    parser.add_argument("--logdir", type=str, default="logs", help="where run folders go")
    checkpoint_info.add_input_layer_argument(parser, default=checkpoint_info.DEFAULT_INPUT_LAYER)
    add_fast_path_arguments(parser)
    method.add_arguments(parser)
    parser.set_defaults(**method.defaults)
    return parser


def run_folder(args, method_path: str) -> str:
    return os.path.join(args.logdir, args.dataset, method_path, args.arch, str(args.id))


def check_batch_split(batch: int, world_size: int):
    """Refuse a ``--batch`` that the torchrun processes cannot share equally (the remainder would be dropped)."""
    if batch % world_size:
        low, high = batch // world_size * world_size, -(-batch // world_size) * world_size
        raise UserError(f"--batch {batch} does not split evenly over {world_size} processes; give a multiple of "
                        f"{world_size}" + (f" ({low} or {high})" if low else f" ({high})"))


# --------------------------------------------------------------------------- data

def make_loaders(args, method: Method, device, dist: Distributed, generator: torch.Generator):
    """The training and test loaders of this process: ``TensorLoader``s on the device or ``DataLoader``s."""
    on_device = data_on_device(args)
    # On the device, CIFAR images are stored unaugmented and cropped and flipped there, fresh every epoch.
    augment_on_device = on_device and args.dataset in ON_DEVICE_AUGMENTED
    train_data = get_dataset(args.dataset, method.train_split(args), smooth_prediction=args.smooth_prediction,
                             augment=not augment_on_device)
    test_data = get_dataset(args.dataset, "test")
    if isinstance(train_data, WithSmoothPrediction):   # pi must be computed for every image used
        train_data.check_covers(min(args.train_subset or len(train_data), len(train_data)))
    if args.train_subset:
        train_data = Subset(train_data, range(min(args.train_subset, len(train_data))))
    if args.test_subset:
        test_data = Subset(test_data, range(min(args.test_subset, len(test_data))))
    per_process = max(1, args.batch // dist.world_size)
    if on_device:
        train_loader = TensorLoader(train_data, per_process, True, device, generator, dist.rank, dist.world_size,
                                    augment="crop_flip" if augment_on_device else None)
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


# --------------------------------------------------------------------------- the epoch

def sgd_step(method: Method, ctx: TrainingContext, epoch: int) -> Callable:
    """``step(*tensors) -> (logged loss,)`` or ``(logged loss, accuracy)``: one SGD step on one mini-batch.

    The values returned are detached 0-d tensors: a tensor that held the
    autograd graph would keep it alive into the next step.
    """
    def step(*tensors):
        objective, logged, train_accuracy = method.batch_loss(ctx, epoch, *tensors)
        ctx.step(objective)
        return (logged.detach(),) if train_accuracy is None else (logged.detach(), train_accuracy.detach())
    return step


def train_epoch(method: Method, ctx: TrainingContext, loader, epoch: int) -> Tuple[float, float]:
    """One epoch of ``method`` over ``loader``: (mean train loss, train accuracy in %, 0.0 if not measured).

    The means weigh each mini-batch by its examples (times ``logged_per_example``);
    the console shows them every ``--print-freq`` batches.
    """
    step = ctx.graphed(sgd_step(method, ctx, epoch))
    num_minibatches, weight = method.minibatches(ctx.args), method.logged_per_example(ctx.args)
    losses, top1 = AverageMeter(), AverageMeter()
    started = time.time()
    for i, batch in enumerate(loader):
        for minibatch in chunk_minibatches(ctx.to_device(*batch), num_minibatches):
            loss, *train_accuracy = step(*minibatch)
            count = minibatch[0].shape[0] * weight
            losses.update(loss, count)
            if train_accuracy:
                top1.update(train_accuracy[0], count)
        ctx.log_batch(epoch, i, len(loader), losses, top1, started)
    return losses.avg, top1.avg


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


# --------------------------------------------------------------------------- log.txt

def write_log(path: str, rows: List[str]):
    """Rewrite ``log.txt`` atomically from the header and the rows of completed epochs."""
    replace_atomic(path, lambda handle: handle.write("".join(line + "\n" for line in [LOG_HEADER] + rows)))


def format_log_row(epoch, seconds, lr, train_loss, train_acc, test_loss, test_acc) -> str:
    return "{}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{:.3}".format(
        epoch, seconds, lr, train_loss, train_acc, test_loss, test_acc)


# --------------------------------------------------------------------------- learning-rate schedule

def lr_factor(epoch: int, step_size: int, gamma: float) -> float:
    """The step schedule's factor on the initial rate in the 0-based ``epoch``, as the published runs used it.

    The published scripts call ``StepLR.step(epoch)`` after epoch ``epoch``, which sets the rate of the
    next epoch to lr0 * gamma^(epoch // step_size). So epoch 0 runs at lr0 and epoch e >= 1 at
    lr0 * gamma^((e - 1) // step_size): with step 50, lr0 for epochs 0..50, lr0 * gamma for 51..100, ...
    """
    if epoch <= 0:
        return 1.0
    return gamma ** ((epoch - 1) // step_size)


def lr_schedule(method: Method, args) -> Callable[[int], float]:
    """epoch -> the factor on ``--lr`` in that epoch: the step schedule times the method's multiplier."""
    return lambda epoch: lr_factor(epoch, args.lr_step_size, args.gamma) * method.lr_multiplier(args, epoch)


# --------------------------------------------------------------------------- the run

def parse_args(method: Method, argv=None):
    parser = build_parser(method)
    args = parser.parse_args(argv)
    if args.epochs == 0:
        parser.error("--epochs 0 trains nothing and writes no checkpoint; give the total number of epochs (1 or more)")
    if args.id is None:
        args.id = random.randint(0, 9999)
    try:
        check_architecture(args.arch, args.dataset)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def train_main(method: Method, argv=None):
    """Parse the options and train; bad input ends with one line and exit status 2."""
    run_cli(lambda: _train(method, parse_args(method, argv)), resume_hint=RESUME_TRAINING)


@dataclass
class _Run:
    """What a training run carries from epoch to epoch."""
    method: Method
    ctx: TrainingContext
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: object
    test_loader: object
    loader_generator: torch.Generator
    folder: str
    log_rows: List[str]
    writer: object = None
    lock: Optional[OutputLock] = None   # rank 0's hold on the run folder


def _train(method: Method, args):
    check_data_on_device(args)
    check_batch_split(args.batch, int(os.environ.get("WORLD_SIZE", "1")))
    dist = Distributed()
    check_cuda_graphs(args, method.supports_cuda_graphs, dist.device, dist.enabled)
    folder = run_folder(args, method.method_path(args))
    checkpoint, overrides = _read_checkpoint(method, args, folder, dist)
    if checkpoint is not None and int(checkpoint["epoch"]) >= args.epochs:
        if dist.is_main:
            print(f"already complete: {int(checkpoint['epoch'])} epochs, {_checkpoint_path(folder)}", flush=True)
            if not os.path.exists(os.path.join(folder, "log.txt")):   # e.g. a checkpoint copied without it
                write_log(os.path.join(folder, "log.txt"), checkpoint["log"])
                print(f"wrote {os.path.join(folder, 'log.txt')} from the checkpoint's rows", flush=True)
        dist.close()
        return
    run, start_epoch = _start(method, args, dist, folder, checkpoint, overrides)
    try:
        for epoch in range(start_epoch, args.epochs):
            _run_epoch(run, epoch)
    finally:
        if run.lock is not None:
            run.lock.release()
    if run.writer is not None:
        run.writer.close()
    if dist.is_main:
        print(f"run folder: {folder}", flush=True)
    dist.barrier()
    dist.close()


def _checkpoint_path(folder: str) -> str:
    return os.path.join(folder, CHECKPOINT_NAME)


def _read_checkpoint(method: Method, args, folder: str, dist: Distributed):
    """(the run folder's checkpoint or None, the argument changes ``--resume-changed-args`` accepted).

    Refuses an existing checkpoint without ``--resume``; a resume without ``--seed`` takes the stored one.
    """
    checkpoint_path = _checkpoint_path(folder)
    if not os.path.exists(checkpoint_path):
        if args.resume and dist.is_main:
            print(f"--resume: no checkpoint in '{folder}', starting a fresh run", flush=True)
        return None, []
    if not args.resume:
        raise UserError(f"run folder '{folder}' already holds a checkpoint; add --resume to continue it, "
                        "or choose another --id")
    checkpoint = load_checkpoint(checkpoint_path)
    stored = checkpoint.get("args")
    if args.seed is None and isinstance(stored, dict) and stored.get("seed") is not None:
        args.seed = stored["seed"]
    parser = build_parser(method)
    defaults = {key: parser.get_default(key) for key in vars(args)}
    return checkpoint, check_resume_arguments(checkpoint, args, defaults, checkpoint_path)


def _build_model(args, device: torch.device) -> Tuple[torch.nn.Module, bool]:
    """The model (initial or ``--pretrained-model`` weights, memory format, compiled) and channels-last."""
    model = get_architecture(args.arch, args.dataset, device, args.input_layer)
    if args.pretrained_model:
        pretrained = load_checkpoint(args.pretrained_model, map_location=device, dataset=args.dataset)
        if pretrained["arch"] != args.arch:
            raise UserError(f"--pretrained-model '{args.pretrained_model}' is a {pretrained['arch']}, not a {args.arch}")
        recorded = checkpoint_info.recorded_input_layer(pretrained, args.pretrained_model)
        if recorded not in (None, args.input_layer):
            raise UserError(f"--pretrained-model '{args.pretrained_model}' was trained with the input layer "
                            f"'{recorded}'; add --input-layer {recorded}")
        model.load_state_dict(pretrained["state_dict"])
    # resolved apart from ``args``, which the checkpoint stores as given (a resume compares them)
    channels_last = use_channels_last(args.channels_last, device, args.bf16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_model(model)
    return model, channels_last


def _start(method: Method, args, dist: Distributed, folder: str, checkpoint: Optional[dict],
           overrides: List[str]) -> Tuple[_Run, int]:
    """Seed, load the data, build the model and optimizer (restored from ``checkpoint`` if given) and
    prepare the run folder; returns the run and its first epoch."""
    if args.seed is None:
        args.seed = random.randint(0, 2 ** 31)
    seed_everything(args.seed + dist.rank)
    loader_generator = torch.Generator()
    loader_generator.manual_seed(loader_seed(args.seed))
    device = dist.device
    if device.type == "cuda":
        # the shapes repeat every step, so cuDNN's timed choice of kernels pays off (as in torchvision's references)
        torch.backends.cudnn.benchmark = True
    train_loader, test_loader = make_loaders(args, method, device, dist, loader_generator)
    model, channels_last = _build_model(args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    # LambdaLR's factor for epoch e is the rate used in epoch e (the scheduler steps after each epoch).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(method, args))
    start_epoch, log_rows = 0, []
    if checkpoint is not None:
        start_epoch, log_rows = _restore(checkpoint, model, scheduler, loader_generator, dist, args, overrides)
        if dist.is_main:
            print(f"resuming '{folder}' after epoch {start_epoch - 1}", flush=True)
            if overrides:
                print(f"warning: resuming with changed arguments ({'; '.join(overrides)}); recorded in "
                      f"{os.path.join(folder, OVERRIDES_NAME)}", file=sys.stderr, flush=True)
    if dist.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    writer, lock = None, None
    if dist.is_main:   # one run writes a run folder at a time
        lock = OutputLock(_checkpoint_path(folder)).acquire()   # (``OutputBusy`` names the run that holds it)
        try:
            writer = _prepare_folder(method, folder, log_rows, start_epoch, overrides)
        except BaseException:
            lock.release()
            raise
    ctx = TrainingContext(args=args, model=model, optimizer=optimizer, device=device, dist=dist,
                          channels_last=channels_last)
    return _Run(method, ctx, scheduler, train_loader, test_loader, loader_generator, folder, log_rows,
                writer, lock), start_epoch


def _restore(checkpoint: dict, model: torch.nn.Module, scheduler, loader_generator: torch.Generator,
             dist: Distributed, args, overrides: List[str]) -> Tuple[int, List[str]]:
    """Load the checkpoint's weights, optimizer, schedule and random states; (first epoch, log rows)."""
    optimizer = scheduler.optimizer
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if "scheduler" in checkpoint:
        scheduler.load_state_dict(checkpoint["scheduler"])
    states = checkpoint.get("rng")
    if states:
        set_rng_state(states[dist.rank] if dist.rank < len(states) else states[0], loader_generator)
    if overrides:
        apply_optimizer_arguments(optimizer, scheduler, args)
    return int(checkpoint["epoch"]), list(checkpoint.get("log", []))


def _prepare_folder(method: Method, folder: str, log_rows: List[str], start_epoch: int, overrides: List[str]):
    """The run folder with a copy of ``code/``, ``log.txt`` so far and any overrides; its TensorBoard writer."""
    os.makedirs(folder, exist_ok=True)
    shutil.copytree(CODE_DIR, os.path.join(folder, "code"), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "dataset_cache"))
    write_log(os.path.join(folder, "log.txt"), log_rows)
    if overrides:
        record_overrides(folder, start_epoch, overrides)
    if not method.measures_train_accuracy:
        print("note: this method does not measure its train accuracy (as published): log.txt's train acc "
              "column holds 0.0 and the console shows n/a", flush=True)
    return _summary_writer(folder, start_epoch)


def _run_epoch(run: _Run, epoch: int):
    """Train one epoch, test, step the schedule; on rank 0 log the epoch and save the checkpoint."""
    ctx = run.ctx
    if isinstance(getattr(run.train_loader, "sampler", None), DistributedSampler):
        run.train_loader.sampler.set_epoch(epoch)
    lr = ctx.optimizer.param_groups[0]["lr"]
    before = time.time()
    ctx.model.train()
    train_loss, train_acc = ctx.dist.mean(*train_epoch(run.method, ctx, run.train_loader, epoch))
    test_loss, test_acc = test(ctx, run.test_loader, ctx.args.noise_sd)
    seconds = time.time() - before
    run.scheduler.step()
    rngs = gather_rng_states(ctx.dist, run.loader_generator)
    if ctx.dist.is_main:
        _record_epoch(run, epoch, lr, seconds, (train_loss, train_acc, test_loss, test_acc), rngs)


def _record_epoch(run: _Run, epoch: int, lr: float, seconds: float, values, rngs: List[dict]):
    """Console line, log.txt row, checkpoint and TensorBoard scalars of a finished epoch."""
    train_loss, train_acc, test_loss, test_acc = values
    args, model, optimizer = run.ctx.args, run.ctx.base_model, run.ctx.optimizer
    if not np.isfinite(train_loss):
        print(f"warning: train loss is {train_loss} in epoch {epoch}", file=sys.stderr)
    run.log_rows.append(format_log_row(epoch, seconds, lr, train_loss, train_acc, test_loss, test_acc))
    train_acc_text = f"{train_acc:.2f}" if run.method.measures_train_accuracy else "n/a"
    print(f"epoch {epoch}/{args.epochs - 1}: lr {lr:.3g}  train loss {train_loss:.4f}  train acc "
          f"{train_acc_text}  noisy test loss {test_loss:.4f}  noisy test acc {test_acc:.2f}  "
          f"({seconds:.1f}s)", flush=True)
    atomic_save({"epoch": epoch + 1, "arch": args.arch, "state_dict": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "rng": rngs, "args": stored_arguments(args), "log": run.log_rows,
                 checkpoint_info.INPUT_LAYER_KEY: args.input_layer}, _checkpoint_path(run.folder))
    write_log(os.path.join(run.folder, "log.txt"), run.log_rows)
    if run.writer is not None:
        for name, value in (("loss/train", train_loss), ("loss/test", test_loss), ("accuracy/train", train_acc),
                            ("accuracy/test", test_acc), ("learning_rate", lr), ("time/epoch", seconds)):
            run.writer.add_scalar(name, value, epoch)
        run.writer.flush()


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
