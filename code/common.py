"""What every script shares: clear errors, argument types, safe checkpoints, torchrun.

Bad input raises ``UserError`` (or a ``DatasetError`` / ``ArchitectureError``);
``run_cli`` turns it into one line on stderr and exit status 2, before any
output is written.
"""
import argparse
import os
import shutil
import sys
import tempfile
from typing import Callable

import torch

from architectures import ArchitectureError, check_architecture, get_architecture
from datasets import DatasetError

EXIT_USAGE = 2


class UserError(ValueError):
    """An input problem; the message names it and says how to fix it."""


def run_cli(main: Callable[[], None]):
    """Run ``main`` and report input problems as one line without a traceback."""
    try:
        main()
    except (UserError, DatasetError, ArchitectureError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# --------------------------------------------------------------------------- argument types

def _number(kind, predicate, requirement):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a valid {kind.__name__}")
        if not predicate(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {requirement}")
        return value
    parse.__name__ = f"{requirement} {kind.__name__}"
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive")
positive_float = _number(float, lambda v: v > 0, "a positive")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative")
nonnegative_float = _number(float, lambda v: v >= 0, "a non-negative")
probability = _number(float, lambda v: 0 < v < 1, "in the open interval (0, 1)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (usage goes to --help) and exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- checkpoints

def replace_atomic(path: str, write: Callable, binary: bool = False):
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync, then rename it over ``path``.

    A crash leaves either the old file or the new one. The new file gets the
    usual permissions (those of a file created with ``open``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path: str):
    """``torch.save`` through ``replace_atomic``: a crash during a save leaves the old checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomic(path, lambda handle: torch.save(obj, handle), binary=True)
    # make the rename itself durable
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``: nothing in it is ever executed."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found; give the checkpoint.pth.tar written by a train_*.py run")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint '{path}' is empty; it was probably cut short: train again or resume")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "Unpickl" in type(exc).__name__:
            raise UserError(f"checkpoint '{path}' needs unsafe unpickling, which is refused; save only tensors, "
                            "numbers and strings (the published checkpoint format)")
        raise UserError(f"checkpoint '{path}' is truncated or not a PyTorch checkpoint "
                        f"({text.splitlines()[0] if text else type(exc).__name__})")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "arch" not in checkpoint:
        raise UserError(f"checkpoint '{path}' is not a training checkpoint (needs the keys 'arch' and 'state_dict')")
    return checkpoint


def load_base_classifier(path: str, dataset: str, device) -> torch.nn.Module:
    """The base classifier saved in ``path``, checked against ``dataset``, in eval mode."""
    checkpoint = load_checkpoint(path, map_location=device)
    arch = checkpoint["arch"]
    try:
        check_architecture(arch, dataset)
    except ArchitectureError as exc:
        raise UserError(f"checkpoint '{path}': {exc}")
    model = get_architecture(arch, dataset, device)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"checkpoint '{path}' does not match architecture '{arch}' ({first})")
    return model.eval()


# --------------------------------------------------------------------------- torchrun

def select_free_gpu():
    """Let setGPU pick a free GPU (through nvidia-smi), as the published scripts did.

    Only for a single process on a GPU machine whose CUDA_VISIBLE_DEVICES is
    unset, and before CUDA is initialised; a no-op everywhere else.
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ or shutil.which("nvidia-smi") is None:
        return
    try:
        import setGPU  # noqa: F401
    except Exception:  # not installed, or nvidia-smi found no GPU: keep the default device
        pass


class Distributed:
    """The process group set up by ``torchrun`` (world size 1 without it).

    NCCL on GPUs, gloo on CPUs; each process uses GPU ``LOCAL_RANK`` when GPUs exist.
    """

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size == 1:
            select_free_gpu()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, *values: float):
        """The mean of each value over the processes (the values themselves without torchrun)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tuple((tensor / self.world_size).tolist())

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
