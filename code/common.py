"""What every script shares: clear errors, argument types, safe checkpoints, torchrun.

Bad input raises ``UserError`` (or a ``DatasetError`` / ``ArchitectureError``);
``run_cli`` turns it into one line on stderr and exit status 2, before any
output is written. Ctrl-C ends a script with one line that says how to
continue, and exit status 130.
"""
import argparse
import functools
import gc
import hashlib
import os
import shutil
import sys
import tempfile
from typing import Callable

import torch

from architectures import ArchitectureError, check_architecture, get_architecture
from datasets import DatasetError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for Ctrl-C

#: How to continue an interrupted evaluation script (``run_cli``'s default).
RESUME_EVALUATION = "run the same command again to continue (complete rows are kept)"
#: How to continue an interrupted training run.
RESUME_TRAINING = "run the same command with --resume to continue from the last saved epoch"


class UserError(ValueError):
    """An input problem; the message names it and says how to fix it."""


def run_cli(main: Callable[[], None], resume_hint: str = RESUME_EVALUATION):
    """Run ``main`` and report input problems and Ctrl-C as one line without a traceback.

    Input problems exit with status 2. Ctrl-C exits with status 130 and the
    line ``interrupted: {resume_hint}``; the scripts write every row and
    checkpoint whole (appended and flushed, or replaced atomically), so what
    was written before the interruption stays usable.
    """
    interrupted = False
    try:
        main()
    except (UserError, DatasetError, ArchitectureError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        # Free the interrupted frames first, so that their progress bars close (and print) before the last line.
        gc.collect()
        print(f"\ninterrupted: {resume_hint}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


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


def _looks_like_torch_file(path: str) -> bool:
    """Whether ``path`` starts like a file written by ``torch.save``.

    A zip archive (the format since PyTorch 1.6), a pickle of protocol 2 or
    newer (the legacy format) or a tar archive (the format of PyTorch < 0.4).
    """
    with open(path, "rb") as handle:
        head = handle.read(512)
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80") or head[257:262] == b"ustar"


def check_checkpoint_file(path: str):
    """Raise ``UserError`` unless ``path`` is a non-empty file that starts like a ``torch.save`` file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found; give the checkpoint.pth.tar written by a train_*.py run")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint '{path}' is empty; it was probably cut short: train again or resume")
    if not _looks_like_torch_file(path):
        raise UserError(f"'{path}' is not a PyTorch checkpoint (it is not a file written by torch.save); give the "
                        "checkpoint.pth.tar written by a train_*.py run")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``: nothing in it is ever executed."""
    check_checkpoint_file(path)
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


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's content (hex), read in 1 MiB chunks; remembered while the file is unchanged."""
    stat = os.stat(path)
    return _sha256_of(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:   # size and mtime: the cache key
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
