"""Process-group set-up for ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo).

``beseg train`` run directly is a single process; the same command under
``torchrun --nproc_per_node N`` (or multi-node torchrun) finds ``RANK``/``WORLD_SIZE`` in the
environment and trains with DistributedDataParallel. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"train.device={requested!r} but CUDA is not available on this machine.")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", local_rank)


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Returns:
        A :class:`DistInfo`; ``world_size == 1`` without torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
