"""Checkpoints: written atomically, read without executing anything, checked before use.

``load_checkpoint`` reads with ``weights_only=True`` and checks the published keys (``arch``,
``state_dict``); ``load_base_classifier`` builds the saved architecture for a data set; each
problem is one ``UserError`` line that names the file. ``file_sha256`` identifies a checkpoint in
the settings records.
"""
import functools
import hashlib
import os

import torch

import checkpoint_info
from architectures import ArchitectureError, check_architecture, get_architecture
from common import UserError, replace_atomic


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


def load_checkpoint(path: str, map_location="cpu", dataset: str = None) -> dict:
    """Load a checkpoint dict with ``weights_only=True``: nothing in it is ever executed.

    With ``dataset``, a MACER release (``{'net', 'epoch'}``) reads as the training checkpoint it
    is equivalent to (``checkpoint_info.from_macer``).
    """
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
    if dataset is not None and checkpoint_info.is_macer_release(checkpoint):
        checkpoint = checkpoint_info.from_macer(checkpoint, dataset)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "arch" not in checkpoint:
        raise UserError(f"checkpoint '{path}' is not a training checkpoint (needs the keys 'arch' and 'state_dict')")
    return checkpoint


def load_base_classifier(path: str, dataset: str, device, input_layer: str = None) -> torch.nn.Module:
    """The base classifier saved in ``path``, checked against ``dataset``, in eval mode.

    ``input_layer``: its first layer (``--input-layer``); None: what the checkpoint tells
    (``checkpoint_info.input_layer``).
    """
    checkpoint = load_checkpoint(path, map_location=device, dataset=dataset)
    layer, _ = checkpoint_info.input_layer(checkpoint, path, dataset, input_layer)
    arch = checkpoint["arch"]
    try:
        check_architecture(arch, dataset)
    except ArchitectureError as exc:
        raise UserError(f"checkpoint '{path}': {exc}")
    model = get_architecture(arch, dataset, device, layer)
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
