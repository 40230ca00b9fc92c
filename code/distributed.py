"""torchrun: the process group, its rank and device (``Distributed``), and the choice of a free GPU."""
import os
import shutil

import torch


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
