"""What an exact resume of a training run needs besides the weights: random states and an arguments check.

The checkpoint stores every random number generator state (Python, NumPy, torch CPU and CUDA, the
data order) of every process, and the arguments. ``--resume`` restores the states, so that on a CPU
with ``--seed`` the final weights equal those of an uninterrupted run, and first compares the
arguments (``check_resume_arguments``): only ``RESUME_FREE_ARGUMENTS`` may differ, unless
``--resume-changed-args`` is given, which is then recorded in the run folder's
``resume_overrides.txt``. The arguments that name files are stored relative to the repository root
(``stored_arguments``) and compared by the file they name.
"""
import os
import random
import time
from typing import List

import numpy as np
import torch

from common import UserError
from distributed import Distributed
from provenance import OVERRIDES_NAME, REPOSITORY, overrides_line, repository_path


# --------------------------------------------------------------------------- random states

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def loader_seed(seed: int) -> int:
    """The seed of the data order's generator: a stream of its own, derived from ``--seed``.

    Seeding it with ``seed`` itself, like the global generator that draws the initial weights,
    would make the first epoch's order come from the very numbers that drew the weights.
    """
    return int(np.random.SeedSequence(int(seed), spawn_key=(1,)).generate_state(1, dtype=np.uint64)[0])


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


# --------------------------------------------------------------------------- resume: same arguments

# Options that do not change what is computed, so a resumed run may change them: the total number of
# epochs (the schedule does not depend on it), where the run folder is and what it is called, the
# console output, and the resume switches themselves. ``workers`` changes which loader worker (and so
# which random stream) crops a given CIFAR image, not the distribution of the crops.
RESUME_FREE_ARGUMENTS = frozenset({"epochs", "workers", "print_freq", "logdir", "id", "resume",
                                   "resume_changed_args"})
# Arguments that name files: stored relative to the repository root, compared by the file they name.
PATH_ARGUMENTS = frozenset({"pretrained_model", "smooth_prediction", "logdir"})
_ABSENT = "<absent>"


def changed_arguments(stored: dict, current: dict, defaults: dict) -> List[str]:
    """``'key: old -> new'`` for each argument outside ``RESUME_FREE_ARGUMENTS`` whose value differs.

    A key the stored arguments lack (an option added after the checkpoint was written) counts as
    stored at its default, i.e. the behaviour the run had; a stored key the current options lack is
    listed (the code no longer knows it).
    """
    changes = []
    for key in sorted(set(stored) | set(current)):
        if key in RESUME_FREE_ARGUMENTS:
            continue
        old = stored.get(key, defaults.get(key, _ABSENT))
        new = current.get(key, _ABSENT)
        if old != new and not (key in PATH_ARGUMENTS and _same_file(old, new)):
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


def _same_file(stored, current) -> bool:
    """Whether a stored path (relative to the repository root, or absolute) names the file ``current`` names."""
    if not (isinstance(stored, str) and isinstance(current, str) and stored and current):
        return False
    return os.path.realpath(os.path.join(REPOSITORY, stored)) == os.path.realpath(current)


def stored_arguments(args) -> dict:
    """The arguments a checkpoint stores: as given, with paths relative to the repository root where inside it."""
    return {key: repository_path(os.path.abspath(value)) if key in PATH_ARGUMENTS and isinstance(value, str) and value
            else value for key, value in vars(args).items()}


def check_resume_arguments(checkpoint: dict, args, defaults: dict, checkpoint_path: str) -> List[str]:
    """Refuse a resume whose arguments differ from the checkpoint's (beyond the free ones).

    Returns the differences that ``--resume-changed-args`` accepted (empty when there are none); a
    checkpoint that stores no arguments (written by the published code) counts as one difference,
    since nothing about it can be checked.
    """
    flag = "--resume-changed-args"
    stored = checkpoint.get("args")
    if not isinstance(stored, dict):
        changes = ["the checkpoint stores no arguments (written by the published code or an older version), "
                   "so they cannot be compared"]
        if not args.resume_changed_args:
            raise UserError(f"checkpoint '{checkpoint_path}' stores no arguments to compare with; add {flag} "
                            "to continue it with the arguments given now")
        return changes
    changes = changed_arguments(stored, vars(args), defaults)
    if changes and not args.resume_changed_args:
        raise UserError(f"--resume with arguments that differ from checkpoint '{checkpoint_path}': "
                        f"{'; '.join(changes)}; give the original arguments, or add {flag} to continue with "
                        "these (recorded in the run folder)")
    return changes


def apply_optimizer_arguments(optimizer: torch.optim.Optimizer, scheduler, args):
    """Make a resumed optimizer use the arguments given now (its loaded state holds the stored ones).

    Only for a resume with ``--resume-changed-args``: the rate of the next epoch becomes
    ``--lr`` times the schedule's factor, and momentum and weight decay those given.
    """
    scheduler.base_lrs = [args.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = args.lr
        group["lr"] = args.lr * factor(scheduler.last_epoch)
        group["momentum"] = args.momentum
        group["weight_decay"] = args.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def record_overrides(folder: str, start_epoch: int, changes: List[str]):
    """Append the accepted differences of a resume to the run folder's ``resume_overrides.txt``."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with open(os.path.join(folder, OVERRIDES_NAME), "a") as handle:
        handle.write(overrides_line(stamp, start_epoch - 1, changes))
